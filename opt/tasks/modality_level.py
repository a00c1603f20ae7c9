"""Modality-level tasks: whole-modality masking, text decoding and image decoding.

Whole-modality masking (:func:`drop_modalities`) hides one or two modalities of a
sample entirely; the token-level tasks apply it to the modalities they do not
mask, and 5-way matching hides images or audio with :func:`with_present`.

Text decoding hides the text entirely and regenerates it with the text decoder from
image only, audio only, or both (one condition per step, drawn uniformly among
``tasks.text_decoding_conditions``). Image decoding hides the image
and predicts its VQ codes with the image decoder from text only, audio only or
both (``tasks.image_decoding_conditions``); per sample the condition is replaced by the null context with probability
``condition_dropout`` (for classifier-free guidance). Each ID step trains either
the autoregressive order or the parallel masked (MaskGIT) objective
(``tasks.image_decoding_parallel_fraction`` of the steps, half by default), so one network
serves both decoding modes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from opt.config import TasksConfig
from opt.model.generation import cosine_mask_ratio
from opt.model.opt_model import OPTModel
from opt import MODALITIES
from opt.tasks.base import TaskGenerators, TaskOutput, accuracy, uniform


def with_present(batch: dict, present: dict[str, torch.Tensor]) -> dict:
    """A shallow copy of ``batch`` with new ``present`` flags for some modalities."""
    out = dict(batch)
    for modality, flags in present.items():
        out[modality] = dict(batch[modality]) | {"present": flags}
    return out


def drop_modalities(batch: dict, keep: str, probability: float, generator: torch.Generator) -> dict:
    """Whole-modality masking: for each sample, with ``probability`` hide one or both
    of the modalities other than ``keep`` (uniformly among the non-empty subsets)."""
    others = [m for m in MODALITIES if m != keep and m in batch]
    if not others or probability <= 0:
        return batch
    size = len(batch["keys"])
    subsets = [[m] for m in others] + ([others] if len(others) == 2 else [])
    drop = uniform(size, generator) < probability
    choice = torch.randint(len(subsets), (size,), generator=generator)
    present = {}
    for modality in others:
        hidden = drop & torch.tensor([modality in subsets[c] for c in choice.tolist()])
        present[modality] = batch[modality]["present"] & ~hidden.to(batch[modality]["present"].device)
    return with_present(batch, present)


def _sources(task: str, conditions: list[str], batch: dict, generator: torch.Generator) -> tuple[str, ...]:
    """One of ``conditions`` ("image", "image+audio", ...) among those whose modalities the
    batch carries (a run with ``data.modalities`` [text, image] has no audio to condition on)."""
    options = [tuple(c.split("+")) for c in conditions]
    options = [c for c in options if all(m in batch for m in c)]
    if not options:
        raise ValueError(f"{task}: the batch has none of the modalities of {', '.join(conditions)}")
    return options[int(torch.randint(len(options), (1,), generator=generator))]


class TextDecoding:
    name = "text_decoding"

    def __init__(self, config: TasksConfig, *, label_smoothing: float) -> None:
        self.config = config
        self.label_smoothing = label_smoothing

    def __call__(self, model: OPTModel, batch: dict, generators: TaskGenerators, *,
                 conditions: list[str] | None = None) -> TaskOutput:
        """``conditions`` replaces ``tasks.text_decoding_conditions`` (a curriculum phase's own)."""
        sources = _sources(self.name, conditions or self.config.text_decoding_conditions, batch, generators.shared)
        fused = model.fuse(model.encode_unimodal(batch, modalities=sources), sources)
        ids, mask = batch["text"]["ids"], batch["text"]["mask"] & batch["text"]["present"][:, None]
        logits = model.text_decoder.teacher_forced(ids, fused["states"], fused["mask"])
        targets = ids[:, 1:]
        keep = mask[:, 1:]
        loss = F.cross_entropy(logits[keep], targets[keep], label_smoothing=self.label_smoothing)
        token_accuracy = accuracy(logits[keep], targets[keep])
        metrics = {"loss": loss.detach(), "accuracy": token_accuracy,
                   f"accuracy_from_{'_'.join(sources)}": token_accuracy}
        return TaskOutput(loss, metrics)


class ImageDecoding:
    name = "image_decoding"

    def __init__(self, config: TasksConfig) -> None:
        self.config = config

    def __call__(self, model: OPTModel, batch: dict, generators: TaskGenerators, *,
                 conditions: list[str] | None = None) -> TaskOutput:
        """``conditions`` replaces ``tasks.image_decoding_conditions`` (a curriculum phase's own)."""
        decoder = model.image_decoder
        sources = _sources(self.name, conditions or self.config.image_decoding_conditions, batch, generators.shared)
        fused = model.fuse(model.encode_unimodal(batch, modalities=sources), sources)
        context, context_mask = fused["states"], fused["mask"]
        size = context.shape[0]
        dropped = (uniform(size, generators.local) < self.config.condition_dropout).to(context.device)
        codes = model.image_codes(batch["image"]["pixels"])
        present = batch["image"]["present"]
        autoregressive = bool(uniform(1, generators.shared) < 1.0 - self.config.image_decoding_parallel_fraction)
        if autoregressive:
            inputs = torch.cat([torch.full_like(codes[:, :1], decoder.bos_id), codes[:, :-1]], dim=1)
            predict = present[:, None].expand_as(codes)
        else:
            ratio = cosine_mask_ratio(uniform((size, 1), generators.local)).to(codes.device)  # MaskGIT's schedule
            predict = (uniform(codes.shape, generators.local).to(codes.device) < ratio.clamp_min(1 / codes.shape[1]))
            predict &= present[:, None]
            inputs = codes.masked_fill(predict, decoder.mask_id)
        logits = decoder(inputs, context, context_mask, causal=autoregressive, drop_condition=dropped).float()
        loss = F.cross_entropy(logits[predict], codes[predict])
        mode = "autoregressive" if autoregressive else "parallel"
        code_accuracy = accuracy(logits[predict], codes[predict])
        metrics = {"loss": loss.detach(), "accuracy": code_accuracy, f"loss_{mode}": loss.detach(),
                   f"accuracy_from_{'_'.join(sources)}": code_accuracy}
        return TaskOutput(loss, metrics)
