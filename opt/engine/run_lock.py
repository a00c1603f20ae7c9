"""One trainer per run directory, and signals that stop training cleanly.

:class:`RunLock` holds an exclusive ``flock`` on ``RUN/.lock`` while a process
trains there (the lock file names its holder); a second ``opt train`` on the same
run directory is refused with one line instead of interleaving checkpoints and
logs. The kernel drops the lock when the holder exits, however it exits. (On a
network filesystem without ``flock`` support the lock may not hold.)

:class:`StopSignals` turns SIGTERM (what schedulers and ``kill`` send) and SIGINT
(Ctrl-C) into a request the training loop honours after the current step: it
saves a checkpoint and exits. A second signal ends the process at once.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import threading
from pathlib import Path
from types import FrameType

from opt.errors import UserError


class RunLock:
    """An exclusive lock on a run directory, held until :meth:`release` or process exit."""

    def __init__(self, run: str | Path) -> None:
        self.path = Path(run) / ".lock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "another process"
            self.handle.close()
            raise UserError(f"run directory {self.path.parent} is in use by {holder}; "
                            "wait for it to finish or choose another --run-dir") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        self.handle.flush()

    def release(self) -> None:
        if not self.handle.closed:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()


SIGNAL_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal's number, as shells report


class StopSignals:
    """Within ``with StopSignals() as stop:``, SIGTERM and SIGINT set ``stop.received``;
    a second one restores the default action and delivers itself (the process ends)."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self.previous: dict[signal.Signals, object] = {}

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.received is not None:  # the second signal: stop now
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)
            return
        self.received = signal.Signals(number)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for number in SIGNAL_EXIT_CODES:
                self.previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
