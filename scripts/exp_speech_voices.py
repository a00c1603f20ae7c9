"""Speech probe: does training on many voices and phrasings carry over to unheard ones?

``run`` trains the speech side of the demo recipe on one world's train split: its contrastive
phase, its speech-recognition phase (captions from audio), then the demo's task mixture with
captions from speech only and half the image decoding (1,300 steps in all). It then evaluates the model on the
world's test, test_novel and test_unseen splits. Each world gets its own text tokenizer, trained
on its train split as ``make demo`` does. ``table`` prints the speech figures of every run,
with each variant's mean and seed-to-seed spread.

    python scripts/exp_speech_voices.py run --world data/world_v1 --name narrow --seed 0
    python scripts/exp_speech_voices.py run --world data/world --name wide --seed 1
    python scripts/exp_speech_voices.py run --world data/world --name wide-speed --seed 0 \\
        audio.speed_factors=[0.9,1.0,1.1]
    python scripts/exp_speech_voices.py table
    python scripts/exp_speech_voices.py diagnose --world data/world narrow-s0 wide-s0

``diagnose`` takes test_unseen's two factors apart. It writes two diagnostic splits with test's
scenes (``--count`` of them): test's captions spoken by test_unseen's voices, and test_unseen's
phrasings spoken by test's voices. It then measures the named runs' A->T R@1 and audio caption
attribute accuracy on each.

Extra ``key=value`` arguments go to ``opt train`` as config overrides. ``run`` resumes: finished
stages are skipped.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml
# the sibling experiment's helpers (scripts/ is on sys.path)
from exp_scaling import lookup, opt_command, train_and_evaluate

from opt.data.world.speech import UNSEEN_VOICES, VOICES, Voice

STEPS = {"contrastive": 300, "captions from speech": 500, "mixture": 500}
FIGURES = (
    ("A->T R@1", ("retrieval", "a2t", "r1")),
    ("A->T R@1, towers", ("retrieval", "a2t", "two_tower", "r1")),
    ("audio captions", ("captioning", "audio", "attribute_accuracy")),
    ("audio caption WER", ("captioning", "audio", "wer")),
)
SPLITS = ("test", "test_novel", "test_unseen")


def probe_config(base: Path, world: Path, tokenizer: Path, seed: int) -> dict:
    """The demo config cut down to its speech side, on ``world`` with ``tokenizer``."""
    config = yaml.safe_load(base.read_text())
    config["data"]["train"] = str(world / "train-*.tar")
    config["data"]["val"] = str(world / "val-*.tar")
    config["tokenizer"]["path"] = str(tokenizer)
    # the demo's mixture, with half its image decoding and captions from speech only
    config["tasks"]["weights"] = {"mlm": 1, "mvm": 1, "mam": 2, "text_decoding": 3, "image_decoding": 1, "itm": 1,
                                  "contrastive": 5}
    config["tasks"]["text_decoding_conditions"] = ["audio"]
    config["tasks"]["phases"] = [
        {"steps": STEPS["contrastive"], "weights": {"contrastive": 1}},
        {"steps": STEPS["captions from speech"], "weights": {"text_decoding": 1}, "text_decoding_conditions": ["audio"]},
    ]
    config["train"].update(seed=seed, steps=sum(STEPS.values()), eval_every=sum(STEPS.values()))
    return config


def run(args: argparse.Namespace) -> None:
    world = Path(args.world)
    out = Path(args.out)
    tokenizer = out / "tokenizers" / f"{world.name}.model"
    if not tokenizer.exists():
        tokenizer.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(opt_command("tokenizer", "train", "--data", str(world / "train-*.tar"), "--out", str(tokenizer),
                                   "--vocab-size", "512"), check=True)
    folder = train_and_evaluate(out / f"{args.name}-s{args.seed}",
                                probe_config(Path(args.config), world, tokenizer, args.seed), args.overrides,
                                ["--data", str(world), "--rerank-k", "10", "--generate-count", "1", "--no-meteor",
                                 "--no-card"])
    (folder / "probe.json").write_text(json.dumps({"world": str(world), "seed": args.seed,
                                                    "overrides": args.overrides}, indent=2))


DIAGNOSTICS = {  # name: (phrasings, voices), as the world generator names them
    "unseen voices": ("test", UNSEEN_VOICES),
    "unseen phrasings": ("unseen", VOICES),
}


def diagnostic_splits(world: Path, out: Path, count: int) -> dict[str, str]:
    """Write (once) the diagnostic splits into ``out`` and return their shard paths."""
    from opt.data.shards import ShardWriter
    from opt.data.world.synth import make_sample

    manifest = json.loads((world / "manifest.json").read_text())
    held_out = {tuple(pair) for pair in manifest["held_out_pairs"]}
    paths = {}
    for name, (phrasings, voices) in DIAGNOSTICS.items():
        path = out / f"{name.replace(' ', '_')}-{count}.tar"
        paths[name] = str(path)
        if path.exists():
            continue
        style = (phrasings, functools.partial(Voice.sample, voices=voices))
        out.mkdir(parents=True, exist_ok=True)
        with ShardWriter(str(path)) as shard:  # written under a temporary name, renamed when closed
            for index in range(count):
                shard.write(*make_sample("test", index, seed=manifest["seed"], image_size=manifest["image_size"],
                                         held_out=held_out, style=style))
    return paths


def diagnose(args: argparse.Namespace) -> None:
    from opt.data.world.attributes import aggregate, score_caption
    from opt.downstream.captioning import caption_split
    from opt.downstream.common import encode_split, load_model
    from opt.downstream.retrieval import retrieve

    out = Path(args.out)
    splits = diagnostic_splits(Path(args.world), out / "diagnostic", args.count)
    results = json.loads((out / "diagnostic.json").read_text()) if (out / "diagnostic.json").exists() else {}
    for run_name in args.runs:
        todo = {split: shards for split, shards in splits.items() if split not in results.get(run_name, {})}
        if not todo:
            continue
        loaded = load_model(out / run_name / "model")
        for split, shards in todo.items():
            encoded = encode_split(loaded, shards, modalities=("text", "audio"))
            a2t = retrieve(loaded, encoded, ("audio",), "text", rerank_k=10)
            captions = caption_split(loaded, shards, "audio")
            scores = aggregate(score_caption(c.caption, c.meta) for c in captions)
            results.setdefault(run_name, {})[split] = {
                "A->T R@1": a2t["r1"], "A->T R@1, towers": a2t["two_tower"]["r1"],
                "audio captions": scores["overall"],
                **{f"audio captions, {key}": value for key, value in scores.items() if key != "overall"}}
            (out / "diagnostic.json").write_text(json.dumps(results, indent=2))
    names = list(splits)
    keys = ("A->T R@1", "audio captions", "audio captions, color", "audio captions, position_or_relation")
    print("| run | " + " | ".join(f"{split}: {key}" for split in names for key in keys) + " |")
    print("|---" * (1 + len(names) * len(keys)) + "|")
    for run_name in args.runs:
        print(f"| {run_name} | " + " | ".join(f"{results[run_name][split][key]:.3f}" for split in names
                                               for key in keys) + " |")


def table(args: argparse.Namespace) -> None:
    rows: dict[str, list[dict]] = {}
    for report in sorted(Path(args.out).glob("*-s*/report/metrics.json")):
        variant, _, seed = report.parent.parent.name.rpartition("-s")
        metrics = json.loads(report.read_text())
        row = {"seed": int(seed)}
        for split in SPLITS:
            for label, path in FIGURES:
                row[(split, label)] = lookup(metrics.get(split, {}), path)
        rows.setdefault(variant, []).append(row)
    if not rows:
        sys.exit(f"exp_speech_voices: no evaluated runs under {args.out}")
    columns = [(split, label) for split in SPLITS for label, _ in FIGURES]
    print("| variant | seed | " + " | ".join(f"{split} {label}" for split, label in columns) + " |")
    print("|---" * (len(columns) + 2) + "|")
    for variant, runs in rows.items():
        for row in sorted(runs, key=lambda r: r["seed"]):
            print(f"| {variant} | {row['seed']} | " + " | ".join(
                "-" if row[c] is None else f"{row[c]:.3f}" for c in columns) + " |")
        if len(runs) > 1:
            cells = []
            for column in columns:
                values = [r[column] for r in runs if r[column] is not None]
                cells.append(f"{statistics.mean(values):.3f} ± {max(values) - min(values):.3f}" if values else "-")
            print(f"| {variant} | mean ± range | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/speech_probe")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="train and evaluate one probe")
    run_parser.add_argument("--world", required=True, help="a synthetic-world directory")
    run_parser.add_argument("--name", required=True, help="the variant's name in the table")
    run_parser.add_argument("--seed", type=int, default=0)
    run_parser.add_argument("--config", default="configs/tiny.yaml")
    run_parser.add_argument("overrides", nargs="*", help="key=value config overrides for opt train")
    commands.add_parser("table", help="print every evaluated probe")
    diagnose_parser = commands.add_parser("diagnose", help="unseen voices and unseen phrasings, each on its own")
    diagnose_parser.add_argument("--world", required=True, help="the world whose test scenes are spoken")
    diagnose_parser.add_argument("--count", type=int, default=500)
    diagnose_parser.add_argument("runs", nargs="+", help="probe runs (folders under --out)")
    args = parser.parse_args()
    {"run": run, "table": table, "diagnose": diagnose}[args.command](args)


if __name__ == "__main__":
    main()
