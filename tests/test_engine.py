"""The pretraining engine (DeepSpeed on one CPU process): exact resume, checkpoint
fallback, the NaN guard, export, metrics and plots."""

from __future__ import annotations

import json
import math

import pytest
import torch

from opt.cli import main
from opt.config import load_config
from opt.engine import checkpoints
from opt.engine.deepspeed_backend import fp32_state_dict
from opt.engine.trainer import Trainer, TrainingStopped
from opt.model.opt_model import OPTModel
from opt.tasks.mixture import TaskMixture


@pytest.fixture(scope="module")
def train_overrides(small_training_overrides):
    return small_training_overrides + ["train.checkpoint_every=2", "train.warmup_steps=2",
                                       "train.keep_checkpoints=5"]


def train(overrides, run, steps, resume="auto"):
    config = load_config("configs/tiny.yaml", overrides + [f"train.steps={steps}"])
    return Trainer(config, run, resume=resume, progress=False).fit()


def final_weights(run):
    return fp32_state_dict(checkpoints.list_checkpoints(run)[0])


class Killed(Exception):
    pass


def test_kill_and_resume_matches_an_uninterrupted_run(train_overrides, tmp_path, monkeypatch):
    # the resumed run crosses a curriculum phase boundary (step 4) after its checkpoint (step 3)
    overrides = train_overrides + ["train.checkpoint_every=3", "tasks.phases=[{steps: 4, weights: {text_decoding: 1, mlm: 1}}]"]
    train(overrides, tmp_path / "straight", 6)
    original, calls = TaskMixture.forward, {"n": 0}

    def dies_in_step_5(self, model, batch, step):
        calls["n"] += 1
        if calls["n"] == 5:
            raise Killed
        return original(self, model, batch, step)

    monkeypatch.setattr(TaskMixture, "forward", dies_in_step_5)
    with pytest.raises(Killed):
        train(overrides, tmp_path / "resumed", 6)
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path / "resumed")] == ["step-00000003"]
    monkeypatch.setattr(TaskMixture, "forward", original)
    train(overrides, tmp_path / "resumed", 6)
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, different  # bitwise, CPU fp32
    records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 4, 5, 6]  # step 4 was logged before the kill


def test_unreadable_newest_checkpoint_falls_back_to_the_previous(train_overrides, tmp_path, capsys):
    train(train_overrides, tmp_path, 4)
    newest = checkpoints.list_checkpoints(tmp_path)[0]
    for file in (newest / "state").glob("*.pt"):
        file.write_bytes(b"corrupted")
    config = load_config("configs/tiny.yaml", train_overrides + ["train.steps=4"])
    trainer = Trainer(config, tmp_path, progress=False)
    assert trainer.step == 2
    captured = capsys.readouterr()
    assert f"checkpoint {newest} cannot be used" in captured.out + captured.err
    assert (tmp_path / "checkpoints" / "corrupt" / newest.name).is_dir()


