"""Sample-level tasks: 5-way image-text-audio matching and two-tower contrastive
alignment with momentum encoders and negative queues.

5-way ITM classes, each drawn with probability 0.2 per sample i:
0 matched; 1 image from another sample j; 2 audio from another sample j;
3 image and audio both from one other sample j; 4 image from j and audio from
k, with i, j, k all different. With probability ``itm_modality_drop`` a sample
also loses its image or its audio (one of the two, evenly), and its label says
what is swapped among the modalities left: without the image, 0 or 2; without
the audio, 0 or 1. Retrieval re-ranks two-modality pairs (audio-text) with the
same head.

Contrastive alignment (BriVL / MoCo style): online towers embed text, image and
audio; momentum copies of the encoders and towers (EMA of the online ones) embed
the same batch, and per modality a queue keeps the latest momentum embeddings as
extra negatives. Symmetric InfoNCE for text-image, text-audio and image-audio.
The batch's own candidates are the *online* embeddings of the other modality
(gradients reach both towers, as in CLIP); the queue only adds negatives. Using
momentum keys as positives (pure MoCo) trained far slower here: in the paper's
one-task-per-step mode the momentum encoders move only on contrastive steps and
lag the online ones by hundreds of updates. With ``distillation`` > 0 the targets
mix the one-hot match with the momentum encoders' own similarity distribution
(momentum distillation, OPPOVL).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from opt import MODALITIES, TOWER_PAIRS, pair_name
from opt.config import TasksConfig
from opt.model.opt_model import OPTModel
from opt.tasks.base import TaskGenerators, TaskOutput, accuracy, uniform
from opt.tasks.modality_level import with_present


def itm_assignment(size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample a class in 0..4 and the indices its image and audio come from."""
    if size < 3:
        raise ValueError("5-way matching needs batches of at least 3 samples")
    labels = torch.randint(5, (size,), generator=generator)
    index = torch.arange(size)
    j = (index + torch.randint(1, size, (size,), generator=generator)) % size  # uniform over j != i
    low, high = torch.minimum(index, j), torch.maximum(index, j)
    k = torch.randint(size - 2, (size,), generator=generator)  # the k-th index skipping i and j
    k = k + (k >= low).long()
    k = k + (k >= high).long()
    image_from = torch.where((labels == 1) | (labels == 3) | (labels == 4), j, index)
    audio_from = torch.where(labels == 2, j, index)
    audio_from = torch.where(labels == 3, j, audio_from)
    audio_from = torch.where(labels == 4, k, audio_from)
    return labels, image_from, audio_from


def _gather(part: dict, index: torch.Tensor) -> dict:
    return {key: value[index.to(value.device)] for key, value in part.items()}


