"""``opt train``, ``opt export`` and ``opt plot``."""

from __future__ import annotations

import argparse

from opt.cli.common import add_config_arguments, config_from_args, output_file, output_folder


def register(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="pretrain, or fine-tune from a model directory (train.init_from), with the configured pretext tasks (DeepSpeed ZeRO)")
    add_config_arguments(train)
    train.add_argument("--run-dir", default="runs/train",
                       help="run directory: config, checkpoints, metrics, TensorBoard logs (default runs/train)")
    train.add_argument("--resume", default="auto",
                       help="auto (newest valid checkpoint of the run, the default), none, or a checkpoint directory")
    train.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    train.set_defaults(handler=run_train)

    export = commands.add_parser("export", help="turn a run's newest checkpoint into a model directory")
    export.add_argument("run_dir", metavar="RUN", help="training run directory")
    export.add_argument("--out", type=output_folder, required=True, help="output model directory")
    export.add_argument("--checkpoint", help="a specific checkpoint directory (default: the newest)")
    export.set_defaults(handler=run_export)

    plot = commands.add_parser("plot", help="write PNG curves of a run's metrics")
    plot.add_argument("run_dir", metavar="RUN", help="training run directory")
    plot.add_argument("--out", type=output_file, help="output PNG (default RUN/curves.png)")
    plot.set_defaults(handler=run_plot)


def run_train(args: argparse.Namespace) -> None:
    from opt.engine.trainer import Trainer

    record = Trainer(config_from_args(args), args.run_dir, resume=args.resume).fit()
    if record:
        print(f"train: step {record['step']}, loss {record['loss']:.4f} -> {args.run_dir}")


def run_export(args: argparse.Namespace) -> None:
    from opt.engine.export import export_run

    print(f"export: {export_run(args.run_dir, args.out, checkpoint=args.checkpoint)}")


def run_plot(args: argparse.Namespace) -> None:
    from opt.engine.plot import plot_run

    print(f"plot: {plot_run(args.run_dir, args.out)}")
