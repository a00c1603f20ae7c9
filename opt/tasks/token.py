"""Token-level tasks: masked language, vision and audio modelling.

Each hides part of one modality, runs the cross-modal encoder on everything
that is present (after whole-modality masking of the other modalities) and
predicts what was hidden from the fused states at the hidden positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from opt.config import TasksConfig
from opt.model.opt_model import OPTModel
from opt.tasks.base import TaskOutput, TaskRandom, accuracy, drop_modalities, select_positions, uniform

FIRST_ORDINARY_ID = 7  # ids below are special tokens (pad, unk, bos, eos, mask, cls, sep)


def mask_text_ids(ids: torch.Tensor, valid: torch.Tensor, *, rate: float, mask_id: int, vocab_size: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: select ``rate`` of the valid tokens; of those 80% become [MASK],
    10% a random ordinary token, 10% stay. Returns (new ids, selected)."""
    selected = select_positions(valid, rate, generator)
    roll = uniform(ids.shape, generator).to(ids.device)
    random_ids = torch.randint(FIRST_ORDINARY_ID, vocab_size, ids.shape, generator=generator).to(ids.device)
    masked = ids.clone()
    masked[selected & (roll < 0.8)] = mask_id
    swap = selected & (roll >= 0.8) & (roll < 0.9)
    masked[swap] = random_ids[swap]
    return masked, selected


def _span(fused: dict, modality: str) -> torch.Tensor:
    start, end = fused["spans"][modality]
    return fused["states"][:, start:end]


class MaskedLanguageModeling:
    name = "mlm"

    def __init__(self, config: TasksConfig) -> None:
        self.config = config

    def __call__(self, model: OPTModel, batch: dict, random: TaskRandom) -> TaskOutput:
        generator = random.mask
        spec = model.spec
        text = batch["text"]
        content = text["mask"] & (text["ids"] >= FIRST_ORDINARY_ID) & text["present"][:, None]
        ids, selected = mask_text_ids(text["ids"], content, rate=self.config.mlm_rate, mask_id=spec.mask_id,
                                      vocab_size=spec.vocab_size, generator=generator)
        batch = drop_modalities(batch, "text", self.config.modality_drop, generator)
        fused = model.fuse(model.encode_unimodal(batch, text_ids=ids))
        logits = model.heads["mlm"](_span(fused, "text")[selected]).float()
        targets = text["ids"][selected]
        loss = F.cross_entropy(logits, targets)
        return TaskOutput(loss, {"loss": loss.item(), "accuracy": accuracy(logits, targets)})


class MaskedVisionModeling:
    """Hidden 8 x 8 patches are predicted as the VQ codes of the same grid cells."""

    name = "mvm"

    def __init__(self, config: TasksConfig) -> None:
        self.config = config

    def __call__(self, model: OPTModel, batch: dict, random: TaskRandom) -> TaskOutput:
        generator = random.mask
        image = batch["image"]
        codes = model.image_codes(image["pixels"])  # (b, 64)
        valid = image["present"][:, None].expand_as(codes)
        hidden = select_positions(valid, self.config.mvm_rate, generator)
        batch = drop_modalities(batch, "image", self.config.modality_drop, generator)
        fused = model.fuse(model.encode_unimodal(batch, hide_patches=hidden))
        logits = model.heads["mvm"](_span(fused, "image")[hidden]).float()
        targets = codes[hidden]
        loss = F.cross_entropy(logits, targets)
        return TaskOutput(loss, {"loss": loss.item(), "accuracy": accuracy(logits, targets)})


class MaskedAudioModeling:
    """Hidden audio frames (after the conv front end) are identified by InfoNCE against
    the front end's true frame features, among ``mam_negatives`` other hidden frames
    of the batch drawn at random (the paper's 10), or among all of them (0)."""

    name = "mam"

    def __init__(self, config: TasksConfig) -> None:
        self.config = config

    def __call__(self, model: OPTModel, batch: dict, random: TaskRandom) -> TaskOutput:
        generator = random.mask
        hidden = select_positions(model.audio_frames(batch), self.config.mam_rate, generator)
        batch = drop_modalities(batch, "audio", self.config.modality_drop, generator)
        unimodal = model.encode_unimodal(batch, hide_frames=hidden)
        fused = model.fuse(unimodal)
        predicted = F.normalize(model.heads["mam"](_span(fused, "audio")[hidden]).float(), dim=-1)
        targets = F.normalize(unimodal["audio"]["frames"][hidden].detach().float(), dim=-1)
        count, negatives = predicted.shape[0], self.config.mam_negatives
        if 0 < negatives < count - 1:  # the true frame (column 0) among sampled hidden frames of the batch
            others = torch.randint(count - 1, (count, negatives), generator=generator)
            others = others + (others >= torch.arange(count)[:, None]).long()  # never the frame itself
            candidates = torch.cat([torch.arange(count)[:, None], others], dim=1).to(predicted.device)
            logits = (predicted[:, None, :] * targets[candidates]).sum(-1) / self.config.mam_temperature
            labels = torch.zeros(count, dtype=torch.long, device=logits.device)
        else:  # every hidden frame of the batch is a candidate: (m, m), the diagonal is the true frame
            logits = predicted @ targets.T / self.config.mam_temperature
            labels = torch.arange(count, device=logits.device)
        loss = F.cross_entropy(logits, labels)
        return TaskOutput(loss, {"loss": loss.item(), "accuracy": accuracy(logits, labels)})
