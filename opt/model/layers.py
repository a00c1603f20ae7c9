"""Transformer building blocks shared by the cross-modal encoder and the decoders.

Shape letters: b batch, t query positions, s key positions, h heads, d width,
k head width (d / h).

Choices:
- pre-LN blocks (LayerNorm before attention and MLP), GELU MLP;
- attention through ``F.scaled_dot_product_attention`` with a boolean mask,
  True where a query may attend a key; padding is masked on the key side, so
  padded positions never influence real ones;
- a per-layer :class:`KVCache` for incremental decoding: self-attention keys
  and values grow by one step at a time, cross-attention keys and values are
  computed once from the context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass
class KVCache:
    """Keys and values of one attention layer, ``(b, h, s, k)``."""

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = torch.cat([self.keys, keys], dim=2)
            self.values = torch.cat([self.values, values], dim=2)
        return self.keys, self.values

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` of the batch (beam search)."""
        if self.keys is not None:
            self.keys, self.values = self.keys[index], self.values[index]

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]


def attention_mask(key_mask: torch.Tensor | None, queries: int, *, causal: bool = False,
                   offset: int = 0, keys: int | None = None, device=None) -> torch.Tensor | None:
    """Boolean ``(b | 1, 1, t, s)`` mask, True where attention is allowed.

    ``key_mask`` (b, s) is True on real keys. ``causal`` lets query i (at
    absolute position ``offset + i``) see keys 0..offset+i.
    """
    mask = None
    if key_mask is not None:
        mask = key_mask[:, None, None, :]
        keys = key_mask.shape[1]
        device = key_mask.device
    if causal:
        query_positions = torch.arange(queries, device=device)[:, None] + offset
        allowed = torch.arange(keys, device=device)[None, :] <= query_positions
        allowed = allowed[None, None]
        mask = allowed if mask is None else mask & allowed
    return mask


def distance_bias(positions: int, heads: int, *, device=None) -> torch.Tensor:
    """ALiBi's bidirectional attention bias ``(1, h, t, t)``: ``-slope_h * |i - j|``, with
    the geometric slopes ``2^(-8 (h' + 1) / h)`` of Press et al. (2022)."""
    slopes = 2.0 ** (-8.0 * torch.arange(1, heads + 1, device=device) / heads)
    index = torch.arange(positions, device=device)
    distance = (index[None, :] - index[:, None]).abs()
    return -(slopes[:, None, None] * distance)[None]


