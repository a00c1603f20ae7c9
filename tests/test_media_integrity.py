"""Media cut short or damaged, and audio at any rate, in the training pipeline's sample decoder
and the converters' readers: every case is a counted skip (a raise in strict mode), never a
padded image or a silently shortened recording."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image, ImageFile

from opt.config import load_config
from opt.data.convert import convert_manifest
from opt.data.convert.media import Skip, read_image, read_speech
from opt.data.pipeline import BatchLoader
from opt.data.samples import SampleDecoder, SkipSample
from opt.data.shards import ShardWriter
from opt.errors import DataError


def image_bytes(fmt: str) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, format=fmt)
    return encoded.getvalue()


def audio_bytes(fmt: str, rate: int = 22050, seconds: float = 2.0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    noise = 0.05 * np.random.default_rng(0).standard_normal(len(t))
    encoded = io.BytesIO()
    subtype = "VORBIS" if fmt == "OGG" else "PCM_16"
    sf.write(encoded, (0.3 * np.sin(2 * np.pi * 300 * t) + noise).astype(np.float32), rate, format=fmt,
             subtype=subtype)
    return encoded.getvalue()


def cut(payload: bytes, fraction: float) -> bytes:
    return payload[: int(len(payload) * fraction)]


def decoder(*modalities: str) -> SampleDecoder:
    config = load_config(None, [f"data.modalities=[{','.join(modalities)}]", "data.image_size=32"])
    return SampleDecoder(config.data, config.audio, tokenizer=None)


def skip_reason(decode: SampleDecoder, member: str, payload: bytes) -> str | None:
    try:
        decode({"__key__": "k", member: payload})
    except SkipSample as skip:
        return skip.reason
    return None


@pytest.mark.parametrize("fmt,member", [("JPEG", "jpg"), ("PNG", "png")])
def test_images_cut_short_are_corrupt_for_the_pipeline_and_the_converter(fmt, member, tmp_path):
    whole = image_bytes(fmt)
    assert skip_reason(decoder("image"), member, whole) is None
    for fraction in (0.3, 0.6, 0.95):
        assert skip_reason(decoder("image"), member, cut(whole, fraction)) == "image_corrupt"
        path = tmp_path / f"cut.{member}"
        path.write_bytes(cut(whole, fraction))
        with pytest.raises(Skip) as skip:
            read_image(path)
        assert skip.value.reason == "image_corrupt" and "truncated" in skip.value.detail


def test_truncated_image_loading_switched_on_elsewhere_is_switched_off(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some libraries do on import
    with pytest.warns(RuntimeWarning, match="LOAD_TRUNCATED_IMAGES"):
        reason = skip_reason(decoder("image"), "jpg", cut(image_bytes("JPEG"), 0.6))
    assert reason == "image_corrupt" and ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("fmt,member", [("WAV", "wav"), ("OGG", "ogg")])
def test_audio_cut_short_is_a_truncated_skip_for_the_pipeline_and_the_converter(fmt, member, tmp_path):
    whole = audio_bytes(fmt)
    assert skip_reason(decoder("audio"), member, whole) is None
    path = tmp_path / f"cut.{member}"
    for fraction in (0.1, 0.5, 0.9):
        assert skip_reason(decoder("audio"), member, cut(whole, fraction)) == "audio_truncated"
        path.write_bytes(cut(whole, fraction))
        try:
            speech = read_speech(path)
        except Skip as skip:
            assert skip.reason == "audio_truncated"  # nothing present to keep
        else:
            assert speech.truncated is True and 0 < len(speech.wave) < 2 * 16000
    path.write_bytes(whole)
    assert read_speech(path).truncated is False


@pytest.mark.parametrize("rate", [3000, 200_000])
def test_audio_at_a_rate_outside_4_to_192_khz_is_a_counted_skip(rate, tmp_path):
    payload = audio_bytes("WAV", rate=rate, seconds=0.5)
    assert skip_reason(decoder("audio"), "wav", payload) == "audio_rate_out_of_range"
    (tmp_path / "odd.wav").write_bytes(payload)
    with pytest.raises(Skip) as skip:
        read_speech(tmp_path / "odd.wav")
    assert skip.value.reason == "audio_rate_out_of_range" and f"{rate} Hz" in skip.value.detail


def test_odd_rate_audio_is_read_at_16_khz(tmp_path):
    (tmp_path / "odd.wav").write_bytes(audio_bytes("WAV", rate=44101, seconds=2.0))
    speech = read_speech(tmp_path / "odd.wav")
    assert abs(len(speech.wave) - 32000) <= 1 and speech.seconds == pytest.approx(2.0, abs=1e-4)


def shard_loader(path: Path, strict: bool) -> BatchLoader:
    config = load_config(None, ["data.modalities=[audio]", "data.workers=0", "data.batch_size=4",
                                f"data.strict={str(strict).lower()}"])
    return BatchLoader(str(path), config.data, config.audio, None, train=False)


def test_truncated_audio_in_a_shard_is_counted_or_raises_in_strict_mode(tmp_path):
    path = tmp_path / "cut-000000.tar"
    whole = audio_bytes("WAV")
    with ShardWriter(path) as shard:
        shard.write("whole", {"wav": whole})
        shard.write("cut", {"wav": cut(whole, 0.5)})
    loader = shard_loader(path, strict=False)
    assert [key for batch in loader for key in batch["keys"]] == ["whole"]
    assert loader.stats.skipped == {"audio_truncated": 1}
    with pytest.raises(DataError, match="audio_truncated"):
        list(shard_loader(path, strict=True))


def test_manifest_skips_truncated_and_out_of_range_media_and_reads_odd_rates(tmp_path):
    (tmp_path / "odd.wav").write_bytes(audio_bytes("WAV", rate=44101, seconds=1.0))
    (tmp_path / "cut.wav").write_bytes(cut(audio_bytes("WAV", rate=16000, seconds=2.0), 0.5))
    (tmp_path / "slow.wav").write_bytes(audio_bytes("WAV", rate=2000, seconds=0.5))
    (tmp_path / "whole.jpg").write_bytes(image_bytes("JPEG"))
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "whole.jpg").read_bytes()[:-300])
    rows = [{"audio": "odd.wav", "text": "an odd rate"}, {"audio": "cut.wav", "text": "a recording cut short"},
            {"audio": "slow.wav", "text": "too slow a rate"}, {"image": "cut.jpg", "text": "an image cut short"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = convert_manifest(tmp_path / "m.jsonl", out=tmp_path / "out", progress=False)
    assert summary["samples_out"] == 1
    assert summary["skipped"] == {"audio_rate_out_of_range": 1, "audio_truncated": 1, "image_corrupt": 1}
    details = {r["reason"]: r["detail"] for r in summary["skipped_rows"]}
    assert details["audio_rate_out_of_range"] == "slow.wav: 2000 Hz is outside 4000-192000 Hz"
    assert details["audio_truncated"] == "cut.wav: 1.0 s of a recording cut short"
    assert "image file is truncated" in details["image_corrupt"]
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as shard:
        speech, rate = sf.read(shard.extractfile("train_000000000.flac"))
    assert rate == 16000 and abs(len(speech) - 16000) <= 1
