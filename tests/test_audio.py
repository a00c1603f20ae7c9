"""Audio front end: decoding, down-mixing, resampling, log-mel, clip and pad."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
import torch

from opt.config import AudioConfig
from opt.data.audio import AudioDecodeError, AudioFrontEnd, decode_audio, pad_frames


def encode(wave: np.ndarray, rate: int, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, wave, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def tone(freq: float, seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("fmt,subtype", [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("OGG", "VORBIS")])
def test_decodes_wav_flac_and_ogg(fmt, subtype):
    channels, rate = decode_audio(encode(tone(440, 0.5, 16000), 16000, fmt, subtype))
    assert rate == 16000 and channels.shape[0] == 1
    assert abs(channels.shape[1] - 8000) <= 1200  # vorbis may pad a little
    assert np.abs(channels).max() == pytest.approx(0.5, abs=0.05)


def test_stereo_is_down_mixed_to_the_channel_mean():
    left, right = tone(440, 0.5, 16000), tone(660, 0.5, 16000)
    wave = AudioFrontEnd(AudioConfig()).waveform(encode(np.stack([left, right], axis=1), 16000, subtype="FLOAT"))
    assert "audio_downmixed" in wave.repairs
    np.testing.assert_allclose(wave.samples.numpy(), (left + right) / 2, atol=1e-6)


def test_other_rates_are_resampled_to_16k_and_keep_their_pitch():
    wave = AudioFrontEnd(AudioConfig()).waveform(encode(tone(1000, 1.0, 44100), 44100))
    assert "audio_resampled" in wave.repairs
    assert wave.samples.numel() == 16000
    spectrum = np.abs(np.fft.rfft(wave.samples.numpy()))
    assert np.argmax(spectrum) == pytest.approx(1000, abs=2)  # 1 Hz bins over one second


def test_long_audio_is_clipped_and_features_have_the_configured_shape():
    config = AudioConfig(max_seconds=1.0, n_mels=40)
    front = AudioFrontEnd(config)
    wave = front.waveform(encode(tone(300, 2.5, 16000), 16000))
    assert "audio_clipped" in wave.repairs and wave.samples.numel() == 16000
    features = front.features(wave.samples)
    assert features.shape == (front.max_frames, 40) == (101, 40)
    assert torch.isfinite(features).all() and -1.5 < features.min() and features.max() < 2.0


def test_log_mel_puts_a_tone_in_the_right_band():
    front = AudioFrontEnd(AudioConfig())
    low = front.features(torch.from_numpy(tone(200, 0.5, 16000))).mean(0)
    high = front.features(torch.from_numpy(tone(4000, 0.5, 16000))).mean(0)
    assert low.argmax() < high.argmax()


def test_padding_masks_only_real_frames():
    batch, mask = pad_frames([torch.ones(3, 4), None, torch.ones(5, 4)], 4)
    assert batch.shape == (3, 5, 4)
    assert mask.tolist() == [[True] * 3 + [False] * 2, [False] * 5, [True] * 5]
    assert batch[0, 3:].abs().sum() == 0


def test_garbage_bytes_raise_a_decode_error():
    with pytest.raises(AudioDecodeError):
        decode_audio(b"RIFF\x00\x00garbage")


def test_mean_normalized_features_have_zero_mean_per_band():
    front = AudioFrontEnd(AudioConfig())
    samples = torch.sin(torch.linspace(0, 2000, 16000)) * torch.linspace(0.1, 1.0, 16000)
    features = front.features(samples)
    assert features.mean(dim=0).abs().max() < 1e-5
    raw = AudioFrontEnd(AudioConfig(mean_normalize=False)).features(samples)
    torch.testing.assert_close(features, raw - raw.mean(dim=0, keepdim=True))