def with_bias(mask: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask turned into an additive one carrying ``bias`` (-inf where not allowed)."""
    return bias.to(dtype).masked_fill(~mask, float("-inf"))


def sincos_2d(side: int, width: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings (side * side, width), row-major like the patches."""
    quarter = width // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    y, x = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                          indexing="ij")
    parts = []
    for coordinate in (x.reshape(-1), y.reshape(-1)):
        angles = coordinate[:, None] * frequencies[None, :]
        parts += [angles.sin(), angles.cos()]
    embedding = torch.cat(parts, dim=1)
    return torch.nn.functional.pad(embedding, (0, width - embedding.shape[1]))


class Attention(nn.Module):
    """Multi-head attention: self-attention when ``context`` is None, else cross-attention.

    ``qk_norm`` layer-normalises each head's queries and keys (Dehghani et al. 2023,
    ViT-22B), so the attention logits lie within about +-sqrt(head width) whatever the
    weights' scale. Without it, small-initialised query and key weights give near-uniform
    attention that sharpens only as the weights grow, which an optimizer's bounded
    per-step updates make slow; with it, the logits follow the directions, which turn fast.
    """

    def __init__(self, *, width: int, heads: int, dropout: float = 0.0, context_width: int | None = None,
                 qk_norm: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.query = nn.Linear(width, width)
        self.key_value = nn.Linear(context_width or width, 2 * width)
        self.out = nn.Linear(width, width)
        self.query_norm = nn.LayerNorm(width // heads) if qk_norm else None
        # No bias on the keys: it adds the same q . b to every logit of a query, which the
        # softmax removes, so its gradient is only rounding noise that Adam would turn into
        # drift (different on every process). Older models' key biases are dropped on load.
        self.key_norm = nn.LayerNorm(width // heads, bias=False) if qk_norm else None
        self.register_load_state_dict_pre_hook(self._drop_key_norm_bias)

    @staticmethod
    def _drop_key_norm_bias(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
        state_dict.pop(prefix + "key_norm.bias", None)  # has no effect on the output, whatever its value

    def _split(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """(b, s, h * k) -> (b, h, s, k), normalised per head before the transpose (a contiguous layout)."""
        x = x.unflatten(-1, (self.heads, -1))
        return (x if norm is None else norm(x)).transpose(1, 2)

    def forward(self, x: torch.Tensor, *, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        q = self._split(self.query(x), self.query_norm)  # (b, h, t, k)
        if context is not None and cache is not None and cache.keys is not None:
            k, v = cache.keys, cache.values  # cross-attention: the context does not change
        else:
            k, v = self.key_value(x if context is None else context).chunk(2, dim=-1)
            k, v = self._split(k, self.key_norm), self._split(v)
            if cache is not None:
                k, v = cache.append(k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(rearrange(y, "b h t k -> b t (h k)"))


class MLP(nn.Sequential):
    def __init__(self, *, width: int, ratio: int = 4, dropout: float = 0.0) -> None:
        super().__init__(nn.Linear(width, ratio * width), nn.GELU(), nn.Linear(ratio * width, width), nn.Dropout(dropout))


@dataclass
class LayerCache:
    """Caches of one block. ``self_attention=None`` caches only the cross-attention
    keys and values (parallel decoding, where every step sees all positions)."""

    self_attention: KVCache | None
    cross_attention: KVCache


class Block(nn.Module):
    """Pre-LN transformer block: self-attention, cross-attention to a context of
    ``context_width`` features when that is given, MLP. ``qk_norm`` (see :class:`Attention`):
    "none", "cross" (the cross-attention only) or "all"."""

    def __init__(self, *, width: int, heads: int, mlp_ratio: int = 4, dropout: float = 0.0,
                 context_width: int | None = None, qk_norm: str = "none") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = Attention(width=width, heads=heads, dropout=dropout, qk_norm=qk_norm == "all")
        cross = context_width is not None
        self.cross_norm = nn.LayerNorm(width) if cross else None
        self.cross = Attention(width=width, heads=heads, dropout=dropout, context_width=context_width,
                               qk_norm=qk_norm in ("cross", "all")) if cross else None
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width=width, ratio=mlp_ratio, dropout=dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.drop(self.attention(self.norm1(x), mask=mask, cache=cache.self_attention if cache else None))
        if self.cross is not None:
            x = x + self.drop(self.cross(self.cross_norm(x), context=context, mask=context_mask,
                                         cache=cache.cross_attention if cache else None))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of :class:`Block` with a final LayerNorm."""

    def __init__(self, *, layers: int, width: int, heads: int, mlp_ratio: int = 4, dropout: float = 0.0,
                 context_width: int | None = None, qk_norm: str = "none") -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(width=width, heads=heads, mlp_ratio=mlp_ratio, dropout=dropout, context_width=context_width,
                  qk_norm=qk_norm)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width)

    def new_cache(self, *, self_attention: bool = True) -> list[LayerCache]:
        return [LayerCache(KVCache() if self_attention else None, KVCache()) for _ in self.blocks]

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, cache: list[LayerCache] | None = None) -> torch.Tensor:
        for index, block in enumerate(self.blocks):
            x = block(x, mask=mask, context=context, context_mask=context_mask,
                      cache=cache[index] if cache is not None else None)
        return self.norm(x)


def init_weights(module: nn.Module) -> None:
    """Truncated-normal (std 0.02) linear and embedding weights, zero biases, unit norms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