class ImageTextAudioMatching:
    name = "itm"

    def __init__(self, config: TasksConfig) -> None:
        self.config = config

    def __call__(self, model: OPTModel, batch: dict, generators: TaskGenerators) -> TaskOutput:
        size = len(batch["keys"])
        labels, image_from, audio_from = itm_assignment(size, generators.local)
        mixed = dict(batch) | {"image": _gather(batch["image"], image_from), "audio": _gather(batch["audio"], audio_from)}
        drop = uniform(size, generators.local) < self.config.itm_modality_drop
        drop_image = drop & (uniform(size, generators.local) < 0.5)
        drop_audio = drop & ~drop_image
        index = torch.arange(size)
        labels = torch.where(drop_image, torch.where(audio_from == index, 0, 2), labels)
        labels = torch.where(drop_audio, torch.where(image_from == index, 0, 1), labels)
        mixed = with_present(mixed, {
            "image": mixed["image"]["present"] & ~drop_image.to(mixed["image"]["present"].device),
            "audio": mixed["audio"]["present"] & ~drop_audio.to(mixed["audio"]["present"].device),
        })
        unimodal = model.encode_unimodal(mixed)
        logits = model.match_logits(unimodal, model.fuse(unimodal)).float()
        labels = labels.to(logits.device)
        loss = F.cross_entropy(logits, labels)
        binary = ((logits.detach().argmax(-1) == 0) == (labels == 0)).float().mean()
        return TaskOutput(loss, {"loss": loss.detach(), "accuracy": accuracy(logits, labels),
                                 "matched_vs_not_accuracy": binary})


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` computing the same function, with every parameter turned into a
    buffer of the same name: it is never trained, and never partitioned by ZeRO-3 (which
    partitions parameters only), so each process keeps it whole, as an EMA needs."""
    copied = copy.deepcopy(module)
    for part in copied.modules():
        for name, parameter in list(part._parameters.items()):
            if parameter is not None:
                del part._parameters[name]
                part.register_buffer(name, parameter.detach().clone())
    return copied


def whole(parameters) -> list[torch.Tensor]:
    """The default way to read the online parameters' values: as they are, whole (see :class:`ContrastiveAlignment`)."""
    return [p.detach() for p in parameters]


class ContrastiveAlignment(nn.Module):
    """Owns the momentum encoders, towers and queues (all buffers of its state_dict).

    The momentum encoders and towers are modules of their own (:func:`frozen_copy` of the
    online ones) that the model's encoding code runs in place of its own
    (``encode_unimodal(encoders=...)``); nothing is swapped into the model. ``whole`` maps the
    online parameters to their full values (the engine passes one that rebuilds ZeRO-3
    partitions; the default reads them as they are). The
    engine keeps the momentum copies and queues in fp32 whatever the training precision: an
    EMA step of 0.5% of a weight is below bf16's resolution.
    """

    name = "contrastive"

    def __init__(self, config: TasksConfig, model: OPTModel, *, whole=whole) -> None:
        super().__init__()
        self.config = config
        self.whole = whole
        self.momentum_encoders = frozen_copy(model.encoders)
        self.momentum_towers = frozen_copy(model.towers)
        dim = model.spec.model.towers.dim
        for modality in MODALITIES:
            self.register_buffer(f"queue_{modality}", F.normalize(torch.randn(config.queue_size, dim), dim=-1))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _update_momentum(self, model: OPTModel) -> None:
        m = self.config.momentum
        for online, momentum in ((model.encoders, self.momentum_encoders), (model.towers, self.momentum_towers)):
            copies = dict(momentum.named_buffers())
            names, parameters = zip(*online.named_parameters())
            for name, value in zip(names, self.whole(parameters)):
                copies[name].mul_(m).add_(value.to(copies[name].dtype), alpha=1 - m)

    @torch.no_grad()
    def _momentum_embeddings(self, model: OPTModel, batch: dict) -> dict[str, torch.Tensor]:
        return model.tower_embeddings(model.encode_unimodal(batch, encoders=self.momentum_encoders),
                                      towers=self.momentum_towers)

    @torch.no_grad()
    def _enqueue(self, keys: dict[str, torch.Tensor]) -> None:
        size = next(iter(keys.values())).shape[0]
        positions = (self.queue_pointer + torch.arange(size, device=self.queue_pointer.device)) % self.config.queue_size
        for modality, embeddings in keys.items():
            getattr(self, f"queue_{modality}")[positions] = embeddings.to(getattr(self, f"queue_{modality}").dtype)
        self.queue_pointer.copy_((self.queue_pointer + size) % self.config.queue_size)
        self.queue_filled.copy_(torch.clamp(self.queue_filled + size, max=self.config.queue_size))

    def _info_nce(self, queries: torch.Tensor, keys: torch.Tensor, queue: torch.Tensor, *,
                  momentum_queries: torch.Tensor, momentum_keys: torch.Tensor, scale: torch.Tensor,
                  hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Online queries (b, d) against the online keys (b, d) and the queue (q, d), whose
        entries not yet filled (``hidden``: a (b + q,) mask) get a logit of -1e4: a softmax
        weight of exactly 0 in fp32, as if they were left out, without reading the fill level
        back from the device."""
        logits = (scale * queries @ torch.cat([keys, queue]).T).masked_fill(hidden, -1e4)  # the batch's own first
        labels = torch.arange(queries.shape[0], device=queries.device)
        targets = F.one_hot(labels, logits.shape[1]).float()
        if self.config.distillation > 0:
            with torch.no_grad():
                soft = (scale * momentum_queries @ torch.cat([momentum_keys, queue]).T).masked_fill(hidden, -1e4)
            targets = self.config.distillation * soft.softmax(-1) + (1 - self.config.distillation) * targets
        loss = torch.sum(-targets * logits.log_softmax(-1), dim=-1).mean()
        return loss, accuracy(logits[:, : queries.shape[0]], labels)

    def forward(self, model: OPTModel, batch: dict, generators: TaskGenerators) -> TaskOutput:
        if self.training:  # validation leaves the momentum encoders and queues as they are
            self._update_momentum(model)
        queries = {m: e.float() for m, e in model.tower_embeddings(model.encode_unimodal(batch)).items()}
        keys = {m: e.float() for m, e in self._momentum_embeddings(model, batch).items()}
        scale = model.temperature().float()
        size = next(iter(queries.values())).shape[0]
        positions = torch.arange(size + self.config.queue_size, device=scale.device)
        hidden = positions >= size + self.queue_filled  # the queue's entries not yet filled
        losses, metrics = [], {}
        for a, b in TOWER_PAIRS:
            if a not in queries or b not in queries or pair_name((a, b)) not in self.config.contrastive_pairs:
                continue
            for query, key in ((a, b), (b, a)):
                queue = getattr(self, f"queue_{key}").float()
                loss, retrieval = self._info_nce(queries[query], queries[key], queue, momentum_queries=keys[query],
                                                 momentum_keys=keys[key], scale=scale, hidden=hidden)
                losses.append(loss)
                metrics[f"{query[0]}2{key[0]}_accuracy"] = retrieval
        if not losses:
            raise ValueError("contrastive: no pair of tasks.contrastive_pairs has both modalities in the batch")
        loss = torch.stack(losses).mean()
        if self.training:
            self._enqueue(keys)
        metrics["accuracy"] = sum(metrics.values()) / len(metrics)  # mean in-batch retrieval accuracy
        metrics |= {"loss": loss.detach(), "temperature": 1 / scale.detach()}
        return TaskOutput(loss, metrics)
