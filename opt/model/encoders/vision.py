"""The vision encoder: timm's ViT (patch or convolutional stem), optionally from local timm weights."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from opt.config import VisionConfig
from opt.errors import UserError
from opt.model.encoders.common import pool
from opt.model.layers import sincos_2d


def _load_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise UserError(f"pretrained weights not found: {path}")
    if path.endswith(".safetensors"):
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


class CoordinateChannels(nn.Module):
    """Prepends two channels, each pixel's x and y in [-1, 1], then runs ``stem`` (CoordConv,
    Liu et al. 2018). A position embedding added after the stem is the same for an object's
    tokens and the background's, so whatever pools or attends uniformly over the tokens
    learns nothing of where the object is; through the stem's nonlinearities the coordinates
    reach the features only where there is content."""

    def __init__(self, stem: nn.Module) -> None:
        super().__init__()
        self.stem = stem

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        b, _, h, w = pixels.shape
        y, x = torch.meshgrid(torch.linspace(-1, 1, h, device=pixels.device, dtype=pixels.dtype),
                              torch.linspace(-1, 1, w, device=pixels.device, dtype=pixels.dtype), indexing="ij")
        return self.stem(torch.cat([pixels, torch.stack([x, y]).expand(b, -1, -1, -1)], dim=1))


def conv_stem(patch_size: int, width: int, *, coord_channels: bool = False, depth: int = 1) -> nn.Module:
    """Strided 3x3 convolutions (log2(patch_size) of them, channels doubling up to ``width``)
    mapping (b, 3, H, W) to (b, width, H/p, W/p): the same token grid as a patch embedding,
    with the locality prior of a CNN (Xiao et al. 2021, "Early convolutions help transformers see better").
    ``depth`` > 1 adds ``depth - 1`` stride-1 3x3 convolutions after each strided one but the last;
    ``coord_channels`` feeds the pixels' coordinates in beside them (:class:`CoordinateChannels`)."""
    stages = patch_size.bit_length() - 1
    channels = [5 if coord_channels else 3] + [max(width >> (stages - i), 8) for i in range(1, stages)] + [width]

    def norm_and_activation(c: int) -> list[nn.Module]:
        return [nn.GroupNorm(math.gcd(8, c), c), nn.GELU()]

    layers: list[nn.Module] = []
    for i in range(stages):
        layers.append(nn.Conv2d(channels[i], channels[i + 1], 3, stride=2, padding=1))
        if i < stages - 1:
            layers += norm_and_activation(channels[i + 1])
            for _ in range(depth - 1):
                layers += [nn.Conv2d(channels[i + 1], channels[i + 1], 3, padding=1),
                           *norm_and_activation(channels[i + 1])]
    stem = nn.Sequential(*layers)
    return CoordinateChannels(stem) if coord_channels else stem


class MaskableVisionTransformer(VisionTransformer):
    """timm's ViT whose forward can replace some patch embeddings before positions are added.

    Going through ``forward`` (rather than calling the ViT's internals from outside)
    keeps module hooks, such as ZeRO-3's parameter gathering, working.
    """

    def forward(self, pixels: torch.Tensor, hidden: torch.Tensor | None = None,
                mask_embedding: torch.Tensor | None = None) -> torch.Tensor:
        x = self.patch_embed(pixels)  # (b, n, w)
        if hidden is not None:
            x = torch.where(hidden[..., None], mask_embedding.to(x.dtype), x)
        return self.norm(self.blocks(self.norm_pre(self._pos_embed(x))))


class VisionEncoder(nn.Module):
    """Images (b, 3, H, W) in [0, 1] -> patch tokens (b, (H/p) * (W/p), d)."""

    def __init__(self, config: VisionConfig, *, image_size: int, out_width: int, mlp_ratio: int = 4,
                 dropout: float = 0.0, qk_norm: bool = False) -> None:
        super().__init__()
        self.vit = MaskableVisionTransformer(
            img_size=image_size, patch_size=config.patch_size, embed_dim=config.width, depth=config.layers,
            num_heads=config.heads, mlp_ratio=mlp_ratio, num_classes=0, global_pool="", class_token=False,
            drop_rate=dropout, proj_drop_rate=dropout, attn_drop_rate=dropout, qk_norm=qk_norm,
        )
        if config.stem == "conv":  # timm's PatchEmbed keeps its flattening; only the projection changes
            self.vit.patch_embed.proj = conv_stem(config.patch_size, config.width,
                                                  coord_channels=config.coord_channels, depth=config.stem_depth)
        if config.pretrained_path:
            self.vit.load_state_dict(_load_state_dict(config.pretrained_path), strict=False)
        self.mask_embedding = nn.Parameter(torch.zeros(config.width))
        self.project = nn.Linear(config.width, out_width)
        self.patches = (image_size // config.patch_size) ** 2
        self.width = config.width
        self.class_token = bool(config.class_token)
        self.load_report = None  # a LoadReport when pretrained weights were read
        if not config.pretrained_path:  # start positions informative, as MAE does; they stay learnable
            with torch.no_grad():
                self.vit.pos_embed.copy_(sincos_2d(image_size // config.patch_size, config.width)[None])
        self.pool = config.pool
        # Attention that starts near uniform over 64 patches reads a small object at 1/64 of its
        # strength, and learns to look at it slowly; the pooled vector (max: the object's own
        # features) added to every token reaches such a reader whole from the first step.
        self.context = nn.Linear(config.width, config.width) if config.pooled_context else None

    def forward(self, pixels: torch.Tensor, *, hidden: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``hidden`` (b, n) True marks patches replaced by the mask embedding."""
        x = self.vit((pixels - 0.5) / 0.5, hidden, self.mask_embedding)  # (b, n, w)
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        pooled = pool(x, mask, self.pool)
        tokens = x if self.context is None else x + self.context(pooled)[:, None]
        return {"tokens": self.project(tokens), "mask": mask, "pooled": pooled}
