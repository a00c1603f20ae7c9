"""AudioCaps and Clotho caption CSVs -> one audio-text sample per caption.

The layout is told by the CSV header:

* **Clotho** (``file_name,caption_1,...,caption_5``): one row per clip, the
  clip is ``file_name`` in the audio folder; every ``caption_N`` column is one
  caption (``caption_index`` N - 1). Group: ``"<prefix>:<file_name>"``.
* **AudioCaps** (``audiocap_id,youtube_id,start_time,caption``): one row per
  caption; the rows of one clip (same ``youtube_id`` and ``start_time``) share
  a group, ``"<prefix>:<youtube_id>_<start_time>"``, and are numbered in file
  order. AudioCaps ships no audio; the clip's file is the first that exists of
  ``<youtube_id>_<start_time>``, ``<youtube_id>``, ``Y<youtube_id>`` and
  ``<audiocap_id>``, each with ``.wav``, ``.flac`` or ``.ogg`` (the names
  left by aac-datasets, by per-video downloaders, by AudioSet tools and by
  per-caption downloaders).

Each sample (see :mod:`.captions`) holds the audio as 16 kHz 16-bit FLAC
(resampled from any rate), the caption, and metadata (``group``,
``caption_index``, the CSV columns other than the captions, the input row,
durations, ``"source": "audio-captions"``). ``max_audio_seconds`` > 0 keeps
the first that many seconds of a longer clip (``audio_cut``). Skips: a CSV row
with the wrong number of fields or an empty name (``row_invalid``, once per
row), ``caption_empty``, the audio skips of :mod:`.media` once per caption, and
a clip cut short (``audio_truncated``: a caption speaks of the whole clip).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from opt.data.convert.captions import CaptionConverter, Media, caption_row, convert_captions, skipped_row
from opt.data.convert.common import input_file, input_folder
from opt.data.convert.media import SAMPLE_RATE, Skip, encode_flac, inside, read_speech
from opt.errors import UserError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
AUDIOCAPS_COLUMNS = ("youtube_id", "start_time", "caption")


@dataclass(kw_only=True)
class AudioCaptions(CaptionConverter):
    """Converter of one Clotho or AudioCaps caption row (see the module docstring)."""

    audio: Path
    max_audio_seconds: float = 0.0
    source = "audio-captions"

    def locate(self, row: dict) -> Path:
        if isinstance(row["media"], str):  # Clotho: the file name
            return inside(self.audio, row["media"])
        names = row["media"]["stems"]  # AudioCaps: the candidate names, without a suffix
        for name in names:
            for suffix in AUDIO_SUFFIXES:
                path = inside(self.audio, name + suffix)
                if os.path.isfile(path):  # False, not an error, for a name too long for the file system
                    return path
        raise Skip("audio_missing", f"{names[0]}{AUDIO_SUFFIXES[0]} (or {', '.join(names[1:])} with "
                                    f"{', '.join(AUDIO_SUFFIXES)})")

    def read(self, path: Path) -> Media:
        speech = read_speech(path)
        if speech.truncated:
            raise Skip("audio_truncated", f"{path.name}: {speech.seconds:.1f} s of a clip cut short")
        wave, changes = speech.wave, []
        if self.max_audio_seconds > 0 and len(wave) > self.max_audio_seconds * SAMPLE_RATE:
            wave, changes = wave[:round(self.max_audio_seconds * SAMPLE_RATE)], ["audio_cut"]
        meta = {"audio_seconds": round(len(wave) / SAMPLE_RATE, 3), "original_audio_seconds": round(speech.seconds, 3)}
        return {"flac": encode_flac(wave)}, meta, changes


def _records(path: Path) -> Iterator[tuple[int, list[str] | None]]:
    """``(first line, values)`` of every non-blank CSV row, the header included; values
    None for a row the csv module cannot read."""
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as file:
        reader = csv.reader(file)
        line = 1
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error:
                yield line, None
            else:
                if any(value.strip() for value in values):
                    yield line, [value.strip() for value in values]
            line = reader.line_num + 1


def audio_caption_rows(path: Path) -> tuple[str, Iterator[dict]]:
    """The layout (``clotho`` or ``audiocaps``) and caption rows of a caption CSV."""
    records = _records(path)
    _, header = next(records, (1, []))
    header = header or []
    if "file_name" in header and "caption_1" in header:
        return "clotho", _clotho_rows(path.name, header, records)
    if all(column in header for column in AUDIOCAPS_COLUMNS):
        return "audiocaps", _audiocaps_rows(path.name, header, records)
    raise UserError(f"--csv: {path.name} has neither the Clotho header (file_name,caption_1,...) nor the "
                    f"AudioCaps one (audiocap_id,youtube_id,start_time,caption); found: {','.join(header)}")


def _clotho_rows(name: str, header: list[str], records: Iterator[tuple[int, list[str] | None]]) -> Iterator[dict]:
    captions = sorted((column for column in header if column.removeprefix("caption_").isdigit()),
                      key=lambda column: int(column.removeprefix("caption_")))
    for line, values in records:
        origin = f"{name}:{line}"
        if values is None or len(values) != len(header) or not dict(zip(header, values))["file_name"]:
            yield skipped_row("row_invalid", "malformed CSV, a wrong number of fields or no file_name", origin)
            continue
        row = dict(zip(header, values))
        fields = {column: value for column, value in row.items() if column not in captions}
        for column in captions:
            yield caption_row(group=row["file_name"], media=row["file_name"], caption=row[column],
                              caption_index=int(column.removeprefix("caption_")) - 1, origin=origin, fields=fields)


def _audiocaps_rows(name: str, header: list[str],
                    records: Iterator[tuple[int, list[str] | None]]) -> Iterator[dict]:
    clips: dict[str, list[tuple[str, dict]]] = {}  # clip -> its rows, clips in order of first appearance
    unusable = []
    for line, values in records:
        origin = f"{name}:{line}"
        row = dict(zip(header, values or []))
        if values is None or len(values) != len(header) or not row["youtube_id"] or not _is_start(row["start_time"]):
            unusable.append(skipped_row("row_invalid", "malformed CSV, a wrong number of fields, no youtube_id or "
                                        "no start_time", origin))
            continue
        clips.setdefault(f"{row['youtube_id']}_{row['start_time']}", []).append((origin, row))
    for clip, rows in clips.items():
        for caption_index, (origin, row) in enumerate(rows):
            stems = [clip, row["youtube_id"], "Y" + row["youtube_id"]] + [row["audiocap_id"]] * bool(
                row.get("audiocap_id"))
            fields = {column: value for column, value in row.items() if column != "caption"}
            yield caption_row(group=clip, media={"stems": stems}, caption=row["caption"],
                              caption_index=caption_index, origin=origin, fields=fields)
    yield from unusable


def _is_start(text: str) -> bool:
    try:
        return math.isfinite(float(text)) and float(text) >= 0
    except ValueError:
        return False


def convert_audio_captions(csv_file: str | Path, *, audio: str | Path, out: str | Path, prefix: str = "train",
                           shard_size: int = 1000, workers: int = 1, max_audio_seconds: float = 0.0,
                           progress: bool = True) -> dict:
    """Convert an AudioCaps or Clotho caption CSV into ``out``, one sample per caption; returns
    the summary (see :mod:`opt.data.convert.common`)."""
    if not max_audio_seconds >= 0:  # also refuses nan
        raise UserError(f"--max-audio-seconds must be >= 0, got {max_audio_seconds}")
    csv_file = input_file(csv_file, "--csv")
    converter = AudioCaptions(prefix=prefix, audio=input_folder(audio, "--audio"), max_audio_seconds=max_audio_seconds)
    layout, rows = audio_caption_rows(csv_file)
    return convert_captions(converter, rows, name="audio-captions", source=csv_file, out=out, prefix=prefix,
                            shard_size=shard_size, workers=workers,
                            options={"layout": layout, "max_audio_seconds": max_audio_seconds,
                                     "sample_rate": SAMPLE_RATE}, progress=progress)
