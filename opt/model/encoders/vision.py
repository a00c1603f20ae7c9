"""The vision encoder: timm's ViT (patch or convolutional stem), optionally from local timm weights.

Pretrained weights come from one local file holding a timm ``VisionTransformer`` state dict in
timm's own names (:func:`opt.model.pretrained.read_state_dict` says which files). Loading maps it
onto the encoder tensor by tensor (:func:`load_timm_vit`) and reports where each one went:

- a class token is built when the config asks for one, or (``class_token`` unset) when the
  checkpoint has one; the encoder's output is the patches alone either way;
- position embeddings on another grid are resampled with timm's ``resample_abs_pos_embed``, a
  patch embedding of another patch size with timm's ``resample_patch_embed`` (FlexiViT);
- a conv stem stays fresh and the checkpoint's patch embedding goes unused; the blocks still load;
- a classifier head, ``fc_norm``, ``attn_pool``, register tokens and whatever else the encoder
  has no place for are unused; the encoder's tensors the checkpoint lacks are fresh;
- a tensor both have with shapes that cannot be reconciled is a one-line :class:`UserError`.
  (Shapes cannot tell the number of heads: ``heads`` must match the checkpoint's.)
"""

from __future__ import annotations

import math

import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from opt.config import VisionConfig, VisionStem
from opt.errors import UserError
from opt.logs import info
from opt.model.encoders.common import pool
from opt.model.layers import sincos_2d
from opt.model.pretrained import LoadReport, read_state_dict

WHAT = "pretrained ViT"  # how errors name the checkpoint


def _checkpoint_grid(pos_embed: torch.Tensor, state: dict[str, torch.Tensor], source: str) -> tuple[int, int]:
    """(prefix positions, grid side) of a checkpoint's ``pos_embed`` (1, prefix + side * side, w).

    timm puts the class token's and the registers' positions first, or none of them
    (``no_embed_class``, as DeiT III and register models do); square grids only."""
    positions = pos_embed.shape[1]
    prefix_tokens = int("cls_token" in state) + (state["reg_token"].shape[1] if "reg_token" in state else 0)
    for prefix in dict.fromkeys((prefix_tokens, 0)):
        side = math.isqrt(max(positions - prefix, 0))
        if side * side == positions - prefix:
            return prefix, side
    raise UserError(f"{WHAT} {source}: pos_embed has {positions} positions, not a square grid after "
                    f"{prefix_tokens} class/register positions")


def _positions(pos_embed: torch.Tensor, state: dict[str, torch.Tensor], *, grid: int, class_position: bool,
               source: str) -> torch.Tensor:
    """The checkpoint's ``pos_embed`` (1, p + g * g, w) as the model's (1, [1 +] grid * grid, w).

    The grid is resampled by timm; the model's class position is the checkpoint's, or zero where
    the checkpoint adds none to its class token (the same sum) or has no class token at all."""
    prefix, side = _checkpoint_grid(pos_embed, state, source)
    resampled = resample_abs_pos_embed(pos_embed, new_size=[grid, grid], old_size=[side, side],
                                       num_prefix_tokens=prefix)  # (1, p + grid * grid, w)
    patches = resampled[:, prefix:]
    if not class_position:
        return patches
    has_class_position = prefix > 0 and "cls_token" in state  # timm: class first, then registers
    first = resampled[:, :1] if has_class_position else torch.zeros_like(patches[:, :1])
    return torch.cat([first, patches], dim=1)


