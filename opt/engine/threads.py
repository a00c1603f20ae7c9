"""Torch's CPU threads sized to the cores other processes leave free.

A training step on the CPU splits each operation across torch's intra-op threads, which meet
at a barrier after every one. When another process holds one of the cores, one of the step's
threads waits there for a time slice while the other spins: on 2 cores the tiny training step
fell to 0.30 of its idle samples/s beside a plain busy loop and to 0.21 beside a copy of itself
(a fair share is 0.50), and to 2.5 samples/s (from ~150) in a demo run beside three other jobs
(docs/journal/2026-12-06-contention.md). Sleeping instead of spinning (``OMP_WAIT_POLICY=PASSIVE``)
kept 0.87 under contention but cost the idle step 21%, paid on every small operation.

So the thread count follows the machine instead: every half second (or every step, when steps
take longer), :class:`ThreadGovernor` reads how much CPU time the whole machine spent
(``/proc/stat``) and how much of it was this process's own, and runs as many threads as there
are cores left over by the others (at least one, at most the count torch started with, which
``OMP_NUM_THREADS`` sets). With one thread there is no barrier to wait at; on an idle machine
nothing changes. The step's own loader workers are other processes too: while they decode, the
step leaves them their cores.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

STAT = Path("/proc/stat")
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_busy_seconds(stat: Path = STAT) -> float | None:
    """CPU seconds every core has spent busy since boot (all but idle and iowait), or None where
    ``/proc/stat`` does not exist."""
    try:
        fields = stat.read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(value) for value in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return (sum(values) - values[3] - values[4]) / TICKS


class ThreadGovernor:
    """Sets ``torch.set_num_threads`` from the cores the rest of the machine leaves free;
    :meth:`update` is cheap and meant to be called once per step."""

    def __init__(self, *, interval: float = 0.5, maximum: int | None = None) -> None:
        self.interval = interval
        self.maximum = maximum or torch.get_num_threads()
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.enabled = self.maximum > 1 and machine_busy_seconds() is not None
        self.threads = self.maximum
        self._mark = self._sample()
        self._last_call = self._mark[0]
        self._typical_gap: float | None = None  # between calls: a step's duration, averaged

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        return time.monotonic(), machine_busy_seconds() or 0.0, time.process_time()

    def others(self, previous: tuple[float, float, float], now: tuple[float, float, float]) -> float:
        """Cores the other processes kept busy between two samples."""
        wall = max(now[0] - previous[0], 1e-9)
        return max(0.0, (now[1] - previous[1]) - (now[2] - previous[2])) / wall

    def choose(self, others: float) -> int:
        """Threads for a machine whose other processes keep ``others`` cores busy: the cores left,
        rounded to the nearest whole core (a process using a quarter of a core takes none)."""
        return max(1, min(self.maximum, round(self.cores - others)))

    def update(self) -> int:
        """Re-decide when ``interval`` seconds have passed since the last decision; returns the thread count."""
        if not self.enabled:
            return self.threads
        now = self._sample()
        gap, typical, self._last_call = now[0] - self._last_call, self._typical_gap, now[0]
        self._typical_gap = gap if typical is None else 0.8 * typical + 0.2 * gap
        if typical is not None and gap > 4 * typical + self.interval:
            # the process paused between steps (validation, a checkpoint): what the machine did
            # then says nothing about the steps to come; a fresh window starts here
            self._mark = now
            return self.threads
        if now[0] - self._mark[0] < self.interval:
            return self.threads
        previous, self._mark = self._mark, now
        threads = self.choose(self.others(previous, now))
        if threads != self.threads:
            torch.set_num_threads(threads)
            self.threads = threads
        return threads


_GOVERNOR: ThreadGovernor | None = None


def adapt_threads() -> int:
    """The process's :class:`ThreadGovernor`, created on first use, updated; returns the thread count."""
    global _GOVERNOR
    if _GOVERNOR is None:
        _GOVERNOR = ThreadGovernor()
    return _GOVERNOR.update()


def fix_threads(count: int) -> None:
    """Stop adapting: ``count`` threads from now on (benchmarks that compare against fixed threads)."""
    global _GOVERNOR
    torch.set_num_threads(count)
    _GOVERNOR = ThreadGovernor(maximum=count)
    _GOVERNOR.enabled = False
