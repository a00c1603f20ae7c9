"""Captioning: image and/or audio -> text with the text decoder over the fused
tokens of the given inputs (greedy, or beam search with ``beam`` > 1).

Audio-only captioning is speech recognition, so it also reports the word
error rate. With references (the shard captions by default) it reports the
COCO caption metrics, and each dataset plug-in given
(:mod:`opt.downstream.plugins`) adds its own: on the synthetic world the
attribute accuracy, the fraction of objects whose size, colour, shape and
position/relation the caption states correctly against ``KEY.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from opt.data.pipeline import DataStats
from opt.downstream.caption_metrics import caption_scores, word_error_rate
from opt.downstream.common import LoadedModel, iterate_batches
from opt.downstream.plugins import EvaluationPlugin
from opt.errors import UserError
from opt.model.generation import beam_search, generate_text

INPUTS = {"image": ("image",), "audio": ("audio",), "image+audio": ("image", "audio")}


@dataclass
class Caption:
    key: str
    caption: str
    reference: str
    meta: dict  # the sample's metadata (KEY.json), read by dataset plug-ins


def parse_inputs(inputs: str) -> tuple[str, ...]:
    if inputs not in INPUTS:
        raise UserError(f"--inputs {inputs!r} is not one of {', '.join(INPUTS)}")
    return INPUTS[inputs]


@torch.no_grad()
def caption_batch(loaded: LoadedModel, batch: dict, sources: tuple[str, ...], *, beam: int = 1) -> list[str]:
    """Captions of one batch from the ``sources`` modalities."""
    model, tokenizer = loaded.model, loaded.tokenizer
    fused = model.fuse(model.encode_unimodal(batch, modalities=sources), sources)
    ids_kwargs = {"bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id}
    if beam > 1:
        ids = beam_search(model.text_decoder, fused["states"], fused["mask"], beam_size=beam, **ids_kwargs)
    else:
        ids = generate_text(model.text_decoder, fused["states"], fused["mask"], **ids_kwargs)
    return [tokenizer.decode(row.tolist()) for row in ids.cpu()]


def caption_split(loaded: LoadedModel, data: str, inputs: str, *, beam: int = 1, limit: int | None = None,
                  batch_size: int = 64, stats: DataStats | None = None) -> list[Caption]:
    """Caption every sample of ``data`` that has the ``inputs`` (at most ``limit``); the captions
    are read too, as references. The samples used, skipped and repaired are added to ``stats``."""
    sources = parse_inputs(inputs)
    out = []
    for batch in iterate_batches(loaded, data, modalities=(*sources, "text"), require=sources,
                                 batch_size=batch_size, limit=limit, stats=stats):
        captions = caption_batch(loaded, batch, sources, beam=beam)
        for key, caption, reference, meta in zip(batch["keys"], captions, batch["captions"], batch["meta"],
                                                 strict=True):
            out.append(Caption(key, caption, reference or "", meta))
    return out


def caption_metrics(captions: list[Caption], inputs: str, *, with_meteor: bool = True,
                    plugins: Sequence[EvaluationPlugin] = ()) -> dict[str, float]:
    """COCO metrics against the references, WER for audio, then each plug-in's metrics."""
    scored = [c for c in captions if c.reference]
    metrics: dict[str, float] = {"n": len(captions)}
    if scored:
        predictions = {c.key: c.caption for c in scored}
        references = {c.key: [c.reference] for c in scored}
        metrics |= caption_scores(predictions, references, with_meteor=with_meteor)
        if inputs == "audio":
            metrics["wer"] = word_error_rate(predictions, {c.key: c.reference for c in scored})
    for plugin in plugins:
        metrics |= plugin.caption_metrics([c.caption for c in captions], [c.meta for c in captions])
    return metrics
