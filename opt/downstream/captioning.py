"""Captioning: image and/or audio -> text with the text decoder over the fused
tokens of the given inputs (greedy, or beam search with ``beam`` > 1).

Audio-only captioning is speech recognition, so it also reports the word
error rate. With references (the shard captions by default) it reports the
COCO caption metrics, and each dataset plug-in given
(:mod:`opt.downstream.plugins`) adds its own: on the synthetic world the
attribute accuracy, the fraction of objects whose size, colour, shape and
position/relation the caption states correctly against ``KEY.json``.

With several captions per image or clip (samples sharing a ``group``,
:func:`~opt.downstream.common.group_of`), each group is captioned once, from
its first sample, and scored against every caption of the group (COCO
protocol); a sample without a group is captioned and scored on its own. The
word error rate compares a transcript with the caption of the sample it was
made from (its spoken words), not with the group's other captions, which say
the same thing in other words.

Images or clips given as files (:mod:`opt.downstream.files`) are captioned one
by one (:func:`caption_batches`), without references or metrics.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from opt.data.batch import batch_rows
from opt.data.pipeline import DataStats
from opt.downstream.caption_metrics import caption_scores, word_error_rate
from opt.downstream.common import LoadedModel, group_of, iterate_batches
from opt.downstream.plugins import EvaluationPlugin
from opt.errors import UserError
from opt.model.generation import beam_search, generate_text

INPUTS = {"image": ("image",), "audio": ("audio",), "image+audio": ("image", "audio")}


@dataclass
class Caption:
    """The caption generated for one group, from its first sample."""

    key: str  # the sample captioned
    caption: str
    reference: str  # that sample's own caption ("" when it has none)
    meta: dict  # that sample's metadata (KEY.json), read by dataset plug-ins
    references: list[str] = field(default_factory=list)  # every caption of the group, in reading order


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
    """Caption the first sample of each group of ``data`` that has the ``inputs``, reading at most
    ``limit`` samples; every caption read joins its group's references. The samples used,
    skipped and repaired are added to ``stats``."""
    sources = parse_inputs(inputs)
    by_group: dict[str, Caption] = {}
    for batch in iterate_batches(loaded, data, modalities=(*sources, "text"), require=sources,
                                 batch_size=batch_size, limit=limit, stats=stats):
        groups = [group_of(key, meta) for key, meta in zip(batch["keys"], batch["meta"], strict=True)]
        first: dict[str, int] = {}
        for row, group in enumerate(groups):
            if group not in by_group:
                first.setdefault(group, row)
        rows = list(first.values())
        if rows:
            captions = caption_batch(loaded, batch_rows(batch, rows), sources, beam=beam)
            for row, caption in zip(rows, captions, strict=True):
                by_group[groups[row]] = Caption(batch["keys"][row], caption, batch["captions"][row] or "",
                                                batch["meta"][row])
        for group, reference in zip(groups, batch["captions"], strict=True):
            if reference:
                by_group[group].references.append(reference)
    return list(by_group.values())


def caption_batches(loaded: LoadedModel, batches: Iterable[dict], inputs: str, *, beam: int = 1) -> list[Caption]:
    """One caption per sample of ``batches`` (files or bytes, :mod:`opt.downstream.files`), with
    no references: inputs given as files have no captions to score against."""
    sources = parse_inputs(inputs)
    return [Caption(key, caption, "", meta)
            for batch in batches
            for key, caption, meta in zip(batch["keys"], caption_batch(loaded, batch, sources, beam=beam),
                                          batch["meta"], strict=True)]


def caption_metrics(captions: list[Caption], inputs: str, *, with_meteor: bool = True,
                    plugins: Sequence[EvaluationPlugin] = ()) -> dict[str, float]:
    """COCO metrics of each group's caption against all its references, WER for audio against
    the captioned sample's own caption, then each plug-in's metrics; ``n``: the groups captioned."""
    metrics: dict[str, float] = {"n": len(captions)}
    scored = [c for c in captions if c.references]
    if scored:
        predictions = {c.key: c.caption for c in scored}
        metrics |= caption_scores(predictions, {c.key: c.references for c in scored}, with_meteor=with_meteor)
    transcribed = [c for c in captions if c.reference]
    if inputs == "audio" and transcribed:
        metrics["wer"] = word_error_rate({c.key: c.caption for c in transcribed},
                                         {c.key: c.reference for c in transcribed})
    for plugin in plugins:
        metrics |= plugin.caption_metrics([c.caption for c in captions], [c.meta for c in captions])
    return metrics
