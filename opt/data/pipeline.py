"""The webdataset pipeline that feeds training and evaluation.

    shards -> (resampled | listed, split by node and worker) -> tar samples
           -> shuffle buffer -> decode + validate -> (training, audio.speed_factors set:
           speed perturbation) -> collate into batches

Batches have the layout of :mod:`opt.data.batch`. Bad samples are
skipped or repaired (see :mod:`opt.data.samples`) and counted; the counts ride
along with each batch from the worker processes and are summed by
:class:`BatchLoader`. In strict mode the first bad sample raises
:class:`~opt.errors.DataError` naming the shard and key.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import webdataset as wds
from torch.utils.data import DataLoader

from opt.config import AudioConfig, DataConfig
from opt.data.audio import AudioFrontEnd
from opt.data.augment import perturb_speed
from opt.data.batch import Collator
from opt.data.samples import DecodedSample, SampleDecoder, SkipSample
from opt.data.shards import resolve_shards
from opt.errors import DataError
from opt.text.tokenizer import Tokenizer

SPEED_SEED_OFFSET = 7919  # the speed generators' seeds are the shuffle's plus this


def by_reason(counts: dict[str, int]) -> str:
    """``reason: count, ...`` in reason order ("" when there are none)."""
    return ", ".join(f"{reason}: {count}" for reason, count in sorted(counts.items()))


@dataclass
class DataStats:
    """What the pipeline skipped and repaired.

    A skipped sample is counted once however often a resampled stream meets it
    (``skips`` holds each one's shard and key, so counts from several worker
    processes merge without double counting); repairs are counted each time a
    sample is decoded; ``samples`` counts samples delivered in batches.
    """

    skips: dict[tuple[str, str], str] = field(default_factory=dict)  # (shard, key) -> reason
    repaired: Counter = field(default_factory=Counter)
    samples: int = 0

    @property
    def skipped(self) -> Counter:
        """Skipped samples by reason."""
        return Counter(self.skips.values())

    def add(self, other: "DataStats") -> None:
        self.skips.update(other.skips)
        self.repaired.update(other.repaired)
        self.samples += other.samples

    def take(self) -> "DataStats":
        """Return the counts so far and reset them (used to ship deltas from workers)."""
        taken = DataStats(self.skips, self.repaired, self.samples)
        self.skips, self.repaired, self.samples = {}, Counter(), 0
        return taken

    def as_dict(self) -> dict:
        """The counts as plain data (for metrics files)."""
        return {"used": self.samples, "skipped": dict(sorted(self.skipped.items())),
                "repaired": dict(sorted(self.repaired.items()))}

    def summary(self) -> str:
        skipped = self.skipped
        parts = [f"{self.samples} samples used", f"{sum(skipped.values())} skipped"]
        if skipped:
            parts[-1] += f" ({by_reason(skipped)})"
        if self.repaired:
            parts.append(f"repaired {by_reason(self.repaired)}")
        return "data: " + "; ".join(parts)


_worker_stats = DataStats()  # per process; shards' read errors are counted here too


class NothingUsable:
    """Stops a training stream that reads on without ever producing a usable sample:
    after ``max_samples`` samples read (beyond what the shuffle ``buffer`` holds) with
    none usable, or ``max(3 x shards, 20)`` shard reads that yielded no sample at all
    (no shard readable), it raises :class:`DataError` with the skip counts. Disarmed
    by the first usable sample."""

    def __init__(self, *, shards: int, buffer: int = 0, max_samples: int = 5000) -> None:
        self.max_samples = max_samples + buffer
        self.max_shard_reads = max(3 * shards, 20)
        self.samples = self.shard_reads = 0
        self.armed = True

    def shard_read(self) -> None:
        self.shard_reads += 1
        self._check()

    def sample_read(self) -> None:
        self.samples += 1
        self._check()

    def usable(self) -> None:
        self.armed = False

    def _check(self) -> None:
        unreadable = self.samples == 0 and self.shard_reads >= self.max_shard_reads
        if self.armed and (unreadable or self.samples >= self.max_samples):
            counts = by_reason(_worker_stats.skipped) or "none"
            raise DataError(f"no usable sample in {self.samples} samples from {self.shard_reads} shard reads "
                            f"(skipped by reason: {counts})")


def _tar_error_handler(strict: bool):
    def handle(error: Exception) -> bool:
        url = next((a for a in reversed(error.args) if isinstance(a, str) and a.endswith(".tar")), "?")
        if strict:
            raise DataError(f"{url}: unreadable shard ({type(error).__name__}: {error.args[0] if error.args else ''})")
        _worker_stats.skips[(url, "")] = "shard_unreadable"
        return True

    return handle


def _read_shards(shards: Iterator[dict], strict: bool, watchdog: NothingUsable | None) -> Iterator[dict]:
    """Raw samples of each shard in turn. A key met twice in one read of a shard (a
    member carrying another sample's key) marks the later sample ``__duplicate__``."""
    expand = wds.tarfile_to_samples(handler=_tar_error_handler(strict))
    for shard in shards:
        if watchdog is not None:
            watchdog.shard_read()
        keys = set()
        for raw in expand(iter([shard])):
            if raw.get("__key__") in keys:
                raw["__duplicate__"] = True
            keys.add(raw.get("__key__"))
            if watchdog is not None:
                watchdog.sample_read()
            yield raw


def _decode(samples: Iterator[dict], decoder: SampleDecoder, strict: bool,
            cache: dict | None = None, watchdog: NothingUsable | None = None) -> Iterator[DecodedSample]:
    """Decoded samples; bad ones are skipped and counted (or raise in strict mode), a
    duplicate key as ``duplicate_key``. With a ``cache`` dict, each sample is decoded
    once and later epochs read it from memory (decoding is deterministic, so the
    stream is the same either way)."""
    for raw in samples:
        where = (raw.get("__url__") or "?", raw.get("__key__") or "?")
        if raw.get("__duplicate__"):
            outcome = SkipSample("duplicate_key")
        else:
            outcome = cache.get(where) if cache is not None else None
            if outcome is None:
                try:
                    outcome = decoder(raw)
                except SkipSample as skip:
                    outcome = skip
                if cache is not None:
                    cache[where] = outcome
                if not isinstance(outcome, SkipSample):
                    _worker_stats.repaired.update(outcome.repairs)
        if isinstance(outcome, SkipSample):
            if strict:
                raise DataError(f"{where[0]}: sample {where[1]}: {outcome.reason}")
            _worker_stats.skips.setdefault(where, outcome.reason)
            continue
        if watchdog is not None:
            watchdog.usable()
        yield outcome


def _batches(samples: Iterator[DecodedSample], batch_size: int, partial: bool,
             collate: Collator) -> Iterator[dict]:
    buffer: list[DecodedSample] = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) == batch_size:
            yield _with_stats(collate(buffer))
            buffer = []
    if buffer and partial:
        yield _with_stats(collate(buffer))
    elif _worker_stats.skips or _worker_stats.repaired:
        yield {"stats": _worker_stats.take()}  # counts from the tail must still reach the main process


