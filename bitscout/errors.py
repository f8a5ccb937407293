"""Error codes, the error body on the wire, and the exceptions the SDK and the service raise.

One :class:`ErrorCode` enum, mapped to HTTP statuses in one place (:data:`HTTP_STATUS`). Every
error response of the service has the body :class:`ErrorBody` ``{code, message, field, details}``;
``field`` is the dotted path of the offending input (``budget.max_size_mb``, ``methods.1``) when
one input is to blame. :func:`error_from_body` turns such a response back into the matching typed
exception, so a client sees ``NotFound`` / ``InvalidRequest`` / ... and never parses JSON itself.

Example::

    >>> err = error_from_body(404, {"code": "not_found", "message": "no job abc"})
    >>> type(err).__name__, err.code.value, err.status
    ('NotFound', 'not_found', 404)
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "HTTP_STATUS",
    "BitscoutError",
    "Conflict",
    "ErrorBody",
    "ErrorCode",
    "Forbidden",
    "InternalError",
    "InvalidRequest",
    "JobFailed",
    "NotFound",
    "PayloadTooLarge",
    "RateLimited",
    "ServiceUnavailable",
    "Unauthorized",
    "error_class",
    "error_from_body",
]


class ErrorCode(StrEnum):
    """Why a request or a job failed. The value is what travels on the wire."""

    invalid_request = "invalid_request"
    """The request is malformed or a value is out of range; ``field`` names the input."""
    not_found = "not_found"
    """No such job, point, upload or artifact (or it belongs to another user)."""
    unauthorized = "unauthorized"
    """No bearer token, or an unknown or revoked one."""
    forbidden = "forbidden"
    """The token is valid but may not do this (e.g. an admin-only action)."""
    conflict = "conflict"
    """The resource is in a state that does not allow this (e.g. cancel a finished job)."""
    payload_too_large = "payload_too_large"
    """An upload or a request body is over the configured limit."""
    rate_limited = "rate_limited"
    """Too many submissions or uploads; retry after ``details.retry_after_s`` seconds."""
    unavailable = "unavailable"
    """The service cannot answer now (database down, schema out of date, no resolver)."""
    model_load_failed = "model_load_failed"
    """A job's model could not be loaded or has nothing this tool can search."""
    data_invalid = "data_invalid"
    """A job's data are missing, malformed, lack the named fields or have too few rows."""
    budget_infeasible = "budget_infeasible"
    """No precision map meets the budget; ``details.smallest`` holds what would."""
    out_of_memory = "out_of_memory"
    """A job ran out of memory."""
    canceled = "canceled"
    """A job was canceled at the user's request."""
    internal = "internal"
    """A bug or an unexpected failure; the message says no more than that."""


#: The one mapping from error code to HTTP status.
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.invalid_request: 422,
    ErrorCode.not_found: 404,
    ErrorCode.unauthorized: 401,
    ErrorCode.forbidden: 403,
    ErrorCode.conflict: 409,
    ErrorCode.payload_too_large: 413,
    ErrorCode.rate_limited: 429,
    ErrorCode.unavailable: 503,
    ErrorCode.model_load_failed: 422,
    ErrorCode.data_invalid: 422,
    ErrorCode.budget_infeasible: 422,
    ErrorCode.out_of_memory: 500,
    ErrorCode.canceled: 409,
    ErrorCode.internal: 500,
}


class ErrorBody(BaseModel):
    """The JSON body of every error response."""

    model_config = ConfigDict(extra="ignore")

    code: ErrorCode = Field(description="Machine-readable error code.")
    message: str = Field(max_length=4000, description="A sentence a person can act on.")
    field: str | None = Field(
        default=None,
        max_length=500,
        description="Dotted path of the offending input (e.g. 'budget.max_size_mb'), when one input is to blame.",
    )
    details: dict[str, Any] | None = Field(
        default=None, description="Extra machine-readable facts (e.g. 'retry_after_s', 'smallest', 'errors')."
    )


class BitscoutError(Exception):
    """Base class of every error the SDK raises for a service answer, and the service raises on purpose.

    ``code`` is an :class:`ErrorCode`, ``status`` the HTTP status (from :data:`HTTP_STATUS` unless
    given), ``field`` the dotted path of the offending input, ``details`` extra facts.
    """

    default_code: ErrorCode = ErrorCode.internal

    def __init__(
        self,
        code: ErrorCode | str,
        message: str,
        field: str | None = None,
        details: dict[str, Any] | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code: ErrorCode = _coerce_code(code, status)
        self.message = message
        self.field = field
        self.details = details
        self.status: int = int(status) if status is not None else HTTP_STATUS[self.code]

    def __str__(self) -> str:
        """The message, led by the field it names (once: a message that already starts with its
        field is shown as it is)."""
        if not self.field or self.message.startswith(f"{self.field}:") or self.message.startswith(f"{self.field} "):
            return self.message
        return f"{self.field}: {self.message}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code.value!r}, message={self.message!r}, field={self.field!r})"
        )

    def to_body(self) -> ErrorBody:
        """The wire form of this error."""
        return ErrorBody(code=self.code, message=self.message, field=self.field, details=self.details)


