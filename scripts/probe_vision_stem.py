"""Vision stem probe: how many steps the tiny vision encoder needs to see shape and
position, with the ViT's linear patch embedding and with the convolutional stem.

Each stem's encoder (the tiny config's, from scratch) plus a readout is trained
directly on the one-object images of the synthetic world to name the object's
shape (6) and position (5); accuracy is on the one-object images of ``--val``.
The readout is one attention-pooling query over the tokens (``query``: the
mechanism the text decoder reads images with) or the encoder's pooled vector
(``pooled``: what the two-tower heads read). ``--pooled-context`` turns on
``model.vision.pooled_context``. The stems run in this one process with the same
seed, batches and steps.

    python scripts/probe_vision_stem.py [--config configs/tiny.yaml] [--steps 1000] \
        [--stems patch,conv] [--readout query|pooled] [--pooled-context true|false]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
import torch.nn.functional as F
from torch import nn

from opt.config import VISION_STEMS, load_config
from opt.data.pipeline import BatchLoader
from opt.data.world.facts import POSITIONS, SHAPES
from opt.model.encoders import VisionEncoder


def one_object_images(pattern: str, config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixels, shape index, position index) of every one-object image in the shards."""
    pixels, shapes, positions = [], [], []
    for batch in BatchLoader(pattern, config.data, config.audio, None, train=False):
        for row, meta in enumerate(batch["meta"]):
            if len(meta["objects"]) == 1:
                pixels.append(batch["image"]["pixels"][row])
                shapes.append(SHAPES.index(meta["objects"][0]["shape"]))
                positions.append(list(POSITIONS).index(meta["objects"][0]["position"]))
    return torch.stack(pixels), torch.tensor(shapes), torch.tensor(positions)


class Probe(nn.Module):
    def __init__(self, config, stem: str, readout: str = "query") -> None:
        super().__init__()
        vision = dataclasses.replace(config.model.vision, stem=stem,  # coordinate channels are conv-only
                                     coord_channels=config.model.vision.coord_channels and stem == "conv")
        self.encoder = VisionEncoder(vision, image_size=config.data.image_size, out_width=vision.width)
        self.readout = readout
        self.query = nn.Parameter(torch.randn(1, 1, vision.width) * 0.02)
        self.read = nn.MultiheadAttention(vision.width, vision.heads, batch_first=True)
        self.head = nn.Linear(vision.width, len(SHAPES) + len(POSITIONS))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = self.encoder(pixels)
        if self.readout == "pooled":
            logits = self.head(encoded["pooled"])
        else:
            tokens = encoded["tokens"]
            pooled, _ = self.read(self.query.expand(len(pixels), -1, -1), tokens, tokens)
            logits = self.head(pooled[:, 0])
        return logits[:, :len(SHAPES)], logits[:, len(SHAPES):]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--data", help="training shards (default: the config's data.train)")
    parser.add_argument("--val", help="validation shards (default: the config's data.val)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=250, help="evaluate every this many steps")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stems", default=",".join(VISION_STEMS), help="comma-separated: patch, conv")
    parser.add_argument("--readout", choices=("query", "pooled"), default="query")
    parser.add_argument("--pooled-context", choices=("true", "false"),
                        help="override the config's model.vision.pooled_context")
    args = parser.parse_args()
    overrides = ["data.modalities=[image]", "data.workers=0", "data.batch_size=64"]
    if args.pooled_context:
        overrides.append(f"model.vision.pooled_context={args.pooled_context}")
    config = load_config(args.config, overrides)
    stems = args.stems.split(",")
    if unknown := [s for s in stems if s not in VISION_STEMS]:
        parser.error(f"--stems: {unknown[0]!r} is not one of {', '.join(VISION_STEMS)}")
    train = one_object_images(args.data or config.data.train, config)
    val = one_object_images(args.val or config.data.val, config)
    print(f"{len(train[0])} one-object training images, {len(val[0])} for validation; "
          f"batch {args.batch_size}, lr {args.lr}, readout {args.readout}, "
          f"pooled_context {config.model.vision.pooled_context}")
    rows = []
    for stem in stems:
        torch.manual_seed(args.seed)
        probe = Probe(config, stem, args.readout)
        optimizer = torch.optim.AdamW(probe.parameters(), lr=args.lr, weight_decay=0.05)
        order = torch.Generator().manual_seed(args.seed)
        start = time.perf_counter()
        for step in range(1, args.steps + 1):
            index = torch.randint(len(train[0]), (args.batch_size,), generator=order)
            shape_logits, position_logits = probe(train[0][index])
            loss = F.cross_entropy(shape_logits, train[1][index]) + F.cross_entropy(position_logits, train[2][index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % args.every == 0 or step == args.steps:
                with torch.no_grad():
                    shape_logits, position_logits = probe.eval()(val[0])
                probe.train()
                rows.append((stem, step, (shape_logits.argmax(1) == val[1]).float().mean().item(),
                             (position_logits.argmax(1) == val[2]).float().mean().item(),
                             time.perf_counter() - start))
                print(f"{stem} step {step}: shape {rows[-1][2]:.3f} position {rows[-1][3]:.3f}", flush=True)
    print("\n| stem | step | shape | position | seconds |\n|---|---|---|---|---|")
    for stem, step, shape, position, seconds in rows:
        print(f"| {stem} | {step} | {shape:.3f} | {position:.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
