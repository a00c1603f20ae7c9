"""Read the media files a row names: safe paths, verified images, speech at 16 kHz.

Every problem is a :class:`Skip` whose ``reason`` is the counter name in the
conversion summary (``image_missing``, ``audio_corrupt``, ``path_escapes`` ...).

* Paths: a path from an input file is joined to its root and normalised; one
  that lands outside the root (``..``, an absolute path elsewhere) is refused
  as ``path_escapes`` before anything is opened. The check is lexical: symbolic
  links the user placed inside a root are followed.
* Images: fully decoded with PIL to prove they are whole, by the training
  pipeline's own :func:`~opt.data.samples.open_image` (a file cut short is
  ``image_corrupt``, never padded); JPEG (MPO included), PNG and WebP keep their
  original bytes, any other format is re-encoded to JPEG (quality 95). The
  original size is returned for the metadata; size filters belong to cleaning.
* Speech: decoded and checked by :func:`~opt.data.audio.decode_audio`
  (``audio_corrupt``, ``audio_rate_out_of_range``; a file cut short is returned
  as far as it goes and flagged, for the converter to decide), down-mixed to
  mono, resampled to 16 kHz by :func:`~opt.data.audio.resample` (bounded time
  and memory at any rate) and stored as 16-bit FLAC, which the training
  pipeline reads back.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from opt.data.audio import AudioDecodeError, AudioTruncatedError, decode_audio, resample
from opt.data.samples import SkipSample, open_image

SAMPLE_RATE = 16000
# PIL format -> shard extension; MPO is a camera JPEG with extra frames, which every JPEG reader decodes
KEPT_IMAGE_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}


class Skip(Exception):
    """This row gives no sample; ``reason`` is a counter name, ``detail`` says more."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def inside(root: Path, relative: str) -> Path:
    """``root / relative`` normalised; :class:`Skip` (``path_escapes``) if it leaves ``root``."""
    if "\x00" in relative:
        raise Skip("path_escapes", repr(relative))
    base = os.path.abspath(root)
    candidate = os.path.normpath(os.path.join(base, relative))
    if os.path.commonpath([base, candidate]) != base:
        raise Skip("path_escapes", relative)
    return Path(candidate)


def read_file(path: Path, modality: str) -> bytes:
    """The bytes of ``path``; :class:`Skip` ``<modality>_missing`` / ``_unreadable`` / ``_empty``."""
    try:
        payload = path.read_bytes()
    except FileNotFoundError:
        raise Skip(f"{modality}_missing", path.name) from None
    except OSError as error:
        raise Skip(f"{modality}_unreadable", f"{path.name}: {error.strerror or error}") from None
    except ValueError:  # a name the file system cannot encode (a lone surrogate from a JSON escape)
        raise Skip(f"{modality}_unreadable", f"{path.name!r}: not a valid file name") from None
    if not payload:
        raise Skip(f"{modality}_empty", path.name)
    return payload


def read_image(path: Path) -> tuple[str, bytes, dict]:
    """A verified image: its shard extension, its bytes and ``{"image_size": [w, h], "image_format": ...}``."""
    payload = read_file(path, "image")
    try:
        image = open_image(payload)
    except SkipSample as skip:
        raise Skip(skip.reason, f"{path.name}: {skip.detail}" if skip.detail else path.name) from None
    meta = {"image_size": list(image.size), "image_format": image.format}
    extension = KEPT_IMAGE_FORMATS.get(image.format)
    if extension is None:
        encoded = io.BytesIO()
        image.convert("RGB").save(encoded, format="JPEG", quality=95)
        extension, payload = "jpg", encoded.getvalue()
    return extension, payload, meta


@dataclass(frozen=True)
class Speech:
    wave: np.ndarray  # (n,) mono float32 at SAMPLE_RATE
    seconds: float  # the decoded file's duration
    truncated: bool  # the file ends before its header says it does; ``wave`` holds what is present


def read_speech(path: Path) -> Speech:
    """Mono float32 speech at 16 kHz; :class:`Skip` ``audio_corrupt`` / ``_empty`` /
    ``_rate_out_of_range`` / ``_truncated`` (cut short with nothing left)."""
    payload = read_file(path, "audio")
    try:
        decoded = decode_audio(payload)
    except AudioDecodeError as error:
        message = re.sub(r"^Error opening <[^>]*>: ", "", str(error))  # no memory addresses in the summary
        raise Skip(error.reason, f"{path.name}: {message}") from None
    channels, rate = decoded.channels, decoded.rate
    if channels.shape[1] == 0:
        reason = AudioTruncatedError.reason if decoded.truncated else "audio_empty"
        raise Skip(reason, path.name)
    wave = np.ascontiguousarray(channels.mean(axis=0))
    if rate != SAMPLE_RATE:
        wave = resample(torch.from_numpy(wave), rate, SAMPLE_RATE).numpy()
    if len(wave) == 0:
        raise Skip("audio_empty", f"{path.name}: no samples at {SAMPLE_RATE} Hz")
    if not np.isfinite(wave).all():
        raise Skip("audio_corrupt", f"{path.name}: non-finite samples")
    return Speech(wave, channels.shape[1] / rate, decoded.truncated)


def encode_text(text: str) -> bytes:
    """UTF-8 bytes of a caption; :class:`Skip` (``row_invalid``) for a lone surrogate from a JSON escape."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise Skip("row_invalid", "text is not valid Unicode (a lone surrogate)") from None


def encode_flac(wave: np.ndarray) -> bytes:
    """16-bit FLAC bytes of a mono 16 kHz waveform in [-1, 1]."""
    encoded = io.BytesIO()
    sf.write(encoded, np.clip(wave, -1.0, 1.0), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return encoded.getvalue()
