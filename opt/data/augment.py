"""Audio augmentations for training: SpecAugment and speed perturbation.

SpecAugment (Park et al., 2019) on a batch's log-mel features: each utterance gets
``audio.time_masks`` spans of up to ``audio.time_mask_frames`` frames and ``audio.freq_masks``
bands of up to ``audio.freq_mask_bands`` mel bins set to that utterance's mean feature value
(0 after the front end's per-band mean normalisation), each width drawn uniformly from 0 to the
maximum and placed uniformly within the utterance's real frames, so padding is never chosen and
a short utterance is not masked whole. It runs on the batch's device, draws from the generator
it is given (the task mixture's per-process one, which checkpoints restore: a resumed run masks
what an uninterrupted one would) and reads nothing back from the device.

Speed perturbation (Ko et al., 2015) on each waveform in the data loader's workers, before its
features are made: the utterance is resampled as if it had been recorded at ``factor`` times the
sample rate, so it plays ``factor`` times as fast with its pitch scaled by ``factor`` (what
Kaldi's and torchaudio's speed perturbation do). A speaker's rate and pitch both move, which
is the variety a corpus of many speakers has and a world of six voices lacks. Each worker
draws the factors from a generator of its own, seeded like its shuffle buffer.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator, Sequence

import torch

from opt.config import AudioConfig
from opt.data.audio import AudioFrontEnd, resample


def _spans(lengths: torch.Tensor, count: int, widest: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(b, size) True inside ``count`` random spans per row, each of width U{0..widest}, placed
    within the row's first ``lengths`` positions."""
    batch, device = lengths.shape[0], lengths.device
    draws = torch.rand(2, batch, count, generator=generator).to(device)
    width = torch.minimum((draws[0] * (widest + 1)).floor(), lengths[:, None].float())
    start = (draws[1] * (lengths[:, None].float() - width + 1)).floor()
    index = torch.arange(size, device=device).float()[None, None, :]
    inside = (index >= start[..., None]) & (index < (start + width)[..., None])  # (b, count, size)
    return inside.any(dim=1)


def spec_augment(features: torch.Tensor, mask: torch.Tensor, audio: AudioConfig,
                 generator: torch.Generator) -> torch.Tensor:
    """A copy of ``features`` (b, frames, n_mels) with SpecAugment's time and frequency masks;
    ``mask`` (b, frames) is True on real frames. Unchanged when both mask counts are 0."""
    if audio.time_masks == 0 and audio.freq_masks == 0:
        return features
    batch, frames, bands = features.shape
    real = mask[..., None].to(features.dtype)
    mean = (features * real).sum((1, 2)) / (real.sum((1, 2)) * bands).clamp(min=1)  # (b,)
    hidden = torch.zeros(batch, frames, bands, dtype=torch.bool, device=features.device)
    if audio.time_masks:
        hidden |= _spans(mask.sum(1), audio.time_masks, audio.time_mask_frames, frames, generator)[..., None]
    if audio.freq_masks:
        all_bands = torch.full((batch,), bands, device=features.device)
        hidden |= _spans(all_bands, audio.freq_masks, audio.freq_mask_bands, bands, generator)[:, None, :]
    return torch.where(hidden & mask[..., None], mean[:, None, None].to(features.dtype), features)


def augment_audio(batch: dict, audio: AudioConfig, generator: torch.Generator) -> dict:
    """``batch`` with its audio features SpecAugmented (a new dict; the input is not changed).
    Batches without log-mel features (no audio, or waveform input) are returned as they are."""
    if "audio" not in batch or "features" not in batch["audio"] or not (audio.time_masks or audio.freq_masks):
        return batch
    features = spec_augment(batch["audio"]["features"], batch["audio"]["mask"], audio, generator)
    return batch | {"audio": batch["audio"] | {"features": features}}


def change_speed(wave: torch.Tensor, factor: float, sample_rate: int) -> torch.Tensor:
    """``wave`` (n,) played ``factor`` times as fast: about n / factor samples, pitch times ``factor``."""
    if factor == 1.0:
        return wave
    return resample(wave, int(round(sample_rate * factor)), sample_rate)


def perturb_speed(samples: Iterator, front_end: AudioFrontEnd, factors: Sequence[float],
                  rng: random.Random) -> Iterator:
    """Decoded samples whose kept waveform (``sample.waveform``) is played at a speed drawn from
    ``factors``, clipped to ``audio.max_seconds`` and turned into what the encoder reads. The
    samples that come in are not changed (a cache may hold them): each one out is a copy."""
    config = front_end.config
    for sample in samples:
        if sample.waveform is not None:
            wave = change_speed(sample.waveform, rng.choice(factors), config.sample_rate)[: front_end.max_samples]
            sample = dataclasses.replace(sample, audio=front_end.encoder_input(wave), waveform=None)
        yield sample
