"""Inputs given as files (or bytes) instead of shards: the paths a user names
expanded to files, read, and decoded into batches exactly as training reads a
shard's members (:class:`~opt.data.samples.SampleDecoder`, then
:class:`~opt.data.batch.Collator`): the same image resize and crop, audio
decoding, resampling and features, and caption tokenising.

A path names a file (kept as given), a folder (its image, audio or text files
by extension, recursively, sorted) or a glob (every file it matches, sorted;
``**`` spans folders). A sample's key is its path as given or expanded. A file
that cannot be read or decoded is skipped and counted by reason in a
:class:`~opt.data.pipeline.DataStats` (``file_unreadable``, or the decoder's
reasons: ``image_corrupt``, ``audio_truncated``, ...), the same counts the
shard readers report; a path that matches nothing is a :class:`UserError`.
Texts come one per line of a text file (:func:`read_text_lines`), each keyed by
its own text.
"""

from __future__ import annotations

import glob
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path

from opt.data.batch import Collator, to_device
from opt.data.pipeline import DataStats
from opt.data.samples import EXTENSIONS, DecodedSample, SampleDecoder, SkipSample
from opt.downstream.common import LoadedModel, data_settings, describe_counts
from opt.errors import UserError

# the member name each modality's bytes go under; the decoders read the format from the bytes
MEMBERS = {modality: extensions[0] for modality, extensions in EXTENSIONS.items()}

Inputs = Iterable[tuple[str, dict[str, bytes]]]  # (key, {modality: bytes}) per sample


def expand_paths(paths: Sequence[str], modality: str) -> list[str]:
    """The files ``paths`` name, in order and each once: a file as given, a folder's files with
    one of ``modality``'s extensions (recursive, sorted), a glob's matches (sorted; a folder it
    matches counts as a folder). A path that names no file raises :class:`UserError`."""
    files: dict[str, None] = {}
    for path in paths:
        found = _expand(path, modality)
        if not found:
            kinds = ", ".join(f".{e}" for e in EXTENSIONS[modality])
            raise UserError(f"{path} matches no {modality} file (a file, a folder of {kinds} files, or a glob)")
        files.update(dict.fromkeys(found))
    return list(files)


def _expand(path: str, modality: str) -> list[str]:
    if Path(path).is_file():
        return [path]
    if Path(path).is_dir():
        return _folder_files(path, modality)
    found = []
    for match in sorted(glob.glob(path, recursive=True)):
        found += [match] if Path(match).is_file() else _folder_files(match, modality)
    return found


def _folder_files(folder: str, modality: str) -> list[str]:
    suffixes = {f".{e}" for e in EXTENSIONS[modality]}
    return sorted(str(p) for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in suffixes)


def read_files(paths: Iterable[str], modality: str, stats: DataStats) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(path, {modality: bytes})`` per file; a file that cannot be read is counted as
    ``file_unreadable`` in ``stats`` and left out."""
    for path in paths:
        try:
            payload = Path(path).read_bytes()
        except OSError:
            stats.skips[("", path)] = "file_unreadable"
            continue
        yield path, {modality: payload}


def read_text_lines(path: str | Path) -> list[tuple[str, dict[str, bytes]]]:
    """``(text, {"text": bytes})`` per non-blank line of a text file: the key is the line's text
    itself (stripped), or ``PATH:LINE`` for a line that is not UTF-8 (the decoder then skips it)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"text file not found: {path}")
    inputs = []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if line.strip():
            try:
                key = line.decode("utf-8").strip()
            except UnicodeDecodeError:
                key = f"{path}:{number}"
            inputs.append((key, {"text": line}))
    return inputs


def decode_inputs(loaded: LoadedModel, inputs: Inputs, modalities: Sequence[str],
                  stats: DataStats) -> Iterator[DecodedSample]:
    """Each input decoded as a shard sample with the members ``modalities`` (all required) and
    the model's data settings; a sample the decoder refuses is counted in ``stats`` by reason
    and left out, a decoded one adds its repairs."""
    settings = data_settings(loaded, modalities=modalities, require=modalities)
    decode = SampleDecoder(settings, loaded.model.spec.audio, loaded.tokenizer)
    for key, members in inputs:
        raw = {"__key__": key, "__url__": key} | {MEMBERS[m]: payload for m, payload in members.items()}
        try:
            sample = decode(raw)
        except SkipSample as skip:
            stats.skips[("", key)] = skip.reason
            continue
        stats.repaired.update(sample.repairs)
        yield sample


def collate(loaded: LoadedModel, samples: Iterable[DecodedSample], modalities: Sequence[str], *,
            batch_size: int = 64) -> Iterator[dict]:
    """Batches of at most ``batch_size`` decoded samples on the model's device, in order."""
    collator = Collator(list(modalities), loaded.tokenizer.pad_id, loaded.model.spec.audio.n_mels,
                        audio_input=loaded.model.spec.audio.input)
    samples = iter(samples)
    while chunk := list(islice(samples, batch_size)):
        yield to_device(collator(chunk), loaded.device)


def input_batches(loaded: LoadedModel, inputs: Inputs, modalities: Sequence[str], *, batch_size: int = 64,
                  stats: DataStats | None = None) -> Iterator[dict]:
    """Batches of ``inputs``, their skips, repairs and samples used added to ``stats``;
    no usable input at all raises :class:`UserError` with the counts."""
    stats = stats if stats is not None else DataStats()
    used = 0
    for batch in collate(loaded, decode_inputs(loaded, inputs, modalities, stats), modalities, batch_size=batch_size):
        used += len(batch["keys"])
        stats.samples += len(batch["keys"])
        yield batch
    if used == 0:
        raise UserError(f"no usable input: {describe_counts(stats.as_dict())}")


def file_batches(loaded: LoadedModel, files: Sequence[str], modality: str, *, batch_size: int = 64,
                 stats: DataStats | None = None) -> Iterator[dict]:
    """Batches of ``modality`` read from ``files`` (:func:`expand_paths` finds them), keyed by
    path; files that cannot be read or decoded are skipped and counted in ``stats``."""
    stats = stats if stats is not None else DataStats()
    yield from input_batches(loaded, read_files(files, modality, stats), (modality,), batch_size=batch_size,
                             stats=stats)


def decode_one(loaded: LoadedModel, key: str, members: dict[str, bytes]) -> dict:
    """A batch of one sample (a query); one that cannot be decoded raises :class:`UserError`."""
    stats = DataStats()
    samples = list(decode_inputs(loaded, [(key, members)], list(members), stats))
    if not samples:
        raise UserError(f"{key} cannot be read ({stats.skips[('', key)]})")
    return next(collate(loaded, samples, list(members)))
