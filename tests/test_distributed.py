"""Two CPU processes (gloo) under torchrun: ZeRO-0, ZeRO-2 and ZeRO-3 give the same model
as one process that computes both ranks' losses on their own data and masks and
averages the gradients (what data parallelism means), and ZeRO-2/3 match ZeRO-0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opt.cli import main
from opt.config import load_config
from opt.data.pipeline import BatchLoader
from opt.engine import checkpoints
from opt.engine.deepspeed_backend import fp32_state_dict
from opt.engine.trainer import build_optimizer
from opt.model.opt_model import ModelSpec, OPTModel
from opt.tasks.mixture import TaskMixture
from opt.text.tokenizer import TextTokenizer

ROOT = Path(__file__).resolve().parents[1]


STEPS, RANKS = 3, 2


def torchrun(run: Path, overrides: list[str], stage: int) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(RANKS), "-m",
               "opt", "train", "--config", "configs/tiny.yaml", "--run-dir", str(run), *overrides,
               f"train.zero_stage={stage}", f"train.steps={STEPS}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def overrides(small_training_overrides):
    return small_training_overrides + ["train.warmup_steps=1", "tasks.mode=sum"]


@pytest.fixture(scope="module")
def zero0(overrides, tmp_path_factory):
    run = tmp_path_factory.mktemp("zero0")
    torchrun(run, overrides, 0)
    return run


@pytest.fixture(scope="module")
def one_process(overrides) -> dict[str, torch.Tensor]:
    """The same training in one process: per step, each rank's batch (its shard stream, read
    as that rank would) and each rank's mask generator, losses' gradients averaged."""
    config = load_config(str(ROOT / "configs/tiny.yaml"), overrides + [f"train.steps={STEPS}"])
    tokenizer = TextTokenizer.from_file(config.tokenizer.path)
    torch.manual_seed(config.train.seed)
    model = OPTModel(ModelSpec.from_config(config, tokenizer))
    mixtures, batches = [], []
    for rank in range(RANKS):
        mixtures.append(TaskMixture(config, model, rank=rank))  # one per rank: its own queues and mask generator
        with pytest.MonkeyPatch.context() as patch:  # webdataset seeds each rank's shard stream from these
            patch.setenv("RANK", str(rank))
            patch.setenv("WORLD_SIZE", str(RANKS))
            stream = iter(BatchLoader(config.data.train, config.data, config.audio, tokenizer, train=True,
                                      seed=config.train.seed))
            batches.append([next(stream) for _ in range(STEPS)])
    optimizer, scheduler = build_optimizer(model, config)
    for step in range(STEPS):
        for rank in range(RANKS):
            loss, _ = mixtures[rank](model, batches[rank][step])
            (loss / RANKS).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def assert_same_model(result: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert reference.keys() == result.keys()
    for name in reference:
        torch.testing.assert_close(result[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_two_process_data_parallel_matches_one_process(zero0, one_process):
    assert_same_model(fp32_state_dict(checkpoints.list_checkpoints(zero0)[0]), one_process)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stages_with_two_processes_match_one_process(overrides, zero0, one_process, tmp_path, stage):
    torchrun(tmp_path, overrides, stage)
    result = fp32_state_dict(checkpoints.list_checkpoints(tmp_path)[0])
    assert_same_model(result, one_process)
    assert_same_model(result, fp32_state_dict(checkpoints.list_checkpoints(zero0)[0]))
    first = [json.loads(line) for line in (zero0 / "metrics.jsonl").read_text().splitlines()][0]
    assert first["samples_per_s"] > 0 and first["step"] == 1
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "model")]) == 0  # merges the ZeRO shards
    exported = OPTModel.from_pretrained(tmp_path / "model").state_dict()
    torch.testing.assert_close(exported["cross.cls"], result["cross.cls"], rtol=0, atol=0)
