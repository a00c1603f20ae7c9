"""DeepSpeed: the one module of the project that imports ``deepspeed``.

The DeepSpeed config is derived from the training config (micro-batch size,
accumulation, clipping, precision, ZeRO stage), so the two cannot disagree; an
optional preset JSON (``configs/deepspeed/zero*.json``) adds other knobs and
is refused if it sets one of the derived keys differently. The same code runs
one CPU process (gloo), one GPU, or many under ``deepspeed``/``torchrun``.

DeepSpeed unpickles its checkpoint files with ``weights_only=False``, so a crafted
file in a run directory would run code when it is loaded. Every DeepSpeed load
here runs inside :func:`weights_only_loads`: ``torch.load`` is forced to
``weights_only=True`` with only the few DeepSpeed classes its checkpoints hold
allowed, and a file holding anything else is refused (:class:`UnsafeCheckpoint`).

A step can be taken without its update (:meth:`DeepSpeedBackend.step` with
``update=False``, the trainer's non-finite guard): DeepSpeed's step still runs,
so at every ZeRO stage it clears the gradients and its own accumulation buffers
and counts the micro-batches, but the torch optimizer and the scheduler do not
step and the loss scaler's state is put back. DeepSpeed's own optimizers (ZeRO
1-3, bf16, fp16) also skip a step whose reduced gradients have a non-finite norm,
on every rank alike; a plain fp32 engine without ZeRO steps the torch optimizer
directly and checks nothing, so :meth:`DeepSpeedBackend.gradient_norm` measures
it for the guard.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import socket
from collections.abc import Iterator
from pathlib import Path

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from opt.config import Config
from opt.errors import ConfigError, UserError

TAG = "state"  # DeepSpeed's tag inside every checkpoint directory

# the classes DeepSpeed's checkpoints hold besides tensors and plain data (ZeRO 0-3, fp32 / bf16 / fp16)
CHECKPOINT_CLASSES = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class UnsafeCheckpoint(UserError):
    """A checkpoint file holds Python objects other than tensors, plain data and the allowed classes."""


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside, every ``torch.load`` (DeepSpeed's own included) unpickles tensors, plain data
    and :data:`CHECKPOINT_CLASSES` only, and refuses a file with anything else."""
    original = torch.load

    def load(file, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(file, *args, **kwargs)
        except pickle.UnpicklingError as error:
            reason = str(error).strip().splitlines()[0]
            raise UnsafeCheckpoint(f"{file}: refused to load: it holds objects other than tensors and "
                                   f"plain data ({reason})") from None

    torch.load = load
    try:
        with torch.serialization.safe_globals(CHECKPOINT_CLASSES):
            yield
    finally:
        torch.load = original


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _without_shared_memory_op(skip: bool):
    """DeepSpeed's communication backend compiles a shared-memory all-reduce op for CPUs the first
    time it starts on a machine (about 30 s on two cores) and whenever its build cache is stale. A
    world of one process never communicates, so there it is marked unavailable, which DeepSpeed
    itself does on a CPU that cannot build it."""
    compatible = deepspeed.ops.__compatible_ops__
    key = "deepspeed_shm_comm"
    if not skip or key not in compatible:
        yield
        return
    before = compatible[key]
    compatible[key] = False
    try:
        yield
    finally:
        compatible[key] = before


def init_distributed() -> torch.device:
    """Join (or, for a plain single process, create) the process group; returns this rank's device."""
    if "RANK" not in os.environ:  # not started by a launcher: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if not torch.distributed.is_initialized():
        with _without_shared_memory_op(os.environ["WORLD_SIZE"] == "1"):
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def any_rank(flag: bool | torch.Tensor) -> bool:
    """True on every process when ``flag`` is true on any: one all-reduce of a flag, on the device
    the process group communicates from (NCCL: this process's GPU), and the only value a training
    step reads back from the device."""
    value = torch.as_tensor(flag).reshape(1).to(torch.int32)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        if torch.distributed.get_backend() == "nccl":
            value = value.to(torch.device("cuda", torch.cuda.current_device()))
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def whole_values(parameters) -> list[torch.Tensor]:
    """The full values of ``parameters`` (detached), safe inside the engine's forward. Whole
    parameters are returned as they are; ZeRO-3 partitioned ones are rebuilt from every rank's
    partition (``ds_tensor``, the same padded size on each rank) with one all-gather for them all,
    outside ZeRO-3's own fetching, which may have the same parameters in flight."""
    parameters = list(parameters)
    partitioned = [p for p in parameters if hasattr(p, "ds_tensor")]
    if not partitioned:
        return [p.detach() for p in parameters]
    local = torch.cat([p.ds_tensor.detach().reshape(-1) for p in partitioned])
    world = torch.distributed.get_world_size()
    everyone = torch.empty(world * local.numel(), dtype=local.dtype, device=local.device)
    torch.distributed.all_gather_into_tensor(everyone, local)
    everyone = everyone.view(world, -1)
    values, offset = {}, 0
    for p in partitioned:
        size = p.ds_tensor.numel()
        values[id(p)] = everyone[:, offset:offset + size].reshape(-1)[:p.ds_numel].view(p.ds_shape)
        offset += size
    return [values.get(id(p), p.detach()) for p in parameters]


DERIVED_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")


def deepspeed_config(config: Config) -> dict:
    """The DeepSpeed config of a training config (plus its preset)."""
    train = config.train
    derived = {
        "train_micro_batch_size_per_gpu": config.data.batch_size,
        "gradient_accumulation_steps": train.accumulation,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        # without it ZeRO-1/2 apply a bf16 step whose gradient norm is not finite
        "bf16": {"enabled": train.precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": train.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,
    }
    if not train.deepspeed_preset:
        return derived
    path = Path(train.deepspeed_preset)
    if not path.is_file():
        raise ConfigError(f"config key 'train.deepspeed_preset': file not found: {path}")
    preset = json.loads(path.read_text())
    for key in DERIVED_KEYS:
        if key in preset and preset[key] != derived[key]:
            raise ConfigError(f"DeepSpeed preset {path} sets {key}={preset[key]}, the training config gives "
                              f"{derived[key]}; set it in the training config only")
    stage = preset.get("zero_optimization", {}).get("stage", train.zero_stage)
    if stage != train.zero_stage:
        raise ConfigError(f"DeepSpeed preset {path} sets ZeRO stage {stage} but train.zero_stage is {train.zero_stage}")
    merged = preset | derived
    merged["zero_optimization"] = preset.get("zero_optimization", {}) | derived["zero_optimization"]
    return merged


def precision_unsupported(precision: str) -> str | None:
    """Why DeepSpeed cannot train in ``precision`` on this process's device, or None when it can
    (on a CPU, fp16 needs AVX512-FP16 or AMX-FP16, which many AVX-512 processors lack)."""
    accelerator = get_accelerator()
    supported = {"fp16": accelerator.is_fp16_supported, "bf16": accelerator.is_bf16_supported}.get(precision)
    if supported is None or supported():
        return None
    return (f"config key 'train.precision': {precision} is not supported by DeepSpeed on this machine's "
            f"{accelerator.device_name()} device; use {'bf16 or ' if precision == 'fp16' and accelerator.is_bf16_supported() else ''}fp32")


class DeepSpeedBackend:
    """Wraps a DeepSpeed engine: forward, backward, step, checkpoints."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, config: Config) -> None:
        if config.train.precision == "auto":
            raise ValueError("train.precision is auto: resolve it first (opt.engine.model_setup.resolve_precision)")
        self.config = deepspeed_config(config)
        unsupported = precision_unsupported(config.train.precision)
        if unsupported:
            raise ConfigError(unsupported)
        self.torch_optimizer = optimizer  # what DeepSpeed's optimizer (self.optimizer) wraps, or is
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.config)

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def rank(self) -> int:
        return torch.distributed.get_rank()

    @property
    def world_size(self) -> int:
        return torch.distributed.get_world_size()

    def barrier(self) -> None:
        torch.distributed.barrier()

    def any_rank(self, flag: bool) -> bool:
        """True on every process when ``flag`` is True on any."""
        return any_rank(flag)

    def forward(self, batch: dict, step: int):
        """The wrapped module's forward through the engine (DeepSpeed's hooks: ZeRO-3 gathers)."""
        return self.engine(batch, step)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch. Every rank must run it, finite loss or not: ZeRO reduces
        the gradients inside it."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.backward(loss)
        if not boundary:
            self.engine.step()  # DeepSpeed counts micro-batches in step(), which updates only at a boundary

    def gradient_norm(self) -> torch.Tensor | None:
        """The norm of this rank's reduced gradients (a 0-d tensor on their device), after the last
        micro-batch's backward, where DeepSpeed steps the torch optimizer directly (fp32 without
        ZeRO). None where DeepSpeed's own optimizer measures it in :meth:`step` and skips a
        non-finite step itself."""
        if self.optimizer is not self.torch_optimizer:
            return None
        gradients = [p.grad for p in self.module.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(gradients) if gradients else torch.zeros(())

    def step(self, *, update: bool = True) -> bool:
        """The optimizer step at the end of an accumulation; returns whether it changed the weights
        (False also when DeepSpeed found the gradient norm non-finite). ``update=False`` skips the
        update and leaves the weights, the optimizer state, the scheduler and the loss scale as they are."""
        if update:
            self.engine.step()
        else:
            with self._without_update():
                self.engine.step()
        return update and self.engine.was_step_applied()

    @contextlib.contextmanager
    def _without_update(self) -> Iterator[None]:
        """Inside, DeepSpeed's step clears the gradients and counts the step as usual, while the torch
        optimizer and the scheduler do not step and the loss scaler's state is put back after it."""
        scaler = self._loss_scaler()
        scaler_state = dict(vars(scaler)) if scaler is not None else {}
        try:
            with _replaced(self.torch_optimizer, "step", _do_nothing), _replaced(self.scheduler, "step", _do_nothing):
                yield
        finally:
            if scaler is not None:
                vars(scaler).update(scaler_state)

    def _loss_scaler(self):
        """Where DeepSpeed's optimizer keeps its loss scale (ZeRO: ``loss_scaler``; bf16 or fp16
        without ZeRO: ``loss_scale_config``), or None (fp32 without ZeRO)."""
        for name in ("loss_scaler", "loss_scale_config"):
            if getattr(self.optimizer, name, None) is not None:
                return getattr(self.optimizer, name)
        return None

    def loss_scale(self) -> float | None:
        """The fp16 loss scale; None in the other precisions."""
        scaler = self._loss_scaler()
        return float(scaler.cur_scale) if scaler is not None and self.engine.fp16_enabled() else None

    def save(self, directory: Path, client_state: dict) -> None:
        """Every rank writes its part of the checkpoint into ``directory``."""
        self.engine.save_checkpoint(str(directory), tag=TAG, client_state=client_state)

    def load(self, directory: Path) -> dict:
        """Load model, optimizer, scheduler and loss scaler; returns the client state."""
        with weights_only_loads():
            path, client_state = self.engine.load_checkpoint(str(directory), tag=TAG, load_module_strict=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory}")
        return client_state


