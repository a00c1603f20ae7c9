"""Text tokenisation."""

from opt.text.tokenizer import (
    HuggingFaceTokenizer,
    TextTokenizer,
    Tokenizer,
    load_tokenizer,
    save_tokenizer,
    tokenizer_in,
    train_tokenizer,
)

__all__ = ["HuggingFaceTokenizer", "TextTokenizer", "Tokenizer", "load_tokenizer", "save_tokenizer", "tokenizer_in",
           "train_tokenizer"]
