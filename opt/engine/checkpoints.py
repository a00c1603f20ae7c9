"""Checkpoint directories of a run: ``RUN/checkpoints/step-00001000/``.

A checkpoint is written into ``.tmp-step-...`` and renamed when complete, so a
directory under its final name is always whole. The newest ``keep`` are kept.
Loading tries the newest first and falls back to older ones with a warning.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

PATTERN = re.compile(r"^step-(\d{8})$")


def checkpoint_root(run: str | Path) -> Path:
    return Path(run) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(run: str | Path) -> list[Path]:
    """Complete checkpoints of ``run``, newest first."""
    root = checkpoint_root(run)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(PATTERN.match(p.name).group(1)), reverse=True)


def temporary_path(run: str | Path, step: int) -> Path:
    return checkpoint_root(run) / f".tmp-{checkpoint_name(step)}"


def finalize(run: str | Path, step: int, keep: int) -> Path:
    """Rename the temporary checkpoint of ``step`` into place and prune old ones."""
    final = checkpoint_root(run) / checkpoint_name(step)
    if final.exists():
        shutil.rmtree(final)
    temporary_path(run, step).rename(final)
    for old in list_checkpoints(run)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final
