"""``opt eval``: every downstream task (retrieval, captioning, text-to-image) on
named splits of shards, into ``metrics.json``, the pictures and ``report.md``.

The evaluator knows no dataset. Which splits a directory holds, and the
metrics read against a dataset's own annotations, come from a plug-in
(:mod:`opt.downstream.plugins`): the synthetic world's gives ``test`` and
``test_novel`` and the attribute accuracy of captions and of generated images.

``metrics.json`` is nested split -> task -> direction or input -> metric:
``{"test": {"data": {...}, "retrieval": {"a2t": {"r1": ...}}, "captioning": {"image": {...}},
"text_to_image": {"text": {...}}}, "test_novel": {...}, "seconds": {...}, "machine": {...}}``
(``data``: the samples used, skipped and repaired, by reason, when the split was read with every
modality; each captioning input holds its own ``data``, since it reads only what it needs;
``machine``: the processor and its measured fp32 matmul speed, which the times depend on).
Beside it: per split a grid of generated images under their prompts and a grid
of split images with their generated captions, the training curves when given,
and the report (:mod:`opt.downstream.report`).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from opt.benchmarking import machine_summary
from opt.downstream.captioning import INPUTS, Caption, caption_metrics, caption_split
from opt.data.pipeline import DataStats
from opt.downstream.common import EncodedSplit, LoadedModel, encode_split, split_modalities
from opt.downstream.plugins import PLUGINS, EvaluationPlugin, find_splits
from opt.downstream.report import evaluation_section, render_report
from opt.downstream.retrieval import DEFAULT_CAPTION_PRIOR, DIRECTIONS, retrieve
from opt.downstream.text_to_image import DEFAULT_CANDIDATES, DEFAULT_DECODING, evaluate_text_to_image
from opt.errors import UserError
from opt.files import write_atomic
from opt.logs import warn
from opt.model.card import CARD_NAME, with_evaluation
from opt.viz import save_image_grid

GRID_COUNT = 16  # images shown in each report grid


@dataclass
class EvalSettings:
    """How ``opt eval`` runs each task."""

    limit: int | None = None  # samples per split (None = all)
    batch_size: int = 64  # samples encoded or captioned, and (query, candidate) pairs re-ranked, at once
    rerank_k: int = 16  # retrieval: candidates re-ranked by the cross encoder (0 = off)
    caption_likelihood: bool = True  # re-ranking adds the text decoder's log P(caption | query) or P(query | candidate)
    caption_prior: int = DEFAULT_CAPTION_PRIOR  # ... a candidate caption's relative to its mean over this many other queries
    beam: int = 1  # captioning beam size (1 = greedy)
    generate_count: int = 64  # text-to-image: prompts per split
    decoding: str = DEFAULT_DECODING  # text-to-image: autoregressive | parallel
    steps: int = 12
    guidance: float = 3.0
    candidates: int = DEFAULT_CANDIDATES  # text-to-image: samples per prompt; the captioner keeps the best
    seed: int = 0
    with_meteor: bool = True


@dataclass
class SplitPictures:
    """What the report shows of one split."""

    split: EncodedSplit
    generated: list[torch.Tensor]  # the first generated images (3, H, W) in [0, 1] ...
    prompts: list[str]  # ... and their prompts
    captions: dict[str, list[Caption]]  # inputs -> the first generated captions


def evaluate_split(loaded: LoadedModel, shards: str, settings: EvalSettings, *,
                   plugins: Sequence[EvaluationPlugin] = ()) -> tuple[dict, SplitPictures, dict[str, float]]:
    """Metrics of one split, the pictures the report shows and the seconds each task took.

    The tasks are those the split's modalities allow (:func:`split_modalities`): a caption
    corpus of images and text gets text-image retrieval, captioning from images and
    text-to-image; the synthetic world every direction and input."""
    timings: dict[str, float] = {}
    carried = split_modalities(shards)
    start = time.perf_counter()
    split = encode_split(loaded, shards, modalities=carried, limit=settings.limit, batch_size=settings.batch_size)
    timings["encode"] = time.perf_counter() - start
    metrics: dict[str, dict] = {"data": split.data_stats.as_dict(), "retrieval": {}, "captioning": {}}
    start = time.perf_counter()
    for name, (query, target) in DIRECTIONS.items():
        if set(query) | {target} <= set(carried):
            metrics["retrieval"][name] = retrieve(loaded, split, query, target, rerank_k=settings.rerank_k,
                                                  caption_likelihood=settings.caption_likelihood,
                                                  caption_prior=settings.caption_prior,
                                                  batch_size=settings.batch_size)
    timings["retrieval"] = time.perf_counter() - start
    start = time.perf_counter()
    shown = {}
    for inputs, needed in INPUTS.items():
        if not set(needed) | {"text"} <= set(carried):
            continue
        read = DataStats()
        captions = caption_split(loaded, shards, inputs, beam=settings.beam, limit=settings.limit,
                                 batch_size=settings.batch_size, stats=read)
        metrics["captioning"][inputs] = caption_metrics(captions, inputs, with_meteor=settings.with_meteor,
                                                        plugins=plugins) | {"data": read.as_dict()}
        shown[inputs] = captions[:GRID_COUNT]
    timings["captioning"] = time.perf_counter() - start
    images, prompts = torch.empty(0), []
    if {"text", "image"} <= set(carried):
        start = time.perf_counter()
        t2i, images, prompts = evaluate_text_to_image(loaded, split, count=settings.generate_count,
                                                      decoding=settings.decoding, steps=settings.steps,
                                                      guidance=settings.guidance, candidates=settings.candidates,
                                                      seed=settings.seed, plugins=plugins)
        metrics["text_to_image"] = {"text": t2i}
        timings["text_to_image"] = time.perf_counter() - start
    pictures = SplitPictures(split, list(images[:GRID_COUNT]), prompts[:GRID_COUNT], shown)
    return metrics, pictures, timings


def _caption_grid(pictures: SplitPictures, out: Path) -> Path:
    """Split images with the captions generated from image and from audio (captioning reads fewer
    modalities than the split was encoded with, so it may keep samples the split skipped)."""
    split, shown = pictures.split, pictures.captions
    rows = {key: row for row, key in enumerate(split.keys)}
    keys = {c.key: c for c in shown.get("image", []) if c.key in rows}
    from_audio = {c.key: c.caption for c in shown.get("audio", [])}
    images, titles = [], []
    for key in keys:
        images.append(split.pixels[rows[key]])
        titles.append(f"from image: {keys[key].caption}\nfrom audio: {from_audio.get(key, '-')}\n"
                      f"truth: {keys[key].reference}")
    return save_image_grid(images, out, titles=titles, columns=4, title_lines=10)


def _write_figures(pictures: dict[str, SplitPictures], out: Path, curves: Path | None) -> dict[str, str]:
    """The report's PNGs under ``out``: figure name -> file name."""
    figures = {}
    for name, shown in pictures.items():
        if shown.generated:
            figures[f"{name}_generated"] = save_image_grid(shown.generated, out / f"{name}_generated.png",
                                                           titles=shown.prompts, columns=4).name
        if shown.captions.get("image"):
            figures[f"{name}_captions"] = _caption_grid(shown, out / f"{name}_captions.png").name
    if curves is not None and curves.is_file():
        shutil.copyfile(curves, out / "curves.png")
        figures["curves"] = "curves.png"
    return figures


