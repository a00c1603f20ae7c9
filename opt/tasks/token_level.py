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
from opt.tasks.base import TaskGenerators, TaskOutput, accuracy, select_positions, uniform
from opt.tasks.modality_level import drop_modalities

def ordinary_ids(vocab_size: int, special_ids) -> torch.Tensor:
    """The vocabulary's ids that are not special tokens, ascending (SentencePiece: 7 to the end;
    BERT's WordPiece: every id but [PAD], [UNK], [CLS], [SEP] and [MASK])."""
    ordinary = torch.ones(vocab_size, dtype=torch.bool)
    ordinary[list(special_ids)] = False
    return ordinary.nonzero()[:, 0]


def mask_text_ids(ids: torch.Tensor, valid: torch.Tensor, *, rate: float, mask_id: int, ordinary: torch.Tensor,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: select ``rate`` of the valid tokens; of those 80% become [MASK],
    10% a random ordinary token (one of ``ordinary``), 10% stay. Returns (new ids, selected)."""
    selected = select_positions(valid, rate, generator)
    roll = uniform(ids.shape, generator).to(ids.device)
    random_ids = ordinary[torch.randint(len(ordinary), ids.shape, generator=generator)].to(ids.device)
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

    def __call__(self, model: OPTModel, batch: dict, generators: TaskGenerators) -> TaskOutput:
        generator = generators.local
        spec = model.spec
        text = batch["text"]
        specials = torch.tensor(spec.special_ids, device=text["ids"].device)
        content = text["mask"] & ~torch.isin(text["ids"], specials) & text["present"][:, None]
        ids, selected = mask_text_ids(text["ids"], content, rate=self.config.mlm_rate, mask_id=spec.mask_id,
                                      ordinary=ordinary_ids(spec.vocab_size, spec.special_ids), generator=generator)
        batch = drop_modalities(batch, "text", self.config.modality_drop, generator)
        fused = model.fuse(model.encode_unimodal(batch, text_ids=ids))
        logits = model.heads["mlm"](_span(fused, "text")[selected]).float()
        targets = text["ids"][selected]
        loss = F.cross_entropy(logits, targets)
        return TaskOutput(loss, {"loss": loss.detach(), "accuracy": accuracy(logits, targets)})


class MaskedVisionModeling:
    """Hidden patches are predicted as the VQ codes of the grid cells they cover
    (:meth:`~opt.model.opt_model.OPTModel.patch_codes`: one code per 8-px patch)."""

    name = "mvm"

    def __init__(self, config: TasksConfig) -> None:
        self.config = config

    def __call__(self, model: OPTModel, batch: dict, generators: TaskGenerators) -> TaskOutput:
        generator = generators.local
        image = batch["image"]
        codes = model.patch_codes(model.image_codes(image["pixels"]))  # (b, patches, k * k)
        valid = image["present"][:, None].expand(codes.shape[:2])
        hidden = select_positions(valid, self.config.mvm_rate, generator)
        batch = drop_modalities(batch, "image", self.config.modality_drop, generator)
        fused = model.fuse(model.encode_unimodal(batch, hide_patches=hidden))
        targets = codes[hidden].reshape(-1)  # (m * k * k,)
        logits = model.heads["mvm"](_span(fused, "image")[hidden]).float().reshape(targets.shape[0], -1)
        loss = F.cross_entropy(logits, targets)
        return TaskOutput(loss, {"loss": loss.detach(), "accuracy": accuracy(logits, targets)})


class MaskedAudioModeling:
    """Hidden audio frames (after the conv front end) are identified by InfoNCE against
    the front end's true frame features, among ``mam_negatives`` other frames of the
    *same utterance* drawn at random (the paper's 10), or among all of them (0).

    The distractors come from the same utterance, as in wav2vec 2.0. Drawn from other
    utterances of the batch, the task is solved by recognising the utterance (voice,
    rate, noise) rather than the frame: a model trained that way found the true
    frame among 10 frames of other utterances 21% of the time but among its own
    utterance's frames at chance (2.7%), and text decoding, which makes the audio
    encoder speaker-invariant, pushed it back to chance in the mixture.
    """

    name = "mam"

    def __init__(self, config: TasksConfig) -> None:
        self.config = config

    def __call__(self, model: OPTModel, batch: dict, generators: TaskGenerators) -> TaskOutput:
        generator = generators.local
        valid = model.audio_frames(batch)
        hidden = select_positions(valid, self.config.mam_rate, generator)
        batch = drop_modalities(batch, "audio", self.config.modality_drop, generator)
        unimodal = model.encode_unimodal(batch, hide_frames=hidden)
        fused = model.fuse(unimodal)
        predicted = F.normalize(model.heads["mam"](_span(fused, "audio")[hidden]).float(), dim=-1)  # (m, d)
        frames = F.normalize(unimodal["audio"]["frames"].detach().float(), dim=-1)  # (b, f, d)
        rows, positions = hidden.nonzero(as_tuple=True)  # the utterance and frame of each hidden frame
        logits, labels = same_utterance_logits(predicted, frames[rows], valid[rows], positions,
                                               negatives=self.config.mam_negatives, generator=generator)
        loss = F.cross_entropy(logits / self.config.mam_temperature, labels)
        return TaskOutput(loss, {"loss": loss.detach(), "accuracy": accuracy(logits, labels)})


def same_utterance_logits(predicted: torch.Tensor, frames: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor,
                          *, negatives: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine logits of each prediction (m, d) against its utterance's frames (m, f, d).

    ``valid`` (m, f) marks the utterance's real frames and ``positions`` (m,) the
    true one. With ``negatives`` > 0, column 0 is the true frame and the next
    ``negatives`` columns are other real frames drawn without replacement (or
    -inf where the utterance has fewer); with 0, every frame is a candidate and the
    label is the true frame's position. Returns (logits, labels).
    """
    similarity = (predicted[:, None, :] * frames).sum(-1)  # (m, f)
    if negatives <= 0:
        return similarity.masked_fill(~valid, float("-inf")), positions
    others = valid.clone()
    others[torch.arange(len(positions), device=valid.device), positions] = False
    scores = uniform(valid.shape, generator).to(valid.device).masked_fill(~others, -1.0)
    top = scores.topk(min(negatives, valid.shape[1] - 1), dim=1)  # random distinct distractors first
    distractors = similarity.gather(1, top.indices).masked_fill(top.values < 0, float("-inf"))
    true = similarity.gather(1, positions[:, None])
    labels = torch.zeros(len(positions), dtype=torch.long, device=similarity.device)
    return torch.cat([true, distractors], dim=1), labels
