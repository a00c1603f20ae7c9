"""Training loop, for pretraining and fine-tuning: ``opt train --config FILE [overrides]``.

One code path for every scale: the model and task mixture are wrapped by
DeepSpeed (ZeRO 0-3, fp32 / bf16 / fp16), on one CPU process (gloo) or many
GPUs under the ``deepspeed`` or ``torchrun`` launchers.

Fine-tuning is the same loop started from a model directory (``train.init_from``):
its weights, tokenizer and VQ tokenizer, and its model section, audio settings and
image and caption sizes replace the config's (``model.dropout`` alone stays the
config's: a training setting), with a fresh optimizer and schedule from step 0.
``train.freeze`` keeps the parameters whose names match its glob patterns fixed:
they get no gradient and are left out of the optimizer (so hold no Adam state).

The run directory holds ``config.yaml`` (resolved), the tokenizer (``tokenizer.model`` or
``tokenizer/``), ``model_spec.json`` (what rebuilds the model, pretrained backbones' configs
included), ``vq/`` (the frozen image tokenizer), ``metrics.jsonl``, ``tensorboard/`` and
``checkpoints/step-*``. A checkpoint holds everything for an exact resume:
model, optimizer, scheduler and loss scale (DeepSpeed's part), plus the task
mixture (momentum encoders, queues, its random generator), the RNG states and
the number of batches consumed (the data position: a resumed run skips as many
batches of the same seeded stream).

The non-finite guard: a step is skipped on every rank when any rank saw a non-finite
loss or gradient norm. Every rank first runs all its backward passes (ZeRO reduces
gradients inside them: a rank that left early would hang the others), then the ranks
agree in one all-reduce, then the step runs with or without its update (see
:mod:`opt.engine.deepspeed_backend`). A skipped step leaves the weights, optimizer,
schedule, loss scale, momentum encoders and queues as they were and does not count
towards ``train.steps``; ``train.max_nonfinite`` of them in a row stop the run with a
checkpoint of the last good state (:class:`TrainingStopped`).
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from opt.config import Config, save_config
from opt.data.batch import to_device
from opt.data.pipeline import BatchLoader, DataStats
from opt.engine import checkpoints
from opt.engine.deepspeed_backend import DeepSpeedBackend, any_rank, init_distributed, whole_values
from opt.engine.run_lock import SIGNAL_EXIT_CODES, RunLock, StopSignals
from opt.engine.schedule import warmup_decay
from opt.engine.threads import adapt_threads
from opt.errors import UserError
from opt.files import write_atomic
from opt.logs import info, warn
from opt.model.opt_model import OPTModel
from opt.model.vq import save_vq
from opt.engine.model_setup import SPEC_NAME, build_model, compile_model, freeze_parameters, resolve_precision
from opt.tasks.mixture import TaskMixture, TrainingForward
from opt.text.tokenizer import save_tokenizer


class TrainingStopped(UserError):
    """Too many non-finite steps in a row; the last good state was checkpointed."""


class TrainingInterrupted(UserError):
    """SIGTERM or SIGINT: training stopped after the current step and checkpointed it."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.exit_code = SIGNAL_EXIT_CODES[signal_number]


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on norms, biases, embeddings' scales and scalars.
    Frozen parameters (``requires_grad=False``) are in neither, so they hold no optimizer state."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim < 2 or "norm" in name.lower() else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, config: Config):
    """AdamW over ``parameter_groups`` and its warmup-then-decay schedule, from ``train.*``.

    The fused implementation: on the tiny model's 280 tensors one CPU step took 3.0 ms
    against 15.5 ms for the per-tensor loop (torch's default off the GPU)."""
    train = config.train
    optimizer = torch.optim.AdamW(parameter_groups(model, train.weight_decay), lr=train.lr, betas=tuple(train.betas),
                                  fused=True)
    scheduler = warmup_decay(optimizer, warmup=train.warmup_steps, total=train.steps, decay=train.schedule)
    return optimizer, scheduler


def build_engine(config: Config, model: OPTModel) -> DeepSpeedBackend:
    """The DeepSpeed engine around the whole training forward (:class:`TrainingForward`: the task
    mixture run on ``model``, momentum encoders included), with the trainer's optimizer and schedule
    (``train.precision`` must be resolved: not auto).

    DeepSpeed casts the module it wraps to the training precision; the tasks' state (momentum
    encoders and queues) is put back in fp32 exactly as built: an EMA step of 0.5% of a weight is
    below bf16's resolution."""
    mixture = TaskMixture(config, model, whole=whole_values)  # copies the momentum encoders: before compiling
    task_state = {key: value.clone() for key, value in mixture.state_dict().items()}
    if config.train.compile:
        compile_model(model)
    optimizer, scheduler = build_optimizer(model, config)
    backend = DeepSpeedBackend(TrainingForward(model, mixture), optimizer, scheduler, config)
    backend.module.mixture.float().load_state_dict(task_state)
    return backend


