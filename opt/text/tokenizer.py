"""A SentencePiece text tokenizer with byte fallback and fixed special ids.

Special tokens and their ids (the same for every trained model):
pad 0, unk 1, bos 2, eos 3, then the user-defined pieces [MASK] 4, [CLS] 5,
[SEP] 6. Byte fallback means any UTF-8 text encodes without <unk>.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from opt.errors import UserError
from opt.files import write_atomic

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
MASK, CLS, SEP = "[MASK]", "[CLS]", "[SEP]"
USER_SYMBOLS = (MASK, CLS, SEP)
SPECIAL_IDS = {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "mask": 4, "cls": 5, "sep": 6}


SENTENCEPIECE_NAME = "tokenizer.model"  # a SentencePiece tokenizer inside a model or run directory
HF_DIRECTORY_NAME = "tokenizer"  # a Hugging Face tokenizer's files inside a model or run directory


class TextTokenizer:
    """Encode captions to ids and back."""

    def __init__(self, model_proto: bytes) -> None:
        self._proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.pad_id = self.sp.pad_id()
        self.unk_id = self.sp.unk_id()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.mask_id = self.sp.piece_to_id(MASK)
        self.cls_id = self.sp.piece_to_id(CLS)
        self.sep_id = self.sp.piece_to_id(SEP)
        self.special_ids = frozenset({self.pad_id, self.unk_id, self.bos_id, self.eos_id,
                                      self.mask_id, self.cls_id, self.sep_id})

    @classmethod
    def from_file(cls, path: str | Path) -> "TextTokenizer":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"tokenizer model not found: {path}")
        try:
            return cls(path.read_bytes())
        except RuntimeError:
            raise UserError(f"not a SentencePiece model: {path}") from None

    def save(self, path: str | Path) -> None:
        write_atomic(path, self._proto)

    def files(self) -> dict[str, bytes]:
        """The files that hold this tokenizer, by their name in a model or run directory."""
        return {SENTENCEPIECE_NAME: self._proto}

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, *, max_length: int | None = None, add_bos: bool = True,
               add_eos: bool = True) -> list[int]:
        """Ids of ``text``; truncated to ``max_length`` keeping bos/eos at the ends."""
        ids = self.sp.encode(text, out_type=int)
        budget = None if max_length is None else max_length - int(add_bos) - int(add_eos)
        if budget is not None:
            if budget < 0:
                raise ValueError(f"max_length {max_length} leaves no room for bos/eos")
            ids = ids[:budget]
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special ids are dropped and decoding stops at eos."""
        kept = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i not in self.special_ids:
                kept.append(i)
        return self.sp.decode(kept)


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """The tokenizer at ``path``: a SentencePiece model file, or a Hugging Face tokenizer directory."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory; Hugging Face tokenizers are not supported yet")
    return TextTokenizer.from_file(path)


def tokenizer_in(directory: str | Path) -> Path:
    """Where a model or run directory keeps its tokenizer (``tokenizer.model`` or ``tokenizer/``)."""
    directory = Path(directory)
    for name in (SENTENCEPIECE_NAME, HF_DIRECTORY_NAME):
        if (directory / name).exists():
            return directory / name
    raise UserError(f"{directory} has no tokenizer ({SENTENCEPIECE_NAME} or {HF_DIRECTORY_NAME}/)")


def save_tokenizer(tokenizer: TextTokenizer, directory: str | Path) -> None:
    """Write ``tokenizer``'s files into ``directory`` (each atomically)."""
    for name, payload in tokenizer.files().items():
        (Path(directory) / name).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(directory) / name, payload)


def iter_shard_captions(shards: Iterable[str]) -> Iterator[str]:
    """Captions (``.txt`` members) of the shards; unreadable ones are skipped."""
    for shard in shards:
        try:
            with tarfile.open(shard) as tar:
                for member in tar:
                    if not member.isfile() or not member.name.endswith(".txt"):
                        continue
                    try:
                        text = tar.extractfile(member).read().decode("utf-8").strip()
                    except UnicodeDecodeError:
                        continue
                    if text:
                        yield text
        except (tarfile.TarError, OSError):
            continue


def train_tokenizer(texts: Iterable[str], out: str | Path, *, vocab_size: int = 512,
                    model_type: str = "bpe") -> TextTokenizer:
    """Train a SentencePiece model on ``texts`` and write it to ``out``.

    ``vocab_size`` is an upper bound (a small corpus yields fewer pieces); it
    must leave room for the 256 byte pieces and the special tokens.
    """
    minimum = 256 + 4 + len(USER_SYMBOLS) + 1
    if vocab_size < minimum:
        raise UserError(f"--vocab-size must be at least {minimum} (256 byte pieces + special tokens)")
    texts = list(texts)
    if not texts:
        raise UserError("no captions found to train the tokenizer on")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=SPECIAL_IDS["pad"], unk_id=SPECIAL_IDS["unk"], bos_id=SPECIAL_IDS["bos"], eos_id=SPECIAL_IDS["eos"],
        pad_piece=PAD, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS,
        user_defined_symbols=list(USER_SYMBOLS),
        max_sentence_length=16384,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    tokenizer = TextTokenizer(model.getvalue())
    tokenizer.save(out)
    return tokenizer

