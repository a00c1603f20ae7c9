"""Typed configs: YAML + dotted overrides, one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from opt.config import Config, load_config, save_config
from opt.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["tiny", "base", "large"])
def test_shipped_configs_load(name):
    config = load_config(CONFIGS / f"{name}.yaml")
    assert isinstance(config, Config)


def test_base_has_the_paper_scale():
    model = load_config(CONFIGS / "base.yaml").model
    assert (model.cross.layers, model.cross.width, model.cross.heads) == (12, 768, 12)
    assert (model.text_decoder.layers, model.text_decoder.width, model.text_decoder.heads) == (6, 1024, 16)
    assert model.vq.codebook_size == 8192
    assert model.text_decoder.label_smoothing == 0.1


def test_dotted_overrides_win_over_the_file():
    config = load_config(CONFIGS / "tiny.yaml", ["model.cross.layers=4", "data.modalities=[text,audio]",
                                                 "train.lr=0.5"])
    assert config.model.cross.layers == 4
    assert config.data.modalities == ["text", "audio"]
    assert config.train.lr == 0.5


@pytest.mark.parametrize("overrides,message", [
    (["model.cross.layrs=4"], "config key 'model.cross.layrs'"),
    (["model.cross.layers=four"], "config key 'model.cross.layers'"),
    (["data.modalities=[text,video]"], "config key 'data.modalities[1]': Invalid value 'video'"),
    (["train.precision=fp8"], "config key 'train.precision'"),
    (["data.batch_size=0"], "config key 'data.batch_size'"),
    (["model.vision.patch_size=12"], "config key 'model.vision.patch_size': 12 does not divide"),
    (["model.vision.stem=conv", "data.image_size=96", "model.vision.patch_size=12"], "needs a power of 2"),
    (["model.vision.stem=resnet"], "config key 'model.vision.stem': Invalid value 'resnet'"),
    (["model.audio.front=wav2vec2_conv"], "config key 'audio.input': model.audio.front=wav2vec2_conv reads the waveform"),
    (["audio.input=waveform"], "config key 'audio.input'"),
    (["model.vision.stem=patch", "model.vision.coord_channels=true"], "config key 'model.vision.coord_channels'"),
    (["model.vision.stem=conv", "model.vision.stem_depth=0"], "config key 'model.vision.stem_depth'"),
    (["model.vision.stem=patch", "model.vision.stem_depth=2"], "config key 'model.vision.stem_depth'"),
    (["model.cross.heads=5"], "not divisible by 5 heads"),
    (["model.qk_norm=decoder"], "config key 'model.qk_norm': Invalid value 'decoder'"),
    (["tasks.weights={mlm: 1, xyz: 1}"], "config key 'tasks.weights.xyz'"),
    (["tasks.phases=[{steps: 10, weights: {tdd: 1}}]"], "config key 'tasks.phases.0.weights.tdd'"),
    (["tasks.phases=[{steps: 0, weights: {text_decoding: 1}}]"], "config key 'tasks.phases.0.steps': must be >= 1"),
    (["tasks.phases=[{weights: {text_decoding: 1}}]"], "tasks.phases[0].steps"),
    (["tasks.phases=[{steps: 10, weights: {text_decoding: 0}}]"], "config key 'tasks.phases.0.weights'"),
    (["tasks.text_decoding_conditions=[image+text]"], "config key 'tasks.text_decoding_conditions': 'image+text'"),
    (["tasks.phases=[{steps: 5, weights: {image_decoding: 1}, image_decoding_conditions: []}]"],
     "config key 'tasks.phases.0.image_decoding_conditions'"),
    (["tasks.contrastive_pairs=[text-video]"], "config key 'tasks.contrastive_pairs': 'text-video'"),
    (["tasks.image_decoding_parallel_fraction=1.5"], "config key 'tasks.image_decoding_parallel_fraction': must be <="),
    (["train.checkpoint_every=0"], "config key 'train.checkpoint_every': must be >= 1, got 0"),
    (["train.log_every=0"], "config key 'train.log_every'"),
    (["train.keep_checkpoints=0"], "config key 'train.keep_checkpoints'"),
    (["train.steps=-5"], "config key 'train.steps'"),
    (["train.lr=-1"], "config key 'train.lr': must be > 0"),
    (["data.workers=-1"], "config key 'data.workers'"),
    (["data.max_text_tokens=1"], "config key 'data.max_text_tokens'"),
    (["train.zero_stage=4"], "config key 'train.zero_stage': must be one of 0, 1, 2, 3"),
    (["model.audio.subsample=3"], "config key 'model.audio.subsample'"),
    (["model.dropout=1.0"], "config key 'model.dropout'"),
    (["train.betas=[0.9]"], "config key 'train.betas'"),
    (["novalue"], "must look like key.path=value"),
])
def test_bad_overrides_are_one_line_errors_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_unknown_key_in_a_file_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  batch_sise: 3\n")
    with pytest.raises(ConfigError, match="data.batch_sise"):
        load_config(path)


def test_bad_yaml_and_missing_file(tmp_path):
    (tmp_path / "broken.yaml").write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")


def test_saved_config_loads_back_identically(tmp_path):
    config = load_config(CONFIGS / "tiny.yaml", ["model.cross.layers=3"])
    save_config(config, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == config


def test_renamed_task_keys_are_read_with_a_warning(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("tasks:\n  weights: {td: 2, id: 0}\n  id_parallel_fraction: 0.25\n"
                    "  phases:\n    - {steps: 5, weights: {td: 1}, td_conditions: [audio]}\n")
    with pytest.warns(FutureWarning, match="'tasks.weights.td' is now 'tasks.weights.text_decoding'"):
        config = load_config(path, ["tasks.id_conditions=[text]"])
    assert config.tasks.weights["text_decoding"] == 2 and config.tasks.weights["image_decoding"] == 0
    assert "td" not in config.tasks.weights and config.tasks.image_decoding_parallel_fraction == 0.25
    assert config.tasks.phases[0].text_decoding_conditions == ["audio"]
    assert config.tasks.phases[0].weights == {"text_decoding": 1.0}
    assert config.tasks.image_decoding_conditions == ["text"]


def test_enumerations_load_as_their_values_and_save_as_plain_strings(tmp_path):
    config = load_config(CONFIGS / "tiny.yaml", ["train.precision=bf16"])
    assert config.train.precision == "bf16" and f"{config.model.qk_norm}" == "fusion"
    save_config(config, tmp_path / "resolved.yaml")
    assert "precision: bf16\n" in (tmp_path / "resolved.yaml").read_text()


@pytest.mark.parametrize("image_size, patch_size, stem", [(64, 16, "conv"), (56, 14, "patch"), (64, 4, "patch")])
def test_any_patch_size_dividing_the_image_loads(image_size, patch_size, stem):
    config = load_config(None, [f"data.image_size={image_size}", f"model.vision.patch_size={patch_size}",
                                f"model.vision.stem={stem}"])
    assert config.model.vision.patch_size == patch_size
