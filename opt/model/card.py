"""The model card: the ``README.md`` of a model directory.

Written by :meth:`~opt.model.opt_model.OPTModel.save_pretrained` (so by ``opt export`` and
``opt model init``) from what the directory holds: the architecture and sizes, the model
config, the pretrained parts it started from, the training run when there was one, and an
evaluation section that ``opt eval`` fills in (:func:`with_evaluation`) between two markers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import yaml

from opt.config import Quantizer, VQConfig, to_dict

if TYPE_CHECKING:
    from opt.model.opt_model import OPTModel

CARD_NAME = "README.md"
EVALUATION_START = "<!-- opt eval: start -->"
EVALUATION_END = "<!-- opt eval: end -->"


@dataclass
class TrainingFacts:
    """What the card says about how the weights were trained (``opt export`` fills it from the run)."""

    data: str = ""  # the training shards
    steps: int = 0  # optimizer steps of the checkpoint exported
    batch_size: int = 0  # samples per optimizer step on each process
    tasks: dict[str, float] = field(default_factory=dict)  # task weights
    init_from: str | None = None  # the model directory the run started from (fine-tuning)


def _parameter_table(model: "OPTModel") -> list[str]:
    from opt.model.summary import parameter_counts

    rows = ["| part | parameters |", "|---|---|"]
    rows += [f"| {name} | {count / 1e6:,.2f} M |" for name, count in parameter_counts(model).items()]
    return rows


def _quantizer_note(vq: VQConfig) -> str:
    """`` (FSQ, levels 8x5x5x5)`` for a finite-scalar tokenizer, nothing for a learned codebook."""
    return f" (FSQ, levels {'x'.join(map(str, vq.fsq_levels))})" if vq.quantizer == Quantizer.fsq else ""


def model_card(model: "OPTModel", training: TrainingFacts | None = None) -> str:
    """The card's markdown for ``model``, with an evaluation section still to be filled."""
    spec = model.spec
    config = spec.model
    lines = ["---", "library_name: opt", "tags: [image-text-audio, multimodal, captioning, retrieval, "
             "text-to-image]", "---", "", "# OPT model", "",
             "An Omni-Perception Pre-Trainer: a vision encoder (timm ViT), a text encoder (BERT), an audio encoder, "
             "a cross-modal encoder fusing any subset of them, a text decoder (captions and transcripts) and an "
             "image-token decoder whose VQ codes a VQ tokenizer turns into pixels. Load it with "
             "`OPT.load(directory)` (Python) or pass the directory as `--model` to `opt caption`, `opt generate`, "
             "`opt retrieve`, `opt embed`, `opt search` and `opt eval`.", "", "## Architecture", ""]
    lines += [f"- images {spec.image_size} px, {config.vision.patch_size}-px patches "
              f"({config.vision.stem} stem{', class token' if config.vision.class_token else ''}); vision "
              f"{config.vision.layers} layers x {config.vision.width}",
              f"- text: {config.text.layers} layers x {config.text.width}, {spec.vocab_size}-token vocabulary, "
              f"at most {spec.max_text_tokens} tokens",
              f"- audio: {spec.audio.input} input at {spec.audio.sample_rate} Hz, at most {spec.audio.max_seconds:g} s; "
              f"{config.audio.layers} layers x {config.audio.width}",
              f"- cross-modal encoder {config.cross.layers} x {config.cross.width}; text decoder "
              f"{config.text_decoder.layers} x {config.text_decoder.width}; image decoder "
              f"{config.image_decoder.layers} x {config.image_decoder.width} over {spec.image_codes} codes of a "
              f"{config.vq.codebook_size}-code VQ tokenizer" + _quantizer_note(config.vq), ""]
    lines += _parameter_table(model) + [""]
    sources = {part: entry.get("source") for part, entry in spec.backbones.items() if entry.get("source")}
    if sources:
        lines += ["## Pretrained parts", ""] + [f"- {part}: initialised from `{source}`"
                                                 for part, source in sources.items()] + [""]
    lines += ["## Training", ""]
    if training is None:
        lines += ["Not trained: the weights are as `opt model init` wrote them (fresh where no pretrained part "
                  "was given).", ""]
    else:
        weights = ", ".join(f"{task} {weight:g}" for task, weight in training.tasks.items() if weight > 0)
        lines += [f"- data: `{training.data}`", f"- steps: {training.steps:,} of {training.batch_size} samples per process",
                  f"- tasks: {weights or '-'}"]
        if training.init_from:
            lines.append(f"- fine-tuned from `{training.init_from}`")
        lines.append("")
    lines += ["## Evaluation", "", EVALUATION_START, "Not evaluated yet: `opt eval --model DIR --data SHARDS --out "
              "REPORT` fills in this section.", EVALUATION_END, "",
              "## Intended use and limitations", "",
              "Research on image-text-audio pre-training: captioning images and speech, cross-modal retrieval, "
              "text-to-image generation at the model's resolution. It knows only what its training data holds; "
              "captions and images inherit that data's biases and errors, generated images are small and "
              "coarse, and nothing here was checked for safety in deployment.", "",
              "## Config", "", "```yaml", yaml.safe_dump(to_dict(config), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def with_evaluation(card: str, section: str) -> str | None:
    """``card`` with its evaluation section replaced by ``section`` (markdown); None when the
    card has no evaluation markers (written by hand, or by an older version)."""
    start, end = card.find(EVALUATION_START), card.find(EVALUATION_END)
    if start < 0 or end < start:
        return None
    return card[:start + len(EVALUATION_START)] + "\n" + section.strip() + "\n" + card[end:]
