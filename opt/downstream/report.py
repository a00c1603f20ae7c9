"""``opt eval``: every downstream task on the ``test`` and ``test_novel`` splits
of a shard directory, into ``metrics.json`` and a ``report.md`` a person opens.

``metrics.json`` is nested split -> task -> direction or input -> metric:
``{"test": {"retrieval": {"a2t": {"r1": ...}}, "captioning": {"image": {...}},
"text_to_image": {"text": {...}}}, "test_novel": {...}, "seconds": {...}, "machine": {...}}``
(``machine``: the processor and its measured fp32 matmul speed, which the times depend on).
The report shows the tables (test beside test_novel), a grid of generated
images under their prompts, a grid of test images with their generated
captions, and the training curves when given.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from opt.benchmarking import machine_summary
from opt.data.shards import resolve_shards
from opt.downstream.captioning import INPUTS, caption_metrics, caption_split
from opt.downstream.common import EncodedSplit, LoadedModel, encode_split
from opt.downstream.retrieval import DIRECTIONS, retrieve
from opt.downstream.text_to_image import DEFAULT_CANDIDATES, DEFAULT_DECODING, evaluate_text_to_image
from opt.errors import UserError
from opt.files import write_atomic
from opt.viz import save_image_grid

SPLITS = ("test", "test_novel")
GRID_COUNT = 16  # images shown in each report grid


@dataclass
class EvalSettings:
    limit: int | None = None  # samples per split (None = all)
    rerank_k: int = 16  # retrieval: candidates re-ranked by the cross encoder (0 = off)
    caption_likelihood: bool = True  # re-ranking adds the text decoder's log P(caption | query) or P(query | candidate)
    beam: int = 1  # captioning beam size (1 = greedy)
    generate_count: int = 64  # text-to-image: prompts per split
    decoding: str = DEFAULT_DECODING  # text-to-image: autoregressive | parallel
    steps: int = 12
    guidance: float = 3.0
    candidates: int = DEFAULT_CANDIDATES  # text-to-image: samples per prompt; the captioner keeps the best
    seed: int = 0
    with_meteor: bool = True


def split_shards(data: str | Path, split: str) -> str | None:
    """The shard spec of ``split`` under ``data``, or None when the directory has none."""
    spec = str(Path(data) / f"{split}-*.tar")
    try:
        resolve_shards(spec)
    except UserError:
        return None
    return spec


def evaluate_split(loaded: LoadedModel, shards: str, settings: EvalSettings) -> tuple[dict, dict]:
    """Metrics of one split and the pictures the report shows."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    split = encode_split(loaded, shards, limit=settings.limit)
    timings["encode"] = time.perf_counter() - start
    metrics: dict[str, dict] = {"retrieval": {}, "captioning": {}}
    start = time.perf_counter()
    for name, (query, target) in DIRECTIONS.items():
        metrics["retrieval"][name] = retrieve(loaded, split, query, target, rerank_k=settings.rerank_k,
                                                   caption_likelihood=settings.caption_likelihood)
    timings["retrieval"] = time.perf_counter() - start
    start = time.perf_counter()
    shown = {}
    for inputs in INPUTS:
        captions = caption_split(loaded, shards, inputs, beam=settings.beam, limit=settings.limit)
        metrics["captioning"][inputs] = caption_metrics(captions, inputs, with_meteor=settings.with_meteor)
        shown[inputs] = captions[:GRID_COUNT]
    timings["captioning"] = time.perf_counter() - start
    start = time.perf_counter()
    t2i, images, prompts = evaluate_text_to_image(loaded, split, count=settings.generate_count,
                                                  decoding=settings.decoding, steps=settings.steps,
                                                  guidance=settings.guidance, candidates=settings.candidates,
                                                  seed=settings.seed)
    metrics["text_to_image"] = {"text": t2i}
    timings["text_to_image"] = time.perf_counter() - start
    pictures = {"generated": (images[:GRID_COUNT], prompts[:GRID_COUNT]), "captions": shown,
                "split": split}
    return metrics, pictures | {"seconds": timings}


def _caption_grid(split: EncodedSplit, shown: dict, out: Path) -> Path:
    """Test images with the captions generated from image and from audio."""
    keys = {c.key: c for c in shown["image"]}
    from_audio = {c.key: c.caption for c in shown["audio"]}
    images, titles = [], []
    for key in keys:
        images.append(split.pixels[split.keys.index(key)])
        titles.append(f"from image: {keys[key].caption}\nfrom audio: {from_audio.get(key, '-')}\n"
                      f"truth: {keys[key].reference}")
    return save_image_grid(images, out, titles=titles, columns=4, title_lines=10)


