"""Combine the pretext tasks.

``mode="sample"`` (the OPT paper): each step runs one task drawn with the
configured weights. ``mode="sum"``: each step runs every task with a positive
weight and adds the weighted losses. ``tasks.phases`` optionally runs other
weights first (a curriculum): phase i covers its ``steps`` steps in order from
step 0, and ``tasks.weights`` apply after the last phase. The mixture's random
generators (:class:`~opt.tasks.base.TaskGenerators`, which also draw every task's
choices and masks) and the contrastive task's momentum encoders and queues are
its state, saved in checkpoints.

A stateful task changes its state as it runs (the momentum encoders move before
they embed the batch), before the step is known to be good: the mixture keeps a
copy of that state from the first micro-batch of an optimizer step until the
trainer calls :meth:`TaskMixture.commit` (the step was applied) or
:meth:`TaskMixture.roll_back` (it was skipped).
"""

from __future__ import annotations

import torch
from torch import nn

from opt.config import GENERATION_CONDITIONS, TASK_NAMES, Config
from opt.data.augment import augment_audio
from opt.model.opt_model import OPTModel
from opt.tasks.base import TaskGenerators, TaskOutput
from opt.tasks.modality_level import ImageDecoding, TextDecoding
from opt.tasks.sample_level import ContrastiveAlignment, ImageTextAudioMatching, whole
from opt.tasks.token_level import MaskedAudioModeling, MaskedLanguageModeling, MaskedVisionModeling

NEEDS = {"mlm": {"text"}, "mvm": {"image"}, "mam": {"audio"}, "text_decoding": {"text"}, "image_decoding": {"image"},
         "itm": {"text", "image", "audio"}, "contrastive": set()}


def build_tasks(config: Config, model: OPTModel, *, whole=whole) -> dict:
    """The tasks with a positive weight in ``tasks.weights`` or in a phase, keyed by name
    (``whole``: see :class:`~opt.tasks.sample_level.ContrastiveAlignment`)."""
    settings = config.tasks
    factories = {
        "mlm": lambda: MaskedLanguageModeling(settings),
        "mvm": lambda: MaskedVisionModeling(settings),
        "mam": lambda: MaskedAudioModeling(settings),
        "text_decoding": lambda: TextDecoding(settings, label_smoothing=config.model.text_decoder.label_smoothing),
        "image_decoding": lambda: ImageDecoding(settings),
        "itm": lambda: ImageTextAudioMatching(settings),
        "contrastive": lambda: ContrastiveAlignment(settings, model, whole=whole),
    }
    enabled = set(config.data.modalities)
    used = {name for weights in [settings.weights] + [p.weights for p in settings.phases]
            for name, weight in weights.items() if weight > 0}
    return {name: factories[name]() for name in TASK_NAMES if name in used and NEEDS[name] <= enabled}


class TaskMixture(nn.Module):
    """Runs the tasks; a module so the contrastive task's state travels with it."""

    def __init__(self, config: Config, model: OPTModel, *, rank: int | None = None, whole=whole) -> None:
        """``rank`` seeds the per-process mask generator (default: this process's distributed rank);
        ``whole`` is how the contrastive task reads the online parameters' full values (ZeRO-3)."""
        super().__init__()
        tasks = build_tasks(config, model, whole=whole)
        if not tasks:
            raise ValueError("no pretext task is enabled for the configured modalities")
        self.names = list(tasks)
        self.stateful = nn.ModuleDict({n: t for n, t in tasks.items() if isinstance(t, nn.Module)})
        self.stateless = {n: t for n, t in tasks.items() if not isinstance(t, nn.Module)}
        # (last step + 1, weights over self.names, decoding conditions) per phase, the main ones last
        self.schedule, end = [], 0
        for phase in config.tasks.phases:
            end += phase.steps
            conditions = {task: getattr(phase, f"{task}_conditions") for task in GENERATION_CONDITIONS}
            self.schedule.append((end, self._weights(phase.weights), conditions))
        main_conditions = {task: None for task in GENERATION_CONDITIONS}
        self.schedule.append((None, self._weights(config.tasks.weights), main_conditions))
        self.mode = config.tasks.mode
        self.audio = config.audio  # SpecAugment's settings
        if rank is None:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.generators = TaskGenerators(
            shared=torch.Generator().manual_seed(config.train.seed + 1),
            local=torch.Generator().manual_seed(config.train.seed + 1 + 1000 * (rank + 1)))
        self.kept: dict[str, dict[str, torch.Tensor]] = {}  # stateful tasks' state before this optimizer step

    def _weights(self, weights: dict[str, float]) -> torch.Tensor:
        values = torch.tensor([float(weights.get(n, 0.0)) for n in self.names])
        if values.sum() <= 0:
            raise ValueError("a task phase has no enabled task with a positive weight for the configured modalities")
        return values

    def task(self, name: str):
        return self.stateful[name] if name in self.stateful else self.stateless[name]

    def phase_at(self, step: int) -> tuple[torch.Tensor, dict]:
        """The task weights (over ``self.names``) and the decoding conditions (None: the
        tasks' own) in force at optimizer step ``step``."""
        return next((weights, conditions) for end, weights, conditions in self.schedule if end is None or step < end)

    def choose(self, step: int = 0) -> list[str]:
        """The tasks of step ``step``."""
        weights, _ = self.phase_at(step)
        if self.mode == "sum":
            return [n for n, w in zip(self.names, weights.tolist()) if w > 0]
        index = int(torch.multinomial(weights, 1, generator=self.generators.shared))
        return [self.names[index]]

    def forward(self, model: OPTModel, batch: dict,
                step: int = 0) -> tuple[torch.Tensor, dict[str, dict[str, torch.Tensor]]]:
        """Total loss of optimizer step ``step`` and metrics per task run (detached tensors)."""
        total, metrics = None, {}
        weights, conditions = self.phase_at(step)
        augmented = augment_audio(batch, self.audio, self.generators.local) if self.training else batch
        for name in self.choose(step):
            if self.training and name in self.stateful:
                self._keep(name)
            options = {"conditions": conditions[name]} if name in conditions else {}
            inputs = batch if name == "mam" else augmented  # masked audio modelling's targets are the features
            output: TaskOutput = self.task(name)(model, inputs, self.generators, **options)
            weight = 1.0 if self.mode == "sample" else float(weights[self.names.index(name)])
            total = output.loss * weight if total is None else total + output.loss * weight
            metrics[name] = output.metrics
        return total, metrics

    def _keep(self, name: str) -> None:
        """Copy a stateful task's state the first time it runs in an optimizer step."""
        if name not in self.kept:
            self.kept[name] = {key: value.clone() for key, value in self.stateful[name].state_dict().items()}

    def commit(self) -> None:
        """The optimizer step was applied: the tasks' new state stays."""
        self.kept.clear()

    def roll_back(self) -> None:
        """The optimizer step was skipped: the tasks' state (momentum encoders, queues) as before it."""
        for name, state in self.kept.items():
            self.stateful[name].load_state_dict(state)
        self.kept.clear()

    @torch.no_grad()
    def evaluate(self, model: OPTModel, batches: list[dict], *, seed: int) -> dict[str, float]:
        """Every task on every batch with masks drawn from ``seed`` (the same each call),
        without touching training state; returns ``{"task/metric": mean}``."""
        was_training = self.training, model.training
        self.eval()
        model.eval()
        generator = torch.Generator()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        try:
            for name in self.names:
                generator.manual_seed(seed)
                generators = TaskGenerators(shared=generator, local=generator)
                for batch in batches:
                    for metric, value in self.task(name)(model, batch, generators).metrics.items():
                        key = f"{name}/{metric}"  # some metrics exist only for some draws (text decoding's sources)
                        sums[key] = sums.get(key, 0.0) + float(value)
                        counts[key] = counts.get(key, 0) + 1
        finally:
            self.train(was_training[0])
            model.train(was_training[1])
        return {key: total / counts[key] for key, total in sums.items()}

    def extra_state(self) -> dict:
        """The generators' states (the modules' state is in ``state_dict``)."""
        return {"shared": self.generators.shared.get_state(), "local": self.generators.local.get_state()}

    def load_extra_state(self, state: dict) -> None:
        """Also reads checkpoints that named the generators ``choice`` and ``mask``."""
        self.generators.shared.set_state(state["shared"] if "shared" in state else state["choice"])
        self.generators.local.set_state(state["local"] if "local" in state else state["mask"])


