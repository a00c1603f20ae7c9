"""Resumable, parallel conversion of input rows into webdataset shards.

A converter turns one :class:`~opt.data.convert.rows.Row` into a
:class:`Sample` (members by extension) or raises
:class:`~opt.data.convert.media.Skip`. This module does the rest:

* Shard ``i`` is ``OUT/{prefix}-{i:06d}.tar`` and holds input rows
  ``[i * shard_size, (i + 1) * shard_size)`` (see :mod:`.rows`); a sample's key
  is ``{prefix}_{row:09d}``. Shards are written through
  :class:`~opt.data.shards.ShardWriter` (``.tmp`` then rename), so their bytes
  do not depend on the worker count and a killed run never leaves a
  half-written shard under its final name.
* After its tar, each shard writes ``OUT/records/{prefix}-{i:06d}.json``: the
  rows it skipped (with reasons) and what it kept. A shard is finished when both
  exist; a rerun converts only the others, then builds the summary from all
  records, so it equals the summary of an uninterrupted run.
* ``OUT/{prefix}-convert.json`` holds the run's settings (inputs by name and
  size, shard size, options); a rerun with other settings is refused rather
  than mixing two conversions.
* ``OUT/{prefix}-summary.json``: samples in and out, skips by reason, every
  skipped row, changes made (``narration_cut`` ...) and modality counts.

Workers are forked processes (each with one torch thread, so resampling gives
the same bytes in any process); a tqdm bar counts rows as they are converted.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from opt.data.convert.media import Skip
from opt.data.convert.rows import Row, RowFormat, Segment, plan_shards, read_rows
from opt.data.samples import EXTENSIONS
from opt.data.shards import ShardWriter
from opt.errors import UserError
from opt.files import write_atomic

FORMAT_VERSION = 2  # 2: transcripts cut to the audio present, truncated audio detected
_PREFIX = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass
class Sample:
    members: dict[str, bytes]  # shard extension ("jpg", "txt", "flac", "json") -> bytes
    changes: list[str] = field(default_factory=list)  # counted in the summary, e.g. "narration_cut"


Converter = Callable[[Row], Sample]  # raises Skip when the row gives no sample


@dataclass(frozen=True)
class ShardJob:
    index: int
    path: str  # final shard path
    record: str  # per-shard record path
    prefix: str
    first_row: int
    segments: tuple[Segment, ...]

    @property
    def rows(self) -> int:
        return sum(segment.rows for segment in self.segments)

    def finished(self) -> bool:
        return Path(self.record).is_file() and Path(self.path).is_file()


def convert_to_shards(converter: Converter, *, name: str, inputs: list[str], rows: RowFormat, out: str | Path,
                      prefix: str = "train", shard_size: int = 1000, workers: int = 1, options: dict | None = None,
                      progress: bool = True) -> dict:
    """Convert the rows of ``inputs`` into ``out`` (resuming a previous run) and return the summary."""
    if not _PREFIX.match(prefix):
        raise UserError(f"--prefix must be letters, digits, '_' or '-', got {prefix!r}")
    if shard_size <= 0 or workers <= 0:
        raise UserError("--shard-size and --workers must be positive")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    shards, total = plan_shards(inputs, rows, shard_size)
    settings = {"converter": name, "version": FORMAT_VERSION, "prefix": prefix, "shard_size": shard_size,
                "inputs": [{"name": Path(p).name, "bytes": Path(p).stat().st_size} for p in inputs],
                "rows": total, "options": options or {}}
    _claim(out, settings)
    jobs = [ShardJob(index, str(out / f"{prefix}-{index:06d}.tar"), str(out / "records" / f"{prefix}-{index:06d}.json"),
                     prefix, index * shard_size, tuple(segments)) for index, segments in enumerate(shards)]
    _run(converter, rows, [job for job in jobs if not job.finished()], workers, name, progress)
    summary = _summarize(name, prefix, total, jobs)
    write_atomic(out / f"{prefix}-summary.json", (json.dumps(summary, indent=1) + "\n").encode())
    return summary


def input_file(path: str | Path, option: str) -> Path:
    """An input file that exists; a :class:`UserError` naming ``option`` otherwise."""
    path = Path(path)
    if not os.path.isfile(path):
        raise UserError(f"{option}: no such file: {path}")
    return path


def input_folder(path: str | Path, option: str) -> Path:
    """An input folder that exists; a :class:`UserError` naming ``option`` otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{option}: no such directory: {path}")
    return path


