"""Cleaning of converted shards, after the OPT paper's OPPOVL corpus: drop samples
a model should not learn from, and report what each filter removed.

Filters, applied in this order (a sample is removed by the first that rejects it):

=====================  ==========================================================
``missing_modality``   lacks a modality named in ``require``
``image_unreadable``   image header cannot be read
``image_too_small``    shorter image side below ``min_image_size`` pixels
``text_unreadable``    caption is not UTF-8
``text_empty``         caption is blank
``text_too_short``     fewer than ``min_words`` words
``text_too_long``      more than ``max_words`` words
``text_boilerplate``   caption matches a boilerplate pattern (case-insensitive regex)
``duplicate``          every member equals an earlier kept sample's (SHA-256 of the
                       image bytes, the whitespace-normalised caption and the speech
                       bytes): a caption repeated with another image is kept
``low_similarity``     the scorer's similarity of the pair is below ``min_similarity``
=====================  ==========================================================

Checks on a modality apply only to samples that have it. The similarity filter
takes any callable that scores a list of raw samples (``None`` where the pair is
incomplete, such samples are kept), so this module never imports the model;
:mod:`opt.downstream.similarity` provides one from a trained model. Output
shards keep the input shard names; the report (``OUT/PREFIX-clean-report.json``
for shards named ``PREFIX-NNNNNN.tar``, else ``OUT/clean-report.json``) holds
the counts, a few examples per filter and the settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from opt import MODALITIES
from opt.data.samples import EXTENSIONS
from opt.data.shards import ShardWriter
from opt.errors import DataError, UserError
from opt.files import write_atomic

Scorer = Callable[[list[dict]], list[float | None]]  # raw samples -> similarity of the pair, None if incomplete

DEFAULT_BOILERPLATE = (
    r"^\s*(image|photo|picture) (may )?contains?\b",
    r"\b(stock (photo|image|footage)|royalty[- ]free)\b",
    r"\b(shutterstock|getty ?images|alamy|istock|dreamstime|123rf|depositphotos)\b",
    r"\bclick (here|to (enlarge|zoom|view))\b",
    r"\ball rights reserved\b|©",
    r"^\s*(untitled|no (description|caption)|null|none|n/?a|image|photo|picture)\s*$",
    r"^\s*(img|dsc|dscn|pict)[_-]?\d+",
    r"\.(jpe?g|png|gif|webp|bmp)\s*$",
    r"lorem ipsum",
    r"https?://|www\.",
)
_SHARD_NAME = re.compile(r"^(.+)-\d+\.tar$")
FILTERS = ("missing_modality", "image_unreadable", "image_too_small", "text_unreadable", "text_empty",
           "text_too_short", "text_too_long", "text_boilerplate", "duplicate", "low_similarity")


@dataclass
class CleanSettings:
    require: list[str] = field(default_factory=list)  # modalities a sample must have
    min_image_size: int = 64  # shorter image side in pixels (0: off)
    min_words: int = 2  # fewer caption words are removed (0: off)
    max_words: int = 256  # more caption words are removed (0: off)
    boilerplate: list[str] = field(default_factory=lambda: list(DEFAULT_BOILERPLATE))  # regexes
    deduplicate: bool = True  # drop exact duplicate samples
    min_similarity: float = 0.3  # used only with a scorer
    similarity_pair: list[str] = field(default_factory=lambda: ["image", "text"])  # what the scorer compares
    batch_size: int = 32  # samples per scorer call
    examples: int = 5  # examples kept per filter in the report


def load_boilerplate(path: str | Path) -> list[str]:
    """Regexes from a file, one per line; blank lines and ``#`` comments are ignored."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read boilerplate patterns {path}: {error}") from None
    return [line for line in (raw.strip() for raw in lines) if line and not line.startswith("#")]


def member(sample: dict, modality: str) -> bytes | None:
    """The sample's payload of ``modality`` (any of its extensions), or None."""
    return next((sample[e] for e in EXTENSIONS[modality] if e in sample), None)