def task_flops(mixture: TaskMixture, model: OPTModel, batch: dict,
               dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Forward + backward FLOPs per sample of each task of ``mixture`` on ``batch``, counted by
    :func:`~opt.model.summary.count_flops` (matmuls and attention; elementwise work is not counted)."""
    from opt.model.summary import count_flops

    device_type = next(model.parameters()).device.type
    flops = {}
    for name in mixture.names:
        with count_flops() as counter:
            with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
                loss = mixture.task(name)(model, batch, mixture.generators).loss
            loss.backward()
        model.zero_grad(set_to_none=True)
        flops[name] = counter.get_total_flops() / len(batch["keys"])
    return flops


def combined_flops(flops: torch.Tensor, weights: torch.Tensor, mode: str) -> float:
    """FLOPs per sample of one step from each task's ``flops`` (n,) and the step's task ``weights`` (n,):
    their weighted mean when one task is drawn per step (``sample``), the sum of the weighted ones (``sum``)."""
    weights = weights.to(flops.dtype)
    if mode == "sum":
        return float(flops[weights > 0].sum())
    return float((weights * flops).sum() / weights.sum())


def schedule_flops(mixture: TaskMixture, flops: dict[str, float], steps: int) -> float:
    """FLOPs per sample of a training step averaged over ``steps`` steps of the mixture's
    schedule (its phases, then its main weights), in its mode."""
    counted = torch.tensor([flops[name] for name in mixture.names], dtype=torch.float64)
    return sum(combined_flops(counted, mixture.phase_at(step)[0], mixture.mode) for step in range(steps)) / steps


class TrainingForward(nn.Module):
    """The whole training forward, the one module the engine (DeepSpeed) wraps and calls:
    ``forward(batch, step) -> (loss, metrics)`` runs the task mixture on the model. Its
    parameters are the model's; the mixture adds the contrastive task's momentum encoders and
    queues as buffers, so checkpoints hold them with the weights (``model.*``, ``mixture.*``).

    Checkpoints written before the mixture joined the engine's module hold the model's weights
    without the ``model.`` prefix and the mixture's state elsewhere: their keys are renamed on
    load and the mixture's keys left as they are, for the caller to restore from where it was.
    """

    def __init__(self, model: OPTModel, mixture: TaskMixture) -> None:
        super().__init__()
        self.model = model
        self.mixture = mixture
        self.register_load_state_dict_pre_hook(self._older_layout)

    def forward(self, batch: dict, step: int = 0) -> tuple[torch.Tensor, dict[str, dict[str, torch.Tensor]]]:
        return self.mixture(self.model, batch, step)

    def _older_layout(self, module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
        if any(key.startswith(prefix + "model.") for key in state_dict):
            return
        for key in [k for k in state_dict if k.startswith(prefix)]:
            state_dict[prefix + "model." + key[len(prefix):]] = state_dict.pop(key)
        for key, value in self.mixture.state_dict().items():
            state_dict.setdefault(prefix + "mixture." + key, value)
