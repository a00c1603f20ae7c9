"""Caption prior experiment: retrieval of captions re-ranked with the caption likelihood as it is
and relative to its prior (``--caption-prior M``: minus the log of its mean likelihood given M
other queries), on the same encoded split, for several models.

    python scripts/exp_caption_prior.py --world data/world --splits test test_unseen --directions a2t \\
        --priors 0 4 --out runs/caption_prior.json runs/speech_probe/wide-s0/model runs/speech_probe/wide-s1/model

Prints one row per model, split and direction: R@1 of the towers and after re-ranking with each
prior; ``--out`` keeps every run's figures (and is read back, so finished rows are skipped).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from opt.devices import inference_autocast
from opt.downstream.common import encode_split, load_model
from opt.downstream.retrieval import DIRECTIONS, retrieve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="model directories (opt export)")
    parser.add_argument("--world", required=True, help="a world directory holding the splits")
    parser.add_argument("--splits", nargs="+", default=["test", "test_unseen"])
    parser.add_argument("--directions", nargs="+", default=["a2t"], choices=[n for n, (_, t) in DIRECTIONS.items()
                                                                            if t == "text"])
    parser.add_argument("--priors", nargs="+", type=int, default=[0, 4])
    parser.add_argument("--rerank-k", type=int, default=10)
    parser.add_argument("--out", required=True, help="JSON file of the results")
    args = parser.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    for model_dir in args.models:
        loaded = None
        for split_name in args.splits:
            for direction in args.directions:
                key = f"{model_dir}|{split_name}|{direction}"
                if key not in results:
                    loaded = loaded or load_model(model_dir)
                    query, target = DIRECTIONS[direction]
                    with inference_autocast(loaded.device, loaded.model):
                        split = encode_split(loaded, f"{args.world}/{split_name}-*.tar", modalities=(*query, target))
                        runs = {str(prior): retrieve(loaded, split, query, target, rerank_k=args.rerank_k,
                                                     caption_prior=prior) for prior in args.priors}
                    results[key] = {"towers": runs[str(args.priors[0])]["two_tower"]["r1"]} | {
                        f"prior {prior}": run["r1"] for prior, run in runs.items()}
                    out.write_text(json.dumps(results, indent=2))
                row = results[key]
                print(f"{model_dir:<40} {split_name:<12} {direction}  " + "  ".join(
                    f"{name} {value:.3f}" for name, value in row.items()), flush=True)


if __name__ == "__main__":
    main()
