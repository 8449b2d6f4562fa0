"""The "qcowfs" logger, with the standard logging module loaded by its first line.

`import logging` costs some 4 ms, a tenth of a one-shot command such as
`qcowfs info` (docs/speed.md, start-up), and the engine logs only what is
unusual: a damaged image, a failed flush, a bitmap it cannot use. So the
engine and the modules a command loads log through `log` here, and a command
that has nothing to say never loads logging: a warning or an error loads it;
a debug or info line is dropped while nothing has loaded it, as nothing can
have set a level that shows it (unconfigured, logging shows warnings and
errors alone). The daemon's modules, which configure logging (cli/mount.py)
and load it anyway, take the logger itself (`logger()`). Records carry the
caller's place, not this module's (stacklevel).
"""
from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import logging

NAME = "qcowfs"


@functools.cache
def logger() -> logging.Logger:
    """The logger itself (loads logging): for the daemon's modules, which
    configure logging and use all of it."""
    import logging

    return logging.getLogger(NAME)


def _configured() -> bool:
    """Whether anything has loaded logging, so could have set a level that
    shows debug and info lines: unconfigured, logging shows warnings and
    errors alone (its last-resort handler, on stderr)."""
    return "logging" in sys.modules


# A one-shot command's warnings and errors (level, message), while it holds
# them (hold): it says them when it ends well, and when it fails its one
# error line is all it says. None: they go to logging.
_held: list[tuple[str, str]] | None = None


def hold() -> list[tuple[str, str]]:
    """Keep warnings and errors from now on in the list returned, instead of
    logging them (which would print them bare on stderr, before the error a
    command then fails with: two lines for one failure)."""
    global _held
    _held = []
    return _held


class _Log:
    """logging.getLogger(NAME)'s calls that qcowfs makes."""

    def debug(self, msg: str, *args: object) -> None:
        if _configured():
            logger().debug(msg, *args, stacklevel=2)

    def info(self, msg: str, *args: object) -> None:
        if _configured():
            logger().info(msg, *args, stacklevel=2)

    def warning(self, msg: str, *args: object) -> None:
        if _held is not None:
            _held.append(("warning", msg % args if args else msg))
            return
        logger().warning(msg, *args, stacklevel=2)

    def error(self, msg: str, *args: object) -> None:
        if _held is not None:
            _held.append(("error", msg % args if args else msg))
            return
        logger().error(msg, *args, stacklevel=2)

    def exception(self, msg: str, *args: object) -> None:
        logger().exception(msg, *args, stacklevel=2)


log = _Log()
