"""The non-finite guard: a step in which any rank saw a non-finite loss or gradient is
skipped on every rank before the optimizer steps, and leaves the weights, the optimizer
state, the schedule, the loss scale, the momentum encoders and the queues bitwise as they
were; ``train.max_nonfinite`` of them in a row stop the run with the last good checkpoint.

Faults are injected into the task mixture's forward: a NaN added to the loss (its
gradients stay finite, so DeepSpeed's own overflow check cannot see it), or an extra zero
term whose backward gives one weight an infinite gradient (the loss stays finite).
This file is also the worker that ``torchrun`` starts for the two-process tests."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opt.config import load_config
from opt.engine import checkpoints
from opt.engine.deepspeed_backend import fp32_state_dict, precision_unsupported, whole_values
from opt.engine.trainer import Trainer, TrainingStopped
from opt.tasks.mixture import TaskMixture

ROOT = Path(__file__).resolve().parents[1]
TWO_RANK_FAULTS = {1: {2: "loss"}, 0: {4: "gradient"}}  # rank -> forward call -> fault


class InfiniteGradient(torch.autograd.Function):
    """Adds zero to the loss and gives ``weight`` an infinite gradient."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor) -> torch.Tensor:
        ctx.like = (getattr(weight, "ds_shape", weight.shape), weight.dtype, weight.device)  # ZeRO-3: whole
        return weight.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        shape, dtype, device = ctx.like
        return torch.full(shape, float("inf"), dtype=dtype, device=device)


def faulty_forward(faults: dict[int, str]):
    """The mixture's forward, with a fault ("loss" or "gradient") at the given 1-based calls."""
    original, calls = TaskMixture.forward, {"n": 0}

    def forward(self, model, batch, step=0):
        loss, metrics = original(self, model, batch, step)
        calls["n"] += 1
        fault = faults.get(calls["n"])
        if fault == "loss":
            loss = loss + float("nan")
        elif fault == "gradient":
            loss = loss + InfiniteGradient.apply(model.cross.cls)
        return loss, metrics

    return forward


