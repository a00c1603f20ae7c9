"""A small Python API over a model directory (``opt export``): caption, generate, embed.

    from opt import OPT

    model = OPT.load("runs/demo/model")
    model.caption(images=["cat.png"])                      # ['a small red circle ...']
    model.generate("a big blue square", n=2, candidates=4)  # [PIL.Image.Image, PIL.Image.Image]
    model.embed(texts=["a red circle"]) @ model.embed(images=["cat.png"]).T  # cosine (1, 1)

Inputs are decoded exactly as training reads a shard's members
(:mod:`opt.downstream.files`), so a file, its bytes and the same sample in a
shard give the same result. Unlike ``opt caption`` on files, which skips and
counts unreadable ones, an input that cannot be read raises
:class:`~opt.errors.UserError` naming it: results stay one per input, in order.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image

from opt.data.pipeline import DataStats
from opt.downstream.captioning import caption_batch, parse_inputs
from opt.downstream.common import LoadedModel, load_model
from opt.downstream.files import collate, decode_inputs
from opt.downstream.index import embed_batch
from opt.downstream.text_to_image import generate_images, prompt_batch
from opt.viz import to_uint8
from opt.errors import UserError
from opt.model.opt_model import OPTModel
from opt.text.tokenizer import Tokenizer

ImageInput = str | Path | bytes | Image.Image  # a path, the file's bytes or a PIL image
AudioInput = str | Path | bytes  # a path or the file's bytes
PARAMETERS = {"text": "texts", "image": "images", "audio": "audio"}  # how errors name an input: texts[2]


class OPT:
    """A loaded model with its tokenizer, ready for captioning, generation and embedding.

    >>> model = OPT.load("runs/demo/model")            # doctest: +SKIP
    >>> model.caption(images=["shapes.png"], beam=3)   # doctest: +SKIP
    ['a large green triangle above a small red circle']
    """

    def __init__(self, loaded: LoadedModel, *, batch_size: int = 64) -> None:
        self.loaded = loaded
        self.batch_size = batch_size  # inputs run through the model at once

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu") -> "OPT":
        """The model directory written by ``opt export`` on ``device`` (``cpu``, ``cuda``, ``cuda:1``, ``mps``).

        >>> OPT.load("runs/demo/model", device="cuda")  # doctest: +SKIP
        """
        return cls(load_model(directory, device=device))

    @property
    def model(self) -> OPTModel:
        """The network (:class:`~opt.model.opt_model.OPTModel`, in eval mode)."""
        return self.loaded.model

    @property
    def tokenizer(self) -> Tokenizer:
        return self.loaded.tokenizer

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    def caption(self, images: Sequence[ImageInput] | None = None, audio: Sequence[AudioInput] | None = None, *,
                beam: int = 1) -> list[str]:
        """One caption per image, per clip (speech recognition), or per (image, clip) pair when both
        are given (the same number of each); ``beam`` > 1 searches with that many beams.

        >>> model.caption(images=["a.png", open("b.jpg", "rb").read()])  # doctest: +SKIP
        ['a red circle', 'two blue squares']
        >>> model.caption(audio=["speech.wav"])                          # doctest: +SKIP
        ['a red circle']
        """
        members = {"image": images, "audio": audio}
        given = {m: list(v) for m, v in members.items() if v is not None}
        if not given:
            raise UserError("give images, audio or both to caption")
        if len({len(v) for v in given.values()}) > 1:
            raise UserError(f"captioning images with audio pairs them: got {len(given['image'])} images and "
                            f"{len(given['audio'])} clips")
        sources = parse_inputs("+".join(given))
        captions = []
        for batch in self._batches(given):
            captions += caption_batch(self.loaded, batch, sources, beam=beam)
        return captions

    def generate(self, prompts: str | Sequence[str], n: int = 1, seed: int = 0, **decoding) -> list[Image.Image]:
        """``n`` images per prompt (prompt-major order) from the image-token decoder. ``decoding``:
        :func:`~opt.downstream.text_to_image.generate_images`'s options (``decoding``, ``steps``,
        ``guidance``, ``temperature``, ``candidates``: best of that many, 32 by default).

        >>> model.generate(["a red circle", "a blue square"], n=2, candidates=1)  # doctest: +SKIP
        [<PIL.Image.Image image mode=RGB size=64x64>, ...]
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(p.strip() for p in prompts):
            raise UserError("no prompt given (an empty list or an empty prompt)")
        batch = prompt_batch(self.loaded, [p for p in prompts for _ in range(n)])
        images = generate_images(self.loaded, batch, seed=seed, **decoding)
        return [Image.fromarray(to_uint8(image)) for image in images]

    def embed(self, texts: Sequence[str] | None = None, images: Sequence[ImageInput] | None = None,
              audio: Sequence[AudioInput] | None = None) -> torch.Tensor:
        """Two-tower embeddings (n, dim), float32 and L2-normalised on the CPU, of one modality's
        inputs (give exactly one of ``texts``, ``images``, ``audio``): cosines are dot products.

        >>> model.embed(texts=["a red circle"]) @ model.embed(images=["a.png"]).T  # doctest: +SKIP
        tensor([[0.61]])
        """
        given = {m: list(v) for m, v in {"text": texts, "image": images, "audio": audio}.items() if v is not None}
        if len(given) != 1:
            raise UserError("embed one modality at a time: give exactly one of texts, images or audio")
        (modality, inputs), = given.items()
        if not inputs:
            return torch.zeros(0, self.model.spec.model.towers.dim)
        return torch.cat([embed_batch(self.loaded, batch, modality) for batch in self._batches(given)])

    def _batches(self, given: dict[str, list]) -> Iterator[dict]:
        """Batches of the inputs of ``given`` (modality -> one input per row), every row decoded
        before the first batch runs; an unreadable one raises :class:`UserError`."""
        modalities = list(given)
        rows = [(" + ".join(_name(m, given[m][row], row) for m in modalities),
                 {m: _payload(m, given[m][row]) for m in modalities}) for row in range(len(given[modalities[0]]))]
        stats = DataStats()
        samples = list(decode_inputs(self.loaded, rows, modalities, stats))
        if stats.skips:
            (_, key), reason = next(iter(stats.skips.items()))
            raise UserError(f"{key} cannot be read ({reason})")
        return collate(self.loaded, samples, modalities, batch_size=self.batch_size)


def _payload(modality: str, item) -> bytes:
    """The bytes of one input: a text's UTF-8, a file's bytes, the bytes given, a PIL image as PNG (lossless)."""
    if modality == "text":
        if not isinstance(item, str):
            raise UserError(f"a text input must be a str, got {type(item).__name__}")
        try:
            return item.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError("a text input is not valid UTF-8 text (it holds lone surrogates)") from None
    if isinstance(item, bytes):
        return item
    if modality == "image" and isinstance(item, Image.Image):
        buffer = io.BytesIO()
        item.save(buffer, format="PNG")
        return buffer.getvalue()
    if isinstance(item, (str, Path)):
        if not Path(item).is_file():
            raise UserError(f"{modality} file not found: {item}")
        return Path(item).read_bytes()
    kinds = "a path, bytes or a PIL image" if modality == "image" else "a path or bytes"
    raise UserError(f"an {modality} input must be {kinds}, got {type(item).__name__}")


def _name(modality: str, item, row: int) -> str:
    """How errors name an input: its path, else its parameter and position (``images[2]``)."""
    if modality != "text" and isinstance(item, (str, Path)):
        return str(item)
    return f"{PARAMETERS[modality]}[{row}]"
