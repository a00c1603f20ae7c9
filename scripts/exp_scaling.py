"""Budget or recipe: the demo recipe trained at several multiples of its steps,
with the schedule stretched (every curriculum phase, the total, the warmup and
the validation interval times K; everything else equal, the demo's VQ reused),
then evaluated like the demo and plotted against training minutes.

    python scripts/exp_scaling.py run --scale 4 --out runs/scaling      # train, export, evaluate one multiple
    python scripts/exp_scaling.py run --scale 1 --out runs/scaling --from-run runs/demo   # the demo itself as 1x
    opt eval --model runs/scaling/x1/model --data 'data/world/test_unseen-*.tar' --name test_unseen \
        --out runs/scaling/x1/report_test_unseen --rerank-k 10 --no-card     # a split the 1x report lacks
    python scripts/exp_scaling.py plot --out runs/scaling --png docs/journal/scaling.png

Each multiple lives in ``OUT/xK`` (config.yaml, train/, model/, report/,
timing.json). ``run`` resumes: training restarts from its newest checkpoint and
finished stages are skipped. Training minutes are the wall time of ``opt train``;
a run that shared the machine says so in timing.json (``contended``), and the plot
also gives K times the 1x run's minutes (what the multiple costs on a quiet machine).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

# (label, path into report metrics.json's split, target) for the figures the demo is judged on
FIGURES = (
    ("T->I R@1", ("retrieval", "t2i", "r1"), 0.80),
    ("T->I R@1, towers", ("retrieval", "t2i", "two_tower", "r1"), 0.50),
    ("image captions", ("captioning", "image", "attribute_accuracy"), 0.90),
    ("image captions, shape", ("captioning", "image", "attribute_shape"), None),
    ("text-to-image", ("text_to_image", "text", "attribute_accuracy"), 0.70),
    ("A->T R@1", ("retrieval", "a2t", "r1"), 0.90),
    ("audio captions", ("captioning", "audio", "attribute_accuracy"), 0.80),
)


def stretched_config(base: Path, scale: int, vq_path: str) -> dict:
    """The base config with every step count times ``scale``."""
    config = yaml.safe_load(base.read_text())
    train = config["train"]
    for key in ("steps", "warmup_steps", "eval_every"):
        if key in train:
            train[key] = int(train[key]) * scale
    for phase in config.get("tasks", {}).get("phases") or []:
        phase["steps"] = int(phase["steps"]) * scale
    train["vq_path"] = vq_path
    return config


def opt_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "opt", *args]


def train_and_evaluate(folder: Path, config: dict, overrides: list[str], eval_args: list[str]) -> Path:
    """One probe run in ``folder``, each stage skipped once its output exists: ``config.yaml``
    (written once), ``opt train`` with ``overrides`` into ``train/`` (resuming) and ``opt export`` into
    ``model/``, then ``opt eval --model model/ --out report/`` with ``eval_args``. Returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "config.yaml"
    if not config_path.exists():
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    model = folder / "model"
    if not (model / "config.json").exists():
        subprocess.run(opt_command("train", "--config", str(config_path), "--run-dir", str(folder / "train"),
                                   *overrides), check=True)
        subprocess.run(opt_command("export", str(folder / "train"), "--out", str(model)), check=True)
    if not (folder / "report" / "metrics.json").exists():
        subprocess.run(opt_command("eval", "--model", str(model), "--out", str(folder / "report"), *eval_args),
                       check=True)
    return folder


def run(args: argparse.Namespace) -> None:
    folder = Path(args.out) / f"x{args.scale}"
    folder.mkdir(parents=True, exist_ok=True)
    timing_path = folder / "timing.json"
    if args.from_run:
        # an existing demo run (train/, model/, report/) is the 1x point as it is
        source = Path(args.from_run)
        for part in ("train", "model", "report"):
            if not (folder / part).exists():
                shutil.copytree(source / part, folder / part)
        if not timing_path.exists():
            stamps = [json.loads(line) for line in (folder / "train" / "metrics.jsonl").read_text().splitlines()]
            # the run's config is written when training starts and its log last when it ends
            seconds = ((source / "train" / "metrics.jsonl").stat().st_mtime
                       - (source / "train" / "config.yaml").stat().st_mtime)
            timing_path.write_text(json.dumps({"scale": args.scale, "steps": max(entry["step"] for entry in stamps),
                                               "train_seconds": seconds, "source": str(source),
                                               "contended": args.contended,
                                               "measured": "from the run's config.yaml to its last log line"},
                                              indent=2))
        return
    config_path = folder / "config.yaml"
    if not config_path.exists():
        config_path.write_text(yaml.safe_dump(stretched_config(Path(args.config), args.scale, args.vq),
                                              sort_keys=False))
    model = folder / "model"
    if not (model / "config.json").exists():
        start = time.perf_counter()
        try:
            subprocess.run(opt_command("train", "--config", str(config_path), "--run-dir", str(folder / "train")),
                           check=True)
        finally:  # a stopped run's time counts too: the rerun resumes it and adds its own
            seconds = time.perf_counter() - start
            previous = json.loads(timing_path.read_text()) if timing_path.exists() else {"train_seconds": 0.0}
            steps = yaml.safe_load(config_path.read_text())["train"]["steps"]
            timing_path.write_text(json.dumps({"scale": args.scale, "steps": steps,
                                               "train_seconds": previous["train_seconds"] + seconds,
                                               "contended": args.contended or previous.get("contended", False),
                                               "measured": "wall time of opt train"}, indent=2))
        subprocess.run(opt_command("export", str(folder / "train"), "--out", str(model)), check=True)
    if not (folder / "report" / "metrics.json").exists():
        subprocess.run(opt_command("eval", "--model", str(model), "--data", args.data, "--out", str(folder / "report"),
                                   "--run-dir", str(folder / "train"), "--rerank-k", "10", "--no-card"), check=True)


