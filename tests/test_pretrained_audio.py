"""Waveform input and pretrained wav2vec 2.0 / HuBERT audio encoders: the pipeline's waveform
batches, the backbone's weights and outputs against transformers' own model, saving and
reloading without the backbone's directory, masked audio modelling steps, and the errors.

The backbone directories are built offline with transformers' own ``save_pretrained`` from tiny
configs with the real conv layout at 32 channels (400-sample receptive field, 320-sample stride):
a wav2vec 2.0 with layer-normed conv features (so it reads an attention mask) and a HuBERT
with group norm (so it reads none).
"""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import HubertConfig, HubertModel, Wav2Vec2Config, Wav2Vec2Model

from opt.config import load_config
from opt.data.pipeline import BatchLoader
from opt.errors import UserError
from opt.model.encoders.common import pool
from opt.model.opt_model import ModelSpec, OPTModel
from opt.model.summary import count_flops, dummy_batch, training_step_flops
from opt.tasks.mixture import TaskMixture
from tests.test_model import SMALL

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "conv_dim": (32,) * 7, "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2}
BACKBONES = {"wav2vec2": (Wav2Vec2Model, Wav2Vec2Config(feat_extract_norm="layer", **TINY)),
             "hubert": (HubertModel, HubertConfig(feat_extract_norm="group", **TINY))}
WAVEFORM = ["audio.input=waveform", "data.batch_size=4"]


@pytest.fixture(scope="module")
def backbone_dirs(tmp_path_factory) -> dict[str, Path]:
    """A saved wav2vec 2.0 and a saved HuBERT, by model_type."""
    directories = {}
    for name, (model_class, config) in BACKBONES.items():
        torch.manual_seed(0)
        directories[name] = tmp_path_factory.mktemp(name)
        model_class(config).save_pretrained(directories[name])
    return directories


def reference(name: str, directory: Path) -> torch.nn.Module:
    """The backbone as transformers itself loads it."""
    return BACKBONES[name][0].from_pretrained(directory, local_files_only=True).eval()


def pretrained_model(directory: Path, tokenizer, *overrides: str) -> tuple[OPTModel, object]:
    config = load_config("configs/tiny.yaml", SMALL + WAVEFORM + [f"model.audio.pretrained_dir={directory}",
                                                                  *overrides])
    torch.manual_seed(0)
    return OPTModel(ModelSpec.from_config(config, tokenizer)).eval(), config


def shard_waveforms(pattern: Path) -> dict[str, np.ndarray]:
    """Every sample's audio in the shards, decoded with soundfile alone, by key."""
    waves = {}
    for shard in sorted(pattern.parent.glob(pattern.name)):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".wav"):
                    wave, rate = sf.read(io.BytesIO(tar.extractfile(member).read()), dtype="float32")
                    assert rate == 16000
                    waves[member.name.removesuffix(".wav")] = wave
    return waves


def test_waveform_input_gives_normalised_16k_waveform_batches(world, tokenizer):
    config = load_config(None, ["data.workers=0", "data.shuffle_buffer=0", "data.batch_size=6",
                                "audio.input=waveform", "model.audio.front=wav2vec2_conv", "audio.max_seconds=3.0"])
    batch = next(iter(BatchLoader(f"{world}/val-*.tar", config.data, config.audio, tokenizer, train=False)))
    audio = batch["audio"]
    assert set(audio) == {"waveform", "mask", "present"} and audio["present"].all()
    waveform, mask = audio["waveform"], audio["mask"]
    assert waveform.shape == mask.shape and waveform.shape[0] == 6 and waveform.dtype == torch.float32
    assert (waveform[~mask] == 0).all()
    expected = shard_waveforms(Path(world) / "val-*.tar")
    clipped = 0
    for row, key in enumerate(batch["keys"]):
        wave = expected[key][: 3 * 16000]
        clipped += len(expected[key]) > 3 * 16000
        real = waveform[row, mask[row]]
        assert len(real) == len(wave) and mask[row, : len(wave)].all()
        assert float(real.mean()) == pytest.approx(0.0, abs=1e-5)
        assert float(real.std(correction=0)) == pytest.approx(1.0, abs=1e-4)
        torch.testing.assert_close(real, torch.from_numpy((wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)))
    assert clipped > 0  # some clips are longer than 3 s: cut at 48,000 samples

    raw = load_config(None, ["data.workers=0", "data.shuffle_buffer=0", "data.batch_size=6", "audio.input=waveform",
                             "model.audio.front=wav2vec2_conv", "audio.normalize_waveform=false"])
    batch = next(iter(BatchLoader(f"{world}/val-*.tar", raw.data, raw.audio, tokenizer, train=False)))
    key = batch["keys"][0]
    unnormalised = batch["audio"]["waveform"][0, batch["audio"]["mask"][0]]
    torch.testing.assert_close(unnormalised, torch.from_numpy(expected[key]))


