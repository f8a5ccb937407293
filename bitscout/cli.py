"""The ``bitscout`` command line.

The SDK imports nothing internal, so commands that need the search library, the service or the
workers (``search``, ``export``, ``serve``, ``dispatcher``, ``token``, ``db``) are found through the
entry-point group ``bitscout.commands`` (declared in ``pyproject.toml``): each entry point names a
function ``main(argv: list[str]) -> int``. Missing optional dependencies give a one-line hint.

Exit codes: 0 success, 1 a failed job, 2 bad usage.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _plugin_commands() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group="bitscout.commands")}


def _usage(commands: dict[str, str]) -> str:
    names = ", ".join(sorted(commands))
    return f"usage: bitscout COMMAND [ARGS]...\ncommands: {names}\nRun 'bitscout COMMAND --help' for a command's options."


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    commands = _plugin_commands()
    if not args or args[0] in {"-h", "--help", "help"}:
        print(_usage(commands))
        return EXIT_OK if args else EXIT_USAGE
    name, rest = args[0], args[1:]
    eps = {ep.name: ep for ep in entry_points(group="bitscout.commands")}
    if name not in eps:
        print(f"bitscout: unknown command {name!r}\n{_usage(commands)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        func = eps[name].load()
    except ImportError as exc:
        print(
            f"bitscout {name}: a dependency is missing ({exc.name or exc}); "
            "install the full tool with: pip install 'bitscout[workers]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        return int(func(rest) or 0)
    except KeyboardInterrupt:
        print(f"bitscout {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