def load_timm_vit(vit: VisionTransformer, state: dict[str, torch.Tensor], *, source: str,
                  fresh_stem: bool) -> LoadReport:
    """Copy a timm ViT state dict into ``vit`` (every tensor of it: strict), resampling what
    differs only in grid or patch size; ``fresh_stem``: ``vit.patch_embed`` is not timm's, so the
    checkpoint's ``patch_embed.*`` are unused. Returns where each tensor went."""
    target = vit.state_dict()
    grid = vit.patch_embed.grid_size[0]
    report = LoadReport(part="image", source=source)
    values: dict[str, torch.Tensor] = {}
    in_model_order = [name for name in target if name in state] + [name for name in state if name not in target]
    for name in in_model_order:  # the same report, and the same first clash, whatever order the file keeps
        tensor = state[name]
        if name not in target or (fresh_stem and name.startswith("patch_embed.")):
            report.unused.append(name)
            continue
        want = target[name]
        value = tensor
        if name == "pos_embed" and tensor.ndim == 3:
            value = _positions(tensor, state, grid=grid, class_position=vit.cls_token is not None, source=source)
        elif name == "patch_embed.proj.weight" and tensor.ndim == 4 and tensor.shape[:2] == want.shape[:2]:
            value = resample_patch_embed(tensor, list(want.shape[2:]))  # (w, 3, p, p)
        if value.shape != want.shape:
            raise UserError(f"{WHAT} {source}: {name} has shape {tuple(tensor.shape)}, the model "
                            f"{tuple(want.shape)}; set model.vision.width/layers/heads to the checkpoint's")
        values[name] = value
        same = value.shape == tensor.shape and torch.equal(value, tensor)
        (report.loaded if same else report.resampled).append(name)
    report.fresh = [name for name in target if name not in values]
    vit.load_state_dict({**target, **values})
    return report


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
        x = self.norm(self.blocks(self.norm_pre(self._pos_embed(x))))  # (b, [1 +] n, w)
        return x[:, self.num_prefix_tokens:]  # the patches alone: a class token stays inside the ViT


class VisionEncoder(nn.Module):
    """Images (b, 3, H, W) in [0, 1] -> patch tokens (b, (H/p) * (W/p), d).

    ``config.pretrained_path``: timm ViT weights loaded as the module docstring says; what went
    where is in ``load_report`` and logged as one line."""

    def __init__(self, config: VisionConfig, *, image_size: int, out_width: int, mlp_ratio: int = 4,
                 dropout: float = 0.0, qk_norm: bool = False) -> None:
        super().__init__()
        path = config.pretrained_path
        state = read_state_dict(path, what=WHAT) if path else None
        # the class token: as configured, else as the checkpoint has it (none without one)
        self.class_token = bool(config.class_token if config.class_token is not None or state is None
                                else "cls_token" in state)
        self.vit = MaskableVisionTransformer(
            img_size=image_size, patch_size=config.patch_size, embed_dim=config.width, depth=config.layers,
            num_heads=config.heads, mlp_ratio=mlp_ratio, num_classes=0, global_pool="", class_token=self.class_token,
            drop_rate=dropout, proj_drop_rate=dropout, attn_drop_rate=dropout, qk_norm=qk_norm,
        )
        if config.stem == VisionStem.conv:  # timm's PatchEmbed keeps its flattening; only the projection changes
            self.vit.patch_embed.proj = conv_stem(config.patch_size, config.width,
                                                  coord_channels=config.coord_channels, depth=config.stem_depth)
        self.mask_embedding = nn.Parameter(torch.zeros(config.width))
        self.project = nn.Linear(config.width, out_width)
        self.patches = (image_size // config.patch_size) ** 2
        self.width = config.width
        self.pool = config.pool
        # Attention that starts near uniform over 64 patches reads a small object at 1/64 of its
        # strength, and learns to look at it slowly; the pooled vector (max: the object's own
        # features) added to every token reaches such a reader whole from the first step.
        self.context = nn.Linear(config.width, config.width) if config.pooled_context else None
        self.load_report: LoadReport | None = None  # where each pretrained tensor went, when there were any
        if state is None:  # start positions informative, as MAE does; they stay learnable
            with torch.no_grad():
                self.vit.pos_embed[:, self.vit.num_prefix_tokens:].copy_(
                    sincos_2d(image_size // config.patch_size, config.width)[None])
        else:
            self.load_report = load_timm_vit(self.vit, state, source=path, fresh_stem=config.stem == VisionStem.conv)
            self.load_report.fresh += [name for name in self.state_dict() if not name.startswith("vit.")]
            info(self.load_report.summary())

    def forward(self, pixels: torch.Tensor, *, hidden: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``hidden`` (b, n) True marks patches replaced by the mask embedding."""
        x = self.vit((pixels - 0.5) / 0.5, hidden, self.mask_embedding)  # (b, n, w)
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        pooled = pool(x, mask, self.pool)
        tokens = x if self.context is None else x + self.context(pooled)[:, None]
        return {"tokens": self.project(tokens), "mask": mask, "pooled": pooled}
