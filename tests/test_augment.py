"""Audio augmentations: SpecAugment (where it masks, what it leaves alone, which tasks see it) and speed
perturbation (tempo and pitch, drawn per reading in training, never in evaluation)."""

from __future__ import annotations

import pytest
import torch

from opt.config import AudioConfig, load_config
from opt.data.augment import augment_audio, change_speed, spec_augment
from opt.data.pipeline import BatchLoader
from opt.errors import ConfigError
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


def test_change_speed_scales_tempo_and_pitch_together():
    rate = 16000
    tone = torch.sin(2 * torch.pi * 440 * torch.arange(rate) / rate)  # one second of 440 Hz
    for factor in (0.9, 1.1):
        fast = change_speed(tone, factor, rate)
        assert abs(fast.numel() - rate / factor) <= 2
        spectrum = torch.fft.rfft(fast * torch.hann_window(fast.numel())).abs()
        peak_hz = spectrum.argmax().item() * rate / fast.numel()
        assert abs(peak_hz - 440 * factor) < 3, (factor, peak_hz)
    assert change_speed(tone, 1.0, rate) is tone


def _frames_by_key(loader, batches):
    frames = {}
    for batch, _ in zip(loader, range(batches)):
        for key, length in zip(batch["keys"], batch["audio"]["mask"].sum(1).tolist()):
            frames.setdefault(key, []).append(length)
    return frames


@pytest.fixture()
def one_thread():
    """Decode on one thread, as a loader worker does (two on a shared machine wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_speed_perturbation_in_training_reads_each_utterance_at_a_drawn_speed(world, one_thread):
    base = ["data.batch_size=8", "data.workers=0", "data.shuffle_buffer=0", "data.cache_decoded=true",
            "data.modalities=[audio]"]
    plain = load_config(None, base)
    perturbed = load_config(None, base + ["audio.speed_factors=[0.9,1.1]"])
    spec = f"{world}/train-000000.tar"
    reference = {key: lengths[0] for key, lengths in _frames_by_key(
        BatchLoader(spec, plain.data, plain.audio, None, train=False), 100).items()}
    # training reads the shard again and again: each reading of an utterance draws its speed anew
    seen = _frames_by_key(BatchLoader(spec, perturbed.data, perturbed.audio, None, train=True, seed=1), 25)
    ratios = [reference[key] / length for key, lengths in seen.items() for length in lengths]
    assert all(min(abs(r - 0.9), abs(r - 1.1)) < 0.02 for r in ratios), ratios  # frames scale by 1 / factor
    assert 0.3 < sum(r > 1 for r in ratios) / len(ratios) < 0.7  # both speeds, about equally often
    assert any(len(set(lengths)) == 2 for lengths in seen.values())  # one utterance, two speeds: a fresh draw
    # evaluation never perturbs
    evaluated = _frames_by_key(BatchLoader(spec, perturbed.data, perturbed.audio, None, train=False), 100)
    assert {key: lengths[0] for key, lengths in evaluated.items()} == reference


def test_speed_factors_out_of_range_are_a_config_error():
    with pytest.raises(ConfigError, match="audio.speed_factors"):
        load_config(None, ["audio.speed_factors=[0.9,3.0]"])
