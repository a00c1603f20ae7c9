"""Decode and validate one raw webdataset sample.

A raw sample is the dict webdataset groups from a shard: ``__key__``,
``__url__`` and one bytes entry per member extension. Decoding either returns
a clean :class:`DecodedSample`, with the repairs it made listed, or raises
:class:`SkipSample` naming the reason. The policy:

=====================================  ==========================================
input                                  outcome
=====================================  ==========================================
member missing (modality absent)       kept, modality marked absent (``missing_<m>``)
  ... and the modality is required     skipped: ``missing_<m>``
0-byte member                          skipped: ``<m>_empty``
corrupt image (damaged header or       skipped: ``image_corrupt``
  data Pillow rejects), or cut short     (Pillow's "image file is truncated": never padded)
image over ``max_image_pixels``        skipped: ``image_too_large``
image of another size or mode          repaired: resized, centre-cropped, RGB
non-UTF-8 caption                      skipped: ``text_not_utf8``
empty (whitespace) caption             skipped: ``text_empty``
caption over ``max_caption_chars``     repaired: truncated (``text_truncated``)
audio soundfile cannot decode          skipped: ``audio_corrupt`` (a FLAC cut short is one)
audio cut short (WAV data chunk        skipped: ``audio_truncated``
  shorter than its header, Ogg
  without its end-of-stream page)
sample rate outside 4-192 kHz          skipped: ``audio_rate_out_of_range``
stereo audio / other sample rate       repaired: ``audio_downmixed`` / ``audio_resampled``
                                         (bounded ratio: see :mod:`opt.data.audio`)
audio longer than ``max_seconds``      repaired: clipped (``audio_clipped``)
audio shorter than ``min_audio_seconds`` skipped: ``audio_too_short``
unreadable ``.json`` metadata          repaired: metadata dropped (``meta_unreadable``)
no enabled modality left               skipped: ``no_modality``
=====================================  ==========================================

Kept audio becomes what the audio encoder reads (``audio.input``): log-mel
features, or the mono waveform at ``audio.sample_rate``, normalised per utterance when
``audio.normalize_waveform``.

Images are always decoded in full: Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES``
(which pads a cut-short image with grey instead of failing) is switched back
off, with a warning, if another library turned it on. Two damaged images still
decode and are kept: a PNG that lacks only its closing ``IEND`` chunk (every
pixel is there), and a JPEG whose compressed data is damaged with its markers
intact (JPEG has no checksum, and Pillow silences libjpeg's warnings).
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageFile

from opt.config import AudioConfig, DataConfig
from opt.data.audio import AudioDecodeError, AudioFrontEnd
from opt.text.tokenizer import Tokenizer

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
AUDIO_EXTENSIONS = ("wav", "flac", "ogg")
TEXT_EXTENSIONS = ("txt",)
EXTENSIONS = {"image": IMAGE_EXTENSIONS, "audio": AUDIO_EXTENSIONS, "text": TEXT_EXTENSIONS}


class SkipSample(Exception):
    """This sample cannot be used; ``reason`` is a short counter name, ``detail`` says more."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


@dataclass
class DecodedSample:
    key: str
    url: str
    caption: str | None = None  # the (possibly truncated) caption text
    text: list[int] | None = None  # token ids, bos ... eos
    image: torch.Tensor | None = None  # (3, H, W) float in [0, 1]
    audio: torch.Tensor | None = None  # (frames, n_mels) log-mel, or the (n,) waveform (audio.input)
    # with speed perturbation in training: the (n,) waveform, made into ``audio`` by a later stage
    waveform: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)
    repairs: list[str] = field(default_factory=list)


def _member(raw: dict, modality: str) -> bytes | None:
    for extension in EXTENSIONS[modality]:
        if extension in raw:
            return raw[extension]
    return None


