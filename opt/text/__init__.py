"""Text tokenisation."""

from opt.text.tokenizer import TextTokenizer, load_tokenizer, save_tokenizer, tokenizer_in, train_tokenizer

__all__ = ["TextTokenizer", "load_tokenizer", "save_tokenizer", "tokenizer_in", "train_tokenizer"]
