"""``opt config show``: print the resolved configuration."""

from __future__ import annotations

import argparse
import sys

import yaml

from opt.cli.common import add_command_group, add_config_arguments, config_from_args
from opt.config import to_dict


def register(commands: argparse._SubParsersAction) -> None:
    sub = add_command_group(commands, "config", "inspect configurations")
    show = sub.add_parser("show", help="print the config after defaults, file and overrides are merged")
    add_config_arguments(show)
    show.set_defaults(handler=show_config)


def show_config(args: argparse.Namespace) -> None:
    sys.stdout.write(yaml.safe_dump(to_dict(config_from_args(args)), sort_keys=False))
