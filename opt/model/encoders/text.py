"""The text encoder: a transformers BERT, built from config or read from a local directory."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig, BertModel

from opt.config import TextEncoderConfig
from opt.errors import UserError


class TextEncoder(nn.Module):
    """Token ids (b, t) -> token states (b, t, d); pooled = the state at the bos position."""

    def __init__(self, config: TextEncoderConfig, *, vocab_size: int, pad_id: int, max_positions: int,
                 out_width: int, mlp_ratio: int = 4, dropout: float = 0.0, backbone: dict | None = None) -> None:
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
        self.width = self.bert.config.hidden_size
        self.sizes = {"width": self.width, "layers": self.bert.config.num_hidden_layers,
                      "heads": self.bert.config.num_attention_heads}
        self.backbone_config = None  # the BERT config, when the encoder came from (or is) a pretrained one
        self.load_report = None

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        states = self.bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (b, t, w)
        return {"tokens": self.project(states), "mask": mask, "pooled": states[:, 0]}
