"""The package's output: everything it prints goes through the ``easgd_mpi`` logger.

Modules log to ``logging.getLogger(__name__)`` (children of ``easgd_mpi``): progress lines and
notes at INFO, warnings at WARNING, a rank's one-line error at ERROR; each message is the whole
line as the command line prints it ("easgd: ..."). A user's script configures or silences them
like any library's (``logging.getLogger("easgd_mpi").setLevel(logging.WARNING)``). Where
nothing is configured, :func:`console_if_unconfigured` gives the command line's console:
INFO to stdout, WARNING and above to stderr, one write per line (the launcher forwards several
ranks' output through one stream, and separate writes of a line and its newline interleave).
"""

from __future__ import annotations

import logging
import sys

__all__ = ["LOGGER_NAME", "console", "console_if_unconfigured"]

LOGGER_NAME = "easgd_mpi"


class _ConsoleHandler(logging.Handler):
    """INFO lines to stdout, WARNING and above to stderr, each in one write and flushed.

    The streams are looked up at each line (not bound once), so a redirected ``sys.stdout``
    (pytest's capture, a notebook) gets the lines. ``notes_to_stderr``: every line to stderr
    (a command whose stdout is its result: ``easgd inspect --json``)."""

    def __init__(self, notes_to_stderr: bool = False):
        super().__init__()
        self.notes_to_stderr = notes_to_stderr

    def emit(self, record: logging.LogRecord) -> None:
        to_stderr = self.notes_to_stderr or record.levelno >= logging.WARNING
        stream = sys.stderr if to_stderr else sys.stdout
        if stream is None:  # closed pipe: nothing more can be written
            return
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()
        except BrokenPipeError:
            sys.stdout = None if stream is sys.stdout else sys.stdout
        except Exception:  # noqa: BLE001 - logging must never take a rank down
            self.handleError(record)


def console(quiet: bool = False, notes_to_stderr: bool = False) -> logging.Logger:
    """Print the package's lines as ``easgd train`` does (``quiet``: warnings and errors only;
    ``notes_to_stderr``: every line on stderr, for commands whose stdout is their result).

    Idempotent; the logger stops propagating, so a root handler added later does not print
    every line twice."""
    logger = logging.getLogger(LOGGER_NAME)
    mine = [h for h in logger.handlers if isinstance(h, _ConsoleHandler)]
    if mine:
        mine[0].notes_to_stderr = notes_to_stderr
    else:
        handler = _ConsoleHandler(notes_to_stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    return logger


def console_if_unconfigured() -> None:
    """:func:`console`, unless the user's script configured logging (a handler on the root
    logger or on ``easgd_mpi``, or a level set on ``easgd_mpi``): then theirs applies."""
    logger = logging.getLogger(LOGGER_NAME)
    if logger.handlers or logging.getLogger().handlers or logger.level != logging.NOTSET:
        return
    console()
