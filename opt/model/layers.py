"""Transformer building blocks shared by the cross-modal encoder and the decoders.

Shape letters: b batch, t query positions, s key positions, h heads, d width,
k head width (d / h).

Choices:
- pre-LN blocks (LayerNorm before attention and MLP), GELU MLP;
- attention through ``F.scaled_dot_product_attention`` with a boolean mask,
  True where a query may attend a key; padding is masked on the key side, so
  padded positions never influence real ones; no mask at all where every
  query sees every key, so that SDPA takes its fused kernels;
- self-attention projects queries, keys and values with one matmul (``qkv``);
  cross-attention its queries from x (``query``) and its keys and values from
  the context (``key_value``); older models' separate self-attention
  projections are stacked into ``qkv`` on load;
- a per-layer :class:`KVCache` for incremental decoding: self-attention keys
  and values are written step by step into buffers allocated once,
  cross-attention keys and values are computed once from the context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class KVCache:
    """Keys and values of one attention layer, ``(b, h, s, k)``.

    Decoding appends a step's keys and values into buffers allocated once for ``capacity``
    positions (doubled if a sequence outgrows them), so a step copies only its own keys, not
    the whole prefix; :attr:`keys` and :attr:`values` are views of the filled part. Keys
    stored into an empty cache that holds no more than them (cross-attention's context, whose
    keys are computed once) are kept as they are, without a buffer.
    """

    def __init__(self, capacity: int = 0) -> None:
        self.capacity = capacity
        self.length = 0
        self._keys: torch.Tensor | None = None  # (b, h, >= length, k)
        self._values: torch.Tensor | None = None

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._keys is None else self._keys[:, :, :self.length]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._values is None else self._values[:, :, :self.length]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add ``(b, h, t, k)`` keys and values after the cached ones; returns all of them."""
        end = self.length + keys.shape[2]
        if self._keys is None and end >= self.capacity:
            self._keys, self._values, self.length = keys, values, end
            return keys, values
        if self._keys is None or end > self._keys.shape[2]:
            self._grow(keys, max(self.capacity, 2 * end))
        self._keys[:, :, self.length:end] = keys
        self._values[:, :, self.length:end] = values
        self.length = end
        return self.keys, self.values

    def _grow(self, like: torch.Tensor, positions: int) -> None:
        shape = (like.shape[0], like.shape[1], positions, like.shape[3])
        keys, values = like.new_empty(shape), like.new_empty(shape)
        if self._keys is not None:
            keys[:, :, :self.length] = self.keys
            values[:, :, :self.length] = self.values
        self._keys, self._values = keys, values

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` of the batch (beam search)."""
        if self._keys is not None:
            self._keys, self._values = self._keys[index], self._values[index]


def attention_mask(key_mask: torch.Tensor | None, queries: int, *, causal: bool = False,
                   offset: int = 0, keys: int | None = None, device=None) -> torch.Tensor | None:
    """Boolean ``(b | 1, 1, t, s)`` mask, True where attention is allowed; None when everything is.

    ``key_mask`` (b, s) is True on real keys. ``causal`` lets query i (at
    absolute position ``offset + i``) see keys 0..offset+i; a single query after
    all the keys (one decoding step) sees them all and needs no causal mask.
    """
    mask = None
    if key_mask is not None:
        mask = key_mask[:, None, None, :]
        keys = key_mask.shape[1]
        device = key_mask.device
    if causal and offset < keys - 1:
        query_positions = torch.arange(queries, device=device)[:, None] + offset
        allowed = torch.arange(keys, device=device)[None, :] <= query_positions
        allowed = allowed[None, None]
        mask = allowed if mask is None else mask & allowed
    return mask


def key_padding_mask(key_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The ``(b, 1, 1, s)`` attention mask of the real keys ``key_mask`` (b, s), or None when no key
    is padding: attention without a mask takes SDPA's fused kernels. Reading the mask is a
    device synchronisation on GPUs (one per call: callers compute it once per forward)."""
    if key_mask is None or bool(key_mask.all()):
        return None
    return key_mask[:, None, None, :]


def single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA's result for one query per head, q (b, h, 1, k), as two batched matrix products.

    A decoding step has one query; SDPA's CPU kernel, which tiles over queries, was 1.6x
    (one thread) to 15x (two) slower than this for a step of base text-decoder cross-attention
    (batch 16, 180 keys). ``mask`` as SDPA's: boolean, True where allowed, or additive (a
    query with no allowed key gets NaN, where SDPA's kernels differ among themselves).
    """
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (b, h, 1, s)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return scores.softmax(-1) @ v


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
    """What self- and cross-attention share: heads, optional qk-norm, dropout on the attention
    weights and the output projection. :class:`SelfAttention` and :class:`CrossAttention` add
    the projections of the queries, keys and values.

    ``qk_norm`` layer-normalises each head's queries and keys (Dehghani et al. 2023,
    ViT-22B), so the attention logits lie within about +-sqrt(head width) whatever the
    weights' scale. Without it, small-initialised query and key weights give near-uniform
    attention that sharpens only as the weights grow, which an optimizer's bounded
    per-step updates make slow; with it, the logits follow the directions, which turn fast.
    """

    def __init__(self, *, width: int, heads: int, dropout: float = 0.0, qk_norm: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
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

    @staticmethod
    def _heads_first(x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """(b, s, h, k) -> (b, h, s, k), normalised per head before the transpose."""
        return (x if norm is None else norm(x)).transpose(1, 2)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Queries (b, h, t, k) over keys and values (b, h, s, k) -> (b, t, d), projected."""
        if q.shape[2] == 1 and not self.training:
            y = single_query_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               dropout_p=self.dropout if self.training else 0.0)
        return self.out(rearrange(y, "b h t k -> b t (h k)"))


class SelfAttention(Attention):
    """Multi-head self-attention. One matmul projects queries, keys and values (``qkv``, rows
    in that order); models saved with a ``query`` and a ``key_value`` projection (keys, then
    values) load through :meth:`_fuse_projections`, which stacks them into ``qkv``."""

    def __init__(self, *, width: int, heads: int, dropout: float = 0.0, qk_norm: bool = False) -> None:
        super().__init__(width=width, heads=heads, dropout=dropout, qk_norm=qk_norm)
        self.qkv = nn.Linear(width, 3 * width)
        self.register_load_state_dict_pre_hook(self._fuse_projections)

    @staticmethod
    def _fuse_projections(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
        for kind in ("weight", "bias"):
            query, key_value = prefix + "query." + kind, prefix + "key_value." + kind
            if query in state_dict and key_value in state_dict:
                state_dict[prefix + "qkv." + kind] = torch.cat([state_dict.pop(query), state_dict.pop(key_value)])

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, cache: KVCache | None = None
                ) -> torch.Tensor:
        """x (b, t, d) -> (b, t, d); with a ``cache``, x follows the cached positions."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).unbind(2)  # (b, t, h, k) each
        q, k, v = self._heads_first(q, self.query_norm), self._heads_first(k, self.key_norm), self._heads_first(v)
        if cache is not None:
            k, v = cache.append(k, v)
        return self._attend(q, k, v, mask)


class CrossAttention(Attention):
    """Multi-head attention from x (b, t, d) to a context (b, s, ``context_width``): queries
    from x (``query``), keys and values from the context (``key_value``, keys then values)."""

    def __init__(self, *, width: int, heads: int, context_width: int, dropout: float = 0.0,
                 qk_norm: bool = False) -> None:
        super().__init__(width=width, heads=heads, dropout=dropout, qk_norm=qk_norm)
        self.query = nn.Linear(width, width)
        self.key_value = nn.Linear(context_width, 2 * width)

    def forward(self, x: torch.Tensor, context: torch.Tensor, *, mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """x (b, t, d) -> (b, t, d). A filled ``cache`` holds the context's keys and values
        (the context does not change while decoding): it is then not read."""
        q = self._heads_first(self.query(x).unflatten(-1, (self.heads, -1)), self.query_norm)
        if cache is not None and cache.length:
            k, v = cache.keys, cache.values
        else:
            k, v = self.key_value(context).unflatten(-1, (2, self.heads, -1)).unbind(2)  # (b, s, h, k) each
            k, v = self._heads_first(k, self.key_norm), self._heads_first(v)
            if cache is not None:  # read at every later step: stored contiguous, once
                k, v = cache.append(k.contiguous(), v.contiguous())
        return self._attend(q, k, v, mask)


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
        self.attention = SelfAttention(width=width, heads=heads, dropout=dropout, qk_norm=qk_norm == "all")
        cross = context_width is not None
        self.cross_norm = nn.LayerNorm(width) if cross else None
        self.cross = CrossAttention(width=width, heads=heads, dropout=dropout, context_width=context_width,
                                    qk_norm=qk_norm in ("cross", "all")) if cross else None
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width=width, ratio=mlp_ratio, dropout=dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.drop(self.attention(self.norm1(x), mask=mask, cache=cache.self_attention if cache else None))
        if self.cross is not None:
            x = x + self.drop(self.cross(self.cross_norm(x), context, mask=context_mask,
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

    def new_cache(self, *, positions: int = 0, self_attention: bool = True) -> list[LayerCache]:
        """Per-layer caches; ``positions``: how many positions decoding will cache (their buffers
        are allocated once); ``self_attention=False`` keeps only the context's keys and values."""
        return [LayerCache(KVCache(positions) if self_attention else None, KVCache()) for _ in self.blocks]

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, cache: list[LayerCache] | None = None) -> torch.Tensor:
        """x (b, t, d) -> (b, t, d). ``mask`` and ``context_mask``: boolean attention masks
        (see :func:`attention_mask`, :func:`key_padding_mask`), None where all is visible."""
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
