"""The thread governor: torch's CPU threads sized to the cores other processes leave free."""

from __future__ import annotations

import torch

from opt.engine import threads
from opt.engine.threads import ThreadGovernor, machine_busy_seconds


def test_machine_busy_seconds_counts_everything_but_idle_and_iowait(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  1000 50 200 5000 300 10 20 5 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
    assert machine_busy_seconds(stat) == (1000 + 50 + 200 + 10 + 20 + 5) / threads.TICKS
    assert machine_busy_seconds(tmp_path / "absent") is None


def test_threads_follow_the_cores_the_other_processes_leave():
    governor = ThreadGovernor(maximum=2)
    governor.cores = 2
    assert [governor.choose(others) for others in (0.0, 0.2, 0.6, 1.0, 1.4, 2.0, 3.5)] == [2, 2, 1, 1, 1, 1, 1]
    governor.cores, governor.maximum = 8, 6  # never above what torch started with
    assert governor.choose(0.0) == 6 and governor.choose(3.0) == 5
    # others = machine busy time minus this process's own, per second of wall time
    assert governor.others((0.0, 10.0, 4.0), (2.0, 13.0, 5.0)) == 1.0
    assert governor.others((0.0, 10.0, 4.0), (1.0, 10.5, 4.9)) == 0.0  # never negative (clock granularity)


def test_the_governor_sets_torch_threads_and_skips_stale_windows(monkeypatch):
    started = torch.get_num_threads()
    samples = iter([(0.0, 0.0, 0.0), (1.0, 2.0, 1.0), (2.0, 3.0, 2.0), (20.0, 21.0, 3.0), (21.0, 23.0, 4.0)])
    monkeypatch.setattr(ThreadGovernor, "_sample", staticmethod(lambda: next(samples)))
    try:
        governor = ThreadGovernor(maximum=2)
        governor.cores, governor.enabled = 2, True
        assert governor.update() == 1 and torch.get_num_threads() == 1  # another process kept a core busy
        assert governor.update() == 2 and torch.get_num_threads() == 2  # it left
        assert governor.update() == 2  # 18 s since the last step (paused): no decision on that window
        assert governor.update() == 1  # a fresh window: busy again
    finally:
        torch.set_num_threads(started)


def test_steps_longer_than_the_interval_are_not_taken_for_pauses(monkeypatch):
    """Beside a competitor, a step with a thread too many can take seconds: every window then spans
    a step, and the governor still decides on it (it once skipped them all as stale)."""
    started = torch.get_num_threads()
    # a step every 4 s; from t=4 another process keeps one core busy
    samples = iter([(0.0, 0.0, 0.0), (4.0, 6.0, 6.0), (8.0, 14.0, 10.0), (12.0, 22.0, 14.0)])
    monkeypatch.setattr(ThreadGovernor, "_sample", staticmethod(lambda: next(samples)))
    try:
        governor = ThreadGovernor(maximum=2)
        governor.cores, governor.enabled = 2, True
        assert governor.update() == 2  # the machine busy only with this process (1.5 cores)
        assert governor.update() == 1  # others held a core for the whole 4 s step
        assert governor.update() == 1
    finally:
        torch.set_num_threads(started)
