"""``opt tokenizer train``: train the SentencePiece text tokenizer on shard captions."""

from __future__ import annotations

import argparse

from opt.cli.common import DATA_HELP, add_command_group, output_file, positive_int
from opt.data.shards import resolve_shards
from opt.text.tokenizer import iter_shard_captions, train_tokenizer


def register(commands: argparse._SubParsersAction) -> None:
    sub = add_command_group(commands, "tokenizer", "text tokenizer")
    train = sub.add_parser("train", help="train a SentencePiece tokenizer (byte fallback) on captions")
    train.add_argument("--data", required=True, help=DATA_HELP)
    train.add_argument("--out", type=output_file, required=True, help="output model file, e.g. tok.model")
    train.add_argument("--vocab-size", type=positive_int, default=512, help="upper bound on pieces (default 512)")
    train.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe", help="SentencePiece algorithm")
    train.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> None:
    texts = iter_shard_captions(resolve_shards(args.data))
    tokenizer = train_tokenizer(texts, args.out, vocab_size=args.vocab_size, model_type=args.model_type)
    print(f"tokenizer: {tokenizer.vocab_size} pieces -> {args.out}")
