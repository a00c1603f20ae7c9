"""The text encoder: a transformers BERT, built from config or read from a local directory.

Three ways to build it:

- from ``model.text`` (width, layers, heads): a fresh BERT over the tokenizer's vocabulary,
  with the model's dropout;
- from ``model.text.pretrained_dir``: ``BertModel.from_pretrained`` on local files, in fp32,
  without the pooler; its vocabulary must be the tokenizer's (``tokenizer.path`` = the same
  directory). It keeps its own config, dropout included (BERT's 0.1), not ``model.dropout``;
- from ``backbone`` (``{"source": dir, "config": {...}}``, what a saved model's spec records):
  the same BERT rebuilt from its config alone, without reading any weights; it takes precedence
  over ``pretrained_dir``, which a saved model keeps only as a record of the source.

Its width, layers and heads (``sizes``) are the BERT's in every case.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig, BertModel

from opt import logs
from opt.config import TextEncoderConfig
from opt.errors import UserError
from opt.model.pretrained import LoadReport, quiet_transformers


def _unreadable(directory: str, error: Exception) -> UserError:
    return UserError(f"model.text.pretrained_dir {directory}: {str(error).strip().splitlines()[0]}")


def _pretrained_bert(directory: str, *, vocab_size: int, max_positions: int) -> tuple[BertModel, LoadReport]:
    """The BERT in ``directory`` (fp32, sdpa attention, no pooler) and what loading it did."""
    if not Path(directory).is_dir():
        raise UserError(f"pretrained text encoder directory not found: {directory}")
    try:
        config = BertConfig.from_pretrained(directory, local_files_only=True, attn_implementation="sdpa")
    except (OSError, ValueError) as error:
        raise _unreadable(directory, error) from None
    if config.vocab_size != vocab_size:
        raise UserError(f"model.text.pretrained_dir {directory} has a {config.vocab_size}-token vocabulary but the "
                        f"tokenizer (tokenizer.path) has {vocab_size}; use the BERT directory's own tokenizer "
                        f"(tokenizer.path={directory})")
    if config.max_position_embeddings < max_positions:
        raise UserError(f"model.text.pretrained_dir {directory} has {config.max_position_embeddings} positions but "
                        f"{max_positions} are asked for; lower data.max_text_tokens "
                        f"(and model.cross.max_text_positions)")
    try:
        with quiet_transformers():
            bert, info = BertModel.from_pretrained(directory, config=config, add_pooling_layer=False,
                                                   dtype=torch.float32, local_files_only=True,
                                                   output_loading_info=True)
    except (OSError, ValueError) as error:
        raise _unreadable(directory, error) from None
    missing = set(info["missing_keys"])
    report = LoadReport(part="text", source=str(directory),
                        loaded=[name for name in bert.state_dict() if name not in missing],
                        fresh=sorted(missing), unused=sorted(info["unexpected_keys"]))
    return bert, report


class TextEncoder(nn.Module):
    """Token ids (b, t) -> token states (b, t, d); pooled = the state at the bos position."""

    def __init__(self, config: TextEncoderConfig, *, vocab_size: int, pad_id: int, max_positions: int,
                 out_width: int, mlp_ratio: int = 4, dropout: float = 0.0, backbone: dict | None = None) -> None:
        super().__init__()
        self.backbone_config = None  # the BERT config, when the encoder came from (or is) a pretrained one
        self.load_report = None  # a LoadReport when pretrained weights were read
        if backbone is not None:  # a saved model: rebuild, never read the source again
            bert_config = BertConfig.from_dict(backbone["config"], attn_implementation="sdpa")
            self.bert = BertModel(bert_config, add_pooling_layer=False)
        elif config.pretrained_dir:
            self.bert, self.load_report = _pretrained_bert(config.pretrained_dir, vocab_size=vocab_size,
                                                           max_positions=max_positions)
            logs.info(self.load_report.summary())
        else:
            bert_config = BertConfig(
                vocab_size=vocab_size, hidden_size=config.width, num_hidden_layers=config.layers,
                num_attention_heads=config.heads, intermediate_size=mlp_ratio * config.width,
                max_position_embeddings=max_positions, type_vocab_size=1, pad_token_id=pad_id,
                attn_implementation="sdpa",
                hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
            )
            self.bert = BertModel(bert_config, add_pooling_layer=False)
        if config.pretrained_dir or backbone is not None:
            self.backbone_config = self.bert.config.to_dict()
        self.project = nn.Linear(self.bert.config.hidden_size, out_width)
        self.width = self.bert.config.hidden_size
        self.sizes = {"width": self.width, "layers": self.bert.config.num_hidden_layers,
                      "heads": self.bert.config.num_attention_heads}

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        states = self.bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (b, t, w)
        return {"tokens": self.project(states), "mask": mask, "pooled": states[:, 0]}
