"""``opt model init`` with all three pretrained parts at once, built offline with the libraries' own
save functions: a timm ViT at another image and patch size, a BERT directory with its WordPiece
tokenizer, and a wav2vec 2.0 directory. The written model directory holds each part tensor by
tensor, and loads on its own once the sources are gone."""

from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from transformers import BertModel, Wav2Vec2Model

from opt.cli import main
from opt.downstream.common import load_model
from opt.model.opt_model import OPTModel
from tests.test_model import SMALL
from tests.test_pretrained_audio import backbone_dirs  # noqa: F401 (fixture)
from tests.test_pretrained_text import bert_dir  # noqa: F401 (fixture)
from tests.test_pretrained_vision import HEADS, LAYERS, WIDTH, checkpoint  # noqa: F401 (fixtures)


def test_model_init_loads_a_vit_a_bert_and_a_wav2vec2_tensor_by_tensor(checkpoint, bert_dir, backbone_dirs,
                                                                         tmp_path, capsys):
    timm_model, vit_path = checkpoint  # 32 px in 4-px patches (8 x 8), class token, 10-class head
    sources = tmp_path / "sources"
    shutil.copytree(bert_dir, sources / "bert")
    shutil.copytree(backbone_dirs["wav2vec2"], sources / "wav2vec2")
    shutil.copy(vit_path, sources / "vit.safetensors")
    out = tmp_path / "model"
    argv = ["model", "init", "--config", "configs/tiny.yaml", "--out", str(out), *SMALL,
            "model.vision.stem=patch", "model.vision.coord_channels=false", "model.vision.patch_size=16",
            f"model.vision.width={WIDTH}", f"model.vision.layers={LAYERS}", f"model.vision.heads={HEADS}",
            f"model.vision.pretrained_path={sources / 'vit.safetensors'}",
            f"tokenizer.path={sources / 'bert'}", f"model.text.pretrained_dir={sources / 'bert'}",
            "audio.input=waveform", f"model.audio.pretrained_dir={sources / 'wav2vec2'}"]
    assert main(argv) == 0
    assert f"-> {out}" in capsys.readouterr().out
    saved = load_file(out / "model.safetensors")
    shutil.rmtree(sources)  # the directory must not need them any more

    vit = timm_model.state_dict()  # 64 px in 16-px patches: a 4 x 4 grid, both embeddings resampled
    assert torch.equal(saved["encoders.image.vit.pos_embed"],
                       resample_abs_pos_embed(vit["pos_embed"], new_size=[4, 4], num_prefix_tokens=1))
    assert torch.equal(saved["encoders.image.vit.patch_embed.proj.weight"],
                       resample_patch_embed(vit["patch_embed.proj.weight"], [16, 16]))
    same = [name for name in vit if not name.startswith(("head.", "pos_embed", "patch_embed.proj.weight"))]
    assert len(same) == len(vit) - 4
    for name in same:
        assert torch.equal(saved[f"encoders.image.vit.{name}"], vit[name]), name

    bert = BertModel.from_pretrained(bert_dir, local_files_only=True).state_dict()
    for name, tensor in bert.items():
        if not name.startswith("pooler."):
            assert torch.equal(saved[f"encoders.text.bert.{name}"], tensor), name
    wav2vec2 = Wav2Vec2Model.from_pretrained(backbone_dirs["wav2vec2"], local_files_only=True).state_dict()
    audio = {name.removeprefix("encoders.audio."): t for name, t in saved.items() if name.startswith("encoders.audio.")}
    backbone = {name.split(".", 1)[1]: t for name, t in audio.items() if name.split(".", 1)[1] in wav2vec2}
    assert len(backbone) == len(wav2vec2)
    for name, tensor in wav2vec2.items():
        assert torch.equal(backbone[name], tensor), name

    config = json.loads((out / "config.json").read_text())
    spec = config["spec"]
    assert config["model_type"] == "opt" and spec["model"]["vision"]["class_token"] is True
    assert spec["model"]["vision"]["pretrained_path"] is None  # the ViT is read once; its source is recorded
    assert spec["model"]["text"]["pretrained_dir"] == spec["backbones"]["text"]["source"] == str(sources / "bert")
    assert set(spec["backbones"]) == {"image", "text", "audio"} and spec["model"]["text"]["width"] == 32
    assert (out / "tokenizer" / "tokenizer.json").is_file() or (out / "tokenizer" / "vocab.txt").is_file()
    card = (out / "README.md").read_text()
    assert "Not trained" in card and "## Pretrained parts" in card and "vit.safetensors" in card

    loaded = load_model(out)  # rebuilds every part from config.json alone
    assert isinstance(loaded.model, OPTModel) and loaded.tokenizer.bos_id == loaded.tokenizer.cls_id
    reloaded = loaded.model.state_dict()
    assert all(torch.equal(reloaded[name], tensor) for name, tensor in saved.items())


def test_runs_with_pretrained_backbones_export_without_their_sources(bert_dir, backbone_dirs, world,
                                                                     small_training_overrides, tmp_path):
    """A pretraining run from the backbones' directories, then a fine-tune of its export: each run
    records its model spec, so ``opt export`` rebuilds BERT and wav2vec 2.0 once the sources are gone."""
    sources = tmp_path / "sources"
    shutil.copytree(bert_dir, sources / "bert")
    shutil.copytree(backbone_dirs["wav2vec2"], sources / "wav2vec2")
    common = [o for o in small_training_overrides if not o.startswith("tokenizer.path=")] + [
        "train.steps=2", "train.warmup_steps=1", "train.checkpoint_every=2", "data.max_text_tokens=24"]
    pretraining = common + [f"tokenizer.path={sources / 'bert'}", f"model.text.pretrained_dir={sources / 'bert'}",
                            "audio.input=waveform", f"model.audio.pretrained_dir={sources / 'wav2vec2'}"]
    assert main(["train", "--config", "configs/tiny.yaml", "--run-dir", str(tmp_path / "pretrain"), *pretraining]) == 0
    shutil.rmtree(sources)
    assert main(["export", str(tmp_path / "pretrain"), "--out", str(tmp_path / "pretrained")]) == 0
    finetune = common + [f"train.init_from={tmp_path / 'pretrained'}", "tasks.queue_size=8",
                         "train.freeze=[text_decoder.*]"]
    assert main(["train", "--config", "configs/finetune/retrieval.yaml", "--run-dir", str(tmp_path / "finetune"),
                 *finetune]) == 0
    assert main(["export", str(tmp_path / "finetune"), "--out", str(tmp_path / "finetuned")]) == 0
    model = OPTModel.from_pretrained(tmp_path / "finetuned")
    assert model.spec.backbones["text"]["config"]["hidden_size"] == 32
    assert model.spec.backbones["audio"]["config"]["model_type"] == "wav2vec2"
    before = load_file(tmp_path / "pretrained" / "model.safetensors")
    after = model.state_dict()
    assert not torch.equal(after["towers.text.weight"], before["towers.text.weight"])  # retrieval trained it
    assert torch.equal(after["text_decoder.embed.weight"], before["text_decoder.embed.weight"])  # frozen
