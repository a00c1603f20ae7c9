"""Text-to-image experiment: generate from the captions of a split with each
decoding mode, guidance and number of candidates (best of N by the model's own
captioner), score the pictures with the world analyser and the model's towers,
and print the table.

    python scripts/exp_text_to_image.py --model runs/demo/model --data 'data/world/test-*.tar' --count 64
"""

from __future__ import annotations

import argparse
import json
import time

from opt.downstream.common import encode_split, load_model
from opt.downstream.plugins import PLUGINS
from opt.downstream.text_to_image import evaluate_text_to_image

COLUMNS = ("attribute_accuracy", "attribute_color", "attribute_position_or_relation", "attribute_size",
           "attribute_shape", "r_precision")
SETTINGS = (("parallel", 12, 1.0, 1), ("parallel", 12, 3.0, 1), ("parallel", 12, 3.0, 32),
            ("autoregressive", 0, 1.0, 1), ("autoregressive", 0, 3.0, 1), ("autoregressive", 0, 3.0, 8),
            ("autoregressive", 0, 3.0, 32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--count", type=int, default=64, help="prompts (the first captions of the split)")
    parser.add_argument("--out", help="also write the metrics as JSON")
    args = parser.parse_args()
    loaded = load_model(args.model)
    split = encode_split(loaded, args.data, limit=max(args.count, 100))
    rows = {}
    for decoding, steps, guidance, candidates in SETTINGS:
        start = time.perf_counter()
        metrics, _, _ = evaluate_text_to_image(loaded, split, count=args.count, decoding=decoding,
                                               steps=steps or 12, guidance=guidance, candidates=candidates,
                                               plugins=PLUGINS)
        metrics["seconds"] = time.perf_counter() - start
        steps = steps or split.unimodal["image"]["tokens"].shape[1]
        rows[f"{decoding} (steps {steps}, guidance {guidance}, best of {candidates})"] = metrics
    print("| decoding | " + " | ".join(COLUMNS) + " | seconds |\n" + "|---" * (len(COLUMNS) + 2) + "|")
    for name, metrics in rows.items():
        print(f"| {name} | " + " | ".join(f"{metrics[c]:.3f}" for c in COLUMNS) + f" | {metrics['seconds']:.1f} |")
    if args.out:
        with open(args.out, "w") as out:
            json.dump(rows, out, indent=2)


if __name__ == "__main__":
    main()
