"""Where a client finds the service and its token: arguments, environment, config file.

Precedence, for the URL and the token each: the argument given to the client, then the
environment (``BITSCOUT_URL``, ``BITSCOUT_TOKEN``), then the config file that ``bitscout serve``
writes (``$BITSCOUT_CONFIG``, else ``$XDG_CONFIG_HOME/bitscout/config.json``, else
``~/.config/bitscout/config.json``; JSON ``{"url": ..., "token": ...}``), then the default URL
``http://127.0.0.1:8000`` and no token.

The config file's token is only used for the config file's URL: a client pointed at another
server (by argument or environment) never sends it the local admin token.

Example::

    >>> cfg = resolve_config(url="http://example.org:8000/", token="bst_x", config_path="/nonexistent")
    >>> cfg.url, cfg.token, cfg.token_source
    ('http://example.org:8000', 'bst_x', 'argument')
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEFAULT_URL", "ClientConfig", "default_config_path", "read_config_file", "resolve_config"]

#: Where a local ``bitscout serve`` listens by default.
DEFAULT_URL = "http://127.0.0.1:8000"
ENV_URL = "BITSCOUT_URL"
ENV_TOKEN = "BITSCOUT_TOKEN"  # noqa: S105 - the name of a variable, not a secret
ENV_CONFIG = "BITSCOUT_CONFIG"


def default_config_path() -> Path:
    """The client config file: ``$BITSCOUT_CONFIG`` or ``$XDG_CONFIG_HOME/bitscout/config.json``
    (``~/.config/bitscout/config.json``). The same rule as the server's ``bitscout serve``."""
    explicit = os.environ.get(ENV_CONFIG)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "bitscout" / "config.json"


def read_config_file(path: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """The ``url`` and ``token`` strings of the config file ({} when missing or unreadable)."""
    p = Path(path) if path is not None else default_config_path()
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if k in ("url", "token") and isinstance(v, str) and v}


def _norm_url(url: str) -> str:
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


@dataclass(frozen=True)
class ClientConfig:
    """The resolved connection settings; ``*_source`` says where each came from
    (``argument``, ``environment``, ``config file`` or ``default``)."""

    url: str
    token: str | None
    url_source: str
    token_source: str | None
    config_path: Path


def resolve_config(
    url: str | None = None,
    token: str | None = None,
    *,
    config_path: str | os.PathLike[str] | None = None,
) -> ClientConfig:
    """Resolve the service URL and token (see the module docstring for the precedence)."""
    path = Path(config_path) if config_path is not None else default_config_path()
    file_cfg = read_config_file(path)
    file_url = _norm_url(file_cfg["url"]) if "url" in file_cfg else None

    if url:
        final_url, url_source = _norm_url(url), "argument"
    elif os.environ.get(ENV_URL):
        final_url, url_source = _norm_url(os.environ[ENV_URL]), "environment"
    elif file_url:
        final_url, url_source = file_url, "config file"
    else:
        final_url, url_source = DEFAULT_URL, "default"

    final_token: str | None
    token_source: str | None
    if token:
        final_token, token_source = token, "argument"
    elif os.environ.get(ENV_TOKEN):
        final_token, token_source = os.environ[ENV_TOKEN], "environment"
    elif "token" in file_cfg and (file_url is None or file_url == final_url):
        final_token, token_source = file_cfg["token"], "config file"
    else:
        final_token, token_source = None, None
    return ClientConfig(final_url, final_token, url_source, token_source, path)
