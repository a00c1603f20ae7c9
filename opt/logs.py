"""Messages for the person running a command: one logger, ``opt``, writing to stderr
through ``tqdm.write`` (so progress bars stay whole), from the first process of a
distributed run only, unless a message concerns one process (``every_rank=True``,
which then names the rank).

    from opt.logs import info, warn
    warn("checkpoint X cannot be used; trying the previous one")
"""

from __future__ import annotations

import logging
import os
import sys

from tqdm import tqdm


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class _ProgressSafeStderr(logging.Handler):
    """Writes through ``tqdm.write`` to whatever ``sys.stderr`` is at the time."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


class _FirstRankOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "every_rank", False) or _rank() == 0


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = "warning: " if record.levelno >= logging.WARNING else ""
        where = f"[rank {_rank()}] " if getattr(record, "every_rank", False) else ""
        return f"{where}{prefix}{record.getMessage()}"


logger = logging.getLogger("opt")
if not logger.handlers:
    _handler = _ProgressSafeStderr()
    _handler.setFormatter(_Format())
    _handler.addFilter(_FirstRankOnly())
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def info(message: str, *, every_rank: bool = False) -> None:
    """A line of progress or a summary."""
    logger.info(message, extra={"every_rank": every_rank})


def warn(message: str, *, every_rank: bool = False) -> None:
    """Something skipped or worked around; the run goes on."""
    logger.warning(message, extra={"every_rank": every_rank})
