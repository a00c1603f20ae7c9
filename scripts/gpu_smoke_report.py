"""Throughput and MFU of training runs, for ``scripts/gpu_smoke.sh``.

    python scripts/gpu_smoke_report.py --device cuda RUN [RUN ...] [--out FILE]

Per run: samples/s, the mean of the windows ``metrics.jsonl`` logged after the
first (the first holds start-up: allocation, kernel selection, the loader's
first batches); model FLOPs per sample; and MFU, the achieved FLOP/s as a
fraction of the peak.

- FLOPs per sample: forward + backward of each pretext task of the run's
  mixture, counted with :func:`opt.model.summary.count_flops` on one batch of the
  run's own training data (real text and audio lengths, not the maximum sizes
  of ``opt model summary``), then combined as the run trained: averaged with
  the task weights in force at each step (``tasks.mode=sample``, one task per
  step) or summed (``tasks.mode=sum``). A phase's decoding conditions are not
  counted apart (the smoke runs have no phases).
- Peak: a large square matmul in the run's precision (bf16 or fp32), measured
  now in this process on ``--device``, as ``scripts/bench_*.py`` measure theirs:
  the practical peak, below the data sheet's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from opt.benchmarking import processor_name, timed
from opt.config import Config, load_config
from opt.data.batch import to_device
from opt.data.pipeline import BatchLoader
from opt.devices import resolve_device
from opt.engine.export import run_spec
from opt.model.opt_model import OPTModel
from opt.tasks.mixture import TaskMixture, schedule_flops, task_flops
from opt.text.tokenizer import load_tokenizer, tokenizer_in

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def logged_samples_per_second(run: Path) -> tuple[int, float]:
    """The run's last step and its mean samples/s over the logged windows after the first."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    windows = [record for record in records if "samples_per_s" in record]
    if not windows:
        raise SystemExit(f"gpu_smoke_report: {run}/metrics.jsonl has no samples_per_s record")
    kept = windows[1:] or windows
    return windows[-1]["step"], sum(record["samples_per_s"] for record in kept) / len(kept)


def step_flops(config: Config, run: Path, device: torch.device) -> float:
    """Model FLOPs per sample of a training step of ``run``, averaged over its steps."""
    tokenizer = load_tokenizer(tokenizer_in(run))
    model = OPTModel(run_spec(run, config, tokenizer))
    model.load_vq(run / "vq")
    model.to(device).train()
    mixture = TaskMixture(config, model, rank=0).to(device)
    loader = BatchLoader(config.data.train, config.data, config.audio, tokenizer, train=True,
                         seed=config.train.seed, workers=0, split_by_node=False)
    batches = iter(loader)
    batch = to_device(next(batches), device)
    batches.close()
    flops = task_flops(mixture, model, batch, PRECISIONS[config.train.precision])
    return schedule_flops(mixture, flops, config.train.steps)


def matmul_peak_on(device: torch.device, dtype: torch.dtype) -> float:
    """Measured FLOP/s of a square matmul on ``device``: 8192^2, ten per timing, on a GPU; 1024^2 on a CPU."""
    size, per_call = (8192, 10) if device.type == "cuda" else (1024, 1)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def multiply() -> None:
        for _ in range(per_call):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return per_call * 2 * size**3 / timed(multiply, repeats=5 if device.type == "cuda" else 3)


def report_run(run: Path, device: torch.device, peaks: dict[torch.dtype, float]) -> dict:
    config = load_config(run / "config.yaml")
    dtype = PRECISIONS[config.train.precision]
    if dtype not in peaks:
        peaks[dtype] = matmul_peak_on(device, dtype)
    step, samples_per_second = logged_samples_per_second(run)
    flops = step_flops(config, run, device)
    achieved = samples_per_second * flops
    return {"run": run.name, "steps": step, "precision": str(config.train.precision),
            "zero_stage": config.train.zero_stage, "batch_size": config.data.batch_size,
            "samples_per_s": samples_per_second, "gflop_per_sample": flops / 1e9,
            "achieved_tflop_per_s": achieved / 1e12, "peak_tflop_per_s": peaks[dtype] / 1e12,
            "mfu": achieved / peaks[dtype]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="training run directories (opt train --run-dir)")
    parser.add_argument("--device", default="cuda", help="where FLOPs and the matmul peak are measured (default cuda)")
    parser.add_argument("--out", help="also write the figures as JSON")
    args = parser.parse_args()
    device = resolve_device(args.device)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else processor_name()
    print(f"device: {machine}")
    peaks: dict[torch.dtype, float] = {}
    rows = [report_run(Path(run), device, peaks) for run in args.runs]
    print(f"{'run':<8} {'steps':>5} {'precision':>9} {'batch':>5} {'samples/s':>10} {'GFLOP/sample':>12} "
          f"{'TFLOP/s':>8} {'peak':>8} {'MFU':>6}")
    for row in rows:
        print(f"{row['run']:<8} {row['steps']:>5} {row['precision']:>9} {row['batch_size']:>5} "
              f"{row['samples_per_s']:>10.1f} {row['gflop_per_sample']:>12.2f} {row['achieved_tflop_per_s']:>8.2f} "
              f"{row['peak_tflop_per_s']:>8.1f} {100 * row['mfu']:>5.1f}%")
    print("peak: a square matmul of each run's precision measured just now on this device")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": machine, "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
