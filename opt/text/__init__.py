"""Text tokenisation."""

from opt.text.tokenizer import TextTokenizer, train_tokenizer

__all__ = ["TextTokenizer", "train_tokenizer"]
