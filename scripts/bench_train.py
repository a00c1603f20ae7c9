"""Training-step benchmark: the trainer's real step, measured side by side in one run.

    python scripts/bench_train.py [--configs tiny,base] [--arms A,B] [--rounds 3] [--tiny-steps 14] [--base-steps 2]
                                  [--base-batch 4]
                                  [--out bench_train.json]
    python scripts/bench_train.py --contention [--seconds 12] [--rounds 3] [--out bench_contention.json]
    python scripts/bench_train.py --loader [--samples 1600] [--steps 20] [--rounds 3] [--out bench_loader.json]

The step is what ``opt train`` runs for one optimizer step (:func:`opt.engine.trainer.optimizer_step`):
the whole training forward under the DeepSpeed engine (task mixture, model, momentum encoders),
DeepSpeed's backward and step, the non-finite guard. Data is already in memory (one batch of the
pipeline's layout at the config's maximum sizes, :func:`opt.model.summary.dummy_batch`), so the
loader is left out. Steps run after the curriculum's phases, with the config's main task weights.

Default run, per config (tiny: batch 32; base: batch 4), the arms fp32 / bf16 x eager / compiled
(``train.compile``) in the paper's one-task-per-step mode (``tasks.mode=sample``), and fp32 eager
with every task each step (``sum``): samples/s (median of the rounds and their range), FLOPs per
sample of the same steps (``torch.utils.flop_counter`` on a replay of exactly the timed steps: the
same tasks and masks, counted in the last round), and utilisation: achieved FLOP/s over a large
matmul's FLOP/s measured in this process in the arm's precision. The tiny arms live side by side
and their rounds interleave; base arms run one after another (``--base-steps`` steps each round):
a base engine at batch 4 outgrew 24 GB of memory, so ``--base-batch 1`` on such a machine.

``--contention``: the tiny step (fp32, eager, ``sum`` mode: every step the same work; batch 8) alone, beside
a plain Python busy loop, and beside a copy of the same training step (both at normal priority),
with torch's threads chosen by the project's governor (:mod:`opt.engine.threads`, as ``opt train``
runs) and fixed at the count torch starts with (the step before it), in two processes whose
windows interleave. Target: with each competitor the step keeps >= 40% of its idle samples/s
(a fair share of 2 cores is 50%), and the governed idle figure is within 5% of the fixed one. The
fraction of the governed steps run on fewer threads than torch started with is reported per arm: on
an idle machine it should be 0, the two processes then running the same step.

``--loader``: the tiny step as the demo trains, fed by the training loader in the training process
(the demo's setting) and by two worker processes, against the same batches held in memory, rounds
interleaved (target: the live loader costs at most 15%). See :func:`loader_cost`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from opt.benchmarking import matmul_peak, processor_name  # noqa: E402
from opt.config import load_config  # noqa: E402
from opt.engine.deepspeed_backend import init_distributed  # noqa: E402
from opt.engine.threads import fix_threads  # noqa: E402
from opt.engine.trainer import build_engine, optimizer_step, precision_autocast  # noqa: E402
from opt.model.opt_model import ModelSpec, OPTModel  # noqa: E402
from opt.model.summary import count_flops, dummy_batch  # noqa: E402

BATCH = {"tiny": 32, "base": 4}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class RealStep:
    """The trainer's step for one config and arm, on one in-memory batch."""

    def __init__(self, name: str, *, precision: str = "fp32", mode: str = "sample", compiled: bool = False,
                 batch_size: int | None = None, tokenizer=None) -> None:
        overrides = [f"train.precision={precision}", f"tasks.mode={mode}", f"train.compile={compiled}",
                     "train.accumulation=1", "train.zero_stage=0"]  # each config's own dropout
        self.config = load_config(ROOT / f"configs/{name}.yaml", overrides)
        self.device = init_distributed()
        torch.manual_seed(0)
        model = OPTModel(ModelSpec.from_config(self.config, tokenizer))
        self.backend = build_engine(self.config, model)
        self.batch_size = batch_size or BATCH[name]
        self.batch = dummy_batch(model, self.batch_size) | {"keys": [str(i) for i in range(self.batch_size)]}
        self.first = sum(phase.steps for phase in self.config.tasks.phases)  # the main weights from here
        self.autocast = precision_autocast(self.device, precision)
        self.index = 0
        self.tasks: list[str] = []

    def warm_up(self) -> None:
        """One step as configured; compiled, first one running every task (each compiles on its first call)."""
        if self.config.train.compile:
            mixture = self.backend.module.mixture
            mode, mixture.mode = mixture.mode, "sum"
            self()
            mixture.mode = mode
        self()

    def __call__(self, batch: dict | None = None) -> None:
        outcome = optimizer_step(self.backend, [self.batch if batch is None else batch], self.first + self.index,
                                 self.autocast)
        self.tasks += list(outcome.micro_batches[0][0])
        self.index += 1

    def timed(self, steps: int, count: bool) -> tuple[float, float | None]:
        """Samples/s of ``steps`` steps and, with ``count``, their FLOPs per sample: the steps
        replayed (same tasks and masks: the mixture's generators are put back) under the FLOP counter."""
        mixture = self.backend.module.mixture
        generators, index = mixture.extra_state(), self.index
        start = time.perf_counter()
        for _ in range(steps):
            self()
        seconds = time.perf_counter() - start
        if not count:
            return steps * self.batch_size / seconds, None
        mixture.load_extra_state(generators)
        self.index = index
        with count_flops() as counter:
            for _ in range(steps):
                self()
        return steps * self.batch_size / seconds, counter.get_total_flops() / (steps * self.batch_size)


