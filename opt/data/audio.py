"""Audio front end: decode, check, down-mix, resample, clip, then log-mel features or the
normalised waveform (``audio.input``), and pad.

Decoding uses ``soundfile`` (wav, flac, ogg/vorbis); ``torchaudio.load`` needs
torchcodec, which this project does not depend on. Features are log10 mel
energies, floored 8 decades below the utterance's maximum and scaled to about
[-1, 1] (the Whisper recipe), frames of ``hop_length`` samples; with
``mean_normalize`` each mel band's mean over the utterance is then subtracted
(cepstral mean normalisation: it removes the voice's and channel's spectral
envelope, and audio-text alignment learned about twice as fast with it). With
``audio.input=waveform`` the encoder reads the mono samples themselves, with
``normalize_waveform`` at zero mean and unit variance per utterance, as
transformers' ``Wav2Vec2FeatureExtractor`` prepares them for wav2vec 2.0 and HuBERT.

Checks made while decoding, each an :class:`AudioDecodeError` whose ``reason``
is the skip counter name:

* ``audio_corrupt``: soundfile cannot decode the bytes.
* ``audio_truncated``: the file ends before its own header says it does. A WAV
  whose ``data`` chunk declares more bytes than the file holds (soundfile then
  quietly returns only the frames present), or an Ogg stream cut mid-page or
  before its end-of-stream page (soundfile reads such a file to its last whole
  page without complaint). :func:`decode_audio` returns what is present and
  flags it, so a caller with per-word timing can still use it; the front end
  refuses it. (A FLAC cut short makes soundfile fail: ``audio_corrupt``.)
* ``audio_rate_out_of_range``: a sample rate outside 4-192 kHz.

Resampling (:func:`resample`) is torchaudio's windowed-sinc resampler with its
defaults (``lowpass_filter_width=6``, ``rolloff=0.99``), whose kernel has
``q * (2 * width + p)`` taps for the reduced ratio ``p / q`` of the two rates;
16,001 -> 16,000 Hz reduces to nothing, and took 24 s and 4 GB for a 3 s clip.
The ratio is therefore replaced by the closest fraction whose terms are at most
``MAX_RATIO_TERM`` (1280), which bounds the kernel to 1.7 M taps (about 0.2 s
and 60 MB for a 10 s clip at any rate). Every ratio between the common rates
(8, 11.025, 16, 22.05, 24, 32, 44.1, 48, 96 kHz) already has terms that small,
so those are resampled exactly as before. For other rates the speed (pitch and
duration) changes by a relative error below ``1 / MAX_RATIO_TERM``; to 16 kHz
it is at most 3.9e-4 (0.7 cent, at 160,063 Hz) over every integer rate from 4
to 192 kHz, and 6.25e-5 for 16,001 Hz.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import soundfile as sf
import torch
import torchaudio
import torchaudio.functional as AF

from opt.config import AudioConfig, AudioInput

MIN_RATE, MAX_RATE = 4_000, 192_000  # Hz; audio at other rates is refused
MAX_RATIO_TERM = 1280  # largest numerator / denominator of the resampling ratio (see the module docstring)
_UNKNOWN_WAV_SIZES = (0, 0xFFFFFFFF)  # data chunk sizes that streaming writers leave for "until the end"


class AudioDecodeError(ValueError):
    """The bytes are not usable audio; ``reason`` is the skip counter name."""

    reason = "audio_corrupt"


class AudioTruncatedError(AudioDecodeError):
    """The file ends before its header says it does."""

    reason = "audio_truncated"

    def __init__(self, message: str = "the file ends before its header says it does") -> None:
        super().__init__(message)


class AudioRateError(AudioDecodeError):
    """The sample rate is outside ``MIN_RATE`` .. ``MAX_RATE``."""

    reason = "audio_rate_out_of_range"


@dataclass(frozen=True)
class DecodedAudio:
    channels: np.ndarray  # (channels, samples) float32
    rate: int  # Hz
    truncated: bool  # the file ends before its header says it does; ``channels`` hold what is present


def decode_audio(payload: bytes) -> DecodedAudio:
    """Decode wav/flac/ogg bytes; :class:`AudioDecodeError` (or a subclass) when they cannot be used."""
    truncated = _cut_short(payload)
    try:
        data, rate = sf.read(io.BytesIO(payload), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as error:
        if truncated:
            raise AudioTruncatedError() from None
        raise AudioDecodeError(str(error)) from None
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioRateError(f"{rate} Hz is outside {MIN_RATE}-{MAX_RATE} Hz")
    return DecodedAudio(data.T, int(rate), truncated)


def _cut_short(payload: bytes) -> bool:
    """Whether a WAV or Ogg file ends before its own structure says it does (other formats: False)."""
    if payload[:4] == b"RIFF" and payload[8:12] == b"WAVE":
        return _wav_cut_short(payload)
    if payload[:4] == b"OggS":
        return _ogg_cut_short(payload)
    return False


def _wav_cut_short(payload: bytes) -> bool:
    """The ``data`` chunk declares more bytes than follow it."""
    offset = 12
    while offset + 8 <= len(payload):
        chunk, size = payload[offset:offset + 4], int.from_bytes(payload[offset + 4:offset + 8], "little")
        if chunk == b"data":
            return size not in _UNKNOWN_WAV_SIZES and offset + 8 + size > len(payload)
        offset += 8 + size + (size & 1)  # chunks are padded to an even length
    return False  # no data chunk: soundfile judges the file


def _ogg_cut_short(payload: bytes) -> bool:
    """The file ends inside a page, or after its last whole page with a logical stream still open
    (no end-of-stream page). Bytes that are not a page stop the walk: damage or a trailer, which
    the decoder judges."""
    open_streams: set[bytes] = set()
    offset = 0
    while payload[offset:offset + 4] == b"OggS":
        if offset + 27 > len(payload):
            return True
        table = offset + 27 + payload[offset + 26]  # the segment table follows the 27-byte page header
        end = table + sum(payload[offset + 27:table])
        if end > len(payload):
            return True
        serial = payload[offset + 14:offset + 18]
        if payload[offset + 5] & 0x04:  # end-of-stream flag
            open_streams.discard(serial)
        else:
            open_streams.add(serial)
        offset = end
    if not b"OggS".startswith(payload[offset:offset + 4]):
        return False
    return bool(open_streams)


def resample_ratio(orig: int, new: int) -> tuple[int, int]:
    """``(p, q)`` with ``p / q`` the closest fraction to ``orig / new`` whose terms are at most
    ``MAX_RATIO_TERM`` (``orig / new`` itself, reduced, when its terms are that small)."""
    small, large = sorted((orig, new))
    ratio = Fraction(small, large).limit_denominator(MAX_RATIO_TERM)  # <= 1, so both terms are bounded
    if ratio.numerator == 0:
        raise AudioRateError(f"cannot resample {orig} Hz to {new} Hz")
    return (ratio.numerator, ratio.denominator) if orig <= new else (ratio.denominator, ratio.numerator)


def resample(samples: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """``(..., n)`` samples at ``orig`` Hz resampled to ``new`` Hz in bounded time and memory
    (torchaudio's resampler on the ratio of :func:`resample_ratio`)."""
    p, q = resample_ratio(orig, new)
    return AF.resample(samples, p, q)


@dataclass
class Waveform:
    samples: torch.Tensor  # (n,) mono float32 at the front end's rate
    repairs: list[str] = field(default_factory=list)  # what was fixed: downmixed, resampled, clipped


def normalize_waveform(samples: torch.Tensor) -> torch.Tensor:
    """``(n,)`` samples at zero mean and unit variance (transformers' ``zero_mean_unit_var_norm``:
    population variance, 1e-7 added under the square root, so silence stays zero)."""
    return (samples - samples.mean()) / torch.sqrt(samples.var(correction=0) + 1e-7)


class AudioFrontEnd:
    """Turns audio bytes into what the audio encoder reads: log-mel frames ``(frames, n_mels)``,
    at most ``max_frames``, or the waveform ``(n,)``, at most ``max_samples``."""

    def __init__(self, config: AudioConfig) -> None:
        self.config = config
        self.max_samples = int(round(config.max_seconds * config.sample_rate))
        self.max_frames = self.max_samples // config.hop_length + 1
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=config.sample_rate, n_fft=config.n_fft, hop_length=config.hop_length,
            n_mels=config.n_mels, power=2.0,
        )

    def waveform(self, payload: bytes) -> Waveform:
        """Decode, down-mix to mono, resample and clip to ``max_seconds``; a truncated file
        raises :class:`AudioTruncatedError`."""
        decoded = decode_audio(payload)
        if decoded.truncated:
            raise AudioTruncatedError()
        repairs = []
        if decoded.channels.shape[0] > 1:
            repairs.append("audio_downmixed")
        samples = torch.from_numpy(np.ascontiguousarray(decoded.channels.mean(axis=0)))
        if decoded.rate != self.config.sample_rate:
            repairs.append("audio_resampled")
            samples = resample(samples, decoded.rate, self.config.sample_rate)
        if samples.numel() > self.max_samples:
            repairs.append("audio_clipped")
            samples = samples[: self.max_samples]
        return Waveform(samples, repairs)

    def encoder_input(self, samples: torch.Tensor) -> torch.Tensor:
        """What the audio encoder reads (``audio.input``): log-mel features ``(frames, n_mels)``
        or the waveform ``(n,)``, normalised when ``normalize_waveform``."""
        if self.config.input == AudioInput.logmel:
            return self.features(samples)
        return normalize_waveform(samples) if self.config.normalize_waveform else samples

    @torch.no_grad()
    def features(self, samples: torch.Tensor) -> torch.Tensor:
        """Log-mel features ``(frames, n_mels)`` of a mono waveform."""
        mel = self.mel(samples)  # (n_mels, frames)
        log_mel = torch.clamp(mel, min=1e-10).log10()
        log_mel = torch.maximum(log_mel, log_mel.max() - 8.0)
        features = ((log_mel + 4.0) / 4.0).T[: self.max_frames]  # (frames, n_mels)
        if self.config.mean_normalize:
            features = features - features.mean(dim=0, keepdim=True)
        return features.contiguous()


def pad_frames(features: list[torch.Tensor | None], n_mels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length ``(frames, n_mels)`` tensors into ``(b, t, n_mels)``
    plus a ``(b, t)`` mask that is True on real frames (``None`` gives all padding)."""
    return _pad(features, (n_mels,))


def pad_waveforms(waveforms: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length ``(n,)`` waveforms into ``(b, n)`` zero-padded samples plus a
    ``(b, n)`` mask that is True on real samples (``None`` gives all padding)."""
    return _pad(waveforms, ())


def _pad(items: list[torch.Tensor | None], tail: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``(length, *tail)`` tensors along their first axis into ``(b, longest, *tail)``
    and a ``(b, longest)`` mask of their real positions (at least one position long)."""
    longest = max((item.shape[0] for item in items if item is not None), default=1)
    batch = torch.zeros(len(items), longest, *tail)
    mask = torch.zeros(len(items), longest, dtype=torch.bool)
    for row, item in enumerate(items):
        if item is not None:
            batch[row, : item.shape[0]] = item
            mask[row, : item.shape[0]] = True
    return batch, mask