def _with_stats(batch: dict) -> dict:
    _worker_stats.samples += len(batch["keys"])
    batch["stats"] = _worker_stats.take()
    return batch


def _worker_rng(seed: int) -> random.Random:
    """A generator of its own per process and worker (``seed`` itself on the first worker of rank 0)."""
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
    return random.Random(seed + 1000 * rank + worker)


def _shuffle_per_worker(samples: Iterator[dict], size: int, initial: int, seed: int) -> Iterator[dict]:
    """webdataset's shuffle buffer with a seed of its own per process and worker. One seed for all
    made workers that drew the same shard (a corpus of one shard always does) yield the same
    samples in the same order: every batch twice."""
    yield from wds.filters._shuffle(samples, size, initial, rng=_worker_rng(seed))


def _speed_per_worker(samples: Iterator[DecodedSample], front_end: AudioFrontEnd, factors: list[float],
                      seed: int) -> Iterator[DecodedSample]:
    # a stream of its own (offset from the shuffle's), so turning speeds on leaves the sample order as it was
    yield from perturb_speed(samples, front_end, factors, _worker_rng(seed + SPEED_SEED_OFFSET))


def build_dataset(shards: list[str], data: DataConfig, audio: AudioConfig, tokenizer: Tokenizer | None, *,
                  train: bool, seed: int = 0, batch_size: int | None = None,
                  split_by_node: bool = True) -> wds.DataPipeline:
    """The pipeline as an ``IterableDataset`` of batches.

    ``train=True``: shards resampled forever with an RNG seeded by ``seed``, a shuffle
    buffer, full batches only. ``train=False``: each shard once, in order, last batch
    kept; with ``split_by_node`` the shards are divided among distributed processes,
    otherwise every process reads all of them.
    """
    if "text" in data.modalities and tokenizer is None:
        raise ValueError("a tokenizer is needed when the text modality is enabled")
    perturbed = train and bool(audio.speed_factors) and "audio" in data.modalities
    decoder = SampleDecoder(data, audio, tokenizer, keep_waveform=perturbed)
    collate = Collator(data.modalities, tokenizer.pad_id if tokenizer else 0, audio.n_mels, audio_input=audio.input)
    strict = data.strict
    if train:
        stages = [wds.ResampledShards(shards, seed=seed, deterministic=True)]
    else:
        stages = [wds.SimpleShardList(shards)] + ([wds.split_by_node] if split_by_node else []) + [wds.split_by_worker]
    watchdog = NothingUsable(shards=len(shards), buffer=data.shuffle_buffer) if train else None
    stages.append(wds.pipelinefilter(_read_shards)(strict, watchdog))
    if train and data.shuffle_buffer > 0:
        stages.append(wds.pipelinefilter(_shuffle_per_worker)(data.shuffle_buffer, data.shuffle_buffer // 2, seed))
    cache = {} if train and data.cache_decoded else None  # one per process: each worker fills its own
    stages.append(wds.pipelinefilter(_decode)(decoder, strict, cache, watchdog))
    if perturbed:  # after the cache, which keeps the waveform: a new speed each time a sample is read
        stages.append(wds.pipelinefilter(_speed_per_worker)(decoder.front_end, list(audio.speed_factors), seed))
    stages.append(wds.pipelinefilter(_batches)(batch_size or data.batch_size, not train, collate))
    return wds.DataPipeline(*stages)


class BatchLoader:
    """Iterates batches from a shard spec with worker processes and keeps the data counts.

        loader = BatchLoader("data/world/val-*.tar", config.data, config.audio, tokenizer, train=False)
        for batch in loader: ...
        print(loader.stats.summary())

    It takes the data and audio settings, the tokenizer (None when text is not
    read) and, for training, the seed of the shard order and shuffle buffer.
    """

    def __init__(self, spec: str, data: DataConfig, audio: AudioConfig, tokenizer: Tokenizer | None, *,
                 train: bool, seed: int = 0, workers: int | None = None, batch_size: int | None = None,
                 split_by_node: bool = True) -> None:
        self.shards = resolve_shards(spec)
        self.dataset = build_dataset(self.shards, data, audio, tokenizer, train=train, seed=seed,
                                     batch_size=batch_size, split_by_node=split_by_node)
        self.workers = data.workers if workers is None else workers
        if not train:
            self.workers = min(self.workers, len(self.shards))
        self.stats = DataStats()

    def __iter__(self) -> Iterator[dict]:
        # pinned batches let to_device(..., non_blocking=True) overlap the copy to the GPU with compute
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.workers,
                            pin_memory=torch.cuda.is_available(), persistent_workers=False,
                            prefetch_factor=4 if self.workers else None)
        try:
            for batch in loader:
                self.stats.add(batch.pop("stats"))
                if "keys" in batch:
                    yield batch
        except DataError as error:  # from a worker the message carries the worker's traceback
            raise DataError(str(error).strip().splitlines()[-1].removeprefix("opt.errors.DataError: ")) from None
        finally:
            if self.workers == 0:
                self.stats.add(_worker_stats.take())
