"""Cross-modal retrieval over a whole split: two-tower ranking of every
candidate, then cross-encoder re-ranking of the top K.

Stage 1 scores a query against all N candidates with the towers' cosine (a
query of several modalities, such as text+audio -> image, sums its
modalities' cosines): one (N, N) matrix product. Stage 2 fuses the query with
each of its K best candidates in the cross-modal encoder and orders those K by
the matching head's log-probability of "matched" (5-way ITM class 0) plus the
towers' contrastive logit (learned scale times the cosine), i.e. by the product
of the two models' probabilities. With ``caption_likelihood`` the text
decoder's log-likelihood of the caption joins the product whenever a caption
is on one side: log P(candidate caption | query) when the candidates are
captions, log P(query caption | candidate) when a text query looks for
images or speech (T->I, T+A->I, T->A; the candidate alone conditions, since
the query's speech would give its own words away). Candidates below K keep
their tower order. :func:`pair_scores` is that score for any list of (query,
candidate) pairs; re-ranking every candidate (K = N) ranks all pairs by it.

Re-ranking works from the split's stored encoder outputs (nothing is encoded
again): each pair is fused once for the matching head, each distinct condition
of the caption likelihood (a query image, a candidate clip) once however many
pairs hold it, and pairs go through in order of length, each batch cut to its
longest real token (padding is masked, so cutting it changes no score beyond
rounding). Its cost is then the cross encoder's and the decoder's per pair:
about n K of them against n N for every pair.

Several true matches (COCO, Flickr30k, Clotho, AudioCaps: several captions per
image or clip, one ``group`` per image or clip, :func:`~opt.downstream.common.group_of`):
a side that holds text (text, text+audio) is every sample, each caption its own
query or candidate; a side without text (image, audio) is the first sample of
each group, each image or clip once. A query's true matches are the candidates
of its group: it is found at K when any of them is in the top K, and its rank
is that of the best-ranked one. Without groups every side is every sample and
the true match of query i is candidate i.

Metrics per direction: R@1/5/10 (fractions), mean rank (1 = first) and n (the
queries); ``candidates``: the pool's size; ``two_tower`` holds the rank
figures before re-ranking, ``seconds`` the time of each stage.
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable, Sequence

import torch

from opt.downstream.common import EncodedSplit, LoadedModel, caption_log_likelihood

DIRECTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "t2i": (("text",), "image"),
    "i2t": (("image",), "text"),
    "t2a": (("text",), "audio"),
    "a2t": (("audio",), "text"),
    "ta2i": (("text", "audio"), "image"),
}
LETTERS = {"text": "t", "image": "i", "audio": "a"}
DEFAULT_CAPTION_PRIOR = 0  # other queries whose mean caption likelihood is a candidate caption's prior (0: none)


def direction_name(query: tuple[str, ...], target: str) -> str:
    """``("text", "audio"), "image"`` -> ``"ta2i"``."""
    return "".join(LETTERS[m] for m in query) + "2" + LETTERS[target]


def rank_metrics(ranks: torch.Tensor) -> dict[str, float]:
    """R@1/5/10, mean rank and n from 1-based ranks (n,)."""
    ranks = ranks.float()
    return {"r1": float((ranks <= 1).float().mean()), "r5": float((ranks <= 5).float().mean()),
            "r10": float((ranks <= 10).float().mean()), "mean_rank": float(ranks.mean()), "n": int(ranks.numel())}


def side_rows(groups: Sequence[Hashable], modalities: tuple[str, ...]) -> torch.Tensor:
    """The split rows that make one side of a direction: every row when the side holds text,
    else the first row of each group (each image or clip once)."""
    if "text" in modalities:
        return torch.arange(len(groups))
    first: dict[Hashable, int] = {}
    for row, group in enumerate(groups):
        first.setdefault(group, row)
    return torch.tensor(list(first.values()), dtype=torch.long)


def true_matches(query_groups: Sequence[Hashable], candidate_groups: Sequence[Hashable]) -> torch.Tensor:
    """(q, c) bool: candidate j is a true match of query i (the same group)."""
    ids: dict[Hashable, int] = {}
    queries = torch.tensor([ids.setdefault(g, len(ids)) for g in query_groups], dtype=torch.long)
    candidates = torch.tensor([ids.setdefault(g, len(ids)) for g in candidate_groups], dtype=torch.long)
    return queries[:, None] == candidates[None, :]


def best_match_ranks(scores: torch.Tensor, matches: torch.Tensor) -> torch.Tensor:
    """(q,) 1-based rank of each query's best-ranked true match from ``scores`` (q, c) and
    ``matches`` (q, c) bool: one plus the candidates scored strictly above it (ties go to the
    query). A query without a true match among the candidates ranks c + 1."""
    best = scores.masked_fill(~matches, float("-inf")).max(1).values
    return 1 + (scores > best[:, None]).sum(1)


def reranked_ranks(tower_ranks: torch.Tensor, top_scores: torch.Tensor, top_matches: torch.Tensor) -> torch.Tensor:
    """(q,) ranks after re-ranking each query's top K: ``top_scores`` (q, k) the re-ranking
    scores of its K best tower candidates, ``top_matches`` (q, k) which of them are true
    matches. A query with a true match in its top K takes its best one's rank among the K;
    the others keep their tower rank (``tower_ranks`` (q,))."""
    inside = best_match_ranks(top_scores, top_matches)
    return torch.where(top_matches.any(1), inside, tower_ranks)


@torch.no_grad()
def tower_scores(loaded: LoadedModel, split: EncodedSplit, query: tuple[str, ...], target: str, *,
                 queries: torch.Tensor | None = None, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """(q, c) summed tower cosines of the split rows ``queries`` against ``candidates`` (default: every row)."""
    model, every = loaded.model, torch.arange(len(split))
    rows = {m: queries if queries is not None else every for m in query}
    rows[target] = candidates if candidates is not None else every
    embeddings = {}
    for modality, index in rows.items():
        pooled = split.unimodal[modality]["pooled"][index].to(loaded.device)
        embeddings[modality] = model.tower_embeddings({modality: {"pooled": pooled}})[modality].float().cpu()
    return sum(embeddings[m] @ embeddings[target].T for m in query)


def real_lengths(mask: torch.Tensor) -> torch.Tensor:
    """(N,) from a mask (N, n) True on real positions: one past each row's last real position
    (at least 1), the width a row needs once the padding after it is cut."""
    return (mask * torch.arange(1, mask.shape[1] + 1, device=mask.device)).amax(1).clamp(min=1)


def gather_rows(split: EncodedSplit, modality: str, rows: torch.Tensor, lengths: torch.Tensor,
                device: torch.device) -> dict[str, torch.Tensor]:
    """The stored encoder outputs of ``modality`` for ``rows``, cut to the longest of their
    ``lengths`` (:func:`real_lengths`). Padding is masked as keys in every attention of the
    cross encoder and the decoders, so what is cut changes no real position, only the work."""
    width = int(lengths[rows].max())
    stored = split.unimodal[modality]
    return {"tokens": stored["tokens"][rows, :width].to(device), "mask": stored["mask"][rows, :width].to(device),
            "pooled": stored["pooled"][rows].to(device)}


@torch.no_grad()
def matching_scores(loaded: LoadedModel, split: EncodedSplit, query: tuple[str, ...], target: str,
                    queries: torch.Tensor, candidates: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Log-probability of "matched" for each (query row, candidate row) pair (p,).

    Each pair is fused once in the cross encoder; pairs go through ``batch_size`` at a time in
    order of their real length, so a batch carries little padding."""
    model, sides = loaded.model, {m: queries for m in query} | {target: candidates}
    lengths = {m: real_lengths(split.unimodal[m]["mask"]) for m in sides}
    order = torch.stack([lengths[m][rows] for m, rows in sides.items()]).sum(0).argsort(stable=True)
    scores = torch.empty(len(queries))
    for batch in order.split(batch_size):
        unimodal = {m: gather_rows(split, m, rows[batch], lengths[m], loaded.device) for m, rows in sides.items()}
        logits = model.match_logits(unimodal, model.fuse(unimodal, tuple(sides))).float()
        scores[batch] = logits.log_softmax(-1)[:, 0].cpu()
    return scores


