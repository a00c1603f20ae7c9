"""Audio front end: decode, down-mix, resample, log-mel, clip or pad.

Decoding uses ``soundfile`` (wav, flac, ogg/vorbis); ``torchaudio.load`` needs
torchcodec, which this project does not depend on. Features are log10 mel
energies, floored 8 decades below the utterance's maximum and scaled to about
[-1, 1] (the Whisper recipe), frames of ``hop_length`` samples; with
``mean_normalize`` each mel band's mean over the utterance is then subtracted
(cepstral mean normalisation: it removes the voice's and channel's spectral
envelope, and audio-text alignment learned about twice as fast with it).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import soundfile as sf
import torch
import torchaudio
import torchaudio.functional as AF

from opt.config import AudioConfig


class AudioDecodeError(ValueError):
    """The bytes are not audio soundfile can read."""


def decode_audio(payload: bytes) -> tuple[np.ndarray, int]:
    """Decode wav/flac/ogg bytes to float32 ``(channels, samples)`` and the sample rate."""
    try:
        data, rate = sf.read(io.BytesIO(payload), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as error:
        raise AudioDecodeError(str(error)) from None
    return data.T, int(rate)


@dataclass
class Waveform:
    samples: torch.Tensor  # (n,) mono float32 at the front end's rate
    repairs: list[str] = field(default_factory=list)  # what was fixed: downmixed, resampled, clipped


class AudioFrontEnd:
    """Turns audio bytes into log-mel frames ``(frames, n_mels)``, at most ``max_frames``."""

    def __init__(self, config: AudioConfig) -> None:
        self.config = config
        self.max_samples = int(round(config.max_seconds * config.sample_rate))
        self.max_frames = self.max_samples // config.hop_length + 1
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=config.sample_rate, n_fft=config.n_fft, hop_length=config.hop_length,
            n_mels=config.n_mels, power=2.0,
        )

    def waveform(self, payload: bytes) -> Waveform:
        """Decode, down-mix to mono, resample and clip to ``max_seconds``."""
        channels, rate = decode_audio(payload)
        repairs = []
        if channels.shape[0] > 1:
            repairs.append("audio_downmixed")
        samples = torch.from_numpy(np.ascontiguousarray(channels.mean(axis=0)))
        if rate != self.config.sample_rate:
            repairs.append("audio_resampled")
            samples = AF.resample(samples, rate, self.config.sample_rate)
        if samples.numel() > self.max_samples:
            repairs.append("audio_clipped")
            samples = samples[: self.max_samples]
        return Waveform(samples, repairs)

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
    longest = max((f.shape[0] for f in features if f is not None), default=1)
    batch = torch.zeros(len(features), longest, n_mels)
    mask = torch.zeros(len(features), longest, dtype=torch.bool)
    for row, f in enumerate(features):
        if f is not None:
            batch[row, : f.shape[0]] = f
            mask[row, : f.shape[0]] = True
    return batch, mask
