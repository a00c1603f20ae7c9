"""Checkpoints of a run: ``RUN/checkpoints/step-00001000/``, saved, listed, loaded and
fallen back from, in one place.

A checkpoint is written into ``.tmp-step-...`` by every process (DeepSpeed's part:
model, optimizer, scheduler, loss scale; plus the trainer's client state) and
renamed when complete, so a directory under its final name is always whole. The
newest ``keep`` are kept. Resuming tries the newest first and falls back to older
ones with a warning when one cannot be read or restored.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

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


class CheckpointStore:
    """Saves and restores a run's checkpoints through a backend with ``save(directory,
    client_state)``, ``load(directory) -> client_state``, ``barrier()`` and ``rank``
    (:class:`~opt.engine.deepspeed_backend.DeepSpeedBackend`)."""

    def __init__(self, run: str | Path, backend: Any, *, keep: int) -> None:
        self.run = Path(run)
        self.backend = backend
        self.keep = keep

    def save(self, step: int, client_state: dict) -> Path:
        """Every process writes its part of checkpoint ``step``; returns its final directory."""
        temporary = temporary_path(self.run, step)
        main = self.backend.rank == 0
        if main:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
        self.backend.barrier()
        self.backend.save(temporary, client_state)
        self.backend.barrier()
        final = checkpoint_root(self.run) / checkpoint_name(step)
        if main:
            final = finalize(self.run, step, self.keep)
        self.backend.barrier()
        return final

    def load(self, directory: str | Path, restore: Callable[[dict], None]) -> None:
        """Load ``directory`` into the backend and hand its client state to ``restore``."""
        restore(self.backend.load(Path(directory)))

    def resume_newest(self, restore: Callable[[dict], None]) -> Path | None:
        """Load the newest checkpoint that can be read and restored; older ones are the
        fallback. Returns its directory, or None when there is none."""
        for directory in list_checkpoints(self.run):
            try:
                self.load(directory, restore)
            except Exception as error:  # an unreadable checkpoint: fall back to the previous one
                tqdm.write(f"warning: checkpoint {directory} is unreadable ({type(error).__name__}: {error}); "
                           "trying the previous one")
                continue
            return directory
        return None
