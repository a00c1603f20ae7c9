"""The ``opt`` command. It only parses arguments and calls library functions.

A user mistake (:class:`~opt.errors.UserError`, a bad argument) prints one line
on stderr and exits with status 2 (a training run stopped by SIGTERM or SIGINT:
143 or 130, after its checkpoint); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys

from opt.cli import config_cmd, data_cmd, downstream_cmd, eval_cmd, model_cmd, tokenizer_cmd, train_cmd
from opt.errors import UserError

COMMANDS = (data_cmd, tokenizer_cmd, model_cmd, train_cmd, downstream_cmd, eval_cmd, config_cmd)


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit 2."""

    def error(self, message: str) -> None:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="opt", description="OPT: tri-modal (image, text, audio) pre-training.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    # `deepspeed --module opt ...` puts --local_rank=N before the subcommand (the rank is also in LOCAL_RANK)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    commands.required = True
    for module in COMMANDS:
        module.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.handler(args)
    except UserError as error:
        if args.debug:
            raise
        label = "error: " if error.exit_code == 2 else ""  # a run stopped by a signal is not a mistake
        sys.stderr.write(f"opt: {label}{error}\n")
        return error.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("opt: interrupted\n")
        return 130
    return int(result or 0)
