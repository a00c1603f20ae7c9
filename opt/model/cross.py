"""Cross-modal encoder: fuses any subset of text, image and audio tokens.

Sequence: ``[CLS] + text + image + audio`` (only the modalities given), each
token plus a modality-type embedding and a position embedding of its own
modality (text and audio: 1-D; image: one per grid cell, i.e. 2-D).
Pre-LN transformer blocks with SDPA; padded positions are masked as keys,
so they never influence other positions.
"""

from __future__ import annotations

import torch
from torch import nn

from opt import MODALITIES
from opt.config import CrossModalConfig
from opt.model.layers import Transformer, attention_mask

TYPE_IDS = {"cls": 0, "text": 1, "image": 2, "audio": 3}


class CrossModalEncoder(nn.Module):
    def __init__(self, config: CrossModalConfig, *, image_tokens: int, mlp_ratio: int = 4,
                 dropout: float = 0.0, qk_norm: bool = False) -> None:
        super().__init__()
        self.width = config.width
        self.cls = nn.Parameter(torch.zeros(1, 1, config.width))
        self.types = nn.Embedding(len(TYPE_IDS), config.width)
        self.positions = nn.ModuleDict({
            "text": nn.Embedding(config.max_text_positions, config.width),
            "image": nn.Embedding(image_tokens, config.width),
            "audio": nn.Embedding(config.max_audio_positions, config.width),
        })
        self.transformer = Transformer(layers=config.layers, width=config.width, heads=config.heads,
                                       mlp_ratio=mlp_ratio, dropout=dropout,
                                       qk_norm="all" if qk_norm else "none")

    def forward(self, inputs: dict[str, dict[str, torch.Tensor]]) -> dict:
        """``inputs[modality] = {"tokens": (b, n, d), "mask": (b, n)}`` for the modalities present.

        Returns ``states`` (b, s, d), ``mask`` (b, s), ``cls`` (b, d) and
        ``spans`` {modality: (start, end)} into the sequence.
        """
        if not inputs:
            raise ValueError("the cross-modal encoder needs at least one modality")
        first = next(iter(inputs.values()))["tokens"]
        batch, device = first.shape[0], first.device
        types = self.types(torch.arange(len(TYPE_IDS), device=device))  # (4, d), through forward for hooks
        pieces = [self.cls.expand(batch, -1, -1).to(first.dtype) + types[TYPE_IDS["cls"]]]
        masks = [torch.ones(batch, 1, dtype=torch.bool, device=device)]
        spans, start = {}, 1
        for modality in MODALITIES:
            if modality not in inputs:
                continue
            tokens, mask = inputs[modality]["tokens"], inputs[modality]["mask"]
            positions = self.positions[modality](torch.arange(tokens.shape[1], device=device))
            pieces.append(tokens + positions + types[TYPE_IDS[modality]])
            masks.append(mask)
            spans[modality] = (start, start + tokens.shape[1])
            start += tokens.shape[1]
        x = torch.cat(pieces, dim=1)
        mask = torch.cat(masks, dim=1)
        states = self.transformer(x, mask=attention_mask(mask, x.shape[1]))
        return {"states": states, "mask": mask, "cls": states[:, 0], "spans": spans}
