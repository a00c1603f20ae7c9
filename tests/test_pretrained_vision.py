"""Loading timm ViT checkpoints into the vision encoder: resampling, class tokens, conv stems,
refused files and shape clashes, with every tensor accounted for in the load report."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models.vision_transformer import VisionTransformer

from opt.config import VisionConfig, load_config
from opt.errors import UserError
from opt.model.encoders import VisionEncoder
from opt.model.opt_model import ModelSpec, OPTModel

WIDTH, LAYERS, HEADS = 64, 2, 4


def timm_vit(*, width: int = WIDTH, class_token: bool = True) -> VisionTransformer:
    """A tiny timm ViT, 32 pixels in 4-pixel patches (an 8x8 grid), with a 10-class head."""
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=width, depth=LAYERS, num_heads=HEADS,
                             num_classes=10, class_token=class_token,
                             global_pool="token" if class_token else "avg").eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[VisionTransformer, str]:
    """The tiny timm ViT and its weights saved with safetensors."""
    model = timm_vit()
    path = str(tmp_path_factory.mktemp("vit") / "vit.safetensors")
    save_file(model.state_dict(), path)
    return model, path


def encoder(path: str | None, *, image_size: int, patch_size: int = 4, **config) -> VisionEncoder:
    vision = VisionConfig(patch_size=patch_size, layers=LAYERS, width=WIDTH, heads=HEADS, pretrained_path=path,
                          **config)
    return VisionEncoder(vision, image_size=image_size, out_width=32, mlp_ratio=4).eval()


def assert_every_tensor_accounted_for(report, state: dict, model: VisionEncoder) -> None:
    from_checkpoint = report.loaded + report.resampled + report.unused
    assert sorted(from_checkpoint) == sorted(state)
    ours = sorted(report.loaded + report.resampled + report.fresh)
    assert ours == sorted(name.removeprefix("vit.") for name in model.state_dict())


def test_other_grid_and_patch_size_are_resampled_with_timms_helpers(checkpoint):
    timm_model, path = checkpoint
    state = timm_model.state_dict()
    model = encoder(path, image_size=48, patch_size=8)  # a 6x6 grid of 8-pixel patches
    report = model.load_report
    assert model.class_token is True
    ours = model.vit.state_dict()
    assert torch.equal(ours["pos_embed"], resample_abs_pos_embed(state["pos_embed"], new_size=[6, 6],
                                                                 num_prefix_tokens=1))
    assert torch.equal(ours["patch_embed.proj.weight"], resample_patch_embed(state["patch_embed.proj.weight"], [8, 8]))
    assert sorted(report.resampled) == ["patch_embed.proj.weight", "pos_embed"]
    for name in report.loaded:
        assert torch.equal(ours[name], state[name]), name
    assert sorted(report.unused) == ["head.bias", "head.weight"]
    assert sorted(report.fresh) == ["mask_embedding", "project.bias", "project.weight"]
    assert len(report.loaded) == len(state) - 4 and "cls_token" in report.loaded
    assert_every_tensor_accounted_for(report, state, model)
    out = model(torch.rand(2, 3, 48, 48))
    assert out["tokens"].shape == (2, 36, 32) and out["mask"].shape == (2, 36) and out["pooled"].shape == (2, WIDTH)


def test_same_grid_matches_timms_own_forward(checkpoint):
    timm_model, path = checkpoint
    model = encoder(path, image_size=32)
    report = model.load_report
    assert report.resampled == [] and len(report.loaded) == len(timm_model.state_dict()) - 2
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        patches = timm_model.forward_features((pixels - 0.5) / 0.5)[:, 1:]  # after the final norm, class dropped
        out = model(pixels)
        assert torch.allclose(out["tokens"], model.project(patches), atol=1e-5)
        assert torch.allclose(out["pooled"], patches.mean(1), atol=1e-5)
        hidden = torch.zeros(2, 64, dtype=torch.bool)
        hidden[:, :5] = True  # masking reaches patches only, and changes the output
        masked = model(pixels, hidden=hidden)
    assert masked["tokens"].shape == out["tokens"].shape and not torch.allclose(masked["tokens"], out["tokens"])


def test_pth_state_dict_loads_as_safetensors_does(checkpoint, tmp_path):
    timm_model, path = checkpoint
    nested = tmp_path / "vit.pth"
    torch.save({"model": {f"module.{k}": v for k, v in timm_model.state_dict().items()}, "epoch": 3}, nested)
    from_pth, from_safetensors = encoder(str(nested), image_size=32), encoder(path, image_size=32)
    assert from_pth.load_report.loaded == from_safetensors.load_report.loaded
    pth_state, safetensors_state = from_pth.vit.state_dict(), from_safetensors.vit.state_dict()
    assert all(torch.equal(pth_state[k], safetensors_state[k]) for k in safetensors_state)


class Payload:
    """Something that only unpickling arbitrary code would rebuild."""


def test_pickled_objects_and_missing_files_are_refused(tmp_path):
    pickled = tmp_path / "vit.pth"
    torch.save({"state_dict": Payload()}, pickled)
    with pytest.raises(UserError, match="weights_only") as refused:
        encoder(str(pickled), image_size=32)
    assert str(pickled) in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(UserError, match="not found"):
        encoder(str(tmp_path / "absent.safetensors"), image_size=32)


def test_width_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    path = tmp_path / "wide.safetensors"
    save_file(timm_vit(width=96).state_dict(), path)
    with pytest.raises(UserError) as clash:
        encoder(str(path), image_size=32)
    message = str(clash.value)
    assert message.startswith(f"pretrained ViT {path}: cls_token has shape (1, 1, 96), the model (1, 1, 64)")
    assert "model.vision.width" in message and "\n" not in message


def test_conv_stem_keeps_the_blocks_and_leaves_the_stem_fresh(checkpoint):
    timm_model, path = checkpoint
    model = encoder(path, image_size=32, stem="conv")
    report = model.load_report
    assert sorted(report.unused) == ["head.bias", "head.weight", "patch_embed.proj.bias", "patch_embed.proj.weight"]
    stem = [name for name in report.fresh if name.startswith("patch_embed.")]
    assert stem and all(name.startswith("patch_embed.proj.") for name in stem)
    assert all(name in report.loaded for name in timm_model.state_dict() if name.startswith("blocks."))
    assert torch.equal(model.vit.blocks[1].mlp.fc2.weight, timm_model.blocks[1].mlp.fc2.weight)
    assert_every_tensor_accounted_for(report, timm_model.state_dict(), model)


def test_class_token_left_out_by_the_config_goes_unused(checkpoint):
    timm_model, path = checkpoint
    model = encoder(path, image_size=32, class_token=False)
    report = model.load_report
    assert model.class_token is False and model.vit.cls_token is None
    assert "cls_token" in report.unused and report.resampled == ["pos_embed"]
    assert torch.equal(model.vit.pos_embed, timm_model.pos_embed[:, 1:])
    assert model(torch.rand(1, 3, 32, 32))["tokens"].shape == (1, 64, 32)
    assert_every_tensor_accounted_for(report, timm_model.state_dict(), model)


def test_checkpoint_without_class_token_builds_none(tmp_path):
    path = tmp_path / "pooled.safetensors"
    save_file(timm_vit(class_token=False).state_dict(), path)
    model = encoder(str(path), image_size=32)
    assert model.class_token is False and {"fc_norm.weight", "fc_norm.bias"} <= set(model.load_report.unused)
    assert "norm.weight" in model.load_report.fresh  # timm's average-pooled ViT normalises in fc_norm instead


def test_class_token_without_a_position_gets_a_zero_one(tmp_path):
    torch.manual_seed(0)  # DeiT III / register-model layout: no position added to the class token
    timm_model = VisionTransformer(img_size=32, patch_size=4, embed_dim=WIDTH, depth=LAYERS, num_heads=HEADS,
                                   num_classes=0, no_embed_class=True).eval()
    path = tmp_path / "deit3.safetensors"
    save_file(timm_model.state_dict(), path)
    model = encoder(str(path), image_size=32)
    assert model.load_report.resampled == ["pos_embed"] and not model.vit.pos_embed[:, 0].any()
    pixels = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        patches = timm_model.forward_features((pixels - 0.5) / 0.5)[:, 1:]
        assert torch.allclose(model(pixels)["tokens"], model.project(patches), atol=1e-5)


def test_opt_model_records_the_resolved_class_token(checkpoint):
    _, path = checkpoint
    overrides = [f"model.vision.pretrained_path={path}", f"model.vision.width={WIDTH}", f"model.vision.heads={HEADS}",
                 f"model.vision.layers={LAYERS}", "model.cross.layers=1", "model.text.layers=1",
                 "model.audio.layers=1", "model.text_decoder.layers=1", "model.image_decoder.layers=1"]
    model = OPTModel(ModelSpec.from_config(load_config("configs/tiny.yaml", overrides), None))
    vision = model.spec.model.vision
    assert vision.class_token is True and vision.pretrained_path is None
    assert model.spec.backbones["image"] == {"source": path}
    assert model.encoders["image"].load_report.fresh[0].startswith("patch_embed.proj.")  # tiny.yaml's conv stem
