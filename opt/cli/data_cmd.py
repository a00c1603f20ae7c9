"""``opt data ...``: make the synthetic world, check shards, preview them."""

from __future__ import annotations

import argparse
import time

from opt.cli.common import (DATA_HELP, add_command_group, add_config_arguments, config_from_args, non_negative_int,
                             positive_int)
from opt.data.pipeline import BatchLoader
from opt.data.preview import preview_grid
from opt.data.shards import resolve_shards
from opt.data.world.synth import synthesize_world
from opt.text.tokenizer import TextTokenizer


def register(commands: argparse._SubParsersAction) -> None:
    sub = add_command_group(commands, "data", "datasets and shards")

    synth = sub.add_parser("synth", help="generate the synthetic tri-modal world as webdataset shards")
    synth.add_argument("--out", required=True, help="output directory")
    for split, default in (("train", 5000), ("val", 500), ("test", 500), ("test-novel", 500)):
        synth.add_argument(f"--{split}", type=non_negative_int, default=default,
                           help=f"samples in {split.replace('-', '_')} (default {default})")
    synth.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    synth.add_argument("--image-size", type=positive_int, default=64, help="canvas side in pixels (default 64)")
    synth.add_argument("--shard-size", type=positive_int, default=1000, help="samples per shard (default 1000)")
    synth.add_argument("--workers", type=positive_int, default=2, help="worker processes (default 2)")
    synth.set_defaults(handler=run_synth)

    check = sub.add_parser("check", help="read shards through the training pipeline and count bad samples")
    check.add_argument("--data", required=True, help=DATA_HELP)
    check.add_argument("--tokenizer", help="tokenizer model (default: config tokenizer.path if text is enabled)")
    add_config_arguments(check)
    check.set_defaults(handler=run_check)

    preview = sub.add_parser("preview", help="write a PNG grid of samples with their captions")
    preview.add_argument("--data", required=True, help=DATA_HELP)
    preview.add_argument("--out", required=True, help="output PNG")
    preview.add_argument("--count", type=positive_int, default=24, help="samples to show (default 24)")
    preview.set_defaults(handler=run_preview)


def run_synth(args: argparse.Namespace) -> None:
    counts = {"train": args.train, "val": args.val, "test": args.test, "test_novel": args.test_novel}
    start = time.perf_counter()
    manifest = synthesize_world(args.out, counts, seed=args.seed, image_size=args.image_size,
                                shard_size=args.shard_size, workers=args.workers)
    seconds = time.perf_counter() - start
    held_out = ", ".join(f"{c} {s}" for c, s in manifest["held_out_pairs"])
    print(f"world: {sum(counts.values())} samples in {args.out} ({seconds:.1f} s); held out: {held_out}")


def run_check(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    tokenizer = None
    if "text" in config.data.modalities:
        tokenizer = TextTokenizer.from_file(args.tokenizer or config.tokenizer.path)
    loader = BatchLoader(args.data, config, tokenizer, train=False)
    batches = sum(1 for _ in loader)
    print(f"{batches} batches from {len(loader.shards)} shards; {loader.stats.summary()}")


def run_preview(args: argparse.Namespace) -> None:
    print(f"preview: {preview_grid(resolve_shards(args.data), args.out, count=args.count)}")
