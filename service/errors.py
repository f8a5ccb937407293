"""How the service answers a failure: every error response has the body :class:`~bitscout.errors.ErrorBody`.

:func:`install_error_handlers` puts one handler on the app for each kind of failure:

* a :class:`~bitscout.errors.BitscoutError` (what the store and the routes raise) answers its own
  status and body; ``rate_limited`` adds ``Retry-After``, 401 adds ``WWW-Authenticate: Bearer``;
* a request that fails validation answers 422 ``invalid_request`` with ``field`` set to the
  dotted path of the first offending input (``budget.max_size_mb``, ``limit``), or ``body`` when
  the body as a whole is wrong (not JSON, not an object, missing), and every problem in
  ``details.errors``;
* the framework's own HTTP errors (unknown path, wrong method, a body it cannot parse) map to the
  matching code; its 400 (a body it cannot parse: not UTF-8, a broken multipart) becomes 422,
  the one status of ``invalid_request``, with ``field`` ``body``;
* a database that cannot be reached answers 503 ``unavailable``; any other exception 500
  ``internal``.

No stack trace and no exception text of an unexpected error ever reaches a client: the server
log has them. :data:`ERROR_RESPONSES` and :func:`responses` document these bodies in OpenAPI;
:func:`send_error` writes one from raw ASGI middleware.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

from bitscout.errors import (
    HTTP_STATUS,
    BitscoutError,
    ErrorBody,
    ErrorCode,
    InvalidRequest,
    ServiceUnavailable,
)

log = logging.getLogger("bitscout.service")

__all__ = ["ERROR_RESPONSES", "error_response", "install_error_handlers", "responses", "send_error"]


def error_response(err: BitscoutError) -> JSONResponse:
    """The JSON response of ``err``, with ``Retry-After`` / ``WWW-Authenticate`` where they apply."""
    headers: dict[str, str] = {}
    if err.code is ErrorCode.rate_limited:
        retry = (err.details or {}).get("retry_after_s")
        if isinstance(retry, int | float):
            headers["Retry-After"] = str(max(1, math.ceil(retry)))
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    body = err.to_body().model_dump(mode="json")
    return JSONResponse(body, status_code=err.status, headers=headers)


async def send_error(send: Send, err: BitscoutError) -> None:
    """Answer ``err`` through a raw ASGI ``send`` (for middleware that runs before routing)."""
    body = err.to_body().model_dump_json().encode()
    await send(
        {
            "type": "http.response.start",
            "status": err.status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _loc_to_field(loc: tuple[Any, ...] | list[Any]) -> str | None:
    parts = [str(p) for p in loc]
    source = parts[0] if parts and parts[0] in ("body", "query", "path", "header", "cookie", "form") else None
    if source is not None:
        parts = parts[1:]
    # Drop pydantic's union / validator tags such as "function-after[...]" or "literal['x']".
    parts = [p for p in parts if not any(c in p for c in "[(")]
    if not parts and source == "body":
        return "body"  # the body as a whole (not an object, missing)
    return ".".join(parts) or None


#: Messages for problems with the body as a whole (pydantic's type -> what to say).
_WHOLE_BODY: dict[str, str] = {
    "missing": "the request has no body: send a JSON object",
    "model_attributes_type": "the body must be a JSON object",
    "dict_type": "the body must be a JSON object",
    "model_type": "the body must be a JSON object",
}


def validation_error(exc: RequestValidationError, content_type: str | None = None) -> BitscoutError:
    """The ``invalid_request`` error of a failed request validation (``field``: the first problem;
    ``body`` when the body as a whole is wrong: not JSON, not an object, missing). ``content_type``
    (the request's) lets the message say when a body was not sent as JSON."""
    errors = list(exc.errors())
    items = []
    for e in errors[:20]:
        msg = str(e.get("msg", "invalid value"))
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        field = _loc_to_field(e.get("loc", ()))
        kind = str(e.get("type", ""))
        if field == "body" and list(e.get("loc", ())) == ["body"] and kind in _WHOLE_BODY:
            msg = _WHOLE_BODY[kind]
            media = (content_type or "").split(";")[0].strip().lower()
            if kind != "missing" and media and media != "application/json" and not media.endswith("+json"):
                msg += f", sent with Content-Type: application/json (not {media[:64]})"
        items.append({"field": field, "message": msg, "type": kind})
    first = items[0] if items else {"field": "body", "message": "invalid request"}
    if first.get("type") == "json_invalid":
        first = {**first, "field": "body", "message": "the body is not valid JSON"}
    message = str(first["message"])
    if first["field"] and first["field"] != "body":
        message = f"{first['field']}: {message}"
    if len(items) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return InvalidRequest(message, field=first["field"], details={"errors": items})


def _unparsable_body(exc: StarletteHTTPException) -> str:
    """What to say about a body the framework could not parse (its 400), from the cause."""
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return "the body is not valid UTF-8 text"
    if cause is not None and type(cause).__name__ == "MultiPartException":
        return f"the multipart body cannot be parsed: {cause}"
    return "the body cannot be parsed"


_STATUS_CODES: dict[int, ErrorCode] = {
    400: ErrorCode.invalid_request,
    401: ErrorCode.unauthorized,
    403: ErrorCode.forbidden,
    404: ErrorCode.not_found,
    405: ErrorCode.invalid_request,
    406: ErrorCode.invalid_request,
    409: ErrorCode.conflict,
    413: ErrorCode.payload_too_large,
    415: ErrorCode.invalid_request,
    429: ErrorCode.rate_limited,
    503: ErrorCode.unavailable,
}


def install_error_handlers(app: FastAPI) -> None:
    """Put the service's exception handlers on ``app`` (see the module docstring)."""

    @app.exception_handler(BitscoutError)
    async def _bitscout_error(_request: Request, exc: BitscoutError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc, request.headers.get("content-type")))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(
            exc.status_code, ErrorCode.invalid_request if exc.status_code < 500 else ErrorCode.internal
        )
        message = str(exc.detail) if exc.detail else code.value
        field = None
        if exc.status_code == 404:
            message = "no such resource"
        elif exc.status_code == 405:
            message = "method not allowed on this resource"
        elif exc.status_code == 400:
            # The framework refused the body itself (not UTF-8, multipart without a boundary).
            field, message = "body", _unparsable_body(exc)
        # Every invalid request answers 422 (the one status of invalid_request).
        status = HTTP_STATUS[ErrorCode.invalid_request] if exc.status_code == 400 else exc.status_code
        resp = error_response(BitscoutError(code, message, field=field, status=status))
        if exc.headers:
            resp.headers.update(exc.headers)
        return resp

    @app.exception_handler(DBAPIError)
    async def _database(request: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated or isinstance(exc, OperationalError):
            log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc.orig)
            return error_response(ServiceUnavailable("the database is unavailable; try again shortly"))
        log.exception("database error on %s %s", request.method, request.url.path)
        return error_response(
            BitscoutError(ErrorCode.internal, "internal error; the server log has the details")
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(
            BitscoutError(ErrorCode.internal, "internal error; the server log has the details")
        )


#: The error responses every API operation documents.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing, unknown or revoked token."},
    404: {"model": ErrorBody, "description": "No such resource (or another user's)."},
    422: {"model": ErrorBody, "description": "Invalid request; `field` names the input."},
}


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """:data:`ERROR_RESPONSES` plus the statuses ``codes`` (409, 413, 429, 503) for OpenAPI."""
    out = dict(ERROR_RESPONSES)
    descriptions = {
        409: "The resource's state does not allow this.",
        413: "Too large.",
        429: "Rate limited; see Retry-After.",
        503: "Unavailable.",
    }
    for c in codes:
        out[c] = {"model": ErrorBody, "description": descriptions.get(c, "Error.")}
    return out