def training_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Copies of everything a skipped step must leave alone."""
    backend = trainer.backend
    names, parameters = zip(*trainer.model.named_parameters())
    state = {f"weight/{name}": value.clone() for name, value in zip(names, whole_values(parameters))}  # ZeRO-3 too
    optimizer = backend.torch_optimizer
    # what it updates (under ZeRO this rank's fp32 master partitions) keys its state once it has stepped
    masters = list(optimizer.state) or [p for group in optimizer.param_groups for p in group["params"]]
    for i, master in enumerate(masters):
        state[f"master/{i}"] = master.detach().clone()
        state |= {f"optimizer/{i}/{key}": torch.as_tensor(value).clone()
                  for key, value in optimizer.state.get(master, {}).items()}
    scheduler = backend.scheduler
    state["scheduler"] = torch.tensor([scheduler.last_epoch, scheduler._step_count, *scheduler.get_last_lr()])
    if backend.loss_scale() is not None:
        state["loss_scale"] = torch.tensor(backend.loss_scale())
    return state | {f"mixture/{key}": value.clone() for key, value in trainer.mixture.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], part: str) -> bool:
    keys = [key for key in a.keys() | b.keys() if part in key]
    return any(key not in a or key not in b or not torch.equal(a[key], b[key]) for key in keys)


def recording_steps(history: list):
    """``Trainer._train_step`` that appends (applied, state before, state after) to ``history``."""
    original = Trainer._train_step

    def train_step(self, batches):
        before = training_state(self)
        result = original(self, batches)
        history.append((result is not None, before, training_state(self)))
        return result

    return train_step


def make_config(overrides: list[str], steps: int):
    return load_config(str(ROOT / "configs/tiny.yaml"), overrides + [f"train.steps={steps}"])


@pytest.fixture(scope="module")
def overrides(small_training_overrides):
    # contrastive alignment on every step, so the momentum encoders and queues move on each one
    weights = "{mlm: 1, mvm: 0, mam: 0, text_decoding: 0, image_decoding: 0, itm: 0, contrastive: 1}"
    return small_training_overrides + ["tasks.mode=sum", f"tasks.weights={weights}", "train.warmup_steps=1",
                                       "train.checkpoint_every=10"]


def inject(monkeypatch, faults: dict[int, str]) -> list:
    """Patch ``faults`` into the mixture's forward and record every attempted step: returns the
    list that gets (applied, state before, state after) per attempt."""
    monkeypatch.setattr(TaskMixture, "forward", faulty_forward(faults))
    history: list = []
    monkeypatch.setattr(Trainer, "_train_step", recording_steps(history))
    return history


def train(overrides: list[str], run: Path, steps: int) -> Trainer:
    trainer = Trainer(make_config(overrides, steps), run, progress=False)
    trainer.fit()
    return trainer


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_a_non_finite_loss_or_gradient_leaves_the_training_state_bitwise(overrides, tmp_path, monkeypatch, stage):
    history = inject(monkeypatch, {2: "loss", 4: "gradient"})
    trainer = train(overrides + [f"train.zero_stage={stage}"], tmp_path, 4)
    assert [applied for applied, _, _ in history] == [True, False, True, False, True, True]
    for applied, before, after in history[1:]:  # (the first step's EMA of identical weights moves nothing)
        if applied:  # a good step moves all of it
            for part in ("weight/", "master/", "optimizer/", "scheduler", "momentum_encoders", "queue_"):
                assert changed(before, after, part), part
        else:
            assert same_state(before, after)
    assert trainer.nonfinite == {"in_a_row": 0, "total": 2}
    assert trainer.step == 4 and trainer.backend.scheduler.last_epoch == 4 and trainer.consumed == 6
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.skipif(precision_unsupported("fp16") is not None,
                    reason="DeepSpeed has no fp16 on this CPU (it needs AVX512-FP16 or AMX-FP16)")
def test_fp16_keeps_its_loss_scale_on_a_non_finite_loss_and_halves_it_on_an_overflow(overrides, tmp_path,
                                                                                     monkeypatch):
    """An infinite fp16 gradient is what DeepSpeed's dynamic loss scaling is for: it skips the step
    itself and lowers the scale; everything else stays as it was, as after a non-finite loss."""
    history = inject(monkeypatch, {2: "loss", 4: "gradient"})
    trainer = train(overrides + ["train.precision=fp16"], tmp_path, 3)
    assert [applied for applied, _, _ in history] == [True, False, True, False, True]
    (_, before_loss, after_loss), (_, before_overflow, after_overflow) = history[1], history[3]
    assert same_state(before_loss, after_loss) and after_loss["loss_scale"] == 2.0**16
    assert after_overflow.pop("loss_scale") == before_overflow.pop("loss_scale") / 2
    assert same_state(before_overflow, after_overflow)
    assert trainer.nonfinite == {"in_a_row": 0, "total": 2}


def test_a_skipped_step_discards_all_its_micro_batches(overrides, tmp_path, monkeypatch):
    """With accumulation a NaN in the first micro-batch skips the whole optimizer step, and
    ``train.steps`` counts optimizer steps (ZeRO-2 keeps the reduced gradients in its own buffers)."""
    history = inject(monkeypatch, {1: "loss"})
    trainer = train(overrides + ["train.zero_stage=2", "train.accumulation=2"], tmp_path, 2)
    assert [applied for applied, _, _ in history] == [False, True, True]
    assert same_state(history[0][1], history[0][2])
    assert trainer.step == 2 and trainer.consumed == 6 and trainer.backend.scheduler.last_epoch == 2
    assert trainer.backend.engine.micro_steps == 6  # DeepSpeed's accumulation boundary stays in step
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_too_many_in_a_row_stop_with_the_last_good_checkpoint(overrides, tmp_path, monkeypatch):
    overrides = overrides + ["train.max_nonfinite=2"]
    history = inject(monkeypatch, {3: "loss", 4: "gradient"})
    with pytest.raises(TrainingStopped, match="2 non-finite steps in a row at step 2"):
        train(overrides, tmp_path, 10)
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["step-00000002"]
    good = history[1][2]  # after step 2
    saved = fp32_state_dict(checkpoints.list_checkpoints(tmp_path)[0])
    assert all(torch.equal(saved[key.removeprefix("weight/")], value) for key, value in good.items()
               if key.startswith("weight/"))
    monkeypatch.undo()
    resumed = Trainer(make_config(overrides, 10), tmp_path, progress=False)
    resumed.lock.release()
    assert resumed.step == 2 and resumed.nonfinite == {"in_a_row": 2, "total": 2}
    assert same_state({k: v for k, v in good.items() if k.startswith("mixture/")},
                      {f"mixture/{k}": v for k, v in resumed.mixture.state_dict().items()})


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_two_ranks_skip_the_same_steps_without_hanging(overrides, tmp_path, stage):
    """A NaN loss on rank 1 only, then an infinite gradient on rank 0 only."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "tests.test_nonfinite_guard", str(tmp_path), json.dumps(overrides + [f"train.zero_stage={stage}"])]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=os.environ | {"OMP_NUM_THREADS": "1"})
    try:
        _, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.terminate()  # torchrun stops both ranks (SIGTERM, then SIGKILL)
        process.communicate()
        pytest.fail("the two ranks hung")
    assert process.returncode == 0, stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["applied"] == ranks[1]["applied"] == [True, False, True, False, True, True]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # identical on both ranks after every step
    assert all(rank["unchanged"] == [not applied for applied in rank["applied"]] for rank in ranks)
    assert ranks[0]["nonfinite"] == ranks[1]["nonfinite"] == {"in_a_row": 0, "total": 2}


def weights_digest(trainer: Trainer) -> str:
    weights = b"".join(value.cpu().numpy().tobytes() for value in whole_values(trainer.model.parameters()))
    return hashlib.sha256(weights).hexdigest()


def two_rank_worker(run: Path, overrides: list[str]) -> None:
    """One rank of the two-process test: train 4 steps with this rank's faults and write
    what each attempted step did to ``run/rank{RANK}.json``."""
    rank = int(os.environ["RANK"])
    TaskMixture.forward = faulty_forward(TWO_RANK_FAULTS[rank])
    history: list = []
    digests: list[str] = []
    record = recording_steps(history)

    def train_step(self, batches):
        result = record(self, batches)
        digests.append(weights_digest(self))
        return result

    Trainer._train_step = train_step
    trainer = Trainer(make_config(overrides, 4), run, progress=False)
    trainer.fit()
    summary = {"applied": [applied for applied, _, _ in history], "weights": digests,
               "unchanged": [same_state(before, after) for _, before, after in history],
               "nonfinite": trainer.nonfinite}
    (run / f"rank{rank}.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    two_rank_worker(Path(sys.argv[1]), json.loads(sys.argv[2]))