class _CodedError(BitscoutError):
    """A :class:`BitscoutError` whose code defaults to the class's ``default_code``."""

    def __init__(
        self,
        message: str = "",
        *,
        field: str | None = None,
        details: dict[str, Any] | None = None,
        code: ErrorCode | str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(
            code if code is not None else self.default_code,
            message or self.default_code.value.replace("_", " "),
            field,
            details,
            status,
        )


class InvalidRequest(_CodedError):
    """The request is malformed or out of range (``field`` names the input). Also used for the
    job-level codes ``model_load_failed``, ``data_invalid`` and ``budget_infeasible`` when a request
    (e.g. resolve) fails for those reasons; ``code`` tells which."""

    default_code = ErrorCode.invalid_request


class NotFound(_CodedError):
    """No such resource, or it belongs to another user."""

    default_code = ErrorCode.not_found


class Unauthorized(_CodedError):
    """Missing, unknown or revoked token."""

    default_code = ErrorCode.unauthorized


class Forbidden(_CodedError):
    """The token may not do this."""

    default_code = ErrorCode.forbidden


class Conflict(_CodedError):
    """The resource's state does not allow the action."""

    default_code = ErrorCode.conflict


class PayloadTooLarge(_CodedError):
    """The body or upload is over the limit."""

    default_code = ErrorCode.payload_too_large


class RateLimited(_CodedError):
    """Too many requests; ``retry_after`` seconds (from ``details.retry_after_s``) until the next try."""

    default_code = ErrorCode.rate_limited

    @property
    def retry_after(self) -> float | None:
        value = (self.details or {}).get("retry_after_s")
        return float(value) if isinstance(value, int | float) else None


class ServiceUnavailable(_CodedError):
    """The service cannot answer now; a client may retry later."""

    default_code = ErrorCode.unavailable


class InternalError(_CodedError):
    """An unexpected failure on the server."""

    default_code = ErrorCode.internal


class JobFailed(BitscoutError):
    """A job ended without a result: ``code`` and ``message`` are the job's error (``canceled`` when
    it was canceled), ``job_id`` names it."""

    default_code = ErrorCode.internal

    def __init__(
        self,
        message: str,
        *,
        job_id: str | None = None,
        code: ErrorCode | str = ErrorCode.internal,
        field: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(code, message, field, details)
        self.job_id = job_id

    def __str__(self) -> str:
        prefix = f"job {self.job_id} " if self.job_id else "job "
        return f"{prefix}failed ({self.code.value}): {self.message}"


_CLASS_BY_CODE: dict[ErrorCode, type[BitscoutError]] = {
    ErrorCode.invalid_request: InvalidRequest,
    ErrorCode.model_load_failed: InvalidRequest,
    ErrorCode.data_invalid: InvalidRequest,
    ErrorCode.budget_infeasible: InvalidRequest,
    ErrorCode.not_found: NotFound,
    ErrorCode.unauthorized: Unauthorized,
    ErrorCode.forbidden: Forbidden,
    ErrorCode.conflict: Conflict,
    ErrorCode.canceled: Conflict,
    ErrorCode.payload_too_large: PayloadTooLarge,
    ErrorCode.rate_limited: RateLimited,
    ErrorCode.unavailable: ServiceUnavailable,
    ErrorCode.out_of_memory: InternalError,
    ErrorCode.internal: InternalError,
}

_CODE_BY_STATUS: dict[int, ErrorCode] = {
    400: ErrorCode.invalid_request,
    401: ErrorCode.unauthorized,
    403: ErrorCode.forbidden,
    404: ErrorCode.not_found,
    405: ErrorCode.invalid_request,
    409: ErrorCode.conflict,
    413: ErrorCode.payload_too_large,
    415: ErrorCode.invalid_request,
    422: ErrorCode.invalid_request,
    429: ErrorCode.rate_limited,
    502: ErrorCode.unavailable,
    503: ErrorCode.unavailable,
    504: ErrorCode.unavailable,
}


def _coerce_code(code: ErrorCode | str, status: int | None) -> ErrorCode:
    if isinstance(code, ErrorCode):
        return code
    try:
        return ErrorCode(code)
    except ValueError:
        return _code_for_status(status)


def _code_for_status(status: int | None) -> ErrorCode:
    if status is None:
        return ErrorCode.internal
    if status in _CODE_BY_STATUS:
        return _CODE_BY_STATUS[status]
    return ErrorCode.invalid_request if 400 <= status < 500 else ErrorCode.internal


def error_class(code: ErrorCode | str) -> type[BitscoutError]:
    """The exception class the SDK raises for ``code`` (``BitscoutError`` for unknown codes)."""
    try:
        return _CLASS_BY_CODE[ErrorCode(code)]
    except ValueError:
        return BitscoutError


def error_from_body(status: int, body: Any) -> BitscoutError:
    """Turn an error response (HTTP ``status`` and decoded JSON ``body``) into the typed exception.

    Tolerates bodies that are not an :class:`ErrorBody` (a proxy's page, FastAPI's ``{"detail"}``):
    the code then follows the status.
    """
    code: ErrorCode
    message: str
    field: str | None = None
    details: dict[str, Any] | None = None
    if isinstance(body, dict) and isinstance(body.get("code"), str):
        code = _coerce_code(body["code"], status)
        message = str(body.get("message") or code.value)
        raw_field = body.get("field")
        field = raw_field if isinstance(raw_field, str) else None
        raw_details = body.get("details")
        details = raw_details if isinstance(raw_details, dict) else None
    else:
        code = _code_for_status(status)
        if isinstance(body, dict) and "detail" in body:
            message = str(body["detail"])
        elif isinstance(body, str) and body.strip():
            message = body.strip()[:500]
        else:
            message = f"HTTP {status}"
    cls = _CLASS_BY_CODE.get(code, BitscoutError)
    if cls is BitscoutError or cls is JobFailed:
        return BitscoutError(code, message, field, details, status)
    coded: type[_CodedError] = cls  # type: ignore[assignment]
    return coded(message, field=field, details=details, code=code, status=status)