def precision_autocast(device: torch.device, precision: str):
    """The autocast of a training precision (a bf16 or fp16 engine holds its weights in that
    type, so every forward, validation included, runs under it)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@dataclass
class StepOutcome:
    applied: bool  # the update changed the weights
    finite: bool  # every rank's losses and gradient norm were finite
    losses: list[torch.Tensor]  # this rank's micro-batch losses (detached)
    norm: torch.Tensor | None  # this rank's gradient norm where the guard measures it
    micro_batches: list[tuple[dict, int]]  # each micro-batch's metrics and samples over all ranks


def optimizer_step(backend: DeepSpeedBackend, micro_batches, step: int, autocast) -> StepOutcome:
    """One optimizer step of the training forward over ``micro_batches`` (device batches), under
    the non-finite guard; the task mixture commits or rolls back its state with it. Nothing is read
    back from the device but the agreed finiteness flag (one all-reduce)."""
    mixture: TaskMixture = backend.module.mixture
    if backend.device.type == "cpu":
        adapt_threads()  # as many threads as the other processes leave cores (opt.engine.threads)
    losses, records = [], []
    for batch in micro_batches:
        with autocast:
            loss, metrics = backend.forward(batch, step)
        losses.append(loss.detach().float())
        backend.backward(loss)  # a non-finite loss too: the other ranks wait for its gradients
        records.append((metrics, len(batch["keys"]) * backend.world_size))
    norm = backend.gradient_norm()
    finite_here = torch.isfinite(torch.stack(losses)).all()
    if norm is not None:
        finite_here = finite_here & torch.isfinite(norm).to(finite_here.device)
    finite = not backend.any_rank(~finite_here)
    applied = backend.step(update=finite)
    if applied:
        mixture.commit()
    else:
        mixture.roll_back()
    return StepOutcome(applied, finite, losses, norm, records)


def data_record(stats: DataStats) -> dict[str, int]:
    """The loader's counts for ``metrics.jsonl``: samples used, skipped in all and by reason."""
    skipped = stats.skipped
    return {"data/used": stats.samples, "data/skipped": sum(skipped.values())} | {
        f"data/skipped/{reason}": count for reason, count in sorted(skipped.items())}


