"""Single-modal encoders. Each returns a dict with

- ``tokens`` (b, n, d_cross): token embeddings projected to the cross-modal width,
- ``mask`` (b, n): True on real tokens,
- ``pooled`` (b, d_encoder): one vector per sample, for the two-tower heads.

Vision: a timm ``VisionTransformer`` built from config (never downloaded;
optional local weights). Text: a transformers ``BertModel`` built from a
``BertConfig`` (or a local ``from_pretrained`` directory). Audio: a
convolutional front end (log-mel + strided convs, or torchaudio's wav2vec 2.0
feature extractor on raw waveforms) followed by transformer blocks.

Each encoder also accepts a mask of positions to hide behind a learned
``[MASK]`` embedding (image patches, audio frames) for the token-level tasks;
text is masked at the id level.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torchaudio
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from transformers import BertConfig, BertModel

from opt.config import AudioEncoderConfig, TextEncoderConfig, VisionConfig
from opt.errors import UserError
from opt.model.layers import Transformer, attention_mask, distance_bias, sincos_2d, with_bias


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


class TextEncoder(nn.Module):
    """Token ids (b, t) -> token states (b, t, d); pooled = the state at the bos position."""

    def __init__(self, config: TextEncoderConfig, *, vocab_size: int, pad_id: int, max_positions: int,
                 out_width: int, mlp_ratio: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        if config.pretrained_dir:
            if not Path(config.pretrained_dir).is_dir():
                raise UserError(f"pretrained text encoder directory not found: {config.pretrained_dir}")
            self.bert = BertModel.from_pretrained(config.pretrained_dir, add_pooling_layer=False,
                                                  attn_implementation="sdpa", local_files_only=True)
        else:
            bert_config = BertConfig(
                vocab_size=vocab_size, hidden_size=config.width, num_hidden_layers=config.layers,
                num_attention_heads=config.heads, intermediate_size=mlp_ratio * config.width,
                max_position_embeddings=max_positions, type_vocab_size=1, pad_token_id=pad_id,
                attn_implementation="sdpa",
                hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
            )
            self.bert = BertModel(bert_config, add_pooling_layer=False)
        self.project = nn.Linear(self.bert.config.hidden_size, out_width)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        states = self.bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (b, t, w)
        return {"tokens": self.project(states), "mask": mask, "pooled": states[:, 0]}


class LogMelConvFront(nn.Module):
    """Log-mel frames (b, f, n_mels) -> (b, f / subsample, w) with strided 1-D convolutions.

    Padded frames are zeroed after every stage, so a sample's output does not
    depend on how much padding its batch adds.
    """

    def __init__(self, *, n_mels: int, width: int, subsample: int) -> None:
        super().__init__()
        stages = subsample.bit_length() - 1
        self.convs = nn.ModuleList(
            nn.Conv1d(n_mels if stage == 0 else width, width, kernel_size=3, stride=2, padding=1)
            for stage in range(stages)
        )
        self.activation = nn.GELU()

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = features.transpose(1, 2) * mask[:, None, :].to(features.dtype)  # (b, n_mels, f)
        lengths = mask.sum(1)
        for conv in self.convs:
            x = self.activation(conv(x))
            lengths = torch.div(lengths + 1, 2, rounding_mode="floor")  # ceil(length / 2)
            mask = torch.arange(x.shape[2], device=x.device)[None, :] < lengths[:, None]
            x = x * mask[:, None, :].to(x.dtype)
        return x.transpose(1, 2), mask


class Wav2Vec2ConvFront(nn.Module):
    """Raw 16 kHz waveform (b, n) -> (b, n / 320, w) with torchaudio's wav2vec 2.0 feature extractor.

    Its first layer's group norm spans the whole time axis, padding included
    (as in wav2vec 2.0), so unlike the log-mel front its output depends a
    little on the batch's padding.
    """

    def __init__(self, *, width: int) -> None:
        super().__init__()
        layers = [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2
        self.extractor = torchaudio.models.wav2vec2_model(
            extractor_mode="group_norm", extractor_conv_layer_config=layers, extractor_conv_bias=False,
            encoder_embed_dim=width, encoder_projection_dropout=0.0, encoder_pos_conv_kernel=3,
            encoder_pos_conv_groups=1, encoder_num_layers=0, encoder_num_heads=1, encoder_attention_dropout=0.0,
            encoder_ff_interm_features=width, encoder_ff_interm_dropout=0.0, encoder_dropout=0.0,
            encoder_layer_norm_first=True, encoder_layer_drop=0.0, aux_num_out=None,
        ).feature_extractor
        self.project = nn.Linear(512, width)

    def forward(self, waveform: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, lengths = self.extractor(waveform, mask.sum(1))
        return self.project(x), torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]


def pool(x: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Mean or max of the real positions of x (b, n, d) -> (b, d); rows without any give zeros.

    (A learned attention query, timm's ``AttentionPoolLatent``, was tried for the image
    tower: text-image alignment alone reached 0.30 in-batch accuracy at 600 steps, max
    pooling 0.82.)
    """
    if how == "max":
        pooled = x.masked_fill(~mask[..., None], torch.finfo(x.dtype).min).amax(dim=1)
        return torch.where(mask.any(1, keepdim=True), pooled, torch.zeros_like(pooled))
    weights = mask[..., None].to(x.dtype)
    return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class AudioEncoder(nn.Module):
    """Audio features -> frame tokens. ``frames`` in the output are the front end's
    layer-normalised outputs before the transformer (the targets of masked audio modelling)."""

    def __init__(self, config: AudioEncoderConfig, *, n_mels: int, max_positions: int, out_width: int,
                 mlp_ratio: int = 4, dropout: float = 0.0, qk_norm: bool = False) -> None:
        super().__init__()
        if config.front == "logmel_conv":
            self.front = LogMelConvFront(n_mels=n_mels, width=config.width, subsample=config.subsample)
        else:
            self.front = Wav2Vec2ConvFront(width=config.width)
        self.positions = nn.Embedding(max_positions, config.width)
        self.mask_embedding = nn.Parameter(torch.zeros(config.width))
        self.front_norm = nn.LayerNorm(config.width)  # as wav2vec 2.0's feature projection: frames at unit scale
        self.transformer = Transformer(layers=config.layers, width=config.width, heads=config.heads,
                                       mlp_ratio=mlp_ratio, dropout=dropout,
                                       qk_norm="all" if qk_norm else "none")
        self.project = nn.Linear(config.width, out_width)
        self.max_positions = max_positions
        self.pool = config.pool
        self.heads, self.distance_bias = config.heads, config.distance_bias

    @torch.no_grad()
    def frame_mask(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Which frames exist after the front end (b, frames), without running the transformer."""
        return self.front(features, mask)[1][:, : self.max_positions]

    def forward(self, features: torch.Tensor, mask: torch.Tensor, *,
                hidden: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``features`` (b, f, n_mels) or a waveform (b, n); ``hidden`` (b, frames) masks frames."""
        frames, frame_mask = self.front(features, mask)
        frames, frame_mask = self.front_norm(frames[:, : self.max_positions]), frame_mask[:, : self.max_positions]
        x = frames if hidden is None else torch.where(hidden[..., None], self.mask_embedding.to(frames.dtype), frames)
        x = x + self.positions(torch.arange(x.shape[1], device=x.device))
        mask = attention_mask(frame_mask, x.shape[1])
        if self.distance_bias:
            mask = with_bias(mask, distance_bias(x.shape[1], self.heads, device=x.device), x.dtype)
        x = self.transformer(x, mask=mask)
        pooled = pool(x, frame_mask, self.pool)
        return {"tokens": self.project(x), "mask": frame_mask, "pooled": pooled, "frames": frames}
