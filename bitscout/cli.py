"""The ``bitscout`` command line.

The SDK's own commands (``submit``, ``status``, ``wait``, ``cancel``, ``pareto``, ``resolve``,
``download``, ``events``: :mod:`bitscout.commands`) are built in. The SDK imports nothing internal,
so commands that need the search library, the service or the workers (``search``, ``export``,
``serve``, ``dispatcher``, ``token``, ``db``) are found through the entry-point group
``bitscout.commands`` (declared in ``pyproject.toml``): each entry point names a function
``main(argv: list[str]) -> int``. Missing optional dependencies give a one-line hint.

Every command exits with the codes of :mod:`bitscout.exit_codes`: 0 success, 1 a runtime error,
2 bad usage or input, 3 the job failed (``wait``, ``submit --wait``); 130 when interrupted.
"""

from __future__ import annotations

import sys
from importlib.metadata import EntryPoint, entry_points

from bitscout.exit_codes import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, describe


def _builtin_commands() -> dict[str, str]:
    from bitscout.commands import COMMANDS

    return {name: summary for name, (_main, summary) in COMMANDS.items()}


def _plugin_entry_points() -> dict[str, EntryPoint]:
    builtin = _builtin_commands()
    return {ep.name: ep for ep in entry_points(group="bitscout.commands") if ep.name not in builtin}


def _plugin_commands() -> dict[str, str]:
    return {name: ep.value for name, ep in _plugin_entry_points().items()}


def _usage(plugins: dict[str, str]) -> str:
    builtin = _builtin_commands()
    lines = ["usage: bitscout COMMAND [ARGS]...", "", "commands:"]
    for name, summary in builtin.items():
        lines.append(f"  {name:10}  {summary}")
    if plugins:
        lines.append(f"  {', '.join(sorted(plugins))}  (installed with bitscout[search] / bitscout[server])")
    lines += ["", "Run 'bitscout COMMAND --help' for a command's options and an example.", describe()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    plugins = _plugin_commands()
    if not args or args[0] in {"-h", "--help", "help"}:
        print(_usage(plugins))
        return EXIT_OK if args else EXIT_USAGE
    if args[0] in {"-V", "--version"}:
        from bitscout import __version__

        print(f"bitscout {__version__}")
        return EXIT_OK
    name, rest = args[0], args[1:]
    from bitscout.commands import COMMANDS

    if name in COMMANDS:
        func = COMMANDS[name][0]
    else:
        eps = _plugin_entry_points()
        if name not in eps:
            print(f"bitscout: unknown command {name!r}\n{_usage(plugins)}", file=sys.stderr)
            return EXIT_USAGE
        try:
            func = eps[name].load()
        except ImportError as exc:
            print(
                f"bitscout {name}: a dependency is missing ({exc.name or exc}); "
                "install the full tool with: pip install 'bitscout[workers]'",
                file=sys.stderr,
            )
            return EXIT_ERROR
    try:
        return int(func(rest) or 0)
    except KeyboardInterrupt:
        print(f"bitscout {name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
