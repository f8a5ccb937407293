"""What the server's logs never hold: bearer tokens.

The web page takes a token only from the address's fragment (``/#token=...``), which browsers
never send, so no request line carries one. A client that still puts a token in the query string
(``/?token=...``, ``&access_token=...``) sends it to the server anyway: :class:`RedactTokens`, a
filter on uvicorn's access logger (``uvicorn.access``), replaces such a value by ``[redacted]``
before the line is written, whatever handler or format the logger has.
:func:`install_access_log_redaction` adds it once per process (``create_app`` calls it).
"""

from __future__ import annotations

import logging
import re

__all__ = ["ACCESS_LOGGER", "RedactTokens", "install_access_log_redaction", "redact"]

#: The logger uvicorn writes its access lines to.
ACCESS_LOGGER = "uvicorn.access"

_TOKEN_PARAM = re.compile(r"(?i)([?&;](?:access_)?token=)[^&;#\s\"]*")


def redact(text: str) -> str:
    """``text`` with the value of every ``token=`` / ``access_token=`` query parameter replaced."""
    return _TOKEN_PARAM.sub(r"\1[redacted]", text)


class RedactTokens(logging.Filter):
    """Rewrites a log record's message and string arguments so no token value in a query string
    survives (the record is always kept)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "token=" in record.msg.lower():
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: redact(v) if isinstance(v, str) else v for k, v in record.args.items()}
        return True


def install_access_log_redaction() -> None:
    """Add :class:`RedactTokens` to uvicorn's access logger (once; the logger's later configuration
    by uvicorn keeps its filters)."""
    logger = logging.getLogger(ACCESS_LOGGER)
    if not any(isinstance(f, RedactTokens) for f in logger.filters):
        logger.addFilter(RedactTokens())
