"""Audio front end: decoding, truncation and rate checks, down-mixing, bounded resampling,
log-mel, clip and pad."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF

from opt.config import AudioConfig, AudioInput
from opt.data.audio import (MAX_RATE, MAX_RATIO_TERM, MIN_RATE, AudioDecodeError, AudioFrontEnd, AudioRateError,
                            AudioTruncatedError, decode_audio, pad_frames, pad_waveforms, resample, resample_ratio)
from opt.data.batch import Collator
from opt.data.samples import DecodedSample


def encode(wave: np.ndarray, rate: int, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, wave, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def tone(freq: float, seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("fmt,subtype", [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("OGG", "VORBIS")])
def test_decodes_wav_flac_and_ogg(fmt, subtype):
    decoded = decode_audio(encode(tone(440, 0.5, 16000), 16000, fmt, subtype))
    channels, rate = decoded.channels, decoded.rate
    assert rate == 16000 and decoded.truncated is False and channels.shape[0] == 1
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


COMMON_RATES = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000, 96000)
ODD_RATES = (16001, 44101, 47999, 96001, 191999)


@pytest.mark.parametrize("target", [16000, 22050, 48000])
def test_common_rates_resample_exactly_as_torchaudio_does(target):
    for rate in COMMON_RATES:
        wave = torch.from_numpy(tone(440, 0.25, rate)) + 0.01 * torch.randn(rate // 4, generator=torch.manual_seed(0))
        assert torch.equal(resample(wave, rate, target), AF.resample(wave, rate, target)), rate


def test_resampling_ratio_terms_are_bounded_and_its_speed_error_tiny():
    rates = [*range(MIN_RATE, MAX_RATE + 1, 997), *ODD_RATES, 15993, 160063]
    for rate in rates:
        p, q = resample_ratio(rate, 16000)
        assert max(p, q) <= MAX_RATIO_TERM
        assert abs(p / q / (rate / 16000) - 1) < 4e-4, rate  # below 1 / MAX_RATIO_TERM (0.7 cent)
    assert resample_ratio(16001, 16000) == (1, 1) and resample_ratio(44100, 16000) == (441, 160)
    assert resample_ratio(44101, 16000) == (1199, 435)  # 2.7563 vs 2.7563125: 1.6e-6 apart


def test_odd_rates_keep_their_pitch_and_length():
    for rate in ODD_RATES:
        wave = AudioFrontEnd(AudioConfig(max_seconds=30.0)).waveform(encode(tone(1000, 2.0, rate), rate)).samples
        assert abs(wave.numel() - 32000) <= 32000 / MAX_RATIO_TERM, rate
        spectrum = np.abs(np.fft.rfft(wave[:32000].numpy()))
        assert np.argmax(spectrum) / 2.0 == pytest.approx(1000, abs=1), rate  # 0.5 Hz bins over two seconds


MEASURE = """
import json, resource, time, torch
from opt.data.audio import resample
torch.set_num_threads(2)
resample(torch.randn(44100), 44100, 16000)  # warm up
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
clips = {rate: torch.randn(10 * rate, generator=torch.manual_seed(0)) for rate in RATES}
inputs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
seconds = {}
for rate, clip in clips.items():
    start = time.perf_counter()
    resample(clip, rate, 16000)
    seconds[rate] = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "extra_mb": (peak - inputs) / 1024, "inputs_mb": (inputs - base) / 1024}))