def evaluate_model(loaded: LoadedModel, data: str | Path, out: str | Path, *, settings: EvalSettings,
                   curves: Path | None = None, model_name: str = "") -> dict:
    """Run everything, write ``out/metrics.json``, the PNGs and ``out/report.md``; return the metrics."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"seconds": {}, "machine": machine_summary()}
    pictures = {}
    for split in SPLITS:
        shards = split_shards(data, split)
        if shards is None:
            continue
        results[split], pictures[split] = evaluate_split(loaded, shards, settings)
        results["seconds"][split] = pictures[split].pop("seconds")
    if not pictures:
        raise UserError(f"no test-*.tar or test_novel-*.tar shards in {data}")
    figures = {}
    for split, shown in pictures.items():
        images, prompts = shown["generated"]
        figures[f"{split}_generated"] = save_image_grid(list(images), out / f"{split}_generated.png",
                                                        titles=prompts, columns=4).name
        figures[f"{split}_captions"] = _caption_grid(shown["split"], shown["captions"],
                                                     out / f"{split}_captions.png").name
    if curves is not None and curves.is_file():
        shutil.copyfile(curves, out / "curves.png")
        figures["curves"] = "curves.png"
    write_atomic(out / "metrics.json", json.dumps(results, indent=2).encode())
    write_atomic(out / "report.md", render_report(results, figures, model_name).encode())
    return results


def _lookup(entry: dict, column: str):
    """``entry[a][b]`` for a dotted column ``a.b``; None when missing."""
    for part in column.split("."):
        entry = entry.get(part) if isinstance(entry, dict) else None
    return entry


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _table(results: dict, task: str, rows: list[str], columns: list[str]) -> list[str]:
    """Rows x columns; each cell ``test / test_novel``."""
    splits = [s for s in SPLITS if s in results]
    lines = ["| " + " / ".join(splits) + " | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        cells = [" / ".join(_cell(_lookup(results[split], f"{task}.{row}.{column}")) for split in splits)
                 for column in columns]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def render_report(results: dict, figures: dict[str, str], model_name: str) -> str:
    """The markdown report: tables with test beside test_novel, then the pictures."""
    lines = [f"# OPT evaluation{': ' + model_name if model_name else ''}", ""]
    lines += ["## Retrieval", "",
              "Pool: the whole split. Two-tower ranking of every candidate, then cross-encoder re-ranking "
              "of the top K; `two_tower.r1`: before re-ranking.", ""]
    lines += _table(results, "retrieval", list(DIRECTIONS), ["r1", "r5", "r10", "mean_rank", "two_tower.r1"]) + [""]
    lines += ["## Captioning", "", "Attribute accuracy: objects whose size, colour, shape and position or "
              "relation the caption states correctly.", ""]
    lines += _table(results, "captioning", list(INPUTS),
                    ["attribute_accuracy", "bleu_4", "meteor", "rouge_l", "cider", "wer"]) + [""]
    lines += ["Per attribute (fraction of objects stated correctly):", ""]
    lines += _table(results, "captioning", list(INPUTS),
                    ["attribute_color", "attribute_size", "attribute_shape", "attribute_position_or_relation"]) + [""]
    settings = next((results[s]["text_to_image"]["text"] for s in SPLITS if s in results), {})
    drawn = (f"Decoding: {settings['decoding']}, guidance {settings['guidance']}, each picture the best of "
             f"{settings['candidates']} samples by the model's own captioner (log P(prompt | picture)). "
             if "candidates" in settings else "")
    lines += ["## Text to image", "", drawn + "Attribute accuracy: the analyser finds every object with the prompt's "
              "colour, size and position or relation (shape reported apart).", ""]
    lines += _table(results, "text_to_image", ["text"],
                    ["attribute_accuracy", "attribute_color", "attribute_position_or_relation", "attribute_size",
                     "attribute_shape", "r_precision"]) + [""]
    for split in SPLITS:
        if f"{split}_generated" in figures:
            lines += [f"### Generated from {split} prompts", "", f"![generated]({figures[f'{split}_generated']})",
                      "", f"### {split}: generated captions (from image, from audio) and the truth", "",
                      f"![captions]({figures[f'{split}_captions']})", ""]
    if "curves" in figures:
        lines += ["## Training curves", "", "![curves](curves.png)", ""]
    seconds = results.get("seconds", {})
    lines += ["## Time", ""] + [f"- {split}: " + ", ".join(f"{k} {v:.1f} s" for k, v in parts.items())
                                for split, parts in seconds.items()]
    machine = results.get("machine")
    if machine:
        lines += ["", f"Machine: {machine['processor']}, {machine['cpus']} CPUs, torch {machine['torch']} on "
                  f"{machine['torch_threads']} threads; a 1024 x 1024 fp32 matmul ran at "
                  f"{machine['fp32_matmul_gflops_per_s']} GFLOP/s as the evaluation began."]
    return "\n".join(lines) + "\n"
