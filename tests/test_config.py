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
    (["data.modalities=[text,video]"], "unknown modality 'video'"),
    (["train.precision=fp8"], "config key 'train.precision'"),
    (["data.batch_size=0"], "config key 'data.batch_size'"),
    (["model.vision.patch_size=16"], "config key 'model.vision.patch_size'"),
    (["model.vision.stem=resnet"], "config key 'model.vision.stem': 'resnet'"),
    (["model.vision.stem=conv", "model.vision.pretrained_path=vit.safetensors"], "config key 'model.vision.stem'"),
    (["model.vision.stem=patch", "model.vision.coord_channels=true"], "config key 'model.vision.coord_channels'"),
    (["model.vision.stem=conv", "model.vision.stem_depth=0"], "config key 'model.vision.stem_depth'"),
    (["model.vision.stem=patch", "model.vision.stem_depth=2"], "config key 'model.vision.stem_depth'"),
    (["model.cross.heads=5"], "not divisible by 5 heads"),
    (["model.qk_norm=decoder"], "config key 'model.qk_norm': 'decoder'"),
    (["tasks.weights={mlm: 1, xyz: 1}"], "config key 'tasks.weights.xyz'"),
    (["tasks.phases=[{steps: 10, weights: {tdd: 1}}]"], "config key 'tasks.phases.0.weights.tdd'"),
    (["tasks.phases=[{steps: 0, weights: {td: 1}}]"], "config key 'tasks.phases.0.steps'"),
    (["tasks.phases=[{steps: 10, weights: {td: 0}}]"], "config key 'tasks.phases.0.weights'"),
    (["tasks.td_conditions=[image+text]"], "config key 'tasks.td_conditions': 'image+text'"),
    (["tasks.phases=[{steps: 5, weights: {id: 1}, id_conditions: []}]"], "config key 'tasks.phases.0.id_conditions'"),
    (["tasks.contrastive_pairs=[text-video]"], "config key 'tasks.contrastive_pairs': 'text-video'"),
    (["tasks.id_parallel_fraction=1.5"], "config key 'tasks.id_parallel_fraction'"),
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
