"""Data throughput benchmark, measured side by side in one run.

    python scripts/bench_data.py [--samples 400] [--batches 30] [--out bench_data.json]

1. ``opt data synth``: samples/s with 1 and 2 worker processes (same world).
2. The training loader on configs/tiny.yaml: samples/s with 0, 1 and 2 loader
   workers (decode PNG + WAV, tokenize, log-mel, collate), after one warm-up batch.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from opt.config import load_config
from opt.data.pipeline import BatchLoader
from opt.data.shards import resolve_shards
from opt.data.world.synth import synthesize_world
from opt.text.tokenizer import iter_shard_captions, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def bench_synth(out: Path, samples: int, workers: int) -> float:
    counts = {"train": samples, "val": 0, "test": 0, "test_novel": 0}
    start = time.perf_counter()
    synthesize_world(out, counts, seed=0, shard_size=max(1, samples // 4), workers=workers,
                     progress=False)
    return samples / (time.perf_counter() - start)


def bench_loader(world: Path, tokenizer, workers: int, batches: int) -> float:
    config = load_config(ROOT / "configs/tiny.yaml", [f"data.workers={workers}"])
    iterator = iter(BatchLoader(f"{world}/train-*.tar", config.data, config.audio, tokenizer, train=True,
                                seed=config.train.seed))
    next(iterator)  # start-up (worker processes, first shard) is not throughput
    start = time.perf_counter()
    seen = sum(len(next(iterator)["keys"]) for _ in range(batches))
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=400, help="world size for the synth benchmark")
    parser.add_argument("--batches", type=int, default=30, help="timed batches per loader setting")
    parser.add_argument("--out", help="also write the figures as JSON")
    args = parser.parse_args()
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bench_synth(tmp / "warmup", 4, 1)  # starts the fork server, which would otherwise be timed once
        for workers in (1, 2):
            results[f"synth_samples_per_s_workers_{workers}"] = bench_synth(tmp / f"synth{workers}", args.samples,
                                                                              workers)
        world = tmp / "synth2"
        tokenizer = train_tokenizer(iter_shard_captions(resolve_shards(str(world))), tmp / "tok.model",
                                    vocab_size=512)
        for workers in (0, 1, 2):
            results[f"loader_samples_per_s_workers_{workers}"] = bench_loader(world, tokenizer, workers, args.batches)
    width = max(map(len, results))
    for name, value in results.items():
        print(f"{name:<{width}}  {value:8.1f}")
    print(f"synth speed-up 2 vs 1 workers: {results['synth_samples_per_s_workers_2'] / results['synth_samples_per_s_workers_1']:.2f}x; "
          f"loader 2 vs 0 workers: {results['loader_samples_per_s_workers_2'] / results['loader_samples_per_s_workers_0']:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
