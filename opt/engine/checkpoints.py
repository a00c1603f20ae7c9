"""Checkpoints of a run: ``RUN/checkpoints/step-00001000/``, saved, listed, loaded and
fallen back from, in one place.

A checkpoint is written into ``.tmp-step-...`` by every process (DeepSpeed's part:
model, optimizer, scheduler, loss scale; plus the trainer's client state) and
renamed when complete, so a directory under its final name is always whole. The
newest ``keep`` are kept. Resuming tries the newest first and falls back to older
ones with a warning when one cannot be read or restored; such a checkpoint is
moved to ``checkpoints/corrupt/`` so that it never again outranks a new one. A
save that fails (a full disk, the folder removed under it) is reported in one
line, its temporary directory removed and the previous checkpoints left intact.
"""

from __future__ import annotations

import errno
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from opt.errors import UserError
from opt.logs import warn

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


def move_aside(directory: Path) -> Path:
    """Move an unusable checkpoint to ``checkpoints/corrupt/`` (kept for inspection, never loaded)."""
    corrupt = directory.parent / "corrupt"
    corrupt.mkdir(exist_ok=True)
    target, suffix = corrupt / directory.name, 1
    while target.exists():
        target, suffix = corrupt / f"{directory.name}.{suffix}", suffix + 1
    directory.rename(target)
    return target


def describe(error: BaseException) -> str:
    """``Type: first line of the message``, for one-line warnings."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"


def _disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or one it came from) is the filesystem running out of space."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "unexpected pos" in str(error) or "No space left" in str(error):  # torch.save's zip writer
            return True
        error = error.__cause__ or error.__context__
    return False


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
            temporary.mkdir(parents=True)  # recreates checkpoints/ if it was removed
        self.backend.barrier()
        try:
            self.backend.save(temporary, client_state)
            if not temporary.is_dir():
                raise FileNotFoundError(errno.ENOENT, "removed during the save", str(temporary))
        except Exception as error:
            shutil.rmtree(temporary, ignore_errors=True)
            newest = next(iter(list_checkpoints(self.run)), None)
            kept = f"the newest complete checkpoint is {newest}" if newest else "no earlier checkpoint exists"
            if _disk_full(error):
                raise UserError(f"disk full while saving checkpoint step {step} in {checkpoint_root(self.run)}; "
                                f"{kept}") from None
            if isinstance(error, FileNotFoundError):
                raise UserError(f"checkpoint folder {temporary} disappeared while step {step} was being saved; "
                                f"{kept}") from None
            raise
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
                failure = None
            except Exception as error:  # an unreadable checkpoint: fall back to the previous one
                failure = error
            if not self.backend.any_rank(failure is not None):
                return directory
            if self.backend.rank == 0:
                reason = describe(failure) if failure else "unreadable on another rank"
                moved = move_aside(directory)
                warn(f"checkpoint {directory} cannot be used ({reason}); moved to {moved}, "
                           "trying the previous one")
            self.backend.barrier()
        return None
