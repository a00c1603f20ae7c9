"""Atomic file writes: the bytes go to ``PATH.tmp``, which is renamed to ``PATH``,
so no reader ever sees a half-written file under its final name."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | Path, payload: bytes) -> Path:
    """Write ``payload`` to ``path`` atomically (parent directories are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)
    return path
