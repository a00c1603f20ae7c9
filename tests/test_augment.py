"""SpecAugment on a batch's log-mel features: where it masks, what it leaves alone, and which tasks see it."""

from __future__ import annotations

import torch

from opt.config import AudioConfig, load_config
from opt.data.augment import augment_audio, spec_augment
from opt.tasks.mixture import TaskMixture
from opt.tasks.base import TaskOutput
from tests.test_model import SMALL
from tests.test_tasks import small_setup  # noqa: F401  (the shared fixture)


def features_and_mask(lengths=(300, 120, 40), frames=300, bands=16):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(len(lengths), frames, bands, generator=generator) + 3.0
    mask = torch.arange(frames)[None, :] < torch.tensor(lengths)[:, None]
    return features * mask[..., None], mask


def test_no_masks_configured_leaves_the_batch_as_it_is():
    features, mask = features_and_mask()
    batch = {"audio": {"features": features, "mask": mask}}
    assert augment_audio(batch, AudioConfig(), torch.Generator()) is batch


def test_time_masks_hide_whole_frames_of_real_audio_only_up_to_the_widths():
    features, mask = features_and_mask()
    audio = AudioConfig(time_masks=2, time_mask_frames=10)
    out = spec_augment(features, mask, audio, torch.Generator().manual_seed(1))
    changed = (out != features)  # (b, frames, bands)
    frames_changed = changed.any(-1)
    assert torch.equal(changed.all(-1), frames_changed)  # a hidden frame is hidden in every band
    assert not (frames_changed & ~mask).any()  # padding is never touched
    assert (frames_changed.sum(1) <= 2 * 10).all()
    real = mask[..., None].float()
    mean = (features * real).sum((1, 2)) / (real.sum((1, 2)) * features.shape[-1])
    for row in range(len(features)):  # hidden values are the utterance's mean
        assert torch.allclose(out[row][frames_changed[row]], mean[row])
    again = spec_augment(features, mask, audio, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)  # the generator decides everything


def test_frequency_masks_hide_the_same_bands_in_every_real_frame():
    features, mask = features_and_mask()
    out = spec_augment(features, mask, AudioConfig(freq_masks=2, freq_mask_bands=4), torch.Generator().manual_seed(2))
    changed = out != features
    bands_changed = changed[:, 0, :]  # frame 0 is real in every row
    assert torch.equal(changed, bands_changed[:, None, :] & mask[..., None])
    assert (bands_changed.sum(1) <= 8).all() and bands_changed.any()


def test_over_many_draws_the_masked_share_follows_the_widths():
    features, mask = features_and_mask(lengths=(300,) * 64)
    out = spec_augment(features, mask, AudioConfig(time_masks=1, time_mask_frames=30), torch.Generator().manual_seed(3))
    hidden = (out != features).any(-1).sum(1).float()
    assert abs(hidden.mean().item() - 15.0) < 3.0  # a width uniform on 0..30 has mean 15


def test_every_task_but_masked_audio_modelling_reads_the_augmented_features(small_setup, monkeypatch):  # noqa: F811
    _, model, batch = small_setup
    config = load_config("configs/tiny.yaml", SMALL + ["tasks.mode=sum", "audio.time_masks=2", "audio.freq_masks=2"])
    mixture = TaskMixture(config, model).train()
    seen = {}

    def spy(name):
        def task(model, batch, generators, **options):
            seen[name] = batch["audio"]["features"]
            return TaskOutput(torch.zeros((), requires_grad=True))
        return task

    monkeypatch.setattr(mixture, "task", spy)
    mixture(model, batch)
    clean = batch["audio"]["features"]
    assert torch.equal(seen["mam"], clean)
    others = [features for name, features in seen.items() if name != "mam"]
    assert others and all(not torch.equal(features, clean) for features in others)
    assert all(features is others[0] for features in others)  # one augmentation per step, shared
    mixture.eval()
    seen.clear()
    mixture(model, batch)
    assert all(torch.equal(features, clean) for features in seen.values())  # evaluation is never augmented
