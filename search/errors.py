"""Errors raised by the search library.

Every error names what is wrong (``field``) and carries its :class:`bitscout.errors.ErrorCode`
(``code``, the enum's value), so the runner ends a job with that code and a CLI can print one
readable line. The search library never maps errors to HTTP itself.
"""

from __future__ import annotations

from bitscout.errors import ErrorCode


class SearchError(Exception):
    """Base class of every error the search library raises on purpose."""

    code: str = ErrorCode.internal.value

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:  # pragma: no cover - trivial
        return f"{self.field}: {self.message}" if self.field else self.message


class InvalidInputError(SearchError, ValueError):
    """A parameter, option or specification is malformed (bad bit-width, empty selection...)."""

    code: str = ErrorCode.invalid_request.value


class ModelLoadError(SearchError):
    """The model could not be loaded (not a transformers model, missing files, bad config)."""

    code: str = ErrorCode.model_load_failed.value


class UnsupportedModelError(SearchError):
    """The model loaded but has no structure this library can search (no linear layers...)."""

    code: str = ErrorCode.model_load_failed.value


class DataError(SearchError, ValueError):
    """The data file is missing, malformed, lacks the named fields or has too few rows."""

    code: str = ErrorCode.data_invalid.value


class InfeasibleBudgetError(SearchError):
    """No precision map meets the budget.

    ``smallest`` holds the smallest achievable value of the budget named by ``field``
    (in the budget's own unit), so the message can tell the user what would work.
    """

    code: str = ErrorCode.budget_infeasible.value

    def __init__(self, message: str, *, field: str | None = None, smallest: float | None = None) -> None:
        super().__init__(message, field=field)
        self.smallest = smallest


class CanceledError(SearchError):
    """The caller's ``should_stop`` callback asked the search to stop."""

    code: str = ErrorCode.canceled.value
