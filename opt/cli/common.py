"""Argument helpers shared by the subcommands.

Every ``--out`` creates the folders it lies in when the output is written; the
parser refuses at once only a path that can never be written: a folder given
for a file or a file for a folder, a file standing where a folder must be, or
a folder that cannot be written in.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from opt.config import Config, load_config

DATA_HELP = "shards: a directory, a glob ('DIR/test-*.tar') or a brace pattern (DIR/train-{000000..000009}.tar)"


def add_command_group(commands: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    """A subcommand with its own required actions (``opt NAME ACTION ...``)."""
    parser = commands.add_parser(name, help=help)
    actions = parser.add_subparsers(dest=f"{name}_command", metavar="ACTION", parser_class=type(parser))
    actions.required = True
    return actions


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (defaults apply when omitted)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, e.g. model.cross.layers=4")


def add_device(parser: argparse.ArgumentParser, *, inference: bool = True) -> None:
    """``--device``, cpu by default as every command's (:mod:`opt.devices`)."""
    text = "torch device: cpu, cuda, cuda:N or mps (default cpu; one this machine lacks is refused at once)"
    if inference:
        text += "; on a CUDA GPU that has bf16 the model runs under bf16 autocast, elsewhere in fp32"
    parser.add_argument("--device", default="cpu", help=text)


def add_batch_size(parser: argparse.ArgumentParser, *, default: int = 64,
                   what: str = "samples run through the model at once") -> None:
    """``--batch-size``: how much runs through the model at once (bounds the device's memory)."""
    parser.add_argument("--batch-size", type=positive_int, default=default, help=f"{what} (default {default})")


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def output_file(text: str) -> str:
    """An output file path (its missing folders are created when it is written)."""
    return _writable(text, folder=False)


def output_folder(text: str) -> str:
    """An output folder path (created, with its missing parents, when it is written)."""
    return _writable(text, folder=True)


def _writable(text: str, *, folder: bool) -> str:
    path = Path(text)
    if path.exists() and path.is_dir() != folder:
        raise argparse.ArgumentTypeError(f"{text} is a {'file' if folder else 'folder'}; give a "
                                         f"{'folder' if folder else 'file name'}")
    existing = next(parent for parent in path.parents if parent.exists())
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"cannot create a folder for {text}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write in the folder {existing}")
    return text
