"""Input rows of a conversion: JSON Lines or CSV files, planned into shards.

A conversion numbers the rows of its input files in order (blank lines are not
rows; a UTF-8 byte order mark is ignored), and shard ``i`` holds rows
``[i * shard_size, (i + 1) * shard_size)`` whatever happens to them, so a
shard's content depends only on the input and never on the worker count or on
which rows were skipped. Planning scans the files once and keeps only the byte
offset where each shard's rows begin; a worker seeks there and reads its own
rows, so no process holds a whole (multi-gigabyte) annotation file in memory.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from opt.errors import UserError

MANIFEST_COLUMNS = ("image", "text", "audio")


@dataclass(frozen=True)
class Segment:
    """A run of consecutive rows of one file."""

    path: str
    offset: int  # byte offset of the first row
    line: int  # 1-based line number of the first row
    rows: int


@dataclass(frozen=True)
class Row:
    index: int  # position among all rows of the conversion's input files
    source: str  # "FILE_NAME:LINE", for reports
    fields: dict | None  # the parsed row, or None when it could not be parsed
    problem: str = ""  # why it could not be parsed


class _Lines:
    """Iterate the text lines of a binary file from an offset, tracking the byte
    offset and line number of the next line (so a csv reader's position is known)."""

    def __init__(self, file: BinaryIO, offset: int, line: int) -> None:
        file.seek(offset)
        self.file, self.offset, self.line = file, offset, line

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        raw = self.file.readline()
        if not raw:
            raise StopIteration
        text = raw.decode("utf-8", errors="replace")
        if self.offset == 0:
            text = text.removeprefix("\ufeff")  # the byte order mark spreadsheet programs write
        self.offset += len(raw)
        self.line += 1
        return text


def _open(path: str) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as error:
        raise UserError(f"cannot read input file {path}: {error.strerror or error}") from None


class JsonLines:
    """One JSON object per non-blank line."""

    def starts(self, path: str) -> Iterator[tuple[int, int]]:
        """``(byte offset, line number)`` of every row."""
        offset = 0
        with _open(path) as file:
            for number, raw in enumerate(file, start=1):
                if raw.strip():
                    yield offset, number
                offset += len(raw)

    def read(self, segment: Segment) -> Iterator[tuple[int, dict | None, str]]:
        """``(line, fields, problem)`` for the segment's rows."""
        with _open(segment.path) as file:
            file.seek(segment.offset)
            number, done = segment.line, 0
            for raw in file:
                if done == segment.rows:
                    break
                if raw.strip():
                    done += 1
                    yield number, *_parse_json(raw)
                number += 1


def _parse_json(raw: bytes) -> tuple[dict | None, str]:
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as error:
        return None, f"invalid JSON ({type(error).__name__})"
    if not isinstance(value, dict):
        return None, f"a JSON {type(value).__name__}, not an object"
    return value, ""


class CsvRows:
    """A CSV file with a header row naming at least the columns ``image``, ``text``, ``audio``."""

    def header(self, path: str) -> tuple[list[str], int, int]:
        """The column names and the offset and line number of the first data row."""
        with _open(path) as file:
            lines = _Lines(file, 0, 1)
            try:
                names = next(csv.reader(lines), None)
            except csv.Error as error:
                raise UserError(f"{path}: unreadable CSV header ({error})") from None
            if names is None:
                raise UserError(f"{path}: empty CSV file (expected a header: {', '.join(MANIFEST_COLUMNS)})")
            names = [name.strip() for name in names]
            missing = [column for column in MANIFEST_COLUMNS if column not in names]
            if missing or len(set(names)) != len(names):
                raise UserError(f"{path}: the CSV header must name the columns {', '.join(MANIFEST_COLUMNS)} "
                                f"once each (found: {', '.join(names)})")
            return names, lines.offset, lines.line

    def starts(self, path: str) -> Iterator[tuple[int, int]]:
        _, offset, line = self.header(path)
        with _open(path) as file:
            lines = _Lines(file, offset, line)
            reader = csv.reader(lines)
            while True:
                start = (lines.offset, lines.line)
                try:
                    values = next(reader)
                except StopIteration:
                    return
                except csv.Error:
                    values = None  # still a row; reading it again reports the problem
                if values is None or not _blank(values):
                    yield start

    def read(self, segment: Segment) -> Iterator[tuple[int, dict | None, str]]:
        names, _, _ = self.header(segment.path)
        with _open(segment.path) as file:
            lines = _Lines(file, segment.offset, segment.line)
            reader = csv.reader(lines)
            done = 0
            while done < segment.rows:
                line = lines.line
                try:
                    values = next(reader)
                except csv.Error as error:
                    done += 1
                    yield line, None, f"malformed CSV ({error})"
                    continue
                if _blank(values):
                    continue
                done += 1
                if len(values) != len(names):
                    yield line, None, f"{len(values)} fields for {len(names)} columns"
                else:
                    yield line, dict(zip(names, values)), ""


def _blank(values: list[str]) -> bool:
    """A blank or whitespace-only line, which is not a row (``,,`` is one: a row of empty fields)."""
    return len(values) <= 1 and not "".join(values).strip()


RowFormat = JsonLines | CsvRows


def plan_shards(paths: list[str], rows: RowFormat, shard_size: int) -> tuple[list[list[Segment]], int]:
    """Split the rows of ``paths`` (in order) into shards of ``shard_size`` rows.

    Returns the segments of every shard and the number of rows.
    """
    shards: list[list[Segment]] = []
    total = 0
    for path in paths:
        segment: list = []  # [offset, line, rows] of the open segment of this file
        for offset, line in rows.starts(path):
            if total % shard_size == 0:
                _close(shards, path, segment)
                shards.append([])
                segment = []
            if not segment:
                segment = [offset, line, 0]
            segment[2] += 1
            total += 1
        _close(shards, path, segment)
    return shards, total


def _close(shards: list[list[Segment]], path: str, segment: list) -> None:
    if segment:
        shards[-1].append(Segment(path, *segment))


def read_rows(rows: RowFormat, segments: list[Segment], first_index: int) -> Iterator[Row]:
    """The rows of one shard, numbered from ``first_index``."""
    index = first_index
    for segment in segments:
        name = Path(segment.path).name
        for line, fields, problem in rows.read(segment):
            yield Row(index, f"{name}:{line}", fields, problem)
            index += 1