def first_line(error: Exception) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:200]


def arms(name: str) -> dict[str, dict]:
    rows = {f"{precision}_{'compiled' if compiled else 'eager'}_sample": dict(precision=precision, compiled=compiled)
            for precision in ("fp32", "bf16") for compiled in (False, True)}
    return rows | {"fp32_eager_sum": dict(mode="sum")}


def summarise(name: str, arm: str, rates: list[float], flops: float, peak: float) -> dict:
    median = statistics.median(rates)
    return {f"{name}_{arm}_samples_per_s": median, f"{name}_{arm}_samples_per_s_min": min(rates),
            f"{name}_{arm}_samples_per_s_max": max(rates), f"{name}_{arm}_gflop_per_sample": flops / 1e9,
            f"{name}_{arm}_utilisation": median * flops / peak}


def bench_config(name: str, rounds: int, steps: int, peaks: dict[str, float], interleave: bool,
                 only: set[str] | None) -> dict:
    results = {}
    settings = {arm: options for arm, options in arms(name).items() if not only or arm in only}
    if interleave:  # every arm built first, rounds interleaved
        built = {}
        for arm, options in settings.items():
            try:
                built[arm] = RealStep(name, **options)
                built[arm].warm_up()  # and compilation
            except Exception as error:  # e.g. inductor failing to compile bf16 CPU kernels: say so, go on
                built.pop(arm, None)
                results[f"{name}_{arm}_failed"] = first_line(error)
        rates = {arm: [] for arm in built}
        flops = {}
        for round_ in range(rounds):
            for arm, step in built.items():
                rate, flops[arm] = step.timed(steps, count=round_ == rounds - 1)
                rates[arm].append(rate)
        for arm in built:
            results |= summarise(name, arm, rates[arm], flops[arm], peaks[settings[arm].get("precision", "fp32")])
        return results
    for arm, options in settings.items():  # one engine in memory at a time
        try:
            step = RealStep(name, **options)
            step.warm_up()
        except Exception as error:
            results[f"{name}_{arm}_failed"] = first_line(error)
            continue
        measured = [step.timed(steps, count=round_ == rounds - 1) for round_ in range(rounds)]
        results |= summarise(name, arm, [rate for rate, _ in measured], measured[-1][1],
                             peaks[options.get("precision", "fp32")])
        del step
    return results


# -- contention --------------------------------------------------------------------------------

def step_loop(seconds: float | None, report: bool, fixed: bool) -> dict | None:
    """Run the tiny fp32 sum-mode step; with ``seconds``, measure windows as the parent asks;
    ``fixed``: torch's threads stay as they started (the step before the thread governor)."""
    if fixed:
        fix_threads(torch.get_num_threads())
    step = RealStep("tiny", mode="sum", batch_size=CONTENTION_BATCH)
    for _ in range(3):
        step()
    print("ready", flush=True)
    if not report:
        while True:
            step()
    figures, most = {}, torch.get_num_threads()
    for line in sys.stdin:
        arm = line.strip()
        if arm == "done":
            break
        count, fewer, start = 0, 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            step()
            count += 1
            fewer += torch.get_num_threads() < most
        figures[arm] = count * step.batch_size / (time.perf_counter() - start)
        print(json.dumps({arm: figures[arm], "fewer_threads": fewer / count}), flush=True)
    return figures


CONTENTION_ARMS = ("idle", "busy_loop", "training_step")
CONTENTION_BATCH = 8  # small steps: many per window