class MetricWindow:
    """Means of the per-task metrics and the throughput since the last record. The metrics are
    summed as tensors where they were computed and read once, when the record is written."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.samples = 0
        self.start = time.perf_counter()

    def add(self, metrics: dict[str, dict[str, torch.Tensor]], samples: int) -> None:
        self.samples += samples
        for task, values in metrics.items():
            for name, value in values.items():
                key = f"{task}/{name}"
                self.sums[key] = self.sums.get(key, 0.0) + value
                self.counts[key] = self.counts.get(key, 0) + 1

    def means(self) -> dict[str, float]:
        return {key: float(total) / self.counts[key] for key, total in self.sums.items()}

    def samples_per_second(self) -> float:
        return self.samples / max(time.perf_counter() - self.start, 1e-9)


class Trainer:
    def __init__(self, config: Config, run: str | Path, *, resume: str = "auto", progress: bool = True) -> None:
        """``resume``: "auto" (the run's newest valid checkpoint, if any), "none" or a checkpoint
        directory. A resumed fine-tuning run continues from its own checkpoint, whose weights
        replace those of ``train.init_from``."""
        self.run = Path(run)
        self.progress = progress
        self.device = init_distributed()
        self.lock = self._lock_run_directory()
        torch.manual_seed(config.train.seed)
        config, self.tokenizer, model = build_model(config, self.run)
        if config.data.cache_decoded:  # the same images every epoch: each is VQ-encoded once
            model.remember_image_codes()
        freeze_parameters(model, config.train.freeze)
        self.config = config = resolve_precision(config, model, self.device)
        self.backend = build_engine(config, model)
        self.checkpoints = checkpoints.CheckpointStore(run, self.backend, keep=config.train.keep_checkpoints)
        self.model: OPTModel = self.backend.module.model
        self.mixture: TaskMixture = self.backend.module.mixture
        self.step = 0
        self.consumed = 0  # batches taken from the data stream
        self.nonfinite = {"in_a_row": 0, "total": 0}
        self.is_main = self.backend.rank == 0
        if self.is_main:
            self._prepare_run_directory()
        self.backend.barrier()
        if resume == "auto":
            self._resume_newest()
        elif resume != "none":
            self.checkpoints.load(resume, self._restore)

    # -- run directory and checkpoints ---------------------------------------------------------

    def _lock_run_directory(self) -> RunLock | None:
        """The first process holds the run directory's lock; all refuse together when another job has it."""
        lock, refusal = None, None
        if torch.distributed.get_rank() == 0:
            try:
                lock = RunLock(self.run)
            except UserError as error:
                refusal = error
        if any_rank(refusal is not None):
            raise refusal or UserError(f"run directory {self.run} is in use by another job")
        return lock

    def _prepare_run_directory(self) -> None:
        self.run.mkdir(parents=True, exist_ok=True)
        save_config(self.config, self.run / "config.yaml")
        save_tokenizer(self.tokenizer, self.run)
        write_atomic(self.run / SPEC_NAME, json.dumps(self.model.spec.to_dict(), indent=2).encode())
        if not (self.run / "vq").is_dir():
            save_vq(self.model.vq, self.run / "vq")

    def _client_state(self) -> dict:
        return {
            "step": self.step, "consumed": self.consumed, "nonfinite": dict(self.nonfinite),
            "mixture_extra": self.mixture.extra_state(),  # its tensors are in the module's state
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def save_checkpoint(self) -> Path:
        return self.checkpoints.save(self.step, self._client_state())

    def _restore(self, state: dict) -> None:
        """Apply a checkpoint's client state (DeepSpeed has loaded its own part)."""
        self.step, self.consumed = state["step"], state["consumed"]
        self.nonfinite = dict(state["nonfinite"])
        if "mixture" in state:  # older checkpoints kept the tasks' tensors here
            self.mixture.load_state_dict(state["mixture"])
        self.mixture.load_extra_state(state["mixture_extra"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def _resume_newest(self) -> None:
        directory = self.checkpoints.resume_newest(self._restore)
        if directory is not None:
            info(f"resumed from {directory} at step {self.step}")

    # -- training ------------------------------------------------------------------------------

    def _batches(self):
        config = self.config
        loader = BatchLoader(config.data.train, config.data, config.audio, self.tokenizer, train=True,
                             seed=config.train.seed)
        iterator = iter(loader)
        for _ in range(self.consumed):  # the data position: skip what the interrupted run consumed
            next(iterator)
        return loader, iterator

    def _validation_batches(self) -> list[dict]:
        """The first ``train.eval_batches`` batches of ``data.val`` (every process reads the same ones)."""
        if self.config.train.eval_every <= 0 or not self.config.data.val:
            return []
        config = self.config
        loader = BatchLoader(config.data.val, config.data, config.audio, self.tokenizer, train=False, workers=0,
                             split_by_node=False)
        batches = []
        for batch in loader:
            if len(batch["keys"]) >= 3:  # 5-way matching needs three samples
                batches.append(to_device(batch, self.device))
            if len(batches) == self.config.train.eval_batches:
                break
        return batches

    def _autocast(self):
        return precision_autocast(self.device, self.config.train.precision)

    def validate(self, batches: list[dict]) -> dict[str, float]:
        """Per-task validation metrics, keyed ``val/TASK/METRIC``."""
        with self._autocast():
            metrics = self.mixture.evaluate(self.model, batches, seed=self.config.train.seed)
        return {f"val/{key}": value for key, value in metrics.items()}

    def _log(self, writer, record: dict) -> None:
        with open(self.run / "metrics.jsonl", "a") as log:
            log.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                writer.add_scalar(key, value, record["step"])

    def fit(self) -> dict:
        """Train to ``train.steps``; returns the last logged record. SIGTERM or SIGINT end it
        after the current step with a checkpoint (:class:`TrainingInterrupted`)."""
        try:
            with StopSignals() as signals:
                return self._fit(signals)
        finally:
            if self.lock is not None:
                self.lock.release()

    def _fit(self, signals: StopSignals) -> dict:
        config = self.config.train
        loader, batches = self._batches()
        validation = self._validation_batches()
        writer = SummaryWriter(str(self.run / "tensorboard")) if self.is_main else None
        bar = tqdm(total=config.steps, initial=self.step, desc="train", disable=not (self.progress and self.is_main))
        window = MetricWindow()
        record: dict = {}
        while self.step < config.steps:
            trained = self._train_step(batches)
            if trained is None:
                continue
            loss, micro_batches = trained
            self.step += 1
            bar.update()
            for metrics, samples in micro_batches:
                window.add(metrics, samples)
            if self.step % config.log_every == 0 or self.step == config.steps:
                means = window.means()
                record = {"step": self.step, "lr": self.backend.scheduler.get_last_lr()[0],
                          "samples_per_s": window.samples_per_second(), "loss": float(loss),
                          "nonfinite_steps": self.nonfinite["total"]} | means
                bar.set_postfix({key.removesuffix("/loss"): f"{value:.3f}" for key, value in means.items()
                                 if key.endswith("/loss")} | {"samples/s": f"{record['samples_per_s']:.1f}"},
                                refresh=False)
                record |= data_record(loader.stats)
                if self.backend.loss_scale() is not None:
                    record["loss_scale"] = self.backend.loss_scale()
                if self.is_main:
                    self._log(writer, record)
                window = MetricWindow()
            if validation and (self.step % config.eval_every == 0 or self.step == config.steps):
                measured = self.validate(validation)
                if self.is_main:
                    self._log(writer, {"step": self.step} | measured)
            saved = self.step % config.checkpoint_every == 0 and self.step < config.steps
            if saved:
                self.save_checkpoint()
            if any_rank(signals.received is not None) and self.step < config.steps:
                self._interrupt(signals.received or signal.SIGTERM, saved, bar, writer, loader)
        self.save_checkpoint()
        self._close(bar, writer, loader)
        return record

    def _train_step(self, batches) -> tuple[torch.Tensor, list[tuple[dict, int]]] | None:
        """One optimizer step over ``train.accumulation`` micro-batches: returns the last loss and
        each micro-batch's metrics and sample count (all ranks), or None when the step was skipped."""
        def micro_batches():
            for _ in range(self.config.train.accumulation):
                batch = to_device(next(batches), self.device)
                self.consumed += 1
                yield batch

        outcome = optimizer_step(self.backend, micro_batches(), self.step, self._autocast())
        if outcome.applied:
            self.nonfinite["in_a_row"] = 0
            return outcome.losses[-1], outcome.micro_batches
        norm = None if outcome.norm is None else float(outcome.norm)
        self._nonfinite(_what_was_not_finite([float(value) for value in outcome.losses], norm, outcome.finite))
        return None

    def _close(self, bar: tqdm, writer: SummaryWriter | None, loader: BatchLoader) -> None:
        """Close the progress bar and the log; the main process writes the loader's counts."""
        bar.close()
        if writer is not None:
            writer.close()
            write_atomic(self.run / "data_stats.json", (json.dumps(loader.stats.as_dict(), indent=2) + "\n").encode())
            info(loader.stats.summary())

    def _interrupt(self, received: signal.Signals, saved: bool, bar: tqdm, writer: SummaryWriter | None,
                   loader: BatchLoader) -> None:
        """Checkpoint the step just finished (unless it was) and stop with the signal's exit code."""
        path = checkpoints.checkpoint_root(self.run) / checkpoints.checkpoint_name(self.step)
        if not saved:
            path = self.save_checkpoint()
        self._close(bar, writer, loader)
        raise TrainingInterrupted(f"stopped by {received.name} after step {self.step}; checkpoint in {path} "
                                  "(the same command resumes from it)", received)

    def _nonfinite(self, what: str) -> None:
        self.nonfinite["in_a_row"] += 1
        self.nonfinite["total"] += 1
        warn(f"step {self.step + 1}: non-finite {what}; step skipped ({self.nonfinite['in_a_row']} in a row)",
             every_rank=True)
        if self.nonfinite["in_a_row"] >= self.config.train.max_nonfinite:
            path = self.save_checkpoint()
            raise TrainingStopped(f"{self.nonfinite['in_a_row']} non-finite steps in a row at step {self.step}; "
                                  f"stopped; the last good state is in {path}")


def _what_was_not_finite(losses: list[float], norm: float | None, finite: bool) -> str:
    """This rank's reason for a skipped step, for the warning."""
    bad = [value for value in losses if not math.isfinite(value)]
    if bad:
        return f"loss {bad[0]}"
    if norm is not None and not math.isfinite(norm):
        return f"gradient norm {norm}"
    return "loss or gradient norm on another rank" if not finite else "gradient norm (DeepSpeed's own check)"
