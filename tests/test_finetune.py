"""Fine-tuning: ``train.init_from`` starts a run from a model directory, ``train.freeze`` keeps
parameters fixed, and the configs in ``configs/finetune/`` load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from opt.cli import main
from opt.config import load_config
from opt.engine import checkpoints
from opt.engine.deepspeed_backend import fp32_state_dict
from opt.engine.export import export_run
from opt.engine.model_setup import build_model, freeze_parameters
from opt.engine.trainer import Trainer
from opt.errors import UserError
from opt.model.opt_model import OPTModel

TEXT_DECODING_ONLY = ("tasks.weights={mlm: 0, mvm: 0, mam: 0, text_decoding: 1, image_decoding: 0, itm: 0, "
                      "contrastive: 0}")
CAPTIONING = "configs/finetune/captioning.yaml"
RETRIEVAL = "configs/finetune/retrieval.yaml"
PRETRAINING_STEPS = 30


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pretrained(small_training_overrides, tmp_path_factory) -> tuple[Path, Path]:
    """A small model trained on text decoding alone for a few dozen steps: its run and its export."""
    root = tmp_path_factory.mktemp("pretrained")
    config = load_config("configs/tiny.yaml", small_training_overrides + [
        TEXT_DECODING_ONLY, "train.lr=2e-3", "train.warmup_steps=2", f"train.steps={PRETRAINING_STEPS}",
        f"train.checkpoint_every={PRETRAINING_STEPS}"])
    Trainer(config, root / "run", progress=False).fit()
    export_run(root / "run", root / "model")
    return root / "run", root / "model"


@pytest.fixture()
def finetune_overrides(pretrained, world) -> list[str]:
    """A fine-tune config's overrides for the session world; dropout stays the pretraining's (0),
    so that losses compare."""
    return [f"train.init_from={pretrained[1]}", f"data.train={world}/train-*.tar", "train.eval_every=0",
            "data.batch_size=4", "data.workers=0", "data.shuffle_buffer=16", "train.log_every=1",
            "tasks.queue_size=8", "model.dropout=0"]


def test_fine_tuning_starts_where_the_pretrained_model_left_off(pretrained, finetune_overrides, tmp_path):
    run = tmp_path / "captioning"
    assert main(["train", "--config", CAPTIONING, "--run-dir", str(run), *finetune_overrides,
                 "train.steps=3"]) == 0
    before, after = records(pretrained[0]), records(run)
    assert [r["step"] for r in after] == [1, 2, 3]  # a fresh step count
    fresh = before[0]["text_decoding/loss"]  # a fresh model's first loss
    left_off = sum(r["text_decoding/loss"] for r in before[-5:]) / 5
    first = after[0]["text_decoding/loss"]
    losses = f"text decoding loss: fresh {fresh:.3f}, pretrained {left_off:.3f}, fine-tuned first {first:.3f}"
    assert abs(first - left_off) < 0.25, losses  # seen: fresh 6.02, pretrained 4.11, fine-tuned 4.08
    assert first < fresh - 1.0, losses
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    spec = json.loads((pretrained[1] / "config.json").read_text())["spec"]
    assert resolved["model"] == spec["model"] and resolved["audio"] == spec["audio"]
    assert resolved["data"]["max_text_tokens"] == spec["max_text_tokens"]
    assert resolved["tokenizer"]["path"] == str(run / "tokenizer.model") and (run / "tokenizer.model").is_file()
    assert resolved["train"]["vq_path"] == str(run / "vq") and (run / "vq").is_dir()


def test_the_model_directory_replaces_the_configs_model_section_but_not_its_dropout(
        pretrained, finetune_overrides, tmp_path, capsys):
    config = load_config(CAPTIONING, finetune_overrides + ["model.cross.layers=3", "model.dropout=0.2"])
    resolved, _, model = build_model(config, tmp_path)
    assert resolved.model.cross.layers == 1 and resolved.model.dropout == 0.2
    dropouts = {name: m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert {p for name, p in dropouts.items() if name != "encoders.image.vit.pos_drop"} == {0.2}  # timm's own rate
    assert model.encoders["text"].bert.config.attention_probs_dropout_prob == 0.2
    assert model.training
    saved = load_file(pretrained[1] / "model.safetensors")
    assert all(torch.equal(saved[name], tensor) for name, tensor in model.state_dict().items() if name in saved)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "model.cross.layers=3" in warnings[0] and "has 1" in warnings[0]


def test_frozen_parameters_stay_fixed_and_hold_no_optimizer_state(pretrained, finetune_overrides, tmp_path, capsys):
    """Retrieval with the image encoder and tower frozen: both contrastive (with its momentum
    encoders) and matching train the rest."""
    config = load_config(RETRIEVAL, finetune_overrides + ["train.freeze=[encoders.image.*,towers.image.*]",
                                                          "tasks.mode=sum", "train.steps=3"])
    trainer = Trainer(config, tmp_path, progress=False)
    trainer.fit()
    saved = load_file(pretrained[1] / "model.safetensors")
    named = dict(trainer.model.named_parameters())
    frozen = {n for n in named if n.startswith(("encoders.image.", "towers.image."))}
    assert frozen == {n for n, p in named.items() if not p.requires_grad}
    assert all(torch.equal(named[n], saved[n]) for n in frozen)
    assert all(not torch.equal(named[n], saved[n]) for n in ("encoders.text.project.weight", "heads.itm.2.weight"))
    optimizer = trainer.backend.optimizer  # ZeRO-0, fp32: the AdamW itself
    in_groups = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_groups == {id(p) for n, p in named.items() if n not in frozen}
    assert {id(p) for p in optimizer.state} == in_groups
    contrastive = trainer.mixture.stateful["contrastive"]
    momentum_image = dict(contrastive.momentum_encoders["image"].named_buffers())
    for name, parameter in trainer.model.encoders["image"].named_parameters():
        torch.testing.assert_close(momentum_image[name], parameter)  # the EMA of a fixed encoder is that encoder
    momentum_text = contrastive.momentum_encoders["text"].project.weight
    assert not torch.equal(momentum_text, saved["encoders.text.project.weight"])  # the trained one's EMA moves
    share = sum(named[n].numel() for n in frozen) / sum(p.numel() for p in named.values())
    assert f"parameters frozen ({share:.1%}, {len(frozen)} tensors)" in capsys.readouterr().err


def test_a_zero1_export_keeps_the_frozen_parameters(pretrained, finetune_overrides, tmp_path):
    """ZeRO-1 checkpoints hold frozen parameters only in the module's states; the export finds them."""
    config = load_config(CAPTIONING, finetune_overrides + ["train.freeze=[encoders.*]", "train.zero_stage=1",
                                                           "train.steps=2"])
    Trainer(config, tmp_path / "run", progress=False).fit()
    export_run(tmp_path / "run", tmp_path / "model")
    before, after = load_file(pretrained[1] / "model.safetensors"), load_file(tmp_path / "model" / "model.safetensors")
    encoders = [n for n in before if n.startswith("encoders.")]
    assert encoders and all(torch.equal(before[n], after[n]) for n in encoders)
    assert not torch.equal(before["text_decoder.embed.weight"], after["text_decoder.embed.weight"])