def caption_of(sample: dict) -> str | None:
    payload = member(sample, "text")
    try:
        return None if payload is None else payload.decode("utf-8")
    except UnicodeDecodeError:
        return None


class Cleaner:
    """Applies the filters to a stream of raw samples and keeps the report."""

    def __init__(self, settings: CleanSettings, scorer: Scorer | None = None) -> None:
        self.settings = settings
        self.scorer = scorer
        try:
            self.patterns = [re.compile(p, re.IGNORECASE) for p in settings.boilerplate]
        except re.error as error:
            raise UserError(f"bad boilerplate pattern {error.pattern!r}: {error}") from None
        unknown = set(settings.require) | set(settings.similarity_pair)
        if unknown - set(MODALITIES):
            raise UserError(f"unknown modality {sorted(unknown - set(MODALITIES))[0]!r}; use {', '.join(MODALITIES)}")
        self.checks = [("missing_modality", self._missing_modality), ("image_unreadable", self._image_unreadable),
                       ("image_too_small", self._image_too_small), ("text_unreadable", self._text_unreadable),
                       ("text_empty", self._text_empty), ("text_too_short", self._text_too_short),
                       ("text_too_long", self._text_too_long), ("text_boilerplate", self._text_boilerplate),
                       ("duplicate", self._duplicate)]
        self.seen: dict[bytes, str] = {}  # content digest -> key of the kept sample
        self.removed = dict.fromkeys(FILTERS, 0)
        self.examples: dict[str, list[dict]] = {name: [] for name in FILTERS}
        self.samples_in = self.samples_out = 0

    def clean(self, samples: Iterator[dict]) -> Iterator[dict]:
        """The samples that pass every filter, in input order."""
        pending: list[dict] = []
        for sample in samples:
            self.samples_in += 1
            rejection = self.first_rejection(sample)
            if rejection is not None:
                self._remove(sample, *rejection)
            elif self.scorer is None:
                yield from self._keep([sample])
            else:
                pending.append(sample)
                if len(pending) == self.settings.batch_size:
                    yield from self._keep(self._similar(pending))
                    pending = []
        if pending:
            yield from self._keep(self._similar(pending))

    def first_rejection(self, sample: dict) -> tuple[str, str] | None:
        """``(filter, detail)`` of the first cheap filter that rejects ``sample`` (similarity not included)."""
        for name, check in self.checks:
            detail = check(sample)
            if detail is not None:
                return name, detail
        return None

    def report(self) -> dict:
        return {"samples_in": self.samples_in, "samples_out": self.samples_out, "removed": self.removed,
                "examples": self.examples, "settings": dataclasses.asdict(self.settings),
                "similarity_filter": self.scorer is not None}

    def _keep(self, samples: list[dict]) -> Iterator[dict]:
        self.samples_out += len(samples)
        yield from samples

    def _remove(self, sample: dict, name: str, detail: str) -> None:
        self.removed[name] += 1
        if len(self.examples[name]) < self.settings.examples:
            text = caption_of(sample)
            self.examples[name].append({"key": sample["__key__"], "shard": Path(sample["__url__"]).name,
                                        "text": None if text is None else text[:200], "detail": detail})

    def _similar(self, samples: list[dict]) -> list[dict]:
        scores = self.scorer(samples)
        kept = []
        for sample, score in zip(samples, scores, strict=True):
            if score is not None and score < self.settings.min_similarity:
                self._remove(sample, "low_similarity", f"similarity {score:.3f}")
            else:
                kept.append(sample)
        return kept

    # -- checks: each returns None to keep the sample, or a detail for the report ----------------------

    def _missing_modality(self, sample: dict) -> str | None:
        missing = [m for m in self.settings.require if member(sample, m) is None]
        return f"no {', '.join(missing)}" if missing else None

    def _image_unreadable(self, sample: dict) -> str | None:
        return "cannot read the image" if member(sample, "image") is not None and _image_size(sample) is None else None

    def _image_too_small(self, sample: dict) -> str | None:
        size = _image_size(sample)
        if size is not None and min(size) < self.settings.min_image_size:
            return f"{size[0]}x{size[1]} px"
        return None

    def _text_unreadable(self, sample: dict) -> str | None:
        return "not UTF-8" if member(sample, "text") is not None and caption_of(sample) is None else None

    def _text_empty(self, sample: dict) -> str | None:
        text = caption_of(sample)
        return "blank caption" if text is not None and not text.strip() else None

    def _text_too_short(self, sample: dict) -> str | None:
        words = _words(sample)
        return f"{words} words" if words is not None and words < self.settings.min_words else None

    def _text_too_long(self, sample: dict) -> str | None:
        words = _words(sample)
        limit = self.settings.max_words
        return f"{words} words" if words is not None and limit and words > limit else None

    def _text_boilerplate(self, sample: dict) -> str | None:
        text = caption_of(sample)
        if text is None:
            return None
        return next((f"matches {p.pattern!r}" for p in self.patterns if p.search(text)), None)

    def _duplicate(self, sample: dict) -> str | None:
        if not self.settings.deduplicate:
            return None
        digest = content_digest(sample)
        if digest in self.seen:
            return f"same content as {self.seen[digest]}"
        self.seen[digest] = sample["__key__"]
        return None


