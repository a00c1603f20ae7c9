"""Tokenizer probe: what a VQ tokenizer does for the tasks that predict its codes.

``run`` trains a shortened demo recipe on a trained tokenizer directory: 300 steps of text-to-image
decoding, then 600 of the demo's task mixture (``configs/tiny.yaml``'s weights, so masked vision
modelling gets its share), with the tokenizer's own ``model.vq`` settings. It then evaluates the model
on ``test``. ``table`` prints, per run, the masked vision modelling (MVM) and image decoding
validation figures at the last step, text-to-image attribute accuracy, image caption attribute
accuracy and T->I R@1, with each variant's mean and seed-to-seed spread.

    python scripts/exp_tokenizer_probe.py run --vq runs/vq_probes/baseline1200_s0 --name vq --seed 0
    python scripts/exp_tokenizer_probe.py run --vq runs/vq_probes/fsq1000x1200bf16_s0 --name fsq --seed 0
    python scripts/exp_tokenizer_probe.py table

Each run lives in ``OUT/NAME-sSEED`` (config.yaml, train/, model/, report/). ``run`` resumes:
finished stages are skipped. Extra ``key=value`` arguments go to ``opt train`` as config overrides.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml
from exp_scaling import lookup, train_and_evaluate  # the sibling experiment's helpers (scripts/ is on sys.path)

STEPS = {"text-to-image": 300, "mixture": 600}
FIGURES = (
    ("MVM accuracy (val)", ("val", "val/mvm/accuracy")),
    ("MVM loss (val)", ("val", "val/mvm/loss")),
    ("image decoding accuracy (val)", ("val", "val/image_decoding/accuracy")),
    ("text-to-image", ("test", "text_to_image", "text", "attribute_accuracy")),
    ("text-to-image, shape", ("test", "text_to_image", "text", "attribute_shape")),
    ("image captions", ("test", "captioning", "image", "attribute_accuracy")),
    ("T->I R@1", ("test", "retrieval", "t2i", "r1")),
)


def probe_config(base: Path, vq: Path, seed: int) -> dict:
    """The demo config shortened to ``STEPS``, on the tokenizer in ``vq`` (its settings as trained)."""
    config = yaml.safe_load(base.read_text())
    config["model"]["vq"] = json.loads((vq / "config.json").read_text())["vq"]
    config["tasks"]["phases"] = [{"steps": STEPS["text-to-image"], "weights": {"image_decoding": 1},
                                  "image_decoding_conditions": ["text"]}]
    total = sum(STEPS.values())
    config["train"].update(seed=seed, steps=total, eval_every=total, vq_path=str(vq))
    return config


def run(args: argparse.Namespace) -> None:
    train_and_evaluate(Path(args.out) / f"{args.name}-s{args.seed}",
                       probe_config(Path(args.config), Path(args.vq), args.seed), args.overrides,
                       ["--data", str(Path(args.world) / "test-*.tar"), "--name", "test", "--rerank-k", "10",
                        "--no-meteor", "--no-card"])


def figures(folder: Path) -> dict[str, float | None]:
    """The probe's figures of one run folder."""
    logged = [json.loads(line) for line in (folder / "train" / "metrics.jsonl").read_text().splitlines()]
    sources = {"val": next(entry for entry in reversed(logged) if "val/mvm/accuracy" in entry),
               "test": json.loads((folder / "report" / "metrics.json").read_text())["test"]}
    values = {}
    for label, (source, *path) in FIGURES:
        values[label] = sources[source].get(path[0]) if source == "val" else lookup(sources[source], path)
    return values


def table(args: argparse.Namespace) -> None:
    runs = sorted(path for path in Path(args.out).iterdir() if (path / "report" / "metrics.json").exists())
    rows = {path.name: figures(path) for path in runs}
    variants: dict[str, list[str]] = {}
    for name in rows:
        variants.setdefault(name.rsplit("-s", 1)[0], []).append(name)
    width = max(len(label) for label, _ in FIGURES)
    print(f"{'':<{width}}  " + "  ".join(f"{name:>14}" for name in rows))
    for label, _ in FIGURES:
        cells = [rows[name][label] for name in rows]
        print(f"{label:<{width}}  " + "  ".join(f"{value:>14.3f}" if value is not None else f"{'-':>14}"
                                              for value in cells))
    print()
    for variant, names in variants.items():
        for label, _ in FIGURES:
            values = [rows[name][label] for name in names if rows[name][label] is not None]
            if values:
                spread = max(values) - min(values)
                print(f"{variant:>8} {label:<{width}} mean {statistics.mean(values):.3f}, "
                      f"seed-to-seed spread {spread:.3f} ({len(values)} seeds)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="train and evaluate one tokenizer at one seed")
    run_parser.add_argument("--vq", required=True, help="a trained tokenizer directory (opt vq train --out)")
    run_parser.add_argument("--name", required=True)
    run_parser.add_argument("--seed", type=int, default=0)
    run_parser.add_argument("--world", default="data/world")
    run_parser.add_argument("--config", default="configs/tiny.yaml")
    run_parser.add_argument("--out", default="runs/tokenizer_probe")
    run_parser.add_argument("overrides", nargs="*", help="key=value config overrides for opt train")
    table_parser = commands.add_parser("table", help="print every finished run's figures")
    table_parser.add_argument("--out", default="runs/tokenizer_probe")
    args = parser.parse_args()
    {"run": run, "table": table}[args.command](args)


if __name__ == "__main__":
    main()
