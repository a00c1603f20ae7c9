"""Open Images (or COCO, Flickr30k, ADE20k) + Localized Narratives -> tri-modal shards.

Input: the published annotation files, one JSON object per line::

    {"dataset_id": "open_images", "image_id": "0a1b2c3d4e5f6a7b", "annotator_id": 93,
     "caption": "In this image we can see ...",
     "timed_caption": [{"utterance": "In this image", "start_time": 0.0, "end_time": 1.2}, ...],
     "traces": [[{"x": 0.1, "y": 0.2, "t": 0.5}, ...]],
     "voice_recording": "open_images_train/open_images_train_0a1b2c3d4e5f6a7b_93.ogg"}

The image is ``IMAGE_ID.jpg`` in the images directory, or anywhere below it
(an index of nested ``.jpg`` files is built once per worker, only when a
direct look-up misses); the recording is the ``voice_recording`` path under the
audio directory, or its basename there.

Output sample: the image (original bytes when valid), the transcript (``.txt``),
the speech (16 kHz 16-bit FLAC) and ``.json`` metadata: source ids, the input
row, image size, durations and the kept ``timed_caption``. Mouse traces are not
kept. Speech and transcript are made to match (:func:`fit_narration`):

* A narration longer than ``max_audio_seconds`` is cut at the end of its last
  utterance that ends in time, and the transcript becomes the kept utterances
  (``narration_cut``); one that cannot be cut that way (no timing, or a first
  utterance that is already too long) is skipped as ``narration_uncuttable``.
* A recording shorter than its timing says (cut short, or simply shorter) keeps
  only the utterances that end within the audio present (``TIMING_SLACK_SECONDS``
  allows for rounding), and the speech is cut at the end of the last of them
  (``transcript_cut``). With no utterance left the row is skipped: as
  ``audio_truncated`` when the file is cut short, else ``narration_uncuttable``.
* A recording cut short (see :mod:`opt.data.audio`) without timing cannot be
  matched to its transcript and is skipped as ``audio_truncated``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from opt.data.convert.common import Sample, convert_to_shards, input_folder
from opt.data.convert.media import SAMPLE_RATE, Skip, encode_flac, encode_text, inside, read_image, read_speech
from opt.data.convert.rows import JsonLines, Row
from opt.errors import UserError

STRING_FIELDS = ("dataset_id", "image_id", "caption", "voice_recording")
TIMING_SLACK_SECONDS = 0.05  # an utterance may end this much after the recording and still count as in it


@dataclass(frozen=True)
class Utterance:
    utterance: str
    start_time: float
    end_time: float


def parse_timed_caption(value: object) -> list[Utterance]:
    """The ``timed_caption`` list; :class:`Skip` (``row_invalid``) if it is malformed
    (not a list of objects with an utterance and finite, non-negative times)."""
    if value is None:
        return []
    try:
        timed = [Utterance(str(u["utterance"]), float(u["start_time"]), float(u["end_time"])) for u in value]
    except (TypeError, KeyError, ValueError):
        raise Skip("row_invalid", "malformed timed_caption") from None
    if not all(math.isfinite(t) and t >= 0 for u in timed for t in (u.start_time, u.end_time)):
        raise Skip("row_invalid", "timed_caption with a negative or non-finite time")
    return timed


@dataclass(frozen=True)
class Narration:
    wave: np.ndarray  # (n,) speech at SAMPLE_RATE
    text: str  # the transcript of that speech
    timed: list[Utterance]  # the utterances kept
    changes: list[str]  # "narration_cut" or "transcript_cut" when cut, else empty


def fit_narration(wave: np.ndarray, caption: str, timed: list[Utterance], max_seconds: float,
                  truncated: bool = False) -> Narration:
    """Make speech and transcript match (see the module docstring): cut speech longer than
    ``max_seconds`` (0: no limit), or a transcript whose timing runs past the speech, at an
    utterance boundary. ``truncated``: the recording was cut short."""
    seconds = len(wave) / SAMPLE_RATE
    if truncated and not timed:
        raise Skip("audio_truncated", f"{seconds:.1f} s of a recording cut short, without timing to match")
    if max_seconds > 0 and seconds > max_seconds:
        limit, change, failure = max_seconds, "narration_cut", "narration_uncuttable"
    elif timed and max(u.end_time for u in timed) > seconds + TIMING_SLACK_SECONDS:
        limit, change = seconds + TIMING_SLACK_SECONDS, "transcript_cut"
        failure = "audio_truncated" if truncated else "narration_uncuttable"
    else:
        return Narration(wave, caption, timed, [])
    kept = []
    for utterance in timed:
        if utterance.end_time > limit:
            break
        kept.append(utterance)
    text = " ".join(u.utterance.strip() for u in kept if u.utterance.strip())
    end = round(kept[-1].end_time * SAMPLE_RATE) if kept else 0
    if not text or end == 0:
        raise Skip(failure, f"{seconds:.1f} s without an utterance that ends within {limit:g} s")
    return Narration(wave[:end], text, kept, [change])


@dataclass
class LocalizedNarratives:
    """Converter of one Localized Narratives row (see the module docstring)."""

    images: Path
    audio: Path
    max_audio_seconds: float = 10.0
    _nested: dict[str, Path] | None = field(default=None, init=False, repr=False)

    def __call__(self, row: Row) -> Sample:
        fields = row.fields
        for name in STRING_FIELDS:
            if not isinstance(fields.get(name), str):
                raise Skip("row_invalid", f"{name} missing or not a string")
        if not isinstance(fields.get("annotator_id"), int | str):
            raise Skip("row_invalid", "annotator_id missing")
        caption = fields["caption"].strip()
        if not caption:
            raise Skip("caption_empty", fields["image_id"])
        timed = parse_timed_caption(fields.get("timed_caption"))
        extension, image, image_meta = read_image(self.find_image(fields["image_id"]))
        speech = read_speech(self.find_audio(fields["voice_recording"]))
        narration = fit_narration(speech.wave, caption, timed, self.max_audio_seconds, speech.truncated)
        meta = {
            "source": "localized_narratives",
            "row": row.source,
            **{name: fields[name] for name in ("dataset_id", "image_id", "annotator_id", "voice_recording")},
            **image_meta,
            "audio_seconds": round(len(narration.wave) / SAMPLE_RATE, 3),
            "original_audio_seconds": round(speech.seconds, 3),
            "audio_truncated": speech.truncated,
            "narration_cut": "narration_cut" in narration.changes,
            "transcript_cut": "transcript_cut" in narration.changes,
            "timed_caption": [vars(u) for u in narration.timed],
        }
        members = {extension: image, "txt": encode_text(narration.text), "flac": encode_flac(narration.wave),
                   "json": json.dumps(meta, sort_keys=True).encode("utf-8")}
        return Sample(members, narration.changes)

    def find_image(self, image_id: str) -> Path:
        direct = inside(self.images, f"{image_id}.jpg")
        if os.path.isfile(direct):  # unlike Path.is_file, False for a name too long for the file system
            return direct
        if self._nested is None:
            self._nested = _jpeg_index(self.images)
        if image_id not in self._nested:
            raise Skip("image_missing", f"{image_id}.jpg")
        return self._nested[image_id]

    def find_audio(self, recording: str) -> Path:
        path = inside(self.audio, recording)
        if os.path.isfile(path):
            return path
        return self.audio / path.name


def _jpeg_index(root: Path) -> dict[str, Path]:
    """``{stem: path}`` of every ``.jpg`` below ``root``; the first in sorted walk order wins."""
    index: dict[str, Path] = {}
    for directory, subdirectories, files in os.walk(root):
        subdirectories.sort()
        for name in sorted(files):
            if name.endswith(".jpg"):
                index.setdefault(name[:-4], Path(directory) / name)
    return index


def convert_localized_narratives(annotations: list[str], *, images: str | Path, audio: str | Path, out: str | Path,
                                 prefix: str = "train", shard_size: int = 1000, workers: int = 1,
                                 max_audio_seconds: float = 10.0, progress: bool = True) -> dict:
    """Convert Localized Narratives annotation files into ``out``; returns the summary
    (see :mod:`opt.data.convert.common`)."""
    if not max_audio_seconds >= 0:  # also refuses nan
        raise UserError(f"--max-audio-seconds must be >= 0, got {max_audio_seconds}")
    if not annotations:
        raise UserError("--annotations names no file")
    converter = LocalizedNarratives(input_folder(images, "--images"), input_folder(audio, "--audio"),
                                    max_audio_seconds)
    return convert_to_shards(converter, name="localized_narratives", inputs=[str(a) for a in annotations],
                             rows=JsonLines(), out=out, prefix=prefix, shard_size=shard_size, workers=workers,
                             options={"max_audio_seconds": max_audio_seconds, "sample_rate": SAMPLE_RATE},
                             progress=progress)
