"""Nothing lost, nothing run: signals checkpoint, crafted pickles are refused, corrupt
checkpoints are moved aside, a full disk is one line, one trainer per run directory,
and a stream with no usable sample stops with its counts."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import signal
import tarfile

import pytest
import torch

from opt.cli import main
from opt.config import load_config
from opt.engine import checkpoints
from opt.engine.deepspeed_backend import DeepSpeedBackend, UnsafeCheckpoint, fp32_state_dict, weights_only_loads
from opt.engine.run_lock import RunLock
from opt.engine.trainer import Trainer, TrainingInterrupted
from opt.errors import DataError, UserError
from opt.tasks.mixture import TaskMixture
from tests.test_engine import final_weights, train


@pytest.fixture(scope="module")
def train_overrides(small_training_overrides):
    return small_training_overrides + ["train.checkpoint_every=2", "train.warmup_steps=2",
                                       "train.keep_checkpoints=5"]


def crafted_pickle(marker) -> bytes:
    """A pickle whose loading creates ``marker`` (through ``os.system``-like code: ``open``)."""
    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))
    return pickle.dumps(Evil())


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_finishes_the_step_checkpoints_and_resumes_bitwise(train_overrides, tmp_path, monkeypatch, name):
    overrides = train_overrides + ["train.checkpoint_every=5"]
    train(overrides, tmp_path / "straight", 6)
    original, calls = TaskMixture.forward, {"n": 0}

    def signalled_in_step_3(self, model, batch, step):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), getattr(signal, name))  # arrives mid-step; the step still completes
        return original(self, model, batch, step)

    monkeypatch.setattr(TaskMixture, "forward", signalled_in_step_3)
    with pytest.raises(TrainingInterrupted, match=f"stopped by {name} after step 3") as stopped:
        train(overrides, tmp_path / "resumed", 6)
    assert stopped.value.exit_code == {"SIGTERM": 143, "SIGINT": 130}[name]
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path / "resumed")] == ["step-00000003"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are gone again
    monkeypatch.setattr(TaskMixture, "forward", original)
    train(overrides, tmp_path / "resumed", 6)
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert [n for n in a if not torch.equal(a[n], b[n])] == []


def test_a_crafted_pickle_in_a_checkpoint_never_runs(train_overrides, tmp_path, capsys):
    train(train_overrides, tmp_path / "run", 4)
    newest = checkpoints.list_checkpoints(tmp_path / "run")[0]
    files = sorted((newest / "state").glob("*.pt"))
    assert files
    marker = tmp_path / "payload-ran"
    for file in files:  # every file name a checkpoint holds, each in turn
        original = file.read_bytes()
        file.write_bytes(crafted_pickle(marker))
        with pytest.raises(UnsafeCheckpoint, match=f"{file.name}: refused to load"):
            fp32_state_dict(newest)
        file.write_bytes(original)
    for file in files:
        file.write_bytes(crafted_pickle(marker))
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "model")]) == 0  # falls back
    trainer = Trainer(load_config("configs/tiny.yaml", train_overrides + ["train.steps=4"]), tmp_path / "run",
                      progress=False)
    assert trainer.step == 2 and not marker.exists()
    trainer.lock.release()
    output = capsys.readouterr()
    assert "refused to load" in output.out + output.err
    assert (tmp_path / "run" / "checkpoints" / "corrupt" / newest.name).is_dir()  # never outranks a new one
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path / "run")] == ["step-00000002"]


def test_the_few_deepspeed_classes_still_load_weights_only(train_overrides, tmp_path):
    train(train_overrides + ["train.zero_stage=2", "train.precision=bf16"], tmp_path, 2)
    state = checkpoints.list_checkpoints(tmp_path)[0] / "state"
    optimizer = next(state.glob("*optim_states.pt"))
    with weights_only_loads():
        loaded = torch.load(optimizer, map_location="cpu")
    assert "optimizer_state_dict" in loaded


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(train_overrides, tmp_path, monkeypatch):
    train(train_overrides, tmp_path, 2)

    def disk_full(self, directory, client_state):
        (directory / "partial.pt").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(DeepSpeedBackend, "save", disk_full)
    with pytest.raises(UserError, match="disk full while saving checkpoint step 4") as error:
        train(train_overrides, tmp_path, 4)
    assert "step-00000002" in str(error.value) and "\n" not in str(error.value)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]  # no .tmp left behind
    assert final_weights(tmp_path)


def test_a_second_trainer_on_the_same_run_directory_is_refused(train_overrides, tmp_path):
    holder = RunLock(tmp_path)
    try:
        with pytest.raises(UserError, match=f"run directory {tmp_path} is in use by process {os.getpid()}"):
            train(train_overrides, tmp_path, 2)
    finally:
        holder.release()
    train(train_overrides, tmp_path, 2)  # free again once the holder is gone


def test_training_on_shards_without_a_usable_sample_stops_with_the_counts(train_overrides, tmp_path):
    bad = tmp_path / "bad-000000.tar"
    with tarfile.open(bad, "w") as tar:
        for index in range(40):
            for extension in ("png", "txt", "wav"):
                info = tarfile.TarInfo(f"{index:04d}.{extension}")  # 0-byte members: every sample skipped
                tar.addfile(info)
    (tmp_path / "garbage-000000.tar").write_bytes(os.urandom(5000))
    for spec, reason in ((str(bad), "text_empty: 40"), (str(tmp_path / "garbage-000000.tar"), "shard_unreadable")):
        with pytest.raises(DataError, match=f"no usable sample in .*{reason}"):
            train(train_overrides + [f"data.train={spec}"], tmp_path / f"run-{reason}", 2)


def test_metrics_and_the_run_summary_carry_the_loaders_counts(train_overrides, tmp_path):
    train(train_overrides, tmp_path, 2)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["data/used"] >= 2 * 4 and records[-1]["data/skipped"] == 0
    summary = json.loads((tmp_path / "data_stats.json").read_text())
    assert summary["used"] == records[-1]["data/used"] and summary["skipped"] == {}


def test_a_checkpoint_folder_removed_during_a_save_is_one_line(train_overrides, tmp_path, monkeypatch):
    original = DeepSpeedBackend.save

    def removed_underneath(self, directory, client_state):
        original(self, directory, client_state)
        shutil.rmtree(directory.parent)  # someone deletes checkpoints/ while the save runs

    monkeypatch.setattr(DeepSpeedBackend, "save", removed_underneath)
    with pytest.raises(UserError, match="disappeared while step 2 was being saved; no earlier checkpoint exists"):
        train(train_overrides, tmp_path, 4)
    monkeypatch.setattr(DeepSpeedBackend, "save", original)
    train(train_overrides, tmp_path, 2)  # the next save recreates the folder
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["step-00000002"]


@pytest.mark.parametrize("name", ["config.yaml", "tokenizer.model", "vq/model.safetensors", "vq/config.json"])
def test_a_crafted_pickle_elsewhere_in_a_run_directory_never_runs(train_overrides, tmp_path, capsys, name):
    train(train_overrides, tmp_path / "run", 2)
    marker = tmp_path / "payload-ran"
    (tmp_path / "run" / name).write_bytes(crafted_pickle(marker))
    code = main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "model")])
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("opt:")]  # (torch may warn at import)
    assert code == 2 and len(ours) == 1 and "Traceback" not in err and not marker.exists()