def open_image(payload: bytes, *, max_pixels: int | None = None, draft_size: int | None = None,
               mode: str | None = None) -> Image.Image:
    """Open and fully decode image bytes (a JPEG at a reduced scale near ``draft_size`` when
    given), converted to ``mode`` when given.

    Raises :class:`SkipSample`: ``image_too_large`` (over ``max_pixels`` or Pillow's
    decompression-bomb limit) or ``image_corrupt`` (unreadable, or cut short).
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        warnings.warn("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was on; turned off so that truncated images are "
                      "counted as image_corrupt instead of padded", RuntimeWarning, stacklevel=2)
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(payload))
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise SkipSample("image_too_large", f"{image.width}x{image.height}")
            if draft_size is not None:
                image.draft("RGB", (draft_size, draft_size))
            image.load()
            if mode is not None:
                image = image.convert(mode)
    except SkipSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise SkipSample("image_too_large") from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:  # UnidentifiedImageError is an OSError
        raise SkipSample("image_corrupt", str(error)) from None
    return image


def load_image(payload: bytes, size: int, max_pixels: int) -> tuple[torch.Tensor, list[str]]:
    """Decode image bytes to a ``(3, size, size)`` float tensor in [0, 1].

    Resizes the shorter side to ``size`` and centre-crops. Raises
    :class:`SkipSample` for corrupt, truncated or oversized images.
    """
    image = open_image(payload, max_pixels=max_pixels, draft_size=size, mode="RGB")
    repairs = []
    if image.size != (size, size):
        repairs.append("image_resized")
        scale = size / min(image.size)
        new = (max(size, round(image.width * scale)), max(size, round(image.height * scale)))
        image = image.resize(new, Image.Resampling.BICUBIC)
        left, top = (new[0] - size) // 2, (new[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return pixels.float().div_(255.0), repairs


class SampleDecoder:
    """Callable that turns a raw sample into a :class:`DecodedSample` or raises :class:`SkipSample`."""

    def __init__(self, data: DataConfig, audio: AudioConfig, tokenizer: Tokenizer | None, *,
                 keep_waveform: bool = False) -> None:
        """``keep_waveform``: leave the audio as ``sample.waveform`` for a later stage (speed
        perturbation) instead of making what the encoder reads."""
        self.data = data
        self.keep_waveform = keep_waveform
        self.tokenizer = tokenizer
        self.front_end = AudioFrontEnd(audio) if "audio" in data.modalities else None
        self.min_audio_samples = int(data.min_audio_seconds * audio.sample_rate)

    def __call__(self, raw: dict) -> DecodedSample:
        sample = DecodedSample(key=raw.get("__key__", "?"), url=raw.get("__url__", "?"))
        for modality in self.data.modalities:
            payload = _member(raw, modality)
            if payload is None:
                if modality in self.data.require:
                    raise SkipSample(f"missing_{modality}")
                sample.repairs.append(f"missing_{modality}")
                continue
            if len(payload) == 0:
                raise SkipSample(f"{modality}_empty")
            getattr(self, f"_decode_{modality}")(payload, sample)
        if (sample.text is None and sample.caption is None and sample.image is None and sample.audio is None
                and sample.waveform is None):
            raise SkipSample("no_modality")
        if "json" in raw:
            try:
                sample.meta = json.loads(raw["json"].decode("utf-8"))
                if not isinstance(sample.meta, dict):
                    raise ValueError
            except (UnicodeDecodeError, ValueError):
                sample.meta = {}
                sample.repairs.append("meta_unreadable")
        return sample

    def _decode_text(self, payload: bytes, sample: DecodedSample) -> None:
        try:
            text = payload.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise SkipSample("text_not_utf8") from None
        if not text:
            raise SkipSample("text_empty")
        if len(text) > self.data.max_caption_chars:
            text = text[: self.data.max_caption_chars]
            sample.repairs.append("text_truncated")
        sample.caption = text
        if self.tokenizer is not None:
            sample.text = self.tokenizer.encode(text, max_length=self.data.max_text_tokens)

    def _decode_image(self, payload: bytes, sample: DecodedSample) -> None:
        sample.image, repairs = load_image(payload, self.data.image_size, self.data.max_image_pixels)
        sample.repairs.extend(repairs)

    def _decode_audio(self, payload: bytes, sample: DecodedSample) -> None:
        try:
            wave = self.front_end.waveform(payload)
        except AudioDecodeError as error:
            raise SkipSample(error.reason, str(error)) from None
        if wave.samples.numel() < max(self.min_audio_samples, self.front_end.config.n_fft):
            raise SkipSample("audio_too_short")
        if not torch.isfinite(wave.samples).all():
            raise SkipSample("audio_corrupt")
        if self.keep_waveform:
            sample.waveform = wave.samples
        else:
            sample.audio = self.front_end.encoder_input(wave.samples)
        sample.repairs.extend(wave.repairs)
