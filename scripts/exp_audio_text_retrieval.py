"""Audio-to-text retrieval experiment (the OPT paper's headline direction, with
the other directions beside it): two-tower only, and with cross-encoder
re-ranking of the top K, over the whole split as the candidate pool.

    python scripts/exp_audio_text_retrieval.py --model runs/demo/model --data 'data/world/test-*.tar'
"""

from __future__ import annotations

import argparse
import json

from opt.downstream.common import encode_split, load_model
from opt.downstream.retrieval import DIRECTIONS, retrieve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--rerank-k", type=int, default=16)
    parser.add_argument("--out", help="also write the metrics as JSON")
    args = parser.parse_args()
    loaded = load_model(args.model)
    split = encode_split(loaded, args.data)
    results = {name: retrieve(loaded, split, query, target, rerank_k=args.rerank_k)
               for name, (query, target) in DIRECTIONS.items()}
    print(f"pool: {len(split)} candidates; re-ranking the top {args.rerank_k}")
    print("| direction | R@1 | R@5 | R@10 | mean rank | two-tower R@1 | two-tower s | re-rank s |\n" + "|---" * 8 + "|")
    for name, m in results.items():
        print(f"| {name} | {m['r1']:.3f} | {m['r5']:.3f} | {m['r10']:.3f} | {m['mean_rank']:.1f} | "
              f"{m['two_tower']['r1']:.3f} | {m['seconds']['two_tower']:.3f} | {m['seconds']['rerank']:.2f} |")
    if args.out:
        with open(args.out, "w") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()