def test_resuming_a_fine_tuning_run_continues_from_its_own_checkpoint(pretrained, finetune_overrides, tmp_path):
    overrides = finetune_overrides + ["train.checkpoint_every=2"]
    Trainer(load_config(CAPTIONING, overrides + ["train.steps=2"]), tmp_path, progress=False).fit()
    checkpoint = fp32_state_dict(checkpoints.list_checkpoints(tmp_path)[0])
    trainer = Trainer(load_config(CAPTIONING, overrides + ["train.steps=4"]), tmp_path, progress=False)
    assert trainer.step == 2
    weights = trainer.model.state_dict()
    initial = load_file(pretrained[1] / "model.safetensors")
    name = "text_decoder.embed.weight"
    assert torch.equal(weights[name], checkpoint[name]) and not torch.equal(weights[name], initial[name])
    trainer.fit()
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3, 4]


def test_a_freeze_pattern_matching_nothing_is_an_error(pretrained):
    model = OPTModel.from_pretrained(pretrained[1])
    with pytest.raises(UserError, match=r"train.freeze: 'encoders.imgae.\*' matches no parameter name"):
        freeze_parameters(model, ["encoders.image.*", "encoders.imgae.*"])
    assert all(p.requires_grad for p in model.parameters())  # nothing half-frozen
    with pytest.raises(UserError, match="freeze every parameter"):
        freeze_parameters(model, ["*"])


def test_init_from_needs_a_model_directory(pretrained, finetune_overrides, tmp_path):
    missing = load_config(CAPTIONING, finetune_overrides + [f"train.init_from={tmp_path / 'missing'}"])
    with pytest.raises(UserError, match="model directory not found"):
        build_model(missing, tmp_path / "run")
    a_run = load_config(CAPTIONING, finetune_overrides + [f"train.init_from={pretrained[0]}"])
    with pytest.raises(UserError, match="is a training run, not a model directory; export it first: opt export"):
        build_model(a_run, tmp_path / "run")


@pytest.mark.parametrize("name, tasks", [("captioning", {"text_decoding"}), ("retrieval", {"contrastive", "itm"}),
                                         ("text_to_image", {"image_decoding"})])
def test_the_fine_tuning_configs_load(name, tasks):
    config = load_config(f"configs/finetune/{name}.yaml", ["train.init_from=runs/elsewhere/model"])
    assert {task for task, weight in config.tasks.weights.items() if weight > 0} == tasks
    assert config.train.init_from == "runs/elsewhere/model" and not config.tasks.phases
    assert config.train.lr < load_config("configs/tiny.yaml").train.lr and config.train.warmup_steps > 0
