"""Shard locations and atomic shard writing.

Every ``--data`` option accepts a directory of ``.tar`` shards, a glob
(``'DIR/test-*.tar'``) or a brace pattern (``DIR/train-{000000..000009}.tar``).
Shards are written under a temporary name and renamed into place when complete,
so a killed writer never leaves a half-written shard under its final name.
"""

from __future__ import annotations

import glob
import io
import os
import tarfile
from pathlib import Path

import braceexpand

from opt.errors import UserError


def resolve_shards(spec: str | Path) -> list[str]:
    """Expand a shard spec into a sorted list of existing ``.tar`` paths.

    Raises :class:`UserError` if nothing matches or a named shard is missing.
    """
    spec = str(spec)
    if os.path.isdir(spec):
        paths = sorted(glob.glob(os.path.join(spec, "*.tar")))
    elif "{" in spec:
        paths = list(braceexpand.braceexpand(spec))
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise UserError(f"shard not found: {missing[0]} (from {spec}; {len(missing)} missing)")
    elif glob.has_magic(spec):
        paths = sorted(glob.glob(spec))
    elif os.path.isfile(spec):
        paths = [spec]
    else:
        raise UserError(f"no such shard, directory or pattern: {spec}")
    if not paths:
        raise UserError(f"no shards match {spec}")
    return paths


class ShardWriter:
    """Write one webdataset shard atomically: members go to ``PATH.tmp``,
    which is renamed to ``PATH`` on a clean close and removed on an error.

    Member metadata (mtime, owner, mode) is fixed, so the same samples give
    byte-identical shards.

        with ShardWriter("out/train-000000.tar") as shard:
            shard.write("train_0000001", {"png": png_bytes, "txt": b"a red circle"})
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._file = None
        self._tar = None
        self.count = 0

    def __enter__(self) -> "ShardWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        return self

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Add one sample: ``members`` maps extensions (``"png"``) to bytes."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        for extension, payload in members.items():
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size = len(payload)
            info.mtime = 0
            info.mode = 0o444
            info.uname = info.gname = "opt"
            self._tar.addfile(info, io.BytesIO(payload))
        self.count += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if exc_type is None:
            os.replace(self._tmp, self.path)
        else:
            self._tmp.unlink(missing_ok=True)