def _claim(out: Path, settings: dict) -> None:
    """Write the run settings, refusing a directory that holds another conversion under this prefix."""
    path = out / f"{settings['prefix']}-convert.json"
    if path.is_file():
        old = json.loads(path.read_text())
        for key, value in settings.items():
            if old.get(key) != value:
                raise UserError(f"{out} already holds a '{settings['prefix']}' conversion with another {key} "
                                f"({old.get(key)} vs {value}); choose another --out or --prefix")
    write_atomic(path, (json.dumps(settings, indent=1) + "\n").encode())


# -- workers -----------------------------------------------------------------------------------------

_converter: Converter | None = None
_rows: RowFormat | None = None
_counter = None  # shared count of converted rows, for the progress bar


def _init_worker(converter: Converter, rows: RowFormat, counter) -> None:
    global _converter, _rows, _counter
    torch.set_num_threads(1)
    _converter, _rows, _counter = converter, rows, counter


def _convert(row: Row) -> Sample:
    if row.fields is None:
        raise Skip("row_invalid", row.problem)
    return _converter(row)


def write_shard(job: ShardJob) -> int:
    """Convert one shard's rows, write the shard, then its record; return the rows done."""
    skipped, changes, modalities, samples = [], Counter(), Counter(), 0
    with ShardWriter(job.path) as shard:
        for row in read_rows(_rows, list(job.segments), job.first_row):
            try:
                sample = _convert(row)
            except Skip as skip:
                skipped.append({"row": row.index, "source": row.source, "reason": skip.reason, "detail": skip.detail})
            else:
                shard.write(f"{job.prefix}_{row.index:09d}", sample.members)
                samples += 1
                changes.update(sample.changes)
                modalities.update(m for m, extensions in EXTENSIONS.items() if set(extensions) & set(sample.members))
            with _counter.get_lock():
                _counter.value += 1
    record = {"shard": Path(job.path).name, "rows": [job.first_row, job.first_row + job.rows], "samples": samples,
              "skipped": skipped, "changes": dict(changes), "modalities": dict(modalities)}
    write_atomic(job.record, (json.dumps(record) + "\n").encode())
    return job.rows


def _run(converter: Converter, rows: RowFormat, todo: list[ShardJob], workers: int, name: str,
         progress: bool) -> None:
    if not todo:
        return
    context = multiprocessing.get_context("fork")
    counter = context.Value("q", 0)
    with tqdm(total=sum(job.rows for job in todo), unit="row", desc=name, disable=not progress) as bar, \
            context.Pool(min(workers, len(todo)), initializer=_init_worker,
                         initargs=(converter, rows, counter)) as pool:
        results = pool.imap_unordered(write_shard, todo)
        for _ in range(len(todo)):
            while True:
                try:
                    results.next(timeout=0.2)
                    break
                except multiprocessing.TimeoutError:
                    bar.update(counter.value - bar.n)
        bar.update(counter.value - bar.n)


# -- summary -----------------------------------------------------------------------------------------

def _summarize(name: str, prefix: str, total: int, jobs: list[ShardJob]) -> dict:
    skipped_rows, changes, modalities, samples = [], Counter(), Counter(), 0
    for job in jobs:
        record = json.loads(Path(job.record).read_text())
        skipped_rows.extend(record["skipped"])
        changes.update(record["changes"])
        modalities.update(record["modalities"])
        samples += record["samples"]
    reasons = Counter(row["reason"] for row in skipped_rows)
    return {
        "converter": name,
        "prefix": prefix,
        "samples_in": total,
        "samples_out": samples,
        "skipped": dict(sorted(reasons.items())),
        "changes": dict(sorted(changes.items())),
        "modalities": {m: modalities.get(m, 0) for m in EXTENSIONS},
        "shards": [Path(job.path).name for job in jobs],
        "skipped_rows": skipped_rows,
    }


def summary_line(summary: dict) -> str:
    """One line for the terminal: rows in, samples out, skips by reason."""
    skipped = ", ".join(f"{reason}: {n}" for reason, n in summary["skipped"].items()) or "none"
    return (f"{summary['converter']}: {summary['samples_in']} rows -> {summary['samples_out']} samples in "
            f"{len(summary['shards'])} shards; skipped {summary['samples_in'] - summary['samples_out']} ({skipped})")
