"""What every downstream command shares: loading a model directory, reading a
split through the training pipeline with the model's own data settings, and
encoding a whole split once (unimodal tokens and tower embeddings kept on the
CPU, so retrieval can score every candidate and re-rank with the cross encoder).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from opt import MODALITIES
from opt.config import DataConfig
from opt.data.batch import batch_rows, to_device
from opt.data.pipeline import BatchLoader
from opt.errors import UserError
from opt.model.opt_model import OPTModel
from opt.text.tokenizer import TextTokenizer


@dataclass
class LoadedModel:
    model: OPTModel
    tokenizer: TextTokenizer
    device: torch.device


def load_model(directory: str | Path, *, device: str = "cpu") -> LoadedModel:
    """A model directory written by ``opt export`` (config, weights, ``vq/``, ``tokenizer.model``)."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise UserError(f"{directory} is not a model directory (no config.json); make one with opt export")
    if not (directory / "tokenizer.model").is_file():
        raise UserError(f"{directory} has no tokenizer.model; export the model together with its tokenizer")
    target = torch.device(device)
    model = OPTModel.from_pretrained(directory).to(target).eval()
    return LoadedModel(model, TextTokenizer.from_file(directory / "tokenizer.model"), target)


def data_settings(loaded: LoadedModel, *, batch_size: int = 64, workers: int = 0,
                  modalities: Sequence[str] = MODALITIES) -> DataConfig:
    """Data settings that read ``modalities`` exactly as the model was trained to see them."""
    spec = loaded.model.spec
    return DataConfig(modalities=list(modalities), image_size=spec.image_size, max_text_tokens=spec.max_text_tokens,
                      batch_size=batch_size, workers=workers)


def caption_log_likelihood(model: OPTModel, fused: dict, ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(b,) log P(caption | fused context) from the text decoder: ``ids`` (b, t) from the bos,
    each token after it scored given the ones before, summed where ``real`` (b, t) is True."""
    logits = model.text_decoder.teacher_forced(ids, fused["states"], fused["mask"])
    token = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]  # (b, t - 1)
    return (token * real[:, 1:]).sum(1)


def iterate_batches(loaded: LoadedModel, data: str, *, batch_size: int = 64, limit: int | None = None,
                    workers: int = 0) -> Iterator[dict]:
    """Batches of a shard spec in order (each sample once), at most ``limit`` samples."""
    settings = data_settings(loaded, batch_size=batch_size, workers=workers)
    seen = 0
    for batch in BatchLoader(data, settings, loaded.model.spec.audio, loaded.tokenizer, train=False):
        if limit is not None and seen + len(batch["keys"]) > limit:
            keep = limit - seen
            batch = batch_rows(batch, list(range(keep)))
        seen += len(batch["keys"])
        if batch["keys"]:
            yield to_device(batch, loaded.device)
        if limit is not None and seen >= limit:
            return


@dataclass
class EncodedSplit:
    """A split encoded once: per modality ``tokens`` (N, n, d), ``mask`` (N, n) and
    ``pooled`` (N, d_encoder) on the CPU, plus the keys, captions and metadata."""

    keys: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)
    unimodal: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    pixels: torch.Tensor | None = None  # (N, 3, H, W) in [0, 1], for pictures in reports
    text_ids: torch.Tensor | None = None  # (N, t) caption token ids (bos ... eos, pad after), for decoder scores

    def __len__(self) -> int:
        return len(self.keys)

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
def encode_split(loaded: LoadedModel, data: str, *, limit: int | None = None, batch_size: int = 64) -> EncodedSplit:
    """Run the single-modal encoders over every sample of ``data``."""
    split = EncodedSplit()
    parts: dict[str, dict[str, list[torch.Tensor]]] = {m: {"tokens": [], "mask": [], "pooled": []} for m in MODALITIES}
    pixels, ids = [], []
    for batch in iterate_batches(loaded, data, batch_size=batch_size, limit=limit):
        pixels.append(batch["image"]["pixels"].cpu())
        ids.append(batch["text"]["ids"].masked_fill(~batch["text"]["mask"], loaded.tokenizer.pad_id).cpu())
        split.keys += batch["keys"]
        split.captions += batch["captions"]
        split.meta += batch["meta"]
        for modality, out in loaded.model.encode_unimodal(batch).items():
            for name in ("tokens", "mask", "pooled"):
                parts[modality][name].append(out[name].float().cpu())
    if not split.keys:
        raise UserError(f"no samples in {data}")
    split.pixels = torch.cat(pixels)
    split.text_ids = _pad_cat([i[..., None] for i in ids], loaded.tokenizer.pad_id)[..., 0]
    for modality, tensors in parts.items():
        if tensors["tokens"]:
            split.unimodal[modality] = {"tokens": _pad_cat(tensors["tokens"], 0.0),
                                        "mask": _pad_cat(tensors["mask"], False),
                                        "pooled": torch.cat(tensors["pooled"])}
    return split
