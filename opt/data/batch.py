"""Batches: the collator that stacks decoded samples into the batch dict, and the
helpers every consumer of batches shares (moving to a device, taking rows).

A batch is a dict keyed by modality::

    {"keys": [str] * b, "captions": [str | None] * b, "meta": [dict] * b,
     "text":  {"ids": (b, t) long, "mask": (b, t) bool, "present": (b,) bool},
     "image": {"pixels": (b, 3, H, W) float in [0, 1], "present": (b,) bool},
     "audio": {"features": (b, f, n_mels) float, "mask": (b, f) bool, "present": (b,) bool}}

With ``audio.input=waveform`` the audio entry holds zero-padded samples at ``audio.sample_rate``
instead: ``{"waveform": (b, n) float, "mask": (b, n) bool, "present": (b,) bool}``.

Masks are True on real positions. A disabled modality has no entry; an absent
one in a sample has ``present`` False and all-padding rows. Training,
evaluation and prompts (``opt generate``) all build their batches here.
"""

from __future__ import annotations

from typing import Any

import torch

from opt.config import AudioInput
from opt.data.audio import pad_frames, pad_waveforms
from opt.data.samples import DecodedSample


class Collator:
    """Stacks :class:`DecodedSample` lists into the batch dict described above.

    ``audio_input`` says whether the samples' audio is log-mel features or the waveform; left
    None, the samples' audio says it by its rank (``(frames, n_mels)`` or ``(n,)``), and a batch
    without any audio gets the log-mel layout.
    """

    def __init__(self, modalities: list[str], pad_id: int, n_mels: int, *,
                 audio_input: AudioInput | None = None) -> None:
        self.modalities = modalities
        self.pad_id = pad_id
        self.n_mels = n_mels
        self.audio_input = audio_input

    def __call__(self, samples: list[DecodedSample]) -> dict:
        batch: dict = {
            "keys": [s.key for s in samples],
            "captions": [s.caption for s in samples],
            "meta": [s.meta for s in samples],
        }
        if "text" in self.modalities:
            longest = max((len(s.text) for s in samples if s.text is not None), default=1)
            ids = torch.full((len(samples), longest), self.pad_id, dtype=torch.long)
            for row, s in enumerate(samples):
                if s.text is not None:
                    ids[row, : len(s.text)] = torch.tensor(s.text)
            present = torch.tensor([s.text is not None for s in samples])
            lengths = torch.tensor([len(s.text) if s.text is not None else 0 for s in samples])
            mask = torch.arange(longest)[None, :] < lengths[:, None]
            batch["text"] = {"ids": ids, "mask": mask, "present": present}
        if "image" in self.modalities:
            reference = next((s.image for s in samples if s.image is not None), None)
            shape = reference.shape if reference is not None else (3, 1, 1)
            pixels = torch.stack([s.image if s.image is not None else torch.zeros(shape) for s in samples])
            batch["image"] = {"pixels": pixels, "present": torch.tensor([s.image is not None for s in samples])}
        if "audio" in self.modalities:
            batch["audio"] = self._audio([s.audio for s in samples])
        return batch

    def _audio(self, clips: list[torch.Tensor | None]) -> dict:
        present = torch.tensor([clip is not None for clip in clips])
        if self._reads_waveform(clips):
            waveform, mask = pad_waveforms(clips)
            return {"waveform": waveform, "mask": mask, "present": present}
        features, mask = pad_frames(clips, self.n_mels)
        return {"features": features, "mask": mask, "present": present}

    def _reads_waveform(self, clips: list[torch.Tensor | None]) -> bool:
        if self.audio_input is not None:
            return self.audio_input == AudioInput.waveform
        return any(clip is not None and clip.ndim == 1 for clip in clips)


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors of a (nested) batch dict moved to ``device``; everything else as it is. The copies
    are asynchronous (``non_blocking``): from pinned host memory (the training loader pins on
    CUDA) they overlap the step; torch orders them before any use on the device."""
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value.to(device, non_blocking=True) if torch.is_tensor(value) else value


def batch_rows(value: Any, index: list[int]) -> Any:
    """Rows ``index`` of a (nested) batch dict of tensors and lists."""
    if isinstance(value, dict):
        return {k: batch_rows(v, index) for k, v in value.items()}
    if torch.is_tensor(value):
        return value[torch.tensor(index, dtype=torch.long, device=value.device)]
    return [value[i] for i in index]