def lookup(metrics: dict, path: tuple[str, ...]) -> float | None:
    for key in path:
        if not isinstance(metrics, dict) or key not in metrics:
            return None
        metrics = metrics[key]
    return float(metrics)


def last_validation(train_dir: Path, key: str) -> float | None:
    value = None
    for line in (train_dir / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if key in entry:
            value = entry[key]
    return value


def collect(out: Path) -> list[dict]:
    rows = []
    for folder in sorted(out.glob("x*"), key=lambda path: int(path.name[1:])):
        report = folder / "report" / "metrics.json"
        if not report.exists():
            continue
        metrics = json.loads(report.read_text())
        # a split evaluated on its own later (opt eval --name SPLIT --out OUT/xK/report_SPLIT)
        for extra in sorted(folder.glob("report_*/metrics.json")):
            metrics.update({split: value for split, value in json.loads(extra.read_text()).items()
                            if split not in ("seconds", "machine")})
        timing = json.loads((folder / "timing.json").read_text())
        row = {"scale": int(folder.name[1:]), "steps": timing["steps"], "minutes": timing["train_seconds"] / 60,
               "contended": timing.get("contended", False)}
        for split in ("test", "test_novel", "test_unseen"):
            if split in metrics:
                row[split] = {label: lookup(metrics[split], path) for label, path, _ in FIGURES}
        row["val MVM accuracy"] = last_validation(folder / "train", "val/mvm/accuracy")
        row["val image decoding accuracy"] = last_validation(folder / "train", "val/image_decoding/accuracy")
        rows.append(row)
    return rows


def plot(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = collect(Path(args.out))
    if not rows:
        sys.exit(f"exp_scaling: no evaluated runs under {args.out}")
    base = next((row for row in rows if row["scale"] == 1), None)
    quiet = [row["scale"] * base["minutes"] if base else row["minutes"] for row in rows]
    splits = [split for split in ("test", "test_novel", "test_unseen") if any(split in row for row in rows)]
    figure, axes = plt.subplots(1, len(splits), figsize=(6.5 * len(splits), 5.5), sharey=True, squeeze=False)
    axes = axes[0]
    for axis, split in zip(axes, splits):
        for index, (label, _, target) in enumerate(FIGURES):
            colour = f"C{index}"
            values = [row.get(split, {}).get(label) for row in rows]
            axis.plot(quiet, values, "o-", color=colour, label=label)
            for x, value, row in zip(quiet, values, rows):
                if value is not None:
                    axis.annotate(f"{value:.2f}", (x, value), textcoords="offset points", xytext=(4, 3), fontsize=7,
                                  color=colour)
            if target is not None and split == "test":
                axis.axhline(target, color=colour, linestyle=":", linewidth=1)
        axis.plot(quiet, [row["val MVM accuracy"] for row in rows], "s--", color="grey", label="val MVM accuracy")
        axis.set_xticks(quiet, [f"{row['scale']}x\n{minutes:.0f} min" for row, minutes in zip(rows, quiet)])
        axis.set_xlabel("steps (multiple of the demo's 3,000), minutes on a quiet machine")
        axis.set_title(f"{split}" + (" (dotted: targets)" if split == "test" else ""))
        axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("score")
    for axis in axes:
        axis.margins(x=0.12)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    multiples = ", ".join(f"{row['scale']}x" for row in rows)
    figure.suptitle(f"The demo recipe at {multiples} its training steps (schedule stretched, same VQ)")
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    png = Path(args.png)
    png.parent.mkdir(parents=True, exist_ok=True)
    partial = png.with_name(png.name + ".partial.png")
    figure.savefig(partial, dpi=110)
    partial.replace(png)
    table = Path(args.out) / "scaling.json"
    table.write_text(json.dumps(rows, indent=2))
    print(json.dumps(rows, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="train, export and evaluate one multiple")
    run_parser.add_argument("--scale", type=int, required=True)
    run_parser.add_argument("--out", default="runs/scaling")
    run_parser.add_argument("--config", default="configs/tiny.yaml")
    run_parser.add_argument("--vq", default="runs/demo/vq")
    run_parser.add_argument("--data", default="data/world")
    run_parser.add_argument("--from-run", help="use this finished demo run (train/, model/, report/) as the point")
    run_parser.add_argument("--contended", action="store_true", help="record that the machine was shared")
    plot_parser = commands.add_parser("plot", help="plot the evaluated multiples")
    plot_parser.add_argument("--out", default="runs/scaling")
    plot_parser.add_argument("--png", required=True)
    args = parser.parse_args()
    run(args) if args.command == "run" else plot(args)


if __name__ == "__main__":
    main()
