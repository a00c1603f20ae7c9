"""SpecAugment (Park et al., 2019) on a batch's log-mel features, for training.

Each utterance gets ``audio.time_masks`` spans of up to ``audio.time_mask_frames`` frames and
``audio.freq_masks`` bands of up to ``audio.freq_mask_bands`` mel bins set to that utterance's
mean feature value (0 after the front end's per-band mean normalisation), each width drawn
uniformly from 0 to the maximum and placed uniformly within the utterance's real frames, so
padding is never chosen and a short utterance is not masked whole. It runs on the batch's
device, draws from the generator it is given (the task mixture's per-process one, which
checkpoints restore: a resumed run masks what an uninterrupted one would) and reads nothing
back from the device.
"""

from __future__ import annotations

import torch

from opt.config import AudioConfig


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