@pytest.mark.parametrize("name", list(BACKBONES))
def test_pretrained_backbone_loads_tensor_by_tensor_and_encodes_as_transformers_does(backbone_dirs, tokenizer, name):
    model, _ = pretrained_model(backbone_dirs[name], tokenizer)
    encoder, hf = model.encoders["audio"], reference(name, backbone_dirs[name])
    expected = hf.state_dict()
    loaded = encoder.backbone.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    report = encoder.load_report
    assert sorted(report.loaded) == sorted(expected) and not report.fresh and not report.unused
    assert model.spec.model.audio.pretrained_dir == model.spec.backbones["audio"]["source"]  # a record only
    assert model.spec.backbones["audio"]["config"]["model_type"] == name
    assert model.spec.backbones["audio"]["source"] == str(backbone_dirs[name])
    assert model.spec.model.audio.width == encoder.width == 32 and encoder.frame_width == 32
    assert model.heads["mam"].out_features == 32 and model.towers["audio"].in_features == 32

    waveform = torch.randn(2, 16000)  # 1 s, unpadded: 49 frames
    mask = torch.ones_like(waveform, dtype=torch.bool)
    with torch.no_grad():
        out = encoder(waveform, mask)
        states = hf(waveform).last_hidden_state
        conv = hf.feature_extractor(waveform).transpose(1, 2)
    assert out["mask"].shape == (2, 49) and out["mask"].all()
    torch.testing.assert_close(out["tokens"], encoder.project(states))
    torch.testing.assert_close(out["pooled"], pool(states, out["mask"], "max"))
    torch.testing.assert_close(out["frames"], hf.feature_projection.layer_norm(conv))
    # padded: the mask counts the real frames, and frame_mask() says so without the transformer
    mask[1, 8000:] = False
    assert encoder.frame_mask(waveform, mask).sum(1).tolist() == [49, 24]
    assert encoder(waveform, mask)["mask"].sum(1).tolist() == [49, 24]


def test_saved_model_rebuilds_the_backbone_without_its_directory(backbone_dirs, tokenizer, tmp_path):
    for name in BACKBONES:
        directory = tmp_path / name
        shutil.copytree(backbone_dirs[name], directory)
        model, _ = pretrained_model(directory, tokenizer)
        model.save_pretrained(tmp_path / f"{name}-opt", tokenizer=tokenizer)
        shutil.rmtree(directory)
        loaded = OPTModel.from_pretrained(tmp_path / f"{name}-opt")
        assert loaded.spec == model.spec and loaded.encoders["audio"].load_report is None
        waveform = torch.randn(2, 24000)
        mask = torch.ones_like(waveform, dtype=torch.bool)
        mask[0, 20000:] = False
        batch = {"audio": {"waveform": waveform, "mask": mask, "present": torch.ones(2, dtype=torch.bool)}}
        with torch.no_grad():
            a = model.fuse(model.encode_unimodal(batch))
            b = loaded.fuse(loaded.encode_unimodal(batch))
        torch.testing.assert_close(b["states"], a["states"], atol=0, rtol=0)


