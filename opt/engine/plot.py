"""``opt plot RUN``: loss and accuracy per task, learning rate and throughput as one PNG."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from opt.errors import UserError  # noqa: E402
from opt.viz import save_figure  # noqa: E402


def read_metrics(run: str | Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"no metrics.jsonl in {run}")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    return records


def plot_run(run: str | Path, out: str | Path | None = None) -> Path:
    records = read_metrics(run)
    series: dict[str, dict[str, list]] = defaultdict(lambda: {"step": [], "value": []})
    for record in records:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                series[key]["step"].append(record["step"])
                series[key]["value"].append(value)
    tasks = sorted({key.split("/")[0] for key in series if "/" in key and not key.startswith(("val/", "data/"))})
    panels = [("loss", [f"{t}/loss" for t in tasks]), ("accuracy", [f"{t}/accuracy" for t in tasks]),
              ("validation accuracy", [f"val/{t}/accuracy" for t in tasks]),
              ("learning rate", ["lr"]), ("samples/s", ["samples_per_s"])]
    if not any(key in series for key in panels[2][1]):
        panels.pop(2)
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2))
    for axis, (title, keys) in zip(axes, panels):
        for key in keys:
            if key in series:
                axis.plot(series[key]["step"], series[key]["value"], label=key.removeprefix("val/").split("/")[0],
                          marker=".", markersize=3)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if title == "loss":
            axis.set_yscale("log")
        if len(keys) > 1:
            axis.legend(fontsize=7)
    return save_figure(figure, Path(out) if out else Path(run) / "curves.png")
