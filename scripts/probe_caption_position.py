"""Does the captioner read where things are? Caption a split of the synthetic world from
images as they are, mirrored left-right and flipped top-bottom, and score each caption's
position or relation against the facts moved the same way.

    python scripts/probe_caption_position.py --model runs/demo/model --data 'data/world/test-*.tar'

A captioner that reads the horizontal place scores the same on mirrored images as on the
originals and names the mirrored place; one that ignores it keeps saying what it said before
(the "kept" line: one-object captions whose stated left / right did not change under the
mirror). Every shape of the world is symmetric left-right, so a mirrored image is in
distribution; top-bottom flips turn triangles over, which only the shape score notices.
Prints the confusion of stated against true one-object positions and a table per transform.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json

import torch

from opt.data.world.attributes import aggregate, parse_caption, score_caption
from opt.data.world.facts import POSITIONS
from opt.downstream.captioning import caption_batch
from opt.downstream.common import iterate_batches, load_model
from opt.errors import UserError

# transform name -> (image axis to flip or None, how positions and relations map)
TRANSFORMS = {
    "original": (None, {}),
    "mirrored": (-1, {"left": "right", "right": "left", "left of": "right of", "right of": "left of"}),
    "flipped": (-2, {"top": "bottom", "bottom": "top", "above": "below", "below": "above"}),
}


def moved_facts(facts: dict, mapping: dict[str, str]) -> dict:
    """The facts of the transformed image: positions and the relation renamed by ``mapping``."""
    moved = copy.deepcopy(facts)
    for obj in moved["objects"]:
        obj["position"] = mapping.get(obj["position"], obj["position"])
    if moved.get("relation"):
        moved["relation"] = mapping.get(moved["relation"], moved["relation"])
    return moved


def stated_position(caption: str) -> str:
    objects = parse_caption(caption)["objects"]
    return (objects[0]["position"] if objects else None) or "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model directory (opt export)")
    parser.add_argument("--data", required=True, help="synthetic-world shards with KEY.json facts")
    parser.add_argument("--limit", type=int, help="at most this many samples")
    parser.add_argument("--out", help="also write the figures as JSON")
    args = parser.parse_args()
    loaded = load_model(args.model)
    scores = {name: {1: [], 2: []} for name in TRANSFORMS}
    stated = {name: [] for name in TRANSFORMS}  # one-object (true, stated) places, aligned across transforms
    for batch in iterate_batches(loaded, args.data, limit=args.limit):
        pixels = batch["image"]["pixels"]
        for name, (axis, mapping) in TRANSFORMS.items():
            image = dict(batch["image"], pixels=pixels if axis is None else pixels.flip(axis))
            captions = caption_batch(loaded, dict(batch, image=image), ("image",))
            for facts, caption in zip(batch["meta"], captions):
                if not isinstance(facts, dict) or "objects" not in facts:
                    continue
                facts = moved_facts(facts, mapping)
                count = len(facts["objects"])
                scores[name][count].append(score_caption(caption, facts))
                if count == 1:
                    stated[name].append((facts["objects"][0]["position"], stated_position(caption)))
    if not stated["original"]:
        raise SystemExit(f"{args.data}: no samples with world facts (KEY.json) to probe")
    horizontal = [(o, m) for o, m in zip(stated["original"], stated["mirrored"]) if o[1] in ("left", "right")]
    kept = sum(o[1] == m[1] for o, m in horizontal) / max(len(horizontal), 1)
    results = {}
    print("| images | one object: position | shape | two objects: relation | shape |\n" + "|---" * 5 + "|")
    for name in TRANSFORMS:
        one, two = aggregate(scores[name][1]), aggregate(scores[name][2])
        results[name] = {"one_object": one, "two_objects": two}
        print(f"| {name} | {one.get('position_or_relation', 0):.3f} | {one.get('shape', 0):.3f} | "
              f"{two.get('position_or_relation', 0):.3f} | {two.get('shape', 0):.3f} |")
    results["mirror_kept_left_right"] = kept
    print(f"one-object captions saying left or right that say the same after the mirror: {kept:.3f} "
          f"of {len(horizontal)} (a captioner that reads the place: 0)")
    for name in TRANSFORMS:
        confusion = collections.Counter(stated[name])
        print(f"\n{name}: true place (rows) against stated place (columns), one-object images")
        columns = (*POSITIONS, "-")
        print("| true | " + " | ".join(columns) + " |\n" + "|---" * (len(columns) + 1) + "|")
        for truth in POSITIONS:
            print(f"| {truth} | " + " | ".join(str(confusion[(truth, c)]) for c in columns) + " |")
        results[name]["confusion"] = {f"{t}->{c}": n for (t, c), n in confusion.items()}
    if args.out:
        with open(args.out, "w") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    try:
        main()
    except UserError as error:
        raise SystemExit(f"probe_caption_position: {error}") from None
