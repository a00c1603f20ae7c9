"""Caption benchmarks (one image or clip, several captions) -> one sample per caption.

COCO captions, Flickr30k, AudioCaps and Clotho give each image or clip several
reference captions. The shards hold **one sample per caption**: the medium
(repeated), that caption, and ``.json`` metadata whose ``group`` is
``"<prefix>:<image or clip id>"``, shared by every caption of that medium. So
pretraining sees each caption once with its medium, and evaluation reads the
groups: a retrieval query is found when any sample of its group is ranked, and a
generated caption is scored against all references of its group.

A converter first expands its input (a COCO JSON, a CSV) in the main process into
caption rows, one JSON line per caption, written to a temporary
``SOURCE.captions.jsonl``: the captions of one medium are consecutive (so a
worker reads and verifies a medium once, see :class:`CaptionConverter`), and an
input row that gives no caption (malformed, an unknown image id) is one row that
names its skip reason. Those lines are the rows of
:func:`~opt.data.convert.common.convert_to_shards`, which does the rest:
parallel and resumable shards, every skipped caption counted by reason
(``row`` in a skip is the caption line, its ``detail`` starts with the input
location). The run settings name the source file by name and size, so a rerun
with another source into the same output is refused.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from opt.data.convert.common import Sample, convert_to_shards
from opt.data.convert.media import Skip, encode_text
from opt.data.convert.rows import JsonLines, Row

Media = tuple[dict[str, bytes], dict, list[str]]  # shard members, metadata, changes ("audio_cut" ...)


def caption_row(*, group: str, media: str | dict, caption: object, caption_index: int, origin: str,
                fields: dict) -> dict:
    """One caption of a medium: ``media`` names its file (for the converter's ``locate``),
    ``fields`` go into the sample metadata."""
    return {"group": group, "media": media, "caption": caption, "caption_index": caption_index, "origin": origin,
            "fields": fields}


def skipped_row(reason: str, detail: str, origin: str) -> dict:
    """An input row that gives no caption, counted under ``reason``."""
    return {"skip": reason, "detail": detail, "origin": origin}


@dataclass(kw_only=True)
class CaptionConverter:
    """Converter of one caption row; a subclass says where a medium's file is and how it is read.

    The last medium read (or the :class:`Skip` it raised) is kept, so the captions of
    one image or clip decode it once; a worker's output does not depend on it.
    """

    prefix: str
    _last: tuple[Path, Media | Skip] | None = field(default=None, init=False, repr=False)

    source = ""  # the metadata's "source"

    def locate(self, row: dict) -> Path:
        """The file of the row's medium; :class:`Skip` when there is none."""
        raise NotImplementedError

    def read(self, path: Path) -> Media:
        """The verified medium; :class:`Skip` when it cannot be used."""
        raise NotImplementedError

    def __call__(self, row: Row) -> Sample:
        fields = row.fields
        if "skip" in fields:
            raise Skip(fields["skip"], f"{fields['origin']}: {fields['detail']}")
        caption = fields["caption"].strip() if isinstance(fields["caption"], str) else ""
        if not caption:
            raise Skip("caption_empty", fields["origin"])
        text = encode_text(caption)
        members, media_meta, changes = self._medium(self.locate(fields))
        meta = {"group": f"{self.prefix}:{fields['group']}", **fields["fields"],
                "caption_index": fields["caption_index"], "source": self.source, "row": fields["origin"], **media_meta}
        return Sample({**members, "txt": text, "json": json.dumps(meta, sort_keys=True).encode("utf-8")}, changes)

    def _medium(self, path: Path) -> Media:
        if self._last is None or self._last[0] != path:
            try:
                self._last = (path, self.read(path))
            except Skip as skip:
                self._last = (path, skip)
        medium = self._last[1]
        if isinstance(medium, Skip):
            raise Skip(medium.reason, medium.detail)
        return medium


def write_rows(path: Path, rows: Iterable[dict]) -> None:
    """One JSON line per row."""
    with open(path, "w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row, sort_keys=True) + "\n")


def convert_captions(converter: Callable[[Row], Sample], rows: Iterable[dict], *, name: str, source: str | Path,
                     out: str | Path, prefix: str, shard_size: int, workers: int, options: dict,
                     progress: bool) -> dict:
    """Expand ``rows`` (from the input file ``source``) into caption lines and convert them into
    ``out``; returns the summary (see :mod:`opt.data.convert.common`)."""
    source = Path(source)
    options = {**options, "source": {"name": source.name, "bytes": source.stat().st_size}}
    with tempfile.TemporaryDirectory(prefix="opt-captions-") as folder:
        expanded = Path(folder) / f"{source.name}.captions.jsonl"
        write_rows(expanded, rows)
        return convert_to_shards(converter, name=name, inputs=[str(expanded)], rows=JsonLines(), out=out,
                                 prefix=prefix, shard_size=shard_size, workers=workers, options=options,
                                 progress=progress)
