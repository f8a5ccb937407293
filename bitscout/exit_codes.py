"""The exit codes of every ``bitscout`` command, defined once (standard library only, so that every
package may import it).

====  ==================  ===========================================================================
code  name                when
====  ==================  ===========================================================================
0     ``EXIT_OK``         the command did what was asked
1     ``EXIT_ERROR``      a runtime error: the service is unreachable or failed (5xx), a rate limit,
                          a database or cluster that cannot be used, a wait that timed out, a bug
2     ``EXIT_USAGE``      bad usage or bad input: an unknown flag, a value out of range, a file or a
                          model that cannot be used, a request the service refused as invalid (4xx)
3     ``EXIT_JOB_FAILED``  ``wait`` / ``submit --wait``: the job ended failed or canceled
====  ==================  ===========================================================================

An interrupted command (Ctrl-C) exits 130, as shells expect.
"""

from __future__ import annotations

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_JOB_FAILED", "EXIT_OK", "EXIT_USAGE", "describe"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_JOB_FAILED = 3
EXIT_INTERRUPTED = 130


def describe() -> str:
    """One line naming every exit code, for the epilog of a command's ``--help``."""
    return (
        f"exit codes: {EXIT_OK} success, {EXIT_ERROR} a runtime or service error, "
        f"{EXIT_USAGE} bad usage or input, {EXIT_JOB_FAILED} the job failed or was canceled"
    )
