"""What every downstream command shares: loading a model directory, reading a
split through the training pipeline with the model's own data settings, and
encoding a whole split once (unimodal tokens and tower embeddings kept on the
CPU, so retrieval can score every candidate and re-rank with the cross encoder).

A split is read with the modalities a task needs, each of them required: a
sample that lacks one, or whose member is corrupt, is skipped and counted.
The counts travel back to the caller (``iterate_batches(stats=...)``,
``EncodedSplit.data_stats``), which reports them as ``used N of M samples
(K skipped: reason: count, ...)``; a split without one usable sample is a
:class:`~opt.errors.UserError`.

A sample is one (image and/or audio, caption) pair. Benchmarks with several
captions per image or clip (COCO, Flickr30k, Clotho, AudioCaps) give the
samples of one image or clip the same ``group`` in their metadata
(``KEY.json``); a sample without one is a group of its own (:func:`group_of`).
"""

from __future__ import annotations

from collections import Counter
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from opt import MODALITIES
from opt.config import DataConfig
from opt.data.batch import batch_rows, to_device
from opt.data.pipeline import BatchLoader, DataStats, by_reason
from opt.data.samples import EXTENSIONS
from opt.data.shards import resolve_shards
from opt.devices import resolve_device
from opt.errors import UserError
from opt.model.opt_model import OPTModel
from opt.text.tokenizer import Tokenizer, load_tokenizer, tokenizer_in


@dataclass
class LoadedModel:
    model: OPTModel
    tokenizer: Tokenizer
    device: torch.device


def load_model(directory: str | Path, *, device: str = "cpu") -> LoadedModel:
    """A model directory written by ``opt export`` or ``opt model init`` (config, weights, ``vq/``, tokenizer)."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise UserError(f"{directory} is not a model directory (no config.json); make one with opt export")
    tokenizer = load_tokenizer(tokenizer_in(directory))
    target = resolve_device(device)
    model = OPTModel.from_pretrained(directory).to(target).eval()
    return LoadedModel(model, tokenizer, target)


def data_settings(loaded: LoadedModel, *, batch_size: int = 64, workers: int = 0,
                  modalities: Sequence[str] = MODALITIES, require: Sequence[str] = ()) -> DataConfig:
    """Data settings that read ``modalities`` exactly as the model was trained to see them
    (a sample missing one of ``require`` is skipped)."""
    spec = loaded.model.spec
    return DataConfig(modalities=list(modalities), require=list(require), image_size=spec.image_size,
                      max_text_tokens=spec.max_text_tokens, batch_size=batch_size, workers=workers)


def split_modalities(data: str, *, members: int = 512) -> list[str]:
    """The modalities the samples of a shard spec carry, read from the member names of its
    first shard (at most ``members`` of them; nothing is decoded). A caption corpus gives
    ``["text", "image"]``, the synthetic world all three."""
    found: set[str] = set()
    try:
        with tarfile.open(resolve_shards(data)[0]) as tar:
            for _, member in zip(range(members), tar):
                extension = Path(member.name).name.partition(".")[2].lower()
                found |= {m for m, extensions in EXTENSIONS.items() if extension in extensions}
    except (tarfile.TarError, OSError) as error:
        raise UserError(f"cannot read the first shard of {data}: {error}") from None
    return [m for m in MODALITIES if m in found]


def group_of(key: str, meta: dict) -> str:
    """The sample's group: ``meta["group"]``, shared by the samples of one image or clip, else its own key."""
    return str(meta.get("group", key))


def describe_counts(counts: dict) -> str:
    """``used N of M samples (K skipped: reason: count, ...)`` from ``DataStats.as_dict()``."""
    skipped = sum(counts["skipped"].values())
    reasons = by_reason(counts["skipped"])
    return (f"used {counts['used']} of {counts['used'] + skipped} samples "
            f"({skipped} skipped{': ' + reasons if reasons else ''})")


