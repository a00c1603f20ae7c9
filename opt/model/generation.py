"""Decoding loops, kept apart from the networks.

Text: greedy, top-k / top-p sampling and beam search, all with a KV cache
(``use_cache=False`` recomputes the whole prefix every step; it exists for
the benchmark and the cache-equality test). Images: autoregressive decoding
over the codes in raster order, and MaskGIT-style parallel decoding (cosine
schedule, a handful of steps); both with classifier-free guidance.
"""

from __future__ import annotations

import math

import torch

from opt.model.decoders import ImageTokenDecoder, TextDecoder


def filter_logits(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf. (b, V) -> (b, V)."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_categorical(probabilities: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of ``probabilities`` (..., V) (each row summing to about 1) -> indices (...).

    Inverse-CDF sampling: a uniform draw per row, located in the row's cumulative sum. The same
    distribution as ``torch.multinomial``, whose CPU kernel draws an exponential variate for
    every entry: a third of parallel image decoding's time at the tiny size, where this costs a
    cumulative sum and one search per row. An index of zero probability is never drawn: the
    search returns the first position whose cumulative sum exceeds the draw.
    """
    cumulative = probabilities.float().cumsum(-1)
    draw = torch.rand(cumulative.shape[:-1] + (1,), generator=generator, device=cumulative.device)
    index = torch.searchsorted(cumulative, draw * cumulative[..., -1:], right=True)
    return index.clamp_(max=cumulative.shape[-1] - 1).squeeze(-1)  # rounding can leave the sum below 1


def _next_token(logits: torch.Tensor, *, sample: bool, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    if not sample:
        return logits.argmax(-1)
    probabilities = filter_logits(logits / max(temperature, 1e-5), top_k=top_k, top_p=top_p).softmax(-1)
    return sample_categorical(probabilities, generator)


@torch.no_grad()
def generate_text(decoder: TextDecoder, context: torch.Tensor, context_mask: torch.Tensor, *, bos_id: int,
                  eos_id: int, max_length: int | None = None, sample: bool = False, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
                  use_cache: bool = True) -> torch.Tensor:
    """Greedy (default) or sampled decoding. Returns ids (b, <= max_length) starting
    with bos; after a sequence's eos every further token is eos."""
    max_length = min(max_length or decoder.max_length, decoder.max_length)
    batch = context.shape[0]
    ids = torch.full((batch, 1), bos_id, dtype=torch.long, device=context.device)
    done = torch.zeros(batch, dtype=torch.bool, device=context.device)
    cache = decoder.new_cache() if use_cache else None
    for _ in range(max_length - 1):
        step_input = ids[:, -1:] if use_cache else ids
        logits = decoder(step_input, context, context_mask, cache=cache)[:, -1].float()
        token = _next_token(logits, sample=sample, temperature=temperature, top_k=top_k, top_p=top_p,
                            generator=generator)
        token = torch.where(done, torch.full_like(token, eos_id), token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        done |= token == eos_id
        if done.all():
            break
    return ids


@torch.no_grad()
def beam_search(decoder: TextDecoder, context: torch.Tensor, context_mask: torch.Tensor, *, bos_id: int,
                eos_id: int, beam_size: int = 4, max_length: int | None = None,
                length_penalty: float = 1.0) -> torch.Tensor:
    """Beam search with a KV cache; returns the best sequence per sample (b, <= max_length),
    ranked by log-probability / length ** ``length_penalty``."""
    max_length = min(max_length or decoder.max_length, decoder.max_length)
    batch, device = context.shape[0], context.device
    context = context.repeat_interleave(beam_size, dim=0)
    context_mask = context_mask.repeat_interleave(beam_size, dim=0)
    scores = torch.full((batch, beam_size), float("-inf"), device=device)
    scores[:, 0] = 0.0
    ids = torch.full((batch * beam_size, 1), bos_id, dtype=torch.long, device=device)
    done = torch.zeros(batch * beam_size, dtype=torch.bool, device=device)
    lengths = torch.ones(batch * beam_size, device=device)
    cache = decoder.new_cache()
    for _ in range(max_length - 1):
        log_probs = decoder(ids[:, -1:], context, context_mask, cache=cache)[:, -1].float().log_softmax(-1)
        vocab = log_probs.shape[-1]
        finished_row = torch.full_like(log_probs[0], float("-inf"))
        finished_row[eos_id] = 0.0
        log_probs = torch.where(done[:, None], finished_row, log_probs)  # finished beams only extend with eos
        candidates = (scores.reshape(-1, 1) + log_probs).reshape(batch, beam_size * vocab)
        scores, flat = candidates.topk(beam_size, dim=-1)
        origin = (flat // vocab + torch.arange(batch, device=device)[:, None] * beam_size).reshape(-1)
        token = (flat % vocab).reshape(-1)
        ids = torch.cat([ids[origin], token[:, None]], dim=1)
        for layer in cache:
            layer.self_attention.reorder(origin)
        lengths = lengths[origin] + (~done[origin]).float()
        done = done[origin] | (token == eos_id)
        if done.all():
            break
    normalised = scores.reshape(-1) / lengths.pow(length_penalty)
    best = normalised.reshape(batch, beam_size).argmax(-1) + torch.arange(batch, device=device) * beam_size
    return ids[best]


def _guided_logits(decoder: ImageTokenDecoder, tokens: torch.Tensor, context: torch.Tensor,
                   context_mask: torch.Tensor, *, causal: bool, guidance: float, cache=None,
                   select: torch.Tensor | None = None) -> torch.Tensor:
    """Logits with classifier-free guidance: uncond + g * (cond - uncond). With
    guidance the batch is doubled: rows [:b] conditional, [b:] unconditional.
    ``select`` (b, m): only those positions' logits (see :meth:`ImageTokenDecoder.forward`)."""
    if guidance == 1.0:
        return decoder(tokens, context, context_mask, causal=causal, cache=cache, select=select).float()
    batch = tokens.shape[0]
    drop = torch.arange(2 * batch, device=tokens.device) >= batch
    logits = decoder(torch.cat([tokens, tokens]), torch.cat([context, context]), torch.cat([context_mask, context_mask]),
                     causal=causal, cache=cache, drop_condition=drop,
                     select=None if select is None else torch.cat([select, select])).float()
    conditional, unconditional = logits[:batch], logits[batch:]
    return unconditional + guidance * (conditional - unconditional)


@torch.no_grad()
def generate_image_codes_autoregressive(decoder: ImageTokenDecoder, context: torch.Tensor,
                                        context_mask: torch.Tensor, *, guidance: float = 1.0,
                                        temperature: float = 1.0, top_k: int = 0,
                                        generator: torch.Generator | None = None) -> torch.Tensor:
    """One code per step in raster order, with a KV cache. Returns codes (b, n)."""
    batch = context.shape[0]
    tokens = torch.full((batch, 1), decoder.bos_id, dtype=torch.long, device=context.device)
    cache = decoder.new_cache()
    codes = []
    for _ in range(decoder.codes):
        logits = _guided_logits(decoder, tokens, context, context_mask, causal=True, guidance=guidance,
                                cache=cache)[:, -1]
        tokens = _next_token(logits, sample=temperature > 0, temperature=temperature, top_k=top_k, top_p=1.0,
                             generator=generator)[:, None]
        codes.append(tokens)
    return torch.cat(codes, dim=1)


def cosine_mask_ratio(progress: torch.Tensor | float) -> torch.Tensor | float:
    """Fraction of codes still masked at ``progress`` in [0, 1] (MaskGIT's cosine schedule)."""
    if isinstance(progress, torch.Tensor):
        return torch.cos(progress * math.pi / 2)
    return math.cos(progress * math.pi / 2)


@torch.no_grad()
def generate_image_codes_parallel(decoder: ImageTokenDecoder, context: torch.Tensor, context_mask: torch.Tensor,
                                  *, steps: int = 8, guidance: float = 1.0, temperature: float = 1.0,
                                  generator: torch.Generator | None = None) -> torch.Tensor:
    """MaskGIT decoding: start fully masked; each step samples every masked code,
    keeps the most confident ones and re-masks the rest, following the cosine
    schedule, so all codes are fixed after ``steps`` steps. Returns codes (b, n).

    Every row has the same number of masked codes at each step, so the head runs on
    the masked positions alone (b, m): codes already fixed need no logits.
    """
    batch, n, device = context.shape[0], decoder.codes, context.device
    tokens = torch.full((batch, n), decoder.mask_id, dtype=torch.long, device=device)
    cache = decoder.new_cache(self_attention=False)  # the context's keys and values, computed once
    for step in range(steps):
        open_positions = (tokens == decoder.mask_id).nonzero()[:, 1].reshape(batch, -1)  # (b, m), row-major
        logits = _guided_logits(decoder, tokens, context, context_mask, causal=False, guidance=guidance,
                                cache=cache, select=open_positions)
        probabilities = (logits / max(temperature, 1e-5)).softmax(-1)
        sampled = sample_categorical(probabilities, generator)  # (b, m)
        confidence = probabilities.gather(-1, sampled[..., None]).squeeze(-1).log()
        noise = -torch.log(-torch.log(torch.rand(confidence.shape, generator=generator, device=device)))
        confidence = confidence + temperature * (1 - (step + 1) / steps) * noise  # annealed randomness
        tokens = tokens.scatter(-1, open_positions, sampled)
        remask = int(n * cosine_mask_ratio((step + 1) / steps))  # never more than are open now
        if remask > 0:
            lowest = confidence.topk(remask, dim=-1, largest=False).indices
            tokens = tokens.scatter(-1, open_positions.gather(-1, lowest), decoder.mask_id)
    return tokens
