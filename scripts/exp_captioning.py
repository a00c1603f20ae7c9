"""Captioning experiment: caption a split from image, audio and both, and print
the table (COCO metrics, attribute accuracy, WER for speech).

    python scripts/exp_captioning.py --model runs/demo/model --data 'data/world/test-*.tar' [--beam 3]
"""

from __future__ import annotations

import argparse
import json

from opt.downstream.captioning import INPUTS, caption_metrics, caption_split
from opt.downstream.common import load_model
from opt.downstream.plugins import PLUGINS

COLUMNS = ("attribute_accuracy", "bleu_4", "meteor", "rouge_l", "cider", "wer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--beam", type=int, default=1)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--out", help="also write the metrics as JSON")
    args = parser.parse_args()
    loaded = load_model(args.model)
    results = {}
    for inputs in INPUTS:
        captions = caption_split(loaded, args.data, inputs, beam=args.beam, limit=args.limit)
        results[inputs] = caption_metrics(captions, inputs, plugins=PLUGINS)
    print("| inputs | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for inputs, metrics in results.items():
        cells = [f"{metrics[c]:.3f}" if metrics.get(c) is not None else "-" for c in COLUMNS]
        print(f"| {inputs} | " + " | ".join(cells) + " |")
    if args.out:
        with open(args.out, "w") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()
