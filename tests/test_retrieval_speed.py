"""Re-ranking's shared pair scorer on the small model of :mod:`tests.test_downstream`: what it
does for speed (each pair fused once, each caption's condition fused once per row, batches in
order of length and cut to their longest real token) changes no score beyond rounding and no
rank, and the benchmark's all-pairs arm scores a pair exactly as re-ranking does."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from opt.downstream.common import caption_log_likelihood
from opt.downstream.retrieval import (DIRECTIONS, best_match_ranks, pair_scores, rank_metrics, reranked_ranks,
                                      retrieve, tower_scores)
from tests.test_downstream import encoded, model_dir  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]
RANK_KEYS = ("r1", "r5", "r10", "mean_rank", "n")


@torch.no_grad()
def plain_pair_scores(loaded, split, query, target, queries, candidates) -> torch.Tensor:
    """The re-ranking score written plainly, as before the speed work: every pair through the
    cross encoder at the split's full padded width in one batch, and the caption's condition
    fused again for every pair."""
    model = loaded.model
    rows = {m: queries for m in query} | {target: candidates}
    unimodal = {m: split.select(m, index) for m, index in rows.items()}
    scores = model.match_logits(unimodal, model.fuse(unimodal, tuple(rows))).log_softmax(-1)[:, 0]
    towers = model.tower_embeddings(unimodal)
    scores = scores + model.temperature() * sum((towers[m] * towers[target]).sum(-1) for m in query)
    if target == "text" or "text" in query:
        condition, caption_rows = (query, candidates) if target == "text" else ((target,), queries)
        context = model.fuse({m: unimodal[m] for m in condition}, condition)
        ids = split.text_ids[caption_rows]
        scores = scores + caption_log_likelihood(model, context, ids, ids != loaded.tokenizer.pad_id)
    return scores


def every_pair(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(n).repeat_interleave(n), torch.arange(n).repeat(n)


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_pair_scores_are_the_plain_computations(encoded, name):
    loaded, split = encoded
    queries, candidates = every_pair(len(split))
    fast = pair_scores(loaded, split, *DIRECTIONS[name], queries, candidates, batch_size=64)
    plain = plain_pair_scores(loaded, split, *DIRECTIONS[name], queries, candidates)
    torch.testing.assert_close(fast, plain.float(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["i2t", "t2a", "ta2i"])
def test_a_pair_scores_the_same_whatever_pairs_share_its_batch(encoded, name):
    """The all-pairs arm and the re-ranked arm score the pairs they share alike: a pair's score
    does not depend on the other pairs scored with it, their lengths or the batch size."""
    loaded, split = encoded
    n, k = len(split), 4
    queries, candidates = every_pair(n)
    every = pair_scores(loaded, split, *DIRECTIONS[name], queries, candidates).reshape(n, n)
    top = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:k]  # any k candidates per query
    rows = torch.tensor([0, n // 2])
    for batch_size in (1, 7):
        some = pair_scores(loaded, split, *DIRECTIONS[name], rows.repeat_interleave(k), top.repeat(2),
                           batch_size=batch_size)
        torch.testing.assert_close(some.reshape(2, k), every[rows][:, top], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_retrieval_ranks_are_those_of_the_plain_scores(encoded, name):
    """Re-ranking the top 4 and re-ranking all 24 give the rank metrics the plain scores give."""
    loaded, split = encoded
    query, target = DIRECTIONS[name]
    n = len(split)
    truth = torch.eye(n, dtype=torch.bool)
    with torch.no_grad():
        towers = tower_scores(loaded, split, query, target)
    tower_ranks = best_match_ranks(towers, truth)
    queries, candidates = every_pair(n)
    plain = plain_pair_scores(loaded, split, query, target, queries, candidates).float().reshape(n, n)
    for k in (4, n):
        top = towers.topk(k, dim=1).indices
        expected = rank_metrics(reranked_ranks(tower_ranks, plain.gather(1, top), truth.gather(1, top)))
        result = retrieve(loaded, split, query, target, rerank_k=k, batch_size=16)
        assert {key: result[key] for key in RANK_KEYS} == pytest.approx(expected, abs=1e-6)
        assert result["two_tower"] == rank_metrics(tower_ranks)


def test_benchmark_all_pairs_arm_ranks_every_pair_by_the_shared_score(encoded, model_dir, world, tmp_path, capsys):
    loaded, split = encoded
    spec = importlib.util.spec_from_file_location("bench_retrieval", ROOT / "scripts" / "bench_retrieval.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    figures = bench.main(["--model", str(model_dir), "--data", f"{world}/test-*.tar", "--pool", "24",
                          "--rerank-k", "4", "--directions", "t2a", "i2t", "--out", str(out)])
    assert json.loads(out.read_text())["directions"].keys() == {"t2a", "i2t"}
    printed = capsys.readouterr().out
    assert "| t2a | 96 / 576 |" in printed and "| i2t | 96 / 576 |" in printed
    n = len(split)
    for name, row in figures["directions"].items():
        scores = plain_pair_scores(loaded, split, *DIRECTIONS[name], *every_pair(n)).float().reshape(n, n)
        by_every_pair = rank_metrics(best_match_ranks(scores, torch.eye(n, dtype=torch.bool)))
        assert row["r1_all_pairs"] == pytest.approx(by_every_pair["r1"])
        assert row["all_pairs"]["mean_rank"] == pytest.approx(by_every_pair["mean_rank"], abs=1e-6)
        reranked = retrieve(loaded, split, *DIRECTIONS[name], rerank_k=4)
        assert row["r1_two_tower_rerank"] == reranked["r1"] and row["r1_two_tower"] == reranked["two_tower"]["r1"]
        assert row["speedup"] == pytest.approx(row["all_pairs_s"] / row["two_tower_rerank_s"])


def test_other_queries_are_distinct_rows_never_the_pairs_own():
    from opt.downstream.retrieval import other_queries

    queries = torch.tensor([3, 3, 7, 7, 9, 9, 12, 12, 20, 20])  # five distinct rows, two pairs each
    others = other_queries(queries, 3)
    assert others.shape == (3, len(queries))
    for column, own in enumerate(queries.tolist()):
        picked = others[:, column].tolist()
        assert own not in picked and len(set(picked)) == 3 and set(picked) <= {3, 7, 9, 12, 20}
    assert other_queries(queries, 10).shape == (4, len(queries))  # at most the four others
    assert other_queries(torch.tensor([5, 5]), 4).shape == (0, 2)  # one query: no prior


@pytest.mark.parametrize("name", ["a2t", "i2t", "t2i"])
def test_caption_prior_subtracts_the_log_mean_likelihood_under_other_queries(encoded, name):
    from opt.downstream.retrieval import caption_log_likelihoods, other_queries

    loaded, split = encoded
    query, target = DIRECTIONS[name]
    queries, candidates = every_pair(len(split))
    plain = pair_scores(loaded, split, query, target, queries, candidates)
    relative = pair_scores(loaded, split, query, target, queries, candidates, caption_prior=2)
    if target != "text":  # a text query's prior is the same for every candidate: nothing changes
        torch.testing.assert_close(relative, plain)
        return
    likelihoods = torch.stack([caption_log_likelihoods(loaded, split, query, rows, candidates)
                               for rows in other_queries(queries, 2)])
    prior = (torch.logsumexp(likelihoods.double(), 0) - torch.log(torch.tensor(2.0, dtype=torch.double))).float()
    torch.testing.assert_close(relative, plain - prior, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(relative, plain)
