"""The audio encoder: frame tokens from log-mel features or the waveform, by one of two trunks.

* Built from config: a convolutional front end (log-mel + strided convolutions, or torchaudio's
  wav2vec 2.0 feature extractor on the waveform) and transformer blocks with learned positions.
  ``frames`` are the front end's layer-normalised outputs before the transformer.
* A pretrained transformers wav2vec 2.0 or HuBERT model in place of both (``pretrained_dir``,
  or the ``backbone`` config a saved OPT model rebuilds it from without reading weights). It
  reads the waveform and keeps its own sizes and dropout (not ``model.dropout``). ``frames`` are
  its layer-normed conv features (wav2vec 2.0's ``extract_features``); hidden frames take its
  own ``masked_spec_embed``. Its random SpecAugment time masks (drawn from numpy's global RNG)
  stay off: the tasks choose which frames are hidden.

``frames`` are the targets of masked audio modelling; every output is cut to ``max_positions``
frames. Shapes: b batch, f log-mel frames, n waveform samples, t frames after the front end.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn
from transformers import HubertModel, PreTrainedModel, Wav2Vec2Model

from opt import logs
from opt.config import AudioEncoderConfig
from opt.errors import UserError
from opt.model.encoders.common import pool
from opt.model.layers import Transformer, attention_mask, distance_bias, with_bias
from opt.model.pretrained import LoadReport, quiet_transformers

BACKBONES: dict[str, type[PreTrainedModel]] = {"wav2vec2": Wav2Vec2Model, "hubert": HubertModel}  # by model_type


def receptive_field(kernels: list[int], strides: list[int]) -> int:
    """Input samples that one output frame of a stack of unpadded 1-D convolutions reads."""
    field = 1
    for kernel, stride in reversed(list(zip(kernels, strides))):
        field = (field - 1) * stride + kernel
    return field


def at_least(waveform: torch.Tensor, mask: torch.Tensor, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``waveform`` (b, n) and ``mask`` (b, n) padded to at least ``samples`` (a batch without any
    audio has one padding sample per row, too short for a convolution)."""
    short = samples - waveform.shape[1]
    if short <= 0:
        return waveform, mask
    return (torch.cat([waveform, waveform.new_zeros(waveform.shape[0], short)], 1),
            torch.cat([mask, mask.new_zeros(mask.shape[0], short)], 1))


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

    LAYERS = [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2  # (channels, kernel, stride) per convolution

    def __init__(self, *, width: int) -> None:
        super().__init__()
        self.extractor = torchaudio.models.wav2vec2_model(
            extractor_mode="group_norm", extractor_conv_layer_config=self.LAYERS, extractor_conv_bias=False,
            encoder_embed_dim=width, encoder_projection_dropout=0.0, encoder_pos_conv_kernel=3,
            encoder_pos_conv_groups=1, encoder_num_layers=0, encoder_num_heads=1, encoder_attention_dropout=0.0,
            encoder_ff_interm_features=width, encoder_ff_interm_dropout=0.0, encoder_dropout=0.0,
            encoder_layer_norm_first=True, encoder_layer_drop=0.0, aux_num_out=None,
        ).feature_extractor
        self.project = nn.Linear(512, width)
        self.min_samples = receptive_field([k for _, k, _ in self.LAYERS], [s for _, _, s in self.LAYERS])

    def forward(self, waveform: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        waveform, mask = at_least(waveform, mask, self.min_samples)
        x, lengths = self.extractor(waveform, mask.sum(1))
        return self.project(x), torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]


def _backbone_class(model_type: str | None, source: str) -> type[PreTrainedModel]:
    if model_type not in BACKBONES:
        raise UserError(f"pretrained audio encoder {source}: model_type {model_type!r} is not supported "
                        f"(supported: {', '.join(BACKBONES)})")
    return BACKBONES[model_type]


def _pretrained_backbone(directory: str) -> tuple[PreTrainedModel, LoadReport]:
    """The wav2vec 2.0 or HuBERT model in ``directory`` (local files, fp32) and what loading it did."""
    if not Path(directory).is_dir():
        raise UserError(f"pretrained audio encoder directory not found: {directory}")
    try:
        values = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"pretrained audio encoder {directory}: no readable config.json ({error})") from None
    model_class = _backbone_class(values.get("model_type") if isinstance(values, dict) else None, directory)
    try:
        with quiet_transformers():
            model, info = model_class.from_pretrained(directory, dtype=torch.float32, local_files_only=True,
                                                      output_loading_info=True)
    except (OSError, ValueError) as error:
        raise UserError(f"pretrained audio encoder {directory}: {str(error).strip().splitlines()[0]}") from None
    missing = set(info["missing_keys"])
    report = LoadReport(part="audio", source=str(directory),
                        loaded=[name for name in model.state_dict() if name not in missing],
                        fresh=sorted(missing), unused=sorted(info["unexpected_keys"]))
    return model, report


