"""Retrieval benchmark: two-tower ranking + cross-encoder re-ranking of the top K against
ranking every (query, candidate) pair by the cross encoder, on the same pool, per direction.

Like for like: both arms are :func:`opt.downstream.retrieval.retrieve`, the path ``opt eval``
runs, and score pairs with the one re-ranking scorer
(:func:`~opt.downstream.retrieval.pair_scores`: the matching head's log P(matched) plus the
towers' contrastive logit, plus the caption's likelihood where a caption is on one side) at the
same batch size. Re-ranking scores each query's K best tower candidates; all pairs re-ranks
every candidate, so it scores all n x N pairs and ranks by that score alone. Both times are
measured (two-tower stage + scoring); encoding the pool once is shared and left out of both.
The design anchor: BriVL/WenLan's two towers were ~20x faster than a single-stream cross
encoder at similar quality.

    python scripts/bench_retrieval.py --model runs/demo/model --data 'data/world/test-*.tar' \\
        --pool 500 --rerank-k 10 [--batch-size 256] [--directions t2i a2t] \\
        [--no-caption-likelihood] [--out bench.json]

Prints a markdown table (pairs scored, seconds and R@1 of each arm, the speedup); ``--out``
also writes the figures, the settings and the machine as JSON. Scoring every pair of a
500-sample pool is 250,000 cross-encoder passes per direction: minutes per direction on two
CPU cores.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

from opt.benchmarking import machine_summary
from opt.downstream.common import EncodedSplit, LoadedModel, encode_split, load_model
from opt.downstream.retrieval import DIRECTIONS, retrieve

COLUMNS = "| direction | pairs re-ranked / all | two-tower + re-rank s | all pairs s | speedup | " \
          "R@1 two-tower | R@1 re-ranked | R@1 all pairs |"


def compare(loaded: LoadedModel, split: EncodedSplit, query: tuple[str, ...], target: str, *, rerank_k: int,
            batch_size: int, caption_likelihood: bool) -> dict:
    """Times, pairs scored and R@1 of re-ranking the top ``rerank_k`` and of scoring every pair."""
    settings = {"caption_likelihood": caption_likelihood, "batch_size": batch_size}
    ours = retrieve(loaded, split, query, target, rerank_k=rerank_k, **settings)
    every = retrieve(loaded, split, query, target, rerank_k=len(split), **settings)
    ours_seconds = ours["seconds"]["two_tower"] + ours["seconds"]["rerank"]
    every_seconds = every["seconds"]["two_tower"] + every["seconds"]["rerank"]
    return {"queries": ours["n"], "candidates": ours["candidates"],
            "pairs_reranked": ours["seconds"].get("rerank_pairs", 0), "pairs_all": every["seconds"]["rerank_pairs"],
            "two_tower_rerank_s": ours_seconds, "all_pairs_s": every_seconds, "speedup": every_seconds / ours_seconds,
            "r1_two_tower": ours["two_tower"]["r1"], "r1_two_tower_rerank": ours["r1"], "r1_all_pairs": every["r1"],
            "two_tower_rerank": ours, "all_pairs": every}


def table(rows: dict[str, dict]) -> str:
    """The markdown table of :func:`compare`'s rows, one per direction."""
    lines = [COLUMNS, "|---" * (COLUMNS.count("|") - 1) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['pairs_reranked']:,} / {r['pairs_all']:,} | {r['two_tower_rerank_s']:.2f} | "
                     f"{r['all_pairs_s']:.1f} | {r['speedup']:.1f}x | {r['r1_two_tower']:.3f} | "
                     f"{r['r1_two_tower_rerank']:.3f} | {r['r1_all_pairs']:.3f} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model directory (opt export)")
    parser.add_argument("--data", required=True, help="shard spec of the pool, e.g. 'data/world/test-*.tar'")
    parser.add_argument("--pool", type=int, default=200, help="samples read (queries = candidates without groups)")
    parser.add_argument("--rerank-k", type=int, default=10, help="tower candidates re-ranked per query")
    parser.add_argument("--batch-size", type=int, default=256, help="pairs scored at once, in both arms")
    parser.add_argument("--directions", nargs="+", choices=list(DIRECTIONS), default=list(DIRECTIONS))
    parser.add_argument("--no-caption-likelihood", dest="caption_likelihood", action="store_false",
                        help="score pairs without the caption likelihood (both arms)")
    parser.add_argument("--out", help="also write the figures as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    machine = machine_summary()
    loaded = load_model(args.model)
    start = time.perf_counter()
    split = encode_split(loaded, args.data, limit=args.pool)
    encode_seconds = time.perf_counter() - start
    rows = {name: compare(loaded, split, *DIRECTIONS[name], rerank_k=args.rerank_k, batch_size=args.batch_size,
                          caption_likelihood=args.caption_likelihood) for name in args.directions}
    print(f"pool {len(split)}, re-rank top {args.rerank_k}, {args.batch_size} pairs a batch, caption likelihood "
          f"{'on' if args.caption_likelihood else 'off'}; encoding the pool ({encode_seconds:.1f} s) is shared by "
          f"both arms and left out; {machine['torch_threads']} torch threads, fp32 matmul "
          f"{machine['fp32_matmul_gflops_per_s']} GFLOP/s at the start")
    print(table(rows))
    total_ours = sum(r["two_tower_rerank_s"] for r in rows.values())
    total_every = sum(r["all_pairs_s"] for r in rows.values())
    print(f"all directions: {total_ours:.1f} s against {total_every:.1f} s ({total_every / total_ours:.1f}x)")
    figures = {"settings": vars(args) | {"pool_read": len(split), "encode_s": encode_seconds},
               "machine": machine, "directions": rows}
    if args.out:
        with open(args.out, "w") as out:
            json.dump(figures, out, indent=2)
    return figures


if __name__ == "__main__":
    main()