def _do_nothing(*args, **kwargs) -> None:
    return None


@contextlib.contextmanager
def _replaced(owner: object, name: str, value: object) -> Iterator[None]:
    """Inside, ``owner.name`` is ``value``; afterwards what it was (an instance attribute, or the class's)."""
    missing = object()
    previous = vars(owner).get(name, missing)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if previous is missing:
            delattr(owner, name)
        else:
            setattr(owner, name, previous)


def fp32_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """The model's full fp32 weights in a checkpoint of any ZeRO stage (ZeRO partitions are merged),
    keyed as the model names them: the engine's module is the whole training forward
    (:class:`~opt.tasks.mixture.TrainingForward`), whose ``model.`` prefix is dropped and whose
    task state (``mixture.``) is left out; older checkpoints, which hold the model alone, read alike.

    Frozen parameters (``train.freeze``) are in no optimizer shard. DeepSpeed keeps its own
    copy of them under ZeRO-2 and 3 only; under ZeRO-1 they come from the module's states,
    which stages 0-2 save whole (frozen parameters never change, so that copy is exact)."""
    return model_weights(_module_fp32_state_dict(directory))


def model_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's entries of a training forward's state dict (or of an older, model-only one)."""
    if not any(key.startswith("model.") for key in state):
        return state
    return {key[len("model."):]: value for key, value in state.items() if key.startswith("model.")}


def _module_fp32_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    state = Path(directory) / TAG
    files = sorted(state.glob("mp_rank_*_model_states.pt"))  # ZeRO-3 names its files zero_pp_rank_*
    with weights_only_loads():
        if any(state.glob("*optim_states.pt")):  # ZeRO 1-3: the fp32 master weights live in the optimizer shards
            merged = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=TAG)
            if not files:
                return merged
            module = torch.load(files[0], map_location="cpu")["module"]
            return {name: merged.get(name, tensor).float() for name, tensor in module.items()} | merged
        if not files:
            raise FileNotFoundError(f"no DeepSpeed model states in {state}")
        module = torch.load(files[0], map_location="cpu")["module"]
    return {name: tensor.float() for name, tensor in module.items()}
