"""The two cross-modal decoders. Both attend to the fused states of the
cross-modal encoder and return logits only; losses live in the tasks and
decoding loops in :mod:`opt.model.generation`.

- :class:`TextDecoder`: causal transformer over token ids with cross-attention,
  output embedding tied to the input embedding.
- :class:`ImageTokenDecoder`: transformer over the VQ codes of an image with
  cross-attention. ``causal=True`` is autoregressive decoding over the codes in
  raster order (input ``[BOS] + codes[:-1]``, as in OPT); ``causal=False`` is
  MaskGIT-style parallel decoding (input: codes with some replaced by
  ``[MASK]``). One network serves both. A learned null context stands in
  for the condition when it is dropped (classifier-free guidance).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from opt.config import ImageDecoderConfig, TextDecoderConfig
from opt.model.layers import LayerCache, Transformer, attention_mask, sincos_2d


class TextDecoder(nn.Module):
    def __init__(self, config: TextDecoderConfig, *, vocab_size: int, context_width: int, mlp_ratio: int = 4,
                 dropout: float = 0.0, qk_norm: str = "none") -> None:
        super().__init__()
        self.max_length = config.max_length
        self.embed = nn.Embedding(vocab_size, config.width)
        self.positions = nn.Embedding(config.max_length, config.width)
        self.transformer = Transformer(layers=config.layers, width=config.width, heads=config.heads,
                                       mlp_ratio=mlp_ratio, dropout=dropout, context_width=context_width,
                                       qk_norm=qk_norm)
        self.head = nn.Linear(config.width, vocab_size, bias=False)
        self.head.weight = self.embed.weight

    def new_cache(self) -> list[LayerCache]:
        return self.transformer.new_cache()

    def forward(self, ids: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor, *,
                cache: list[LayerCache] | None = None) -> torch.Tensor:
        """Logits (b, t, vocab) for ids (b, t) following the ``cache``'s length of earlier tokens."""
        offset = cache[0].self_attention.length if cache else 0
        x = self.embed(ids) + self.positions(torch.arange(offset, offset + ids.shape[1], device=ids.device))
        keys = offset + ids.shape[1]
        self_mask = attention_mask(None, ids.shape[1], causal=True, offset=offset, keys=keys, device=ids.device)
        x = self.transformer(x, mask=self_mask, context=context, context_mask=context_mask[:, None, None, :],
                             cache=cache)
        return self.head(x)

    def teacher_forced(self, ids: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        """fp32 logits (b, t - 1, vocab) predicting ``ids[:, 1:]`` from ``ids[:, :-1]`` (b, t) in one pass:
        the training objective of text decoding and the likelihood a caption is scored by."""
        return self(ids[:, :-1], context, context_mask).float()


class ImageTokenDecoder(nn.Module):
    def __init__(self, config: ImageDecoderConfig, *, codebook_size: int, codes: int, context_width: int,
                 mlp_ratio: int = 4, dropout: float = 0.0, qk_norm: str = "none") -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.codes = codes
        self.mask_id = codebook_size
        self.bos_id = codebook_size + 1
        self.embed = nn.Embedding(codebook_size + 2, config.width)
        self.positions = nn.Embedding(codes, config.width)
        self.null_context = nn.Parameter(torch.zeros(1, 1, context_width))
        self.transformer = Transformer(layers=config.layers, width=config.width, heads=config.heads,
                                       mlp_ratio=mlp_ratio, dropout=dropout, context_width=context_width,
                                       qk_norm=qk_norm)
        self.head = nn.Linear(config.width, codebook_size)
        self.grid_positions = config.grid_positions

    def reset_positions(self, std: float = 0.02) -> None:
        """With ``grid_positions``, start the code positions as 2-D sine-cosine over the square code
        grid, at the ``std`` of the code embeddings: the code above is then a fixed offset away
        for every position, which random positions must first learn."""
        if not self.grid_positions:
            return
        grid = sincos_2d(math.isqrt(self.positions.num_embeddings), self.positions.embedding_dim)
        grid = grid - grid.mean(0)  # on a small grid the low frequencies are nearly constant: drop that part
        with torch.no_grad():
            self.positions.weight.copy_(grid * std / grid.std())

    def new_cache(self, *, self_attention: bool = True) -> list[LayerCache]:
        """Per-layer caches; ``self_attention=False`` keeps only the context's keys and values."""
        return self.transformer.new_cache(self_attention=self_attention)

    def forward(self, tokens: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor, *, causal: bool,
                cache: list[LayerCache] | None = None, drop_condition: torch.Tensor | None = None,
                select: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (b, t, codebook_size) for input tokens (b, t) (codes, [MASK] or [BOS]);
        with ``select`` (b, m) indices into t, only those positions' logits (b, m, codebook_size).

        ``drop_condition`` (b,) True replaces that sample's context by the learned null
        context (a single key): condition dropout in training, the unconditional half of
        classifier-free guidance in decoding.
        """
        if drop_condition is not None:
            null = F.pad(self.null_context.to(context.dtype).expand(context.shape[0], -1, -1),
                         (0, 0, 0, context.shape[1] - 1))
            null_mask = torch.zeros_like(context_mask)
            null_mask[:, 0] = True
            context = torch.where(drop_condition[:, None, None], null, context)
            context_mask = torch.where(drop_condition[:, None], null_mask, context_mask)
        offset = cache[0].self_attention.length if cache and cache[0].self_attention else 0
        x = self.embed(tokens) + self.positions(torch.arange(offset, offset + tokens.shape[1], device=tokens.device))
        self_mask = None
        if causal:
            self_mask = attention_mask(None, tokens.shape[1], causal=True, offset=offset,
                                       keys=offset + tokens.shape[1], device=tokens.device)
        x = self.transformer(x, mask=self_mask, context=context, context_mask=context_mask[:, None, None, :],
                             cache=cache)
        if select is not None:
            x = x.gather(1, select[..., None].expand(-1, -1, x.shape[-1]))
        return self.head(x)