"""


def test_any_rate_resamples_a_10_s_clip_in_under_a_second_and_200_mb():
    """Measured in a fresh process, so that the peak resident memory is this work's own;
    15,993 Hz (1279 / 1280) has the largest kernel of any rate to 16 kHz."""
    rates = (*ODD_RATES, 15993)
    script = MEASURE.replace("RATES", repr(rates))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    measured = json.loads(done.stdout)
    assert max(measured["seconds"].values()) < 1.0, measured
    assert measured["extra_mb"] < 200, measured


def test_rates_outside_4_to_192_khz_are_refused():
    for rate in (3999, 192001):
        with pytest.raises(AudioRateError) as error:
            decode_audio(encode(tone(440, 0.1, rate), rate))
        assert error.value.reason == "audio_rate_out_of_range"
    assert decode_audio(encode(tone(440, 0.1, MAX_RATE), MAX_RATE)).rate == MAX_RATE


def cut(payload: bytes, fraction: float) -> bytes:
    return payload[: int(len(payload) * fraction)]


def test_wav_cut_short_is_flagged_and_decodes_to_what_is_present():
    whole = encode(tone(440, 1.0, 16000), 16000)
    assert decode_audio(whole).truncated is False
    decoded = decode_audio(cut(whole, 0.5))
    assert decoded.truncated is True
    assert decoded.channels.shape[1] == (len(whole) // 2 - 44) // 2  # the 16-bit frames after the 44-byte header
    with pytest.raises(AudioTruncatedError) as error:
        AudioFrontEnd(AudioConfig()).waveform(cut(whole, 0.5))
    assert error.value.reason == "audio_truncated"


def test_wav_with_a_streaming_writers_open_size_is_whole():
    whole = bytearray(encode(tone(440, 0.5, 16000), 16000))
    data = whole.index(b"data")
    whole[data + 4:data + 8] = b"\xff\xff\xff\xff"  # "until the end of the file"
    decoded = decode_audio(bytes(whole))
    assert decoded.truncated is False and decoded.channels.shape[1] == 8000


@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.9, 0.999])
def test_ogg_cut_short_is_flagged_or_refused_as_truncated(fraction):
    noise = np.random.default_rng(0).standard_normal(3 * 22050).astype(np.float32) * 0.05
    whole = encode(tone(300, 3.0, 22050) + noise, 22050, "OGG", "VORBIS")
    assert decode_audio(whole).truncated is False
    try:
        decoded = decode_audio(cut(whole, fraction))
    except AudioTruncatedError:
        return  # cut inside the headers: nothing to decode
    assert decoded.truncated is True and decoded.channels.shape[1] < 3 * 22050


def test_flac_cut_short_is_corrupt():
    with pytest.raises(AudioDecodeError) as error:
        decode_audio(cut(encode(tone(440, 1.0, 16000), 16000, "FLAC"), 0.5))
    assert error.value.reason == "audio_corrupt"


def test_waveform_input_is_the_clip_at_zero_mean_and_unit_variance_or_as_it_is():
    samples = torch.from_numpy(tone(300, 0.5, 16000)) * 0.1 + 0.02
    normalised = AudioFrontEnd(AudioConfig(input=AudioInput.waveform)).encoder_input(samples)
    assert normalised.shape == (8000,)
    assert float(normalised.mean()) == pytest.approx(0, abs=1e-6)
    assert float(normalised.var(correction=0)) == pytest.approx(1, abs=1e-4)
    # 1e-7 is added to the variance (as transformers does), 4e-5 of this clip's
    torch.testing.assert_close(normalised, (samples - samples.mean()) / samples.std(correction=0), rtol=1e-4, atol=1e-5)
    raw = AudioFrontEnd(AudioConfig(input=AudioInput.waveform, normalize_waveform=False)).encoder_input(samples)
    assert torch.equal(raw, samples)
    silence = AudioFrontEnd(AudioConfig(input=AudioInput.waveform)).encoder_input(torch.zeros(800))
    assert torch.equal(silence, torch.zeros(800))


def test_waveforms_are_zero_padded_and_a_batch_without_audio_keeps_the_configured_layout():
    waveform, mask = pad_waveforms([torch.ones(3), None, torch.full((5,), 2.0)])
    assert waveform.tolist() == [[1, 1, 1, 0, 0], [0] * 5, [2] * 5]
    assert mask.tolist() == [[True] * 3 + [False] * 2, [False] * 5, [True] * 5]
    samples = [DecodedSample("a", "u", audio=torch.ones(400)), DecodedSample("b", "u")]
    assert set(Collator(["audio"], 0, 64)(samples)["audio"]) == {"waveform", "mask", "present"}  # by rank
    silent = [DecodedSample("a", "u"), DecodedSample("b", "u")]
    audio = Collator(["audio"], 0, 64, audio_input=AudioInput.waveform)(silent)["audio"]
    assert audio["waveform"].shape == audio["mask"].shape == (2, 1) and not audio["present"].any()
    assert Collator(["audio"], 0, 64)(silent)["audio"]["features"].shape == (2, 1, 64)
