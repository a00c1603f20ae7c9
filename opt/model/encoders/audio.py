"""The audio encoder: a convolutional front end (log-mel or waveform) and transformer blocks."""

from __future__ import annotations

import torch
import torchaudio
from torch import nn

from opt.config import AudioEncoderConfig
from opt.model.encoders.common import pool
from opt.model.layers import Transformer, attention_mask, distance_bias, with_bias


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


class AudioEncoder(nn.Module):
    """Audio features -> frame tokens. ``frames`` in the output are the front end's
    layer-normalised outputs before the transformer (the targets of masked audio modelling)."""

    def __init__(self, config: AudioEncoderConfig, *, n_mels: int, max_positions: int, out_width: int,
                 mlp_ratio: int = 4, dropout: float = 0.0, qk_norm: bool = False,
                 backbone: dict | None = None) -> None:
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
        self.width = self.frame_width = config.width  # pooled vectors; the frames masked audio modelling finds
        self.sizes = {"width": config.width, "layers": config.layers, "heads": config.heads}
        self.backbone_config = None  # the transformers config of a pretrained backbone
        self.load_report = None

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
