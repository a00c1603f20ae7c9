"""The ceiling of text-to-image with a given VQ tokenizer: the world analyser's
scores of the tokenizer's own reconstructions of real images (encode, then
decode), beside the same scores of the images themselves. A generated image
is drawn through the same decoder, so it cannot score above its tokenizer.

    python scripts/exp_vq_ceiling.py --vq runs/demo/vq --data 'data/world/test-*.tar' --count 256
"""

from __future__ import annotations

import argparse

import torch

from opt.config import load_config
from opt.data.pipeline import BatchLoader
from opt.data.world.attributes import aggregate
from opt.data.world.image_analysis import score_image
from opt.viz import to_uint8
from opt.model.vq import load_vq

COLUMNS = ("overall", "color", "size", "position_or_relation", "shape", "count")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vq", required=True, help="a VQ tokenizer directory (opt vq train --out)")
    parser.add_argument("--data", required=True, help="shards of the synthetic world")
    parser.add_argument("--count", type=int, default=256, help="images scored (the first of the shards)")
    args = parser.parse_args()
    vq = load_vq(args.vq).eval()
    config = load_config(None, ["data.modalities=[image]", "data.workers=0", "data.batch_size=64"])
    rows = {"images": [], "reconstructions": []}
    for batch in BatchLoader(args.data, config.data, config.audio, None, train=False):
        pixels = batch["image"]["pixels"][: args.count - len(rows["images"])]
        with torch.no_grad():
            rebuilt = vq.decode(vq.encode(pixels)).clamp(0, 1)
        for image, copy, facts in zip(pixels, rebuilt, batch["meta"]):
            rows["images"].append(score_image(to_uint8(image), facts))
            rows["reconstructions"].append(score_image(to_uint8(copy), facts))
        if len(rows["images"]) >= args.count:
            break
    print(f"{len(rows['images'])} images\n")
    print("| scored | " + " | ".join(COLUMNS) + " |\n" + "|---" * (len(COLUMNS) + 1) + "|")
    for name, scores in rows.items():
        means = aggregate(scores)
        print(f"| {name} | " + " | ".join(f"{means[c]:.3f}" for c in COLUMNS) + " |")


if __name__ == "__main__":
    main()