@torch.no_grad()
def caption_log_likelihoods(loaded: LoadedModel, split: EncodedSplit, query: tuple[str, ...],
                            queries: torch.Tensor, captions: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """log P(caption | query) from the text decoder, summed over the caption's tokens,
    for each (query row, caption row) pair (p,).

    The condition depends on the query row alone, so each distinct query row is fused once
    (``batch_size`` of them at a time, shortest first), however many captions it is paired
    with; the pairs of those rows then go through the decoder ``batch_size`` at a time in
    order of caption length, each batch cut to its longest caption."""
    model, pad_id = loaded.model, loaded.tokenizer.pad_id
    lengths = {m: real_lengths(split.unimodal[m]["mask"]) for m in query}
    sources, source_of_pair = queries.unique(return_inverse=True)
    by_length = torch.stack([lengths[m][sources] for m in query]).sum(0).argsort(stable=True)
    sources, source_of_pair = sources[by_length], by_length.argsort()[source_of_pair]
    caption_lengths = real_lengths(split.text_ids != pad_id).clamp(min=2)  # bos and at least one more
    scores = torch.empty(len(queries))
    for first in range(0, len(sources), batch_size):
        chunk = sources[first:first + batch_size]
        unimodal = {m: gather_rows(split, m, chunk, lengths[m], loaded.device) for m in query}
        fused = model.fuse(unimodal, query)
        pairs = ((source_of_pair >= first) & (source_of_pair < first + len(chunk))).nonzero()[:, 0]
        pairs = pairs[caption_lengths[captions[pairs]].argsort(stable=True)]
        for batch in pairs.split(batch_size):
            local = (source_of_pair[batch] - first).to(loaded.device)
            ids = split.text_ids[captions[batch], :int(caption_lengths[captions[batch]].max())].to(loaded.device)
            context = {"states": fused["states"][local], "mask": fused["mask"][local]}
            scores[batch] = caption_log_likelihood(model, context, ids, ids != pad_id).cpu()
    return scores


def pair_tower_scores(loaded: LoadedModel, split: EncodedSplit, query: tuple[str, ...], target: str,
                      queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Summed tower cosines of each (query row, candidate row) pair (p,): the entries of
    :func:`tower_scores` for those pairs, from its matrix over the distinct rows."""
    query_rows, query_of_pair = queries.unique(return_inverse=True)
    candidate_rows, candidate_of_pair = candidates.unique(return_inverse=True)
    matrix = tower_scores(loaded, split, query, target, queries=query_rows, candidates=candidate_rows)
    return matrix[query_of_pair, candidate_of_pair]


def other_queries(queries: torch.Tensor, count: int) -> torch.Tensor:
    """For each pair's query row (p,), ``count`` other distinct query rows (count, p): the distinct
    rows in order, each pair's own shifted by evenly spaced offsets, so no pair gets its own row
    (fewer than ``count`` when there are not that many others)."""
    rows, position = queries.unique(return_inverse=True)
    count = min(count, len(rows) - 1)
    shifts = [(index + 1) * len(rows) // (count + 1) for index in range(count)]
    if not shifts:
        return queries.new_empty((0, len(queries)))
    return torch.stack([rows[(position + shift) % len(rows)] for shift in shifts])


def pair_scores(loaded: LoadedModel, split: EncodedSplit, query: tuple[str, ...], target: str,
                queries: torch.Tensor, candidates: torch.Tensor, *, caption_likelihood: bool = True,
                caption_prior: int = DEFAULT_CAPTION_PRIOR, batch_size: int = 256) -> torch.Tensor:
    """The re-ranking score of each (query row, candidate row) pair (p,), higher is better:
    the matching head's log P(matched) plus the towers' contrastive logit, plus the caption's
    log-likelihood when ``caption_likelihood`` and a caption is on one side (see the module
    docstring). Re-ranking the top K and ranking every pair by the cross encoder both score
    with this, so the two differ only in the pairs they score.

    With ``caption_prior`` M > 0 and captions as candidates, the likelihood of a candidate caption
    is taken relative to its prior: the log of its mean likelihood given M other queries of the
    split (:func:`other_queries`) is subtracted, giving the pointwise mutual information of caption
    and query. A caption whose words the decoder finds unlikely whatever it hears (a phrasing
    never met in training) then no longer loses to a likely phrasing of the wrong facts. A text
    query's own prior is the same for every candidate and changes no ranking, so there is none."""
    scores = matching_scores(loaded, split, query, target, queries, candidates, batch_size=batch_size)
    # ITM's log p(matched) plus the towers' contrastive logit: the product of the two models'
    # probabilities. On the demo model it beat either alone (a2t R@1: towers 0.282, ITM 0.228, both 0.292)
    with torch.no_grad():
        scale = float(loaded.model.temperature())
    scores = scores + scale * pair_tower_scores(loaded, split, query, target, queries, candidates)
    if caption_likelihood and target == "text":  # log P(candidate caption | query)
        scores = scores + caption_log_likelihoods(loaded, split, query, queries, candidates, batch_size=batch_size)
        others = other_queries(queries, caption_prior)
        if len(others):  # minus log mean P(candidate caption | another query); one call fuses each query row once
            priors = caption_log_likelihoods(loaded, split, query, others.reshape(-1), candidates.repeat(len(others)),
                                             batch_size=batch_size).reshape(len(others), -1)
            scores = scores - (torch.logsumexp(priors, 0) - math.log(len(others)))
    elif caption_likelihood and "text" in query:  # log P(query caption | candidate): the captioner scores each
        scores = scores + caption_log_likelihoods(loaded, split, (target,), candidates, queries,
                                                  batch_size=batch_size)
    return scores


def retrieve(loaded: LoadedModel, split: EncodedSplit, query: tuple[str, ...], target: str, *,
             rerank_k: int = 16, caption_likelihood: bool = True, caption_prior: int = DEFAULT_CAPTION_PRIOR,
             batch_size: int = 256) -> dict:
    """Rank all candidates for every query; metrics after re-ranking (and before, in ``two_tower``).
    ``batch_size``: (query, candidate) pairs re-ranked at once."""
    missing = [m for m in (*query, target) if m not in split.unimodal]
    if missing:
        raise ValueError(f"the split has no {missing[0]}")
    groups = split.groups()
    queries, candidates = side_rows(groups, query), side_rows(groups, (target,))
    matches = true_matches([groups[i] for i in queries.tolist()], [groups[i] for i in candidates.tolist()])
    start = time.perf_counter()
    scores = tower_scores(loaded, split, query, target, queries=queries, candidates=candidates)  # (q, c)
    tower_ranks = best_match_ranks(scores, matches)
    tower_seconds = time.perf_counter() - start
    result = rank_metrics(tower_ranks)
    result["two_tower"] = dict(result)
    result["candidates"] = len(candidates)
    result["seconds"] = {"two_tower": tower_seconds, "rerank": 0.0}
    n, k = len(queries), min(rerank_k, len(candidates))
    if k <= 0:
        return result
    start = time.perf_counter()
    top = scores.topk(k, dim=1).indices  # (q, k) columns of ``scores``
    reranked = pair_scores(loaded, split, query, target, queries.repeat_interleave(k), candidates[top].reshape(-1),
                           caption_likelihood=caption_likelihood, caption_prior=caption_prior,
                           batch_size=batch_size).reshape(n, k)
    result.update(rank_metrics(reranked_ranks(tower_ranks, reranked, matches.gather(1, top))))
    result["seconds"] |= {"rerank": time.perf_counter() - start, "rerank_pairs": n * k}
    return result
