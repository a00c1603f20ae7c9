"""A generic manifest of ``{image, text, audio}`` rows -> shards.

The manifest is JSON Lines (``.jsonl``, ``.ndjson``: one object per line) or
CSV (``.csv`` with a header naming ``image``, ``text`` and ``audio``). ``image``
and ``audio`` are paths relative to ``root`` (default: the manifest's folder),
``text`` is the caption itself. Any of the three may be empty or absent: the
sample then lacks that modality (a row with none is skipped as ``row_empty``).
A path that is given but cannot be used (missing, corrupt, escaping ``root``)
skips the row, counted by reason, rather than silently dropping a modality.
A recording cut short is one (``audio_truncated``): with no timing, nothing
says which part of the text the audio present still speaks.
Other columns are kept in the sample's ``.json`` metadata under ``fields``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from opt.data.convert.common import Sample, convert_to_shards
from opt.data.convert.media import SAMPLE_RATE, Skip, encode_flac, encode_text, inside, read_image, read_speech
from opt.data.convert.rows import MANIFEST_COLUMNS, CsvRows, JsonLines, Row
from opt.errors import UserError

FORMATS = {".jsonl": JsonLines, ".ndjson": JsonLines, ".csv": CsvRows}


@dataclass(frozen=True)
class Manifest:
    """Converter of one manifest row (see the module docstring)."""

    root: Path

    def __call__(self, row: Row) -> Sample:
        values = {}
        for column in MANIFEST_COLUMNS:
            value = row.fields.get(column)
            if value is not None and not isinstance(value, str):
                raise Skip("row_invalid", f"{column} is not a string")
            values[column] = (value or "").strip()
        if not any(values.values()):
            raise Skip("row_empty")
        members: dict[str, bytes] = {}
        meta: dict = {"source": "manifest", "row": row.source}
        if values["image"]:
            extension, members[extension], image_meta = read_image(inside(self.root, values["image"]))
            meta |= {"image": values["image"], **image_meta}
        if values["text"]:
            members["txt"] = encode_text(values["text"])
        if values["audio"]:
            speech = read_speech(inside(self.root, values["audio"]))
            if speech.truncated:
                raise Skip("audio_truncated", f"{values['audio']}: {speech.seconds:.1f} s of a recording cut short")
            members["flac"] = encode_flac(speech.wave)
            meta |= {"audio": values["audio"], "audio_seconds": round(len(speech.wave) / SAMPLE_RATE, 3)}
        extra = {key: value for key, value in row.fields.items() if key not in MANIFEST_COLUMNS}
        if extra:
            meta["fields"] = extra
        members["json"] = json.dumps(meta, sort_keys=True).encode("utf-8")
        return Sample(members)


def convert_manifest(manifest: str | Path, *, out: str | Path, root: str | Path | None = None,
                     prefix: str = "train", shard_size: int = 1000, workers: int = 1, progress: bool = True) -> dict:
    """Convert a manifest into ``out``; returns the summary (see :mod:`opt.data.convert.common`)."""
    manifest = Path(manifest)
    rows = FORMATS.get(manifest.suffix.lower())
    if rows is None:
        raise UserError(f"--manifest must be .jsonl, .ndjson or .csv, got {manifest.name}")
    root = Path(root) if root is not None else manifest.parent
    if not root.is_dir():
        raise UserError(f"--root: no such directory: {root}")
    return convert_to_shards(Manifest(root), name="manifest", inputs=[str(manifest)], rows=rows(), out=out,
                             prefix=prefix, shard_size=shard_size, workers=workers,
                             options={"sample_rate": SAMPLE_RATE}, progress=progress)