def next_message(process: subprocess.Popen) -> str:
    """The next line ``process`` writes for us ("ready" or a JSON record), skipping libraries' output."""
    for line in process.stdout:
        if line.strip() == "ready" or line.startswith("{"):
            return line.strip()
    raise RuntimeError(f"{process.args[1:]} ended before it answered")


def competitor(kind: str, fixed: bool) -> subprocess.Popen:
    if kind == "busy_loop":
        command = [sys.executable, "-c", "while True: pass"]
    else:
        command = [sys.executable, __file__, "--step-loop"] + (["--fixed-threads"] if fixed else [])
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    if kind == "training_step":
        next_message(process)
    return process


def contention(seconds: float, rounds: int) -> dict:
    """A measuring process per way of choosing threads, both alive (the one not measuring sleeps on
    its input); per round, each arm (idle, busy loop, a copy of the step) is measured for each in
    turn, the competitor started afresh (a copy of the step chooses its threads as the measured one)."""
    policies = {"adaptive": False, "fixed_threads": True}  # the project's thread governor; torch's threads as started
    measuring = {policy: subprocess.Popen([sys.executable, __file__, "--measure", str(seconds)]
                                          + (["--fixed-threads"] if fixed else []),
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                          text=True)
                 for policy, fixed in policies.items()}
    for process in measuring.values():
        next_message(process)
    rates = {(policy, arm): [] for policy in policies for arm in CONTENTION_ARMS}
    fewer = {(policy, arm): [] for policy in policies for arm in CONTENTION_ARMS}
    for _ in range(rounds):
        for arm in CONTENTION_ARMS:
            for policy, process in measuring.items():
                rival = competitor(arm, policies[policy]) if arm != "idle" else None
                time.sleep(1.0)
                process.stdin.write(arm + "\n")
                process.stdin.flush()
                message = json.loads(next_message(process))
                rates[policy, arm].append(message[arm])
                fewer[policy, arm].append(message["fewer_threads"])
                if rival is not None:
                    rival.kill()
                    rival.wait()
    for process in measuring.values():
        process.stdin.write("done\n")
        process.stdin.close()
        process.wait()
    results = {}
    for policy in policies:
        idle = statistics.median(rates[policy, "idle"])
        for arm in CONTENTION_ARMS:
            values = rates[policy, arm]
            results |= {f"{policy}_{arm}_samples_per_s": statistics.median(values),
                        f"{policy}_{arm}_range": f"{min(values):.1f}-{max(values):.1f}"}
            if arm != "idle":
                results[f"{policy}_{arm}_fraction_of_idle"] = statistics.median(values) / idle
            if policy == "adaptive":  # how often the governor ran fewer threads than torch started with
                results[f"adaptive_{arm}_steps_on_fewer_threads"] = statistics.mean(fewer[policy, arm])
    results["adaptive_idle_vs_fixed_threads"] = (results["adaptive_idle_samples_per_s"]
                                                 / results["fixed_threads_idle_samples_per_s"])
    return results


# -- live loader -------------------------------------------------------------------------------