def _image_size(sample: dict) -> tuple[int, int] | None:
    payload = member(sample, "image")
    if payload is None:
        return None
    try:
        return Image.open(io.BytesIO(payload)).size  # reads the header only
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def _words(sample: dict) -> int | None:
    text = caption_of(sample)
    return None if text is None else len(text.split())


def content_digest(sample: dict) -> bytes:
    """SHA-256 over the image bytes, the whitespace-normalised caption and the speech bytes."""
    digest = hashlib.sha256()
    for modality in MODALITIES:
        payload = member(sample, modality)
        if modality == "text" and payload is not None:
            payload = b" ".join(payload.split())
        digest.update(modality.encode() + (b"-" if payload is None else b"+%d:" % len(payload) + payload))
    return digest.digest()


def read_shard(path: str) -> Iterator[dict]:
    """Raw samples of one shard (``__key__``, ``__url__`` and bytes per extension)."""
    def unreadable(error: Exception) -> bool:
        raise DataError(f"{path}: unreadable shard ({type(error).__name__})")

    yield from wds.DataPipeline(wds.SimpleShardList([path]), wds.tarfile_to_samples(handler=unreadable))


def clean_shards(shards: list[str], out: str | Path, settings: CleanSettings, *, scorer: Scorer | None = None,
                 progress: bool = True) -> dict:
    """Write the samples of ``shards`` that pass the filters into ``out`` (same shard names);
    return the report, also written to ``out`` (see :func:`report_name`)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    names = [Path(shard).name for shard in shards]
    if len(set(names)) != len(names):
        raise UserError("two input shards share a file name; clean them into separate --out directories")
    if any(Path(shard).resolve().parent == out.resolve() for shard in shards):
        raise UserError(f"--out {out} holds the input shards; choose another directory")
    cleaner = Cleaner(settings, scorer)
    for shard, name in zip(tqdm(shards, unit="shard", desc="clean", disable=not progress), names):
        with ShardWriter(out / name) as writer:
            for sample in cleaner.clean(read_shard(shard)):
                writer.write(sample["__key__"], {k: v for k, v in sample.items() if not k.startswith("__")})
    report = cleaner.report() | {"shards": names}
    write_atomic(out / report_name(names), (json.dumps(report, indent=1) + "\n").encode())
    return report


def report_name(shard_names: list[str]) -> str:
    """``PREFIX-clean-report.json`` when every shard is ``PREFIX-NNNNNN.tar`` (train and val
    cleaned into one directory keep separate reports), else ``clean-report.json``."""
    prefixes = {match.group(1) if (match := _SHARD_NAME.match(name)) else None for name in shard_names}
    prefix = prefixes.pop() if len(prefixes) == 1 else None
    return f"{prefix}-clean-report.json" if prefix else "clean-report.json"