def _built_backbone(backbone: dict) -> PreTrainedModel:
    """The backbone a saved OPT model describes (``{"source": ..., "config": {...}}``), weights not read."""
    model_class = _backbone_class(backbone["config"].get("model_type"), backbone["source"])
    return model_class(model_class.config_class.from_dict(backbone["config"]))


class AudioEncoder(nn.Module):
    """Audio features (b, f, n_mels) or a waveform (b, n) -> frame tokens (see the module docstring).

    ``width``: size of the pooled vectors; ``frame_width``: size of ``frames``; ``sizes``: the
    trunk's width, layers and heads (a backbone's own); ``backbone_config``: a backbone's
    transformers config as a dict; ``load_report``: what reading ``pretrained_dir`` did.
    """

    def __init__(self, config: AudioEncoderConfig, *, n_mels: int, max_positions: int, out_width: int,
                 mlp_ratio: int = 4, dropout: float = 0.0, qk_norm: bool = False,
                 backbone: dict | None = None) -> None:
        super().__init__()
        self.max_positions = max_positions
        self.pool = config.pool
        self.backbone_config = None  # the transformers config of a pretrained backbone
        self.load_report = None
        if backbone is not None or config.pretrained_dir:
            self._use_backbone(config, backbone)
        else:
            self._build_trunk(config, n_mels=n_mels, max_positions=max_positions, mlp_ratio=mlp_ratio,
                              dropout=dropout, qk_norm=qk_norm)
        self.project = nn.Linear(self.width, out_width)

    def _build_trunk(self, config: AudioEncoderConfig, *, n_mels: int, max_positions: int, mlp_ratio: int,
                     dropout: float, qk_norm: bool) -> None:
        self.backbone = None
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
        self.heads, self.distance_bias = config.heads, config.distance_bias
        self.width = self.frame_width = config.width  # pooled vectors; the frames masked audio modelling finds
        self.sizes = {"width": config.width, "layers": config.layers, "heads": config.heads}

    def _use_backbone(self, config: AudioEncoderConfig, backbone: dict | None) -> None:
        if backbone is not None:
            self.backbone = _built_backbone(backbone)
        else:
            self.backbone, self.load_report = _pretrained_backbone(config.pretrained_dir)
            logs.info(self.load_report.summary())
        settings = self.backbone.config
        if isinstance(self.backbone, Wav2Vec2Model) and settings.add_adapter:
            raise UserError(f"pretrained audio encoder {config.pretrained_dir or backbone['source']}: a model with "
                            f"an adapter (add_adapter) is not supported")
        self.backbone_config = settings.to_dict()
        self.width, self.frame_width = settings.hidden_size, settings.conv_dim[-1]
        self.sizes = {"width": settings.hidden_size, "layers": settings.num_hidden_layers,
                      "heads": settings.num_attention_heads}
        self.min_samples = receptive_field(settings.conv_kernel, settings.conv_stride)
        # the backbone hides frames only with a masked_spec_embed, which it has when built with SpecAugment on
        self.hides_frames = settings.apply_spec_augment and hasattr(self.backbone, "masked_spec_embed")

    @torch.no_grad()
    def frame_mask(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Which frames exist after the front end (b, t), without running the transformer."""
        if self.backbone is not None:
            return self._backbone_frames(at_least(features, mask, self.min_samples)[1])[:, : self.max_positions]
        return self.front(features, mask)[1][:, : self.max_positions]

    def forward(self, features: torch.Tensor, mask: torch.Tensor, *,
                hidden: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``features`` (b, f, n_mels) or a waveform (b, n); ``hidden`` (b, t) masks frames."""
        run = self._run_trunk if self.backbone is None else self._run_backbone
        states, frame_mask, frames = run(features, mask, hidden)
        pooled = pool(states, frame_mask, self.pool)
        return {"tokens": self.project(states), "mask": frame_mask, "pooled": pooled, "frames": frames}

    def _run_trunk(self, features: torch.Tensor, mask: torch.Tensor,
                   hidden: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        frames, frame_mask = self.front(features, mask)
        frames, frame_mask = self.front_norm(frames[:, : self.max_positions]), frame_mask[:, : self.max_positions]
        x = frames if hidden is None else torch.where(hidden[..., None], self.mask_embedding.to(frames.dtype), frames)
        x = x + self.positions(torch.arange(x.shape[1], device=x.device))
        mask = attention_mask(frame_mask, x.shape[1])
        if self.distance_bias:
            mask = with_bias(mask, distance_bias(x.shape[1], self.heads, device=x.device), x.dtype)
        return self.transformer(x, mask=mask), frame_mask, frames

    def _backbone_frames(self, mask: torch.Tensor) -> torch.Tensor:
        """(b, t) True on the frames the backbone makes of real samples, over all it makes of (b, n)."""
        lengths = self.backbone._get_feat_extract_output_lengths(mask.sum(1))
        total = int(self.backbone._get_feat_extract_output_lengths(torch.tensor(mask.shape[1])))
        return torch.arange(total, device=mask.device)[None, :] < lengths[:, None]

    def _run_backbone(self, waveform: torch.Tensor, mask: torch.Tensor,
                      hidden: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        waveform, mask = at_least(waveform, mask, self.min_samples)
        frame_mask = self._backbone_frames(mask)  # (b, t), every frame
        options = {}
        if self.backbone.config.feat_extract_norm == "layer":
            # The layer-norm models (wav2vec 2.0 large-lv60, HuBERT large) were trained with padding
            # masked out; the group-norm base models were trained without an attention mask, so they
            # get none and only see their padding zeroed. A row without audio attends to its padding
            # (its tokens are dropped anyway) rather than to nothing.
            options["attention_mask"] = (mask | ~mask.any(1, keepdim=True)).long()
        if self.hides_frames:  # always given, so the backbone draws no SpecAugment mask of its own
            hide = torch.zeros_like(frame_mask)
            if hidden is not None:
                hide[:, : hidden.shape[1]] = hidden
            options["mask_time_indices"] = hide
        elif hidden is not None and hidden.any():
            raise UserError("the pretrained audio encoder cannot hide frames (apply_spec_augment is off or "
                            "mask_time_prob is 0 in its config); give the mam task no weight (tasks.weights)")
        conv = []  # the conv features (b, channels, t), caught on their way to the feature projection
        hook = self.backbone.feature_extractor.register_forward_hook(lambda module, args, out: conv.append(out))
        try:
            states = self.backbone(waveform * mask.to(waveform.dtype), **options).last_hidden_state  # (b, t, hidden)
        finally:
            hook.remove()
        frames = self._frame_norm(conv[0].transpose(1, 2))  # (b, t, conv_dim[-1])
        keep = self.max_positions
        return states[:, :keep], frame_mask[:, :keep], frames[:, :keep]

    def _frame_norm(self, conv: torch.Tensor) -> torch.Tensor:
        """The backbone's own layer norm of its conv features (wav2vec 2.0's ``extract_features``);
        a plain layer norm for a HuBERT built without one (``feat_proj_layer_norm`` off)."""
        norm = getattr(self.backbone.feature_projection, "layer_norm", None)
        return norm(conv) if norm is not None else F.layer_norm(conv, conv.shape[-1:])
