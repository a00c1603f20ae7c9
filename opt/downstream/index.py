"""Embedding indexes: the two-tower embeddings of many inputs of one modality,
saved once and searched with queries of any modality.

An index is a safetensors file (no pickle) holding one tensor, ``embeddings``
(n, dim) float32, each row L2-normalised by the model's tower
(:meth:`~opt.model.opt_model.OPTModel.tower_embeddings`), and string metadata:
``format`` (``opt-embedding-index``), ``version``, ``modality`` (of the rows),
``dim`` and ``keys`` (a JSON list, one key per row). A query is embedded with
its own modality's tower and scored by cosine against every row (one matrix
product), so text finds images or speech, and images find images.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from opt import MODALITIES
from opt.downstream.common import LoadedModel
from opt.downstream.files import decode_one
from opt.errors import UserError
from opt.files import write_atomic

FORMAT = "opt-embedding-index"
VERSION = "1"


@dataclass
class EmbeddingIndex:
    """Rows of tower embeddings: ``embeddings`` (n, dim) float32, normalised; ``keys`` one per row."""

    embeddings: torch.Tensor
    keys: list[str]
    modality: str

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class Hit:
    rank: int  # 1 = best
    score: float  # cosine of the query and the row
    key: str


@torch.no_grad()
def embed_batch(loaded: LoadedModel, batch: dict, modality: str) -> torch.Tensor:
    """(b, dim) float32 normalised tower embeddings of ``batch``'s ``modality``, on the CPU."""
    model = loaded.model
    unimodal = model.encode_unimodal(batch, modalities=(modality,))
    return model.tower_embeddings(unimodal)[modality].float().cpu()


def embed_query(loaded: LoadedModel, modality: str, payload: bytes, *, key: str) -> torch.Tensor:
    """(dim,) the tower embedding of one query's bytes (text, image or audio), decoded as a shard
    member is; one that cannot be read raises :class:`UserError` naming ``key``."""
    return embed_batch(loaded, decode_one(loaded, key, {modality: payload}), modality)[0]


def embed_batches(loaded: LoadedModel, batches: Iterable[dict], modality: str) -> EmbeddingIndex:
    """An index of every sample of ``batches``, keyed by the batches' keys."""
    if modality not in MODALITIES:
        raise UserError(f"modality {modality!r} is not one of {', '.join(MODALITIES)}")
    keys, parts = [], []
    for batch in batches:
        keys += batch["keys"]
        parts.append(embed_batch(loaded, batch, modality))
    dim = loaded.model.spec.model.towers.dim
    return EmbeddingIndex(torch.cat(parts) if parts else torch.zeros(0, dim), keys, modality)


def save_index(index: EmbeddingIndex, path: str | Path) -> Path:
    """Write ``index`` to ``path`` atomically as safetensors (see the module docstring)."""
    metadata = {"format": FORMAT, "version": VERSION, "modality": index.modality, "dim": str(index.dim),
                "keys": json.dumps(index.keys)}
    return write_atomic(path, save({"embeddings": index.embeddings.float().contiguous()}, metadata=metadata))


def load_index(path: str | Path) -> EmbeddingIndex:
    """Read an index written by :func:`save_index`; anything else raises :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"index file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as stored:
            metadata = stored.metadata() or {}
            names = set(stored.keys())
            embeddings = stored.get_tensor("embeddings") if "embeddings" in names else None
    except (SafetensorError, OSError) as error:
        raise UserError(f"{path} is not a readable safetensors file ({error})") from None
    if metadata.get("format") != FORMAT:
        raise UserError(f"{path} is not an OPT embedding index (make one with opt embed)")
    try:
        keys = json.loads(metadata["keys"])
        modality, dim = metadata["modality"], int(metadata["dim"])
    except (KeyError, ValueError):
        raise UserError(f"{path}: damaged OPT embedding index (its keys, modality or dim cannot be read)") from None
    if (embeddings is None or embeddings.dim() != 2 or embeddings.shape != (len(keys), dim)
            or not embeddings.is_floating_point() or modality not in MODALITIES
            or not all(isinstance(k, str) for k in keys)):
        raise UserError(f"{path}: damaged OPT embedding index (its embeddings do not match its keys and dim)")
    return EmbeddingIndex(embeddings.float(), keys, modality)


def check_model_fits(loaded: LoadedModel, index: EmbeddingIndex, path: str | Path) -> None:
    """Refuse an index whose rows are not the size of this model's tower embeddings."""
    dim = loaded.model.spec.model.towers.dim
    if index.dim != dim:
        raise UserError(f"{path} holds {index.dim}-d embeddings but this model's towers give {dim}-d ones; "
                        "embed with the same model")


def search(index: EmbeddingIndex, query: torch.Tensor, *, k: int = 10) -> list[Hit]:
    """The ``k`` rows closest to ``query`` (dim,) by cosine, best first (ties keep index order)."""
    scores = index.embeddings @ query.float()  # (n,)
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return [Hit(rank, float(scores[row]), index.keys[row]) for rank, row in enumerate(order.tolist(), start=1)]