def test_nan_guard_skips_then_stops_with_a_checkpoint(train_overrides, tmp_path, monkeypatch):
    original = TaskMixture.forward
    calls = {"n": 0}

    def poisoned(self, model, batch, step):
        loss, metrics = original(self, model, batch, step)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 2 else loss), metrics

    monkeypatch.setattr(TaskMixture, "forward", poisoned)
    with pytest.raises(TrainingStopped, match="3 non-finite steps in a row at step 2"):
        train(train_overrides + ["train.max_nonfinite=3"], tmp_path, 10)
    assert checkpoints.list_checkpoints(tmp_path)[0].name == "step-00000002"
    weights = final_weights(tmp_path)
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_export_loads_with_from_pretrained_and_plot_writes_a_png(train_overrides, tmp_path):
    train(train_overrides, tmp_path / "run", 2)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "model")]) == 0
    model = OPTModel.from_pretrained(tmp_path / "model")
    weights = final_weights(tmp_path / "run")
    torch.testing.assert_close(model.state_dict()["cross.cls"], weights["cross.cls"], rtol=0, atol=0)
    assert main(["plot", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"step", "lr", "samples_per_s", "loss"} <= set(record)
    assert any(key.endswith("/loss") for key in record)


def test_validation_logs_every_task_and_leaves_training_untouched(train_overrides, tmp_path):
    train(train_overrides, tmp_path / "plain", 4)
    train(train_overrides + ["train.eval_every=2", "train.eval_batches=2"], tmp_path / "validated", 4)
    records = [json.loads(line) for line in (tmp_path / "validated" / "metrics.jsonl").read_text().splitlines()]
    validation = [r for r in records if any(k.startswith("val/") for k in r)]
    assert [r["step"] for r in validation] == [2, 4]
    for task in ("mlm", "mvm", "mam", "text_decoding", "image_decoding", "itm", "contrastive"):
        assert 0.0 <= validation[-1][f"val/{task}/accuracy"] <= 1.0
        assert validation[-1][f"val/{task}/loss"] > 0
    plain, validated = final_weights(tmp_path / "plain"), final_weights(tmp_path / "validated")
    assert all(torch.equal(plain[name], validated[name]) for name in plain)


def test_bf16_training_validates_and_exports_an_fp32_model(train_overrides, tmp_path):
    """A bf16 engine holds bf16 weights: validation runs under the same autocast as training
    (it used to fail on the first evaluation), and the export is plain fp32."""
    train(train_overrides + ["train.precision=bf16", "train.eval_every=2", "train.eval_batches=1"], tmp_path / "run", 2)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    validation = [r for r in records if "val/text_decoding/accuracy" in r]
    assert [r["step"] for r in validation] == [2]
    assert 0.0 <= validation[0]["val/text_decoding/accuracy"] <= 1.0 and validation[0]["val/mlm/loss"] > 0
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "model")]) == 0
    model = OPTModel.from_pretrained(tmp_path / "model")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_one_schedule_serves_pretraining_and_the_vq():
    from opt.engine.schedule import learning_rate_factor

    pretraining = [learning_rate_factor(s, warmup=4, total=20) for s in range(21)]
    assert pretraining[:4] == [0.25, 0.5, 0.75, 1.0] and pretraining[4] == 1.0 and pretraining[20] == 0.0
    assert pretraining[12] == pytest.approx(0.5)  # halfway between the warmup's end and the last step
    vq = [learning_rate_factor(s, warmup=4, total=20, decay_start=0) for s in range(21)]
    assert vq[10] == pytest.approx(0.5) and vq[1] == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi / 20)))
    linear = [learning_rate_factor(s, warmup=0, total=10, decay="linear") for s in (0, 5, 10)]
    assert linear == [1.0, 0.5, 0.0]


def test_a_run_on_cached_samples_encodes_each_image_once_and_trains_as_without(train_overrides, world, tmp_path):
    """``data.cache_decoded`` also keeps each training image's VQ codes (the tokenizer is frozen):
    from the second epoch on no image is encoded again, and the weights are those of a run that
    encodes every batch."""
    images_only = train_overrides + [f"data.train={world}/train-000000.tar", "data.batch_size=16",
                                     "tasks.weights={mlm: 0, mam: 0, text_decoding: 0, itm: 0, contrastive: 0, "
                                     "image_decoding: 1, mvm: 1}"]
    runs = {}
    for cached in (True, False):
        config = load_config("configs/tiny.yaml", images_only + [f"data.cache_decoded={cached}", "train.steps=14"])
        trainer = Trainer(config, tmp_path / str(cached), progress=False)
        trainer.fit()
        runs[cached] = trainer
    memory = runs[True].model.__dict__["code_memory"]
    assert len(memory.codes) == 100 and memory.misses == 100  # the shard's 100 images, each encoded once
    assert memory.hits == 14 * 16 - 100
    assert "code_memory" not in runs[False].model.__dict__
    cached, plain = final_weights(tmp_path / "True"), final_weights(tmp_path / "False")
    assert all(torch.equal(cached[name], plain[name]) for name in plain)
