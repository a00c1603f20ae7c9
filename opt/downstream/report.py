"""The ``report.md`` of ``opt eval`` (:mod:`opt.downstream.evaluate`), rendered
from its metrics: the samples each split used and skipped, the tables with the
splits side by side (``test / test_novel`` on the synthetic world), the
pictures, the training curves when given, the time each task took and the
machine it ran on.
"""

from __future__ import annotations

from opt.downstream.captioning import INPUTS
from opt.downstream.common import describe_counts
from opt.downstream.retrieval import DIRECTIONS


def split_names(results: dict) -> list[str]:
    """The evaluated splits of ``metrics.json``, in order (its other entries are ``seconds`` and ``machine``)."""
    return [name for name, value in results.items() if isinstance(value, dict) and "retrieval" in value]


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
    """Rows x columns; each cell the splits' values side by side (``test / test_novel``)."""
    splits = split_names(results)
    rows = [row for row in rows if any(_lookup(results[split], f"{task}.{row}") for split in splits)]
    if not rows:
        return ["(not run: the splits lack the modalities)"]
    lines = ["| " + " / ".join(splits) + " | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        cells = [" / ".join(_cell(_lookup(results[split], f"{task}.{row}.{column}")) for split in splits)
                 for column in columns]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def render_report(results: dict, figures: dict[str, str], model_name: str) -> str:
    """The markdown report: tables with the splits side by side, then the pictures."""
    lines = [f"# OPT evaluation{': ' + model_name if model_name else ''}", ""]
    lines += ["## Data", "", "Each split read with every modality its shards carry: a corrupt sample, or one "
              "lacking one of them, is skipped.", ""]
    lines += [f"- {split}: {describe_counts(results[split]['data'])}" for split in split_names(results)] + [""]
    lines += ["## Retrieval", "",
              "Pool: the whole split, every caption and each image or clip once (the first sample of its "
              "group). A query is found at K when any of its true matches (its group's) is in the top K; the "
              "mean rank is its best match's. Two-tower ranking of every candidate, then cross-encoder "
              "re-ranking of the top K; `two_tower.r1`: before re-ranking.", ""]
    lines += _table(results, "retrieval", list(DIRECTIONS), ["r1", "r5", "r10", "mean_rank", "two_tower.r1"]) + [""]
    lines += ["## Captioning", "", "One caption per image or clip (group), scored against every caption of its "
              "group; WER against the captioned sample's own caption. Attribute accuracy: objects whose size, "
              "colour, shape and position or relation the caption states correctly.", ""]
    lines += _table(results, "captioning", list(INPUTS),
                    ["attribute_accuracy", "bleu_4", "meteor", "rouge_l", "cider", "spice", "wer"]) + [""]
    lines += ["Per attribute (fraction of objects stated correctly):", ""]
    lines += _table(results, "captioning", list(INPUTS),
                    ["attribute_color", "attribute_size", "attribute_shape", "attribute_position_or_relation"]) + [""]
    settings = next((results[s]["text_to_image"]["text"] for s in split_names(results)
                     if "text_to_image" in results[s]), {})
    drawn = (f"Decoding: {settings['decoding']}, guidance {settings['guidance']}, each picture the best of "
             f"{settings['candidates']} samples by the model's own captioner (log P(prompt | picture)). "
             if "candidates" in settings else "")
    lines += ["## Text to image", "", drawn + "Attribute accuracy: the analyser finds every object with the prompt's "
              "colour, size and position or relation (shape reported apart).", ""]
    lines += _table(results, "text_to_image", ["text"],
                    ["attribute_accuracy", "attribute_color", "attribute_position_or_relation", "attribute_size",
                     "attribute_shape", "r_precision"]) + [""]
    for split in split_names(results):
        if f"{split}_generated" in figures:
            lines += [f"### Generated from {split} prompts", "", f"![generated]({figures[f'{split}_generated']})", ""]
        if f"{split}_captions" in figures:
            lines += [f"### {split}: generated captions (from image, from audio) and the truth", "",
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


def headline(split: dict) -> str:
    """One line of a split's main figures: R@1 per retrieval direction that had queries, and per
    captioning input CIDEr (and the world's attribute accuracy where its samples carry facts)."""
    parts = [f"{name} R@1 {metrics['r1']:.3f}" for name, metrics in split["retrieval"].items()
             if metrics.get("n") and "r1" in metrics]
    for inputs, metrics in split["captioning"].items():
        shown = [f"{key} {metrics[key]:.3f}" for key in ("cider", "attribute_accuracy") if key in metrics]
        if shown:
            parts.append(f"captions from {inputs}: {', '.join(shown)}")
    attributes = split.get("text_to_image", {}).get("text", {}).get("attribute_accuracy")
    if attributes is not None:
        parts.append(f"text-to-image attributes {attributes:.3f}")
    return "; ".join(parts) or "nothing to score"


def evaluation_section(results: dict, data: str, report: str) -> str:
    """The model card's evaluation section: each split's data and headline figures."""
    lines = [f"`opt eval` on `{data}` (full report: `{report}`):", ""]
    for split in split_names(results):
        lines.append(f"- **{split}** ({describe_counts(results[split]['data'])}): {headline(results[split])}")
    return "\n".join(lines)