def loader_cost(rounds: int, samples: int, steps: int) -> dict:
    """The tiny step as the demo trains (fp32, sample mode, batch 32, decoded samples cached) fed by
    the training loader in this process (``data.workers: 0``, the demo's) and by two worker processes,
    against the same step on batches the loader gave before, held in memory. A world of ``samples``
    training samples is synthesized first; each loader runs one full pass before the rounds (its
    first-pass rate is reported: decoding every sample), so the rounds see what a run sees after
    its first epoch. Each round times ``steps`` steps of each arm in turn; the loaders' iterators
    live across rounds, as in training."""
    import dataclasses
    import itertools
    import tempfile

    from opt.data.pipeline import BatchLoader
    from opt.data.shards import resolve_shards
    from opt.data.world.synth import synthesize_world
    from opt.text.tokenizer import iter_shard_captions, train_tokenizer

    config = load_config(ROOT / "configs/tiny.yaml")
    loaders = {"in_process": 0, "two_workers": 2}
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        synthesize_world(world, {"train": samples, "val": 0, "test": 0, "test_novel": 0}, seed=0,
                         shard_size=max(1, samples // 8), workers=2, progress=False)
        tokenizer = train_tokenizer(iter_shard_captions(resolve_shards(str(world))), Path(tmp) / "tokenizer.model",
                                    vocab_size=config.tokenizer.vocab_size)
        step = RealStep("tiny", tokenizer=tokenizer)
        streams, results, in_memory = {}, {"loader_world_samples": samples}, []
        for arm, workers in loaders.items():
            data = dataclasses.replace(step.config.data, workers=workers)
            streams[arm] = iter(BatchLoader(f"{world}/train-*.tar", data, step.config.audio, tokenizer, train=True,
                                            seed=0))
            step(next(streams[arm]))  # worker start-up is not throughput
            first_pass = samples // step.batch_size
            start = time.perf_counter()
            for batch in itertools.islice(streams[arm], first_pass):
                step(batch)
                if arm == "two_workers":
                    in_memory.append(batch)
            results[f"loader_{arm}_first_pass_samples_per_s"] = first_pass * step.batch_size / (
                time.perf_counter() - start)
        rates = {"in_memory": [], **{arm: [] for arm in loaders}}
        for _ in range(rounds):
            for arm in rates:
                start = time.perf_counter()
                for index in range(steps):
                    step(in_memory[index % len(in_memory)] if arm == "in_memory" else next(streams[arm]))
                rates[arm].append(steps * step.batch_size / (time.perf_counter() - start))
        del streams
    for arm, values in rates.items():
        results |= {f"loader_{arm}_samples_per_s": statistics.median(values),
                    f"loader_{arm}_range": f"{min(values):.1f}-{max(values):.1f}"}
    for arm in loaders:
        results[f"loader_{arm}_cost"] = 1 - results[f"loader_{arm}_samples_per_s"] / results[
            "loader_in_memory_samples_per_s"]
    return results


def report(figures: dict) -> None:
    width = max(map(len, figures))
    for key, value in figures.items():
        print(f"{key:<{width}}  {value:12.4g}" if isinstance(value, (int, float)) else f"{key:<{width}}  {value}",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,base", help="comma-separated: tiny, base")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per arm (median and range)")
    parser.add_argument("--tiny-steps", type=int, default=14, help="steps per round, tiny")
    parser.add_argument("--base-steps", type=int, default=2, help="steps per round, base")
    parser.add_argument("--base-batch", type=int, default=BATCH["base"],
                        help="base batch size (4 needs more than 24 GB of memory)")
    parser.add_argument("--arms", help="comma-separated arms to run (default all: fp32_eager_sample, "
                        "fp32_compiled_sample, bf16_eager_sample, bf16_compiled_sample, fp32_eager_sum)")
    parser.add_argument("--contention", action="store_true", help="the contention benchmark instead")
    parser.add_argument("--seconds", type=float, default=12.0, help="--contention: seconds per window")
    parser.add_argument("--loader", action="store_true", help="the live-loader benchmark instead")
    parser.add_argument("--samples", type=int, default=1600, help="--loader: training samples in its world")
    parser.add_argument("--steps", type=int, default=20, help="--loader: steps per arm and round")
    parser.add_argument("--out", help="also write the figures as JSON")
    parser.add_argument("--measure", type=float, help=argparse.SUPPRESS)  # --contention's measuring process
    parser.add_argument("--step-loop", action="store_true", help=argparse.SUPPRESS)  # its copy of the step
    parser.add_argument("--fixed-threads", action="store_true", help=argparse.SUPPRESS)  # without the governor
    args = parser.parse_args()
    if args.measure is not None or args.step_loop:
        step_loop(args.measure, report=args.measure is not None, fixed=args.fixed_threads)
        return
    results = {"processor": processor_name(), "torch_threads": torch.get_num_threads()}
    report(results)
    if args.contention:
        figures = contention(args.seconds, args.rounds)
        report(figures)
        results |= figures
    elif args.loader:
        figures = loader_cost(args.rounds, args.samples, args.steps)
        report(figures)
        results |= figures
    else:
        peaks = {precision: matmul_peak(dtype) for precision, dtype in DTYPES.items()}
        figures = {f"{precision}_matmul_gflops_per_s": peak / 1e9 for precision, peak in peaks.items()}
        report(figures)
        results |= figures
        BATCH["base"] = args.base_batch
        for name in args.configs.split(","):
            steps = args.tiny_steps if name == "tiny" else args.base_steps
            figures = bench_config(name, args.rounds, steps, peaks, interleave=name == "tiny",
                                   only=set(args.arms.split(",")) if args.arms else None)
            report(figures)
            results |= figures
        results["fp32_matmul_gflops_per_s_after"] = matmul_peak(torch.float32) / 1e9
        report({"fp32_matmul_gflops_per_s_after": results["fp32_matmul_gflops_per_s_after"]})
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