def caption_log_likelihood(model: OPTModel, fused: dict, ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(b,) log P(caption | fused context) from the text decoder: ``ids`` (b, t) from the bos,
    each token after it scored given the ones before, summed where ``real`` (b, t) is True."""
    logits = model.text_decoder.teacher_forced(ids, fused["states"], fused["mask"])
    token = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]  # (b, t - 1)
    return (token * real[:, 1:]).sum(1)


def iterate_batches(loaded: LoadedModel, data: str, *, modalities: Sequence[str] = MODALITIES,
                    require: Sequence[str] = (), batch_size: int = 64, limit: int | None = None, workers: int = 0,
                    stats: DataStats | None = None) -> Iterator[dict]:
    """Batches of a shard spec in order (each sample once), at most ``limit`` samples, reading
    ``modalities`` and skipping the samples that lack one of ``require``.

    The samples used and the skips and repairs of the samples read are added to ``stats``
    when given; a spec without one usable sample raises :class:`UserError`.
    """
    settings = data_settings(loaded, batch_size=batch_size, workers=workers, modalities=modalities, require=require)
    loader = BatchLoader(data, settings, loaded.model.spec.audio, loaded.tokenizer, train=False)
    batches, used = iter(loader), 0
    try:
        for batch in batches:
            if limit is not None and used + len(batch["keys"]) > limit:
                batch = batch_rows(batch, list(range(limit - used)))
            used += len(batch["keys"])
            if batch["keys"]:
                yield to_device(batch, loaded.device)
            if limit is not None and used >= limit:
                break
    finally:
        batches.close()  # the loader adds its last counts when it closes
        read = DataStats(skips=dict(loader.stats.skips), repaired=Counter(loader.stats.repaired), samples=used)
        if stats is not None:
            stats.add(read)
    if used == 0:
        raise UserError(f"no usable samples in {data}: {describe_counts(read.as_dict())}")


@dataclass
class EncodedSplit:
    """A split encoded once: per modality ``tokens`` (N, n, d), ``mask`` (N, n) and
    ``pooled`` (N, d_encoder) on the CPU, plus the keys, captions and metadata."""

    keys: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)
    unimodal: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    pixels: torch.Tensor | None = None  # (N, 3, H, W) in [0, 1], for pictures in reports (when image is read)
    text_ids: torch.Tensor | None = None  # (N, t) caption token ids (bos ... eos, pad after), for decoder scores
    data_stats: DataStats = field(default_factory=DataStats)  # samples used, skipped and repaired by the read

    def __len__(self) -> int:
        return len(self.keys)

    def groups(self) -> list[str]:
        """The group of each sample (:func:`group_of`)."""
        return [group_of(key, meta) for key, meta in zip(self.keys, self.meta, strict=True)]

    def select(self, modality: str, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored encoder outputs of ``modality`` for rows ``index``."""
        return {k: v[index] for k, v in self.unimodal[modality].items()}


def _pad_cat(parts: list[torch.Tensor], value) -> torch.Tensor:
    """Concatenate (b_i, n_i, ...) tensors along dim 0, padding dim 1 to the longest."""
    longest = max(p.shape[1] for p in parts)
    padded = []
    for p in parts:
        pad = [0, 0] * (p.dim() - 2) + [0, longest - p.shape[1]]
        padded.append(F.pad(p, pad, value=value))
    return torch.cat(padded)


@torch.no_grad()
def encode_split(loaded: LoadedModel, data: str, *, modalities: Sequence[str] = MODALITIES, limit: int | None = None,
                 batch_size: int = 64) -> EncodedSplit:
    """Run the single-modal encoders over every sample of ``data`` that has all of ``modalities``."""
    split = EncodedSplit()
    parts: dict[str, dict[str, list[torch.Tensor]]] = {m: {"tokens": [], "mask": [], "pooled": []} for m in modalities}
    pixels, ids = [], []
    for batch in iterate_batches(loaded, data, modalities=modalities, require=modalities, batch_size=batch_size,
                                 limit=limit, stats=split.data_stats):
        if "image" in batch:
            pixels.append(batch["image"]["pixels"].cpu())
        if "text" in batch:
            ids.append(batch["text"]["ids"].masked_fill(~batch["text"]["mask"], loaded.tokenizer.pad_id).cpu())
        split.keys += batch["keys"]
        split.captions += batch["captions"]
        split.meta += batch["meta"]
        for modality, out in loaded.model.encode_unimodal(batch, modalities=modalities).items():
            for name in ("tokens", "mask", "pooled"):  # features in fp32 (bf16 under autocast); masks stay bool
                value = out[name].cpu()
                parts[modality][name].append(value.float() if value.is_floating_point() else value)
    split.pixels = torch.cat(pixels) if pixels else None
    split.text_ids = _pad_cat([i[..., None] for i in ids], loaded.tokenizer.pad_id)[..., 0] if ids else None
    for modality, tensors in parts.items():
        if tensors["tokens"]:
            split.unimodal[modality] = {"tokens": _pad_cat(tensors["tokens"], 0.0),
                                        "mask": _pad_cat(tensors["mask"], False),
                                        "pooled": torch.cat(tensors["pooled"])}
    return split
