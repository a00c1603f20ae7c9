"""Text tokenizers: a SentencePiece model trained here, or a Hugging Face tokenizer directory.

Both expose the same ids and methods (:class:`Tokenizer`): encoding truncates keeping bos and
eos at the ends, decoding stops at eos and drops special ids.

SentencePiece (:class:`TextTokenizer`): byte fallback (any UTF-8 text encodes without <unk>)
and special ids that are the same for every trained model: pad 0, unk 1, bos 2, eos 3, then the
user-defined pieces [MASK] 4, [CLS] 5, [SEP] 6.

Hugging Face (:class:`HuggingFaceTokenizer`): the tokenizer of a pretrained text encoder (a BERT's
WordPiece vocabulary), read from local files only. Following BERT, a sequence starts with the
tokenizer's [CLS] (our bos) and ends with its [SEP] (our eos).
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
from abc import ABC, abstractmethod
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
# any of these marks a directory as holding a Hugging Face tokenizer (a model-only directory
# would otherwise load as a tokenizer with nothing but the special tokens)
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


class Tokenizer(ABC):
    """Encode captions to ids and back: what the data pipeline, the model spec and decoding need."""

    pad_id: int
    unk_id: int | None  # None for a vocabulary without an unknown token
    bos_id: int  # starts every encoded text
    eos_id: int  # ends every encoded text; decoding stops at it
    mask_id: int
    cls_id: int
    sep_id: int
    special_ids: frozenset[int]  # dropped by decode

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Ids are in ``range(vocab_size)``."""

    @abstractmethod
    def files(self) -> dict[str, bytes]:
        """The files that hold this tokenizer, by their name in a model or run directory."""

    @abstractmethod
    def save(self, path: str | Path) -> None:
        """Write this tokenizer to ``path`` (what :func:`load_tokenizer` reads back)."""

    @abstractmethod
    def _plain_ids(self, text: str) -> list[int]:
        """Ids of ``text`` without bos or eos."""

    @abstractmethod
    def _plain_text(self, ids: list[int]) -> str:
        """Text of ids that hold no special id."""

    def encode(self, text: str, *, max_length: int | None = None, add_bos: bool = True,
               add_eos: bool = True) -> list[int]:
        """Ids of ``text``; truncated to ``max_length`` keeping bos/eos at the ends."""
        ids = self._plain_ids(text)
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
        return self._plain_text(kept)


class TextTokenizer(Tokenizer):
    """A SentencePiece model with the fixed special ids of :data:`SPECIAL_IDS`."""

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
        return {SENTENCEPIECE_NAME: self._proto}

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def _plain_ids(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def _plain_text(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


class HuggingFaceTokenizer(Tokenizer):
    """A ``transformers`` tokenizer read from a local directory (e.g. a pretrained BERT's).

    bos is its [CLS] token and eos its [SEP] token (BERT's ``[CLS] text [SEP]``); a tokenizer
    without a cls token uses its bos token, one without a sep token its eos token. pad, mask and
    unk are its own. ``vocab_size`` counts added tokens (``len(tokenizer)``).
    """

    def __init__(self, directory: str | Path) -> None:
        from transformers import AutoTokenizer  # here: slow to import, and SentencePiece runs never need it

        self.directory = Path(directory)
        if not any((self.directory / name).is_file() for name in HF_TOKENIZER_FILES):
            raise UserError(f"{self.directory} holds no tokenizer (none of {', '.join(HF_TOKENIZER_FILES)})")
        try:
            self.hf = AutoTokenizer.from_pretrained(self.directory, local_files_only=True)
        except (OSError, ValueError) as error:
            reason = str(error).strip().splitlines()[0]
            raise UserError(f"cannot read the Hugging Face tokenizer in {self.directory}: {reason}") from None
        hf = self.hf
        self.pad_id = self._required("pad", hf.pad_token_id)
        self.mask_id = self._required("mask", hf.mask_token_id)
        self.bos_id = self.cls_id = self._required("cls (or bos)", _first_set(hf.cls_token_id, hf.bos_token_id))
        self.eos_id = self.sep_id = self._required("sep (or eos)", _first_set(hf.sep_token_id, hf.eos_token_id))
        self.unk_id = hf.unk_token_id
        named = {self.pad_id, self.unk_id, self.bos_id, self.eos_id, self.mask_id} - {None}
        self.special_ids = frozenset(named | set(hf.all_special_ids))

    def _required(self, name: str, token_id: int | None) -> int:
        if token_id is None:
            raise UserError(f"the tokenizer in {self.directory} has no {name} token")
        return token_id

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def save(self, path: str | Path) -> None:
        self.hf.save_pretrained(path)

    def files(self) -> dict[str, bytes]:
        with tempfile.TemporaryDirectory() as tmp:
            self.save(tmp)
            return {f"{HF_DIRECTORY_NAME}/{file.relative_to(tmp).as_posix()}": file.read_bytes()
                    for file in sorted(Path(tmp).rglob("*")) if file.is_file()}

    def _plain_ids(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def _plain_text(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)


def _first_set(*ids: int | None) -> int | None:
    return next((i for i in ids if i is not None), None)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer at ``path``: a SentencePiece model file, or a Hugging Face tokenizer directory."""
    path = Path(path)
    if path.is_dir():
        return HuggingFaceTokenizer(path)
    return TextTokenizer.from_file(path)


def tokenizer_in(directory: str | Path) -> Path:
    """Where a model or run directory keeps its tokenizer (``tokenizer.model`` or ``tokenizer/``)."""
    directory = Path(directory)
    for name in (SENTENCEPIECE_NAME, HF_DIRECTORY_NAME):
        if (directory / name).exists():
            return directory / name
    raise UserError(f"{directory} has no tokenizer ({SENTENCEPIECE_NAME} or {HF_DIRECTORY_NAME}/)")


def save_tokenizer(tokenizer: Tokenizer, directory: str | Path) -> None:
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