@pytest.mark.parametrize("trunk", ["wav2vec2", "hubert", "wav2vec2_conv"])
def test_masked_audio_modelling_trains_on_waveform_batches(backbone_dirs, world, tokenizer, trunk):
    if trunk == "wav2vec2_conv":
        config = load_config("configs/tiny.yaml", SMALL + WAVEFORM + ["model.audio.front=wav2vec2_conv",
                                                                      "audio.max_seconds=2.0"])
        torch.manual_seed(0)
        model = OPTModel(ModelSpec.from_config(config, tokenizer))
        trained = model.encoders["audio"].front
    else:
        model, config = pretrained_model(backbone_dirs[trunk], tokenizer, "audio.max_seconds=2.0")
        trained = model.encoders["audio"].backbone
    batch = next(iter(BatchLoader(f"{world}/val-*.tar", config.data, config.audio, tokenizer, train=False)))
    assert "waveform" in batch["audio"]
    mixture = TaskMixture(config, model.train())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {name: p.detach().clone() for name, p in trained.named_parameters()}
    losses = []
    for _ in range(3):
        output = mixture.task("mam")(model, batch, mixture.generators)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()
        losses.append(output.loss.item())
    assert all(np.isfinite(losses)) and 0.0 <= output.metrics["accuracy"] <= 1.0
    changed = [name for name, p in trained.named_parameters() if not torch.equal(p, before[name])]
    assert len(changed) > len(before) // 2  # the audio trunk trains end to end
    if trunk != "wav2vec2_conv":
        assert "masked_spec_embed" in changed  # hidden frames take the backbone's own mask embedding


def test_hidden_frames_take_the_backbones_mask_embedding_and_nothing_else_is_hidden(backbone_dirs, tokenizer):
    model, _ = pretrained_model(backbone_dirs["wav2vec2"], tokenizer)
    encoder = model.encoders["audio"].train()  # in training the backbone would draw SpecAugment masks of its own
    waveform, mask = torch.randn(2, 16000), torch.ones(2, 16000, dtype=torch.bool)
    hidden = torch.zeros(2, 49, dtype=torch.bool)
    hidden[:, 10] = True
    captured = []
    hook = encoder.backbone.encoder.register_forward_pre_hook(lambda module, args: captured.append(args[0].clone()))
    with torch.no_grad():
        encoder(waveform, mask, hidden=hidden)
        encoder(waveform, mask)
    hook.remove()
    masked, plain = captured
    embedding = encoder.backbone.masked_spec_embed
    torch.testing.assert_close(masked[:, 10], embedding.expand(2, -1))
    torch.testing.assert_close(masked[~hidden], plain[~hidden])
    assert not torch.isclose(plain, embedding).all(-1).any()


def test_flop_count_covers_the_backbone(backbone_dirs, tokenizer):
    model, _ = pretrained_model(backbone_dirs["wav2vec2"], tokenizer, "audio.max_seconds=2.0")
    batch = dummy_batch(model, 2)
    assert batch["audio"]["waveform"].shape == (2, 32000)
    with count_flops() as counter, torch.no_grad():
        model.encoders["audio"].backbone(batch["audio"]["waveform"])
    backbone_forward = counter.get_total_flops() / 2
    assert backbone_forward > 0 and training_step_flops(model) > 2 * backbone_forward


def test_unknown_model_type_and_missing_directory_are_one_line_user_errors(tokenizer, tmp_path):
    whisper = tmp_path / "whisper"
    whisper.mkdir()
    (whisper / "config.json").write_text('{"model_type": "whisper"}')
    empty = tmp_path / "empty"
    empty.mkdir()
    for directory, words in [(whisper, ["'whisper'", "wav2vec2, hubert"]), (tmp_path / "absent", ["not found"]),
                             (empty, ["config.json"])]:
        with pytest.raises(UserError) as error:
            pretrained_model(directory, tokenizer)
        message = str(error.value)
        assert "\n" not in message and str(directory) in message and all(w in message for w in words)