def evaluate(loaded: LoadedModel, splits: dict[str, str], out: str | Path, *, settings: EvalSettings,
             plugins: Sequence[EvaluationPlugin] = (), curves: Path | None = None, model_name: str = "") -> dict:
    """Run every task on each named split (name -> shard spec), with the ``plugins``' metrics;
    write ``out/metrics.json``, the PNGs and ``out/report.md``; return the metrics."""
    if not splits:
        raise UserError("no splits to evaluate")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"seconds": {}, "machine": machine_summary()}
    pictures = {}
    for name, shards in splits.items():
        results[name], pictures[name], results["seconds"][name] = evaluate_split(loaded, shards, settings,
                                                                                 plugins=plugins)
    figures = _write_figures(pictures, out, curves)
    write_atomic(out / "metrics.json", json.dumps(results, indent=2).encode())
    write_atomic(out / "report.md", render_report(results, figures, model_name).encode())
    return results


def evaluation_splits(data: str | Path, name: str | None = None) -> tuple[dict[str, str], tuple[EvaluationPlugin, ...]]:
    """The splits ``opt eval --data DATA [--name NAME]`` evaluates, and the plug-ins that score them.

    Without a name, a directory a plug-in recognises gives that plug-in's splits (the synthetic
    world's ``test`` and ``test_novel``); any other shards (a directory, a glob, a brace pattern)
    are one split, named ``NAME`` or ``eval``. Every plug-in joins in on such shards: each scores
    only the samples carrying its annotations."""
    if name is None and Path(data).is_dir():
        try:
            plugin, splits = find_splits(data)
            return splits, (plugin,)
        except UserError:
            pass
    return {name or "eval": str(data)}, PLUGINS


def evaluate_directory(loaded: LoadedModel, data: str | Path, out: str | Path, *, settings: EvalSettings,
                       name: str | None = None, curves: Path | None = None, model_name: str = "") -> dict:
    """:func:`evaluate` on the splits :func:`evaluation_splits` finds in ``data``."""
    splits, plugins = evaluation_splits(data, name)
    return evaluate(loaded, splits, out, settings=settings, plugins=plugins, curves=curves, model_name=model_name)


def record_in_model_card(model: str | Path, results: dict, data: str | Path, report: str | Path) -> bool:
    """Put the headline figures of ``results`` into the evaluation section of the model directory's
    card (``README.md``), atomically; a card without the section, or a directory that cannot be
    written, is left as it is with a warning. Returns whether the card changed."""
    path = Path(model) / CARD_NAME
    card = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None
    updated = with_evaluation(card, evaluation_section(results, str(data), str(report))) if card else None
    if updated is None:
        warn(f"{path} has no evaluation section to fill (an older model directory?); figures are in {report}")
        return False
    try:
        write_atomic(path, updated.encode())
    except OSError as error:
        warn(f"cannot update the model card {path} ({error.strerror}); figures are in {report}")
        return False
    return True
