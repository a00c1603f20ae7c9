"""Argument helpers shared by the subcommands."""

from __future__ import annotations

import argparse

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
