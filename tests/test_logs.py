"""User messages: stderr, the first process only unless a message concerns one process."""

from __future__ import annotations

from opt.logs import info, warn


def test_messages_go_to_stderr_from_the_first_rank_only(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    warn("checkpoint A cannot be used")
    info("resumed from B")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "warning: checkpoint A cannot be used\nresumed from B\n"
    monkeypatch.setenv("RANK", "1")
    warn("said by every rank")
    warn("step 3: non-finite loss", every_rank=True)
    assert capsys.readouterr().err == "[rank 1] warning: step 3: non-finite loss\n"
