"""Two CPU processes (gloo) under torchrun: ZeRO-2 and ZeRO-3 give the same model as
plain data parallelism (ZeRO-0) with the same two processes and the same data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opt.cli import main
from opt.engine import checkpoints
from opt.engine.deepspeed_backend import fp32_state_dict
from opt.model.opt_model import OPTModel

ROOT = Path(__file__).resolve().parents[1]


def torchrun(run: Path, overrides: list[str], stage: int) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "opt",
               "train", "--config", "configs/tiny.yaml", "--run-dir", str(run), *overrides,
               f"train.zero_stage={stage}", "train.steps=3"]
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


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stages_with_two_processes_match_data_parallel(overrides, zero0, tmp_path, stage):
    torchrun(tmp_path, overrides, stage)
    reference = fp32_state_dict(checkpoints.list_checkpoints(zero0)[0])
    result = fp32_state_dict(checkpoints.list_checkpoints(tmp_path)[0])
    assert reference.keys() == result.keys()
    for name in reference:
        torch.testing.assert_close(result[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)
    first = [json.loads(line) for line in (zero0 / "metrics.jsonl").read_text().splitlines()][0]
    assert first["samples_per_s"] > 0 and first["step"] == 1
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "model")]) == 0  # merges the ZeRO shards
    exported = OPTModel.from_pretrained(tmp_path / "model").state_dict()
    torch.testing.assert_close(exported["cross.cls"], result["cross.cls"], rtol=0, atol=0)
