"""The data pipeline: batch layout, shard specs, and every bad-input case."""

from __future__ import annotations

import io
import tarfile
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from opt.config import load_config
from opt.data.pipeline import BatchLoader
from opt.data.shards import ShardWriter, resolve_shards
from opt.errors import DataError, UserError


def world_samples(world, count):
    grouped = {}
    with tarfile.open(next(world.glob("train-*.tar"))) as tar:
        for member in tar:
            key, _, extension = member.name.partition(".")
            grouped.setdefault(key, {})[extension] = tar.extractfile(member).read()
            if len(grouped) > count:
                break
    return [grouped[k] for k in list(grouped)[:count]]


def wav(seconds=1.0, rate=16000, channels=1):
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * 300 * t)
    buffer = io.BytesIO()
    sf.write(buffer, np.stack([wave] * channels, axis=1), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def png(width, height, mode="RGB"):
    buffer = io.BytesIO()
    Image.new(mode, (width, height), 128).save(buffer, format="PNG")
    return buffer.getvalue()


# key -> (how the good sample is changed, expected skip reason or repair)
def bad_cases(good):
    return {
        "corrupt_image": ({"png": b"\x89PNG\r\n\x1a\nnot really"}, ("skip", "image_corrupt")),
        "truncated_image": ({"png": good["png"][: len(good["png"]) // 2]}, ("skip", "image_corrupt")),
        "empty_member": ({"wav": b""}, ("skip", "audio_empty")),
        "empty_caption": ({"txt": b"   \n"}, ("skip", "text_empty")),
        "non_utf8_caption": ({"txt": b"\xff\xfe caption"}, ("skip", "text_not_utf8")),
        "long_caption": ({"txt": ("a red circle " * 800).encode()[:10_000]}, ("repair", "text_truncated")),
        "missing_member": ({"wav": None}, ("repair", "missing_audio")),
        "rate_44k": ({"wav": wav(rate=44100)}, ("repair", "audio_resampled")),
        "stereo": ({"wav": wav(channels=2)}, ("repair", "audio_downmixed")),
        "huge_image": ({"png": png(1200, 1200)}, ("skip", "image_too_large")),
        "grey_odd_size_image": ({"png": png(96, 128, "L")}, ("repair", "image_resized")),
        "corrupt_audio": ({"wav": b"RIFF\x24\x00\x00\x00WAVEfmt garbage"}, ("skip", "audio_corrupt")),
        "too_short_audio": ({"wav": wav(seconds=0.01)}, ("skip", "audio_too_short")),
        "bad_json": ({"json": b"{not json"}, ("repair", "meta_unreadable")),
    }


@pytest.fixture(scope="module")
def bad_shard(world, tmp_path_factory):
    goods = world_samples(world, 3)
    path = tmp_path_factory.mktemp("bad") / "bad-000000.tar"
    with ShardWriter(path) as shard:
        for i, good in enumerate(goods):
            shard.write(f"good{i}", good)
        for key, (change, _) in bad_cases(goods[0]).items():
            members = {k: v for k, v in ({**goods[0], **change}).items() if v is not None}
            shard.write(key, members)
    return path


def bad_config(**overrides):
    items = {"data.batch_size": 4, "data.workers": 0, "data.max_image_pixels": 1_000_000,
             "data.max_text_tokens": 24} | overrides
    return load_config(None, [f"{k}={v}" for k, v in items.items()])


def bad_loader(spec: str, tokenizer, *, train: bool = False, **overrides) -> BatchLoader:
    config = bad_config(**overrides)
    return BatchLoader(spec, config.data, config.audio, tokenizer, train=train, seed=config.train.seed)


def collect(loader):
    batches = list(loader)
    keys = [k for b in batches for k in b["keys"]]
    return batches, keys


def test_batches_have_the_documented_layout(world, tokenizer, config):
    loader = BatchLoader(f"{world}/val-*.tar", config.data, config.audio, tokenizer, train=False)
    batches, keys = collect(loader)
    assert len(keys) == 24 and len(set(keys)) == 24
    batch = batches[0]
    b = len(batch["keys"])
    ids, mask = batch["text"]["ids"], batch["text"]["mask"]
    assert ids.shape == mask.shape and ids.shape[0] == b
    assert (ids[~mask] == tokenizer.pad_id).all() and (ids[:, 0] == tokenizer.bos_id).all()
    assert batch["image"]["pixels"].shape == (b, 3, 64, 64)
    assert 0.0 <= batch["image"]["pixels"].min() and batch["image"]["pixels"].max() <= 1.0
    features, audio_mask = batch["audio"]["features"], batch["audio"]["mask"]
    assert features.shape[:2] == audio_mask.shape and features.shape[2] == config.audio.n_mels
    assert (audio_mask.sum(1) > 100).all()  # > 1 s of speech each
    assert all(batch[m]["present"].all() for m in ("text", "image", "audio"))
    assert batch["captions"][0] and batch["meta"][0]["objects"]
    assert loader.stats.samples == 24 and not loader.stats.skipped


def test_disabled_modality_is_absent_from_batches(world, tokenizer):
    config = load_config(None, ["data.modalities=[text,image]", "data.workers=0", "data.batch_size=8"])
    batch = next(iter(BatchLoader(f"{world}/val-*.tar", config.data, config.audio, tokenizer, train=False)))
    assert "audio" not in batch and "image" in batch and "text" in batch


def test_training_mode_resamples_forever_with_full_shuffled_batches(world, tokenizer):
    config = load_config(None, ["data.batch_size=16", "data.workers=2", "data.shuffle_buffer=64"])
    loader = BatchLoader(f"{world}/val-*.tar", config.data, config.audio, tokenizer, train=True, seed=config.train.seed)
    seen = []
    for step, batch in enumerate(loader):
        assert len(batch["keys"]) == 16
        seen.extend(batch["keys"])
        if step == 5:
            break
    assert len(seen) == 96 > 24  # more than the 24 samples in the split: it loops
    assert seen[:24] != sorted(seen[:24])


def test_workers_reading_one_shard_shuffle_it_differently(world, tokenizer):
    """The val split is one shard: both workers resample it; a shared shuffle seed gave every batch twice."""
    config = load_config(None, ["data.batch_size=8", "data.workers=2", "data.shuffle_buffer=16"])
    assert len(resolve_shards(f"{world}/val-*.tar")) == 1
    loader = BatchLoader(f"{world}/val-*.tar", config.data, config.audio, tokenizer, train=True, seed=0)
    batches = []
    for batch in loader:  # the DataLoader takes batches from the workers in turn
        batches.append(batch["keys"])
        if len(batches) == 4:
            break
    assert batches[0] != batches[1] and batches[2] != batches[3]


def test_every_bad_input_is_skipped_or_repaired_and_counted(bad_shard, tokenizer):
    cases = bad_cases({"png": b"", "wav": b""})
    loader = bad_loader(str(bad_shard), tokenizer)
    batches, keys = collect(loader)
    expected_kept = {"good0", "good1", "good2"} | {k for k, (_, (kind, _)) in cases.items() if kind == "repair"}
    assert set(keys) == expected_kept
    skips = Counter(reason for _, (kind, reason) in cases.values() if kind == "skip")
    assert loader.stats.skipped == skips
    for _, (kind, reason) in cases.values():
        if kind == "repair":
            assert loader.stats.repaired[reason] >= 1, reason
    by_key = {k: (b, i) for b in batches for i, k in enumerate(b["keys"])}
    batch, row = by_key["missing_member"]
    assert not batch["audio"]["present"][row] and not batch["audio"]["mask"][row].any()
    batch, row = by_key["long_caption"]
    assert batch["text"]["mask"][row].sum() == 24 and len(batch["captions"][row]) == 1000
    batch, row = by_key["grey_odd_size_image"]
    assert batch["image"]["pixels"][row].shape == (3, 64, 64)
    assert "skipped" in loader.stats.summary()


def test_counts_are_summed_across_worker_processes(bad_shard, tokenizer, tmp_path):
    for name in ("bad-000000.tar", "bad-000001.tar"):
        (tmp_path / name).write_bytes(bad_shard.read_bytes())
    one = bad_loader(str(bad_shard), tokenizer)
    collect(one)
    two = bad_loader(f"{tmp_path}/bad-*.tar", tokenizer, **{"data.workers": 2})
    _, keys = collect(two)
    assert two.workers == 2
    assert len(keys) == 2 * one.stats.samples
    assert two.stats.skipped == one.stats.skipped + one.stats.skipped


def test_decoded_sample_cache_gives_the_same_stream_and_each_skip_is_counted_once(bad_shard, tokenizer,
                                                                                       monkeypatch):
    from opt.data.samples import SampleDecoder

    calls = Counter()
    decode = SampleDecoder.__call__

    def counting(self, raw):
        calls[raw["__key__"]] += 1
        return decode(self, raw)

    monkeypatch.setattr(SampleDecoder, "__call__", counting)
    runs = {}
    for cached in (False, True):
        calls.clear()
        loader = bad_loader(str(bad_shard), tokenizer, train=True, **{"data.cache_decoded": cached})
        batches = [batch for _, batch in zip(range(12), loader)]  # several passes over the shard
        runs[cached] = (batches, loader.stats, dict(calls))
    (plain, plain_stats, plain_calls), (cached, cached_stats, cached_calls) = runs[False], runs[True]
    assert [b["keys"] for b in plain] == [b["keys"] for b in cached]
    for a, b in zip(plain, cached):
        assert torch.equal(a["image"]["pixels"], b["image"]["pixels"])
        assert torch.equal(a["audio"]["features"], b["audio"]["features"])
    skips_per_pass = sum(kind == "skip" for _, (kind, _) in bad_cases({"png": b"", "wav": b""}).values())
    # each bad sample counted once, though the stream met it on every pass
    assert plain_stats.skipped == cached_stats.skipped and sum(plain_stats.skipped.values()) == skips_per_pass
    assert max(plain_calls.values()) > 1 and set(cached_calls.values()) == {1}


def test_required_modality_missing_is_a_skip(bad_shard, tokenizer):
    loader = bad_loader(str(bad_shard), tokenizer, **{"data.require": "[audio]"})
    _, keys = collect(loader)
    assert "missing_member" not in keys and loader.stats.skipped["missing_audio"] == 1


def test_strict_mode_names_the_shard_and_key(bad_shard, tokenizer):
    loader = bad_loader(str(bad_shard), tokenizer, **{"data.strict": True})
    with pytest.raises(DataError, match=r"bad-000000\.tar: sample corrupt_image: image_corrupt"):
        collect(loader)


def test_strict_mode_error_from_a_worker_is_one_line(bad_shard, tokenizer):
    config = bad_config(**{"data.strict": True, "data.workers": 1})
    with pytest.raises(DataError) as error:
        collect(BatchLoader(str(bad_shard), config.data, config.audio, tokenizer, train=False))
    assert "\n" not in str(error.value) and "corrupt_image" in str(error.value)


def test_truncated_and_empty_shards_are_counted_not_fatal(world, tokenizer, tmp_path):
    shard = next(world.glob("val-*.tar")).read_bytes()
    (tmp_path / "a-000000.tar").write_bytes(shard[: len(shard) // 2 + 100])
    (tmp_path / "a-000001.tar").write_bytes(b"")
    (tmp_path / "a-000002.tar").write_bytes(shard)
    loader = bad_loader(str(tmp_path), tokenizer)
    _, keys = collect(loader)
    assert len(keys) >= 24 + 5  # the intact shard plus what preceded the cut
    assert loader.stats.skipped["shard_unreadable"] >= 1


def test_shard_specs_accept_directories_globs_and_braces(world):
    by_dir = resolve_shards(str(world))
    assert len(by_dir) == 7  # train x3, val, test, test_novel, test_unseen
    assert resolve_shards(f"{world}/train-*.tar") == [str(p) for p in sorted(world.glob("train-*.tar"))]
    assert resolve_shards(f"{world}/train-{{000000..000002}}.tar") == resolve_shards(f"{world}/train-*.tar")
    with pytest.raises(UserError, match="shard not found"):
        resolve_shards(f"{world}/train-{{000000..000009}}.tar")
    with pytest.raises(UserError, match="no shards match"):
        resolve_shards(f"{world}/nothing-*.tar")
    with pytest.raises(UserError, match="no such shard"):
        resolve_shards(f"{world}/missing.tar")


def test_a_member_carrying_another_samples_key_is_a_counted_duplicate(world, tokenizer, tmp_path):
    goods = world_samples(world, 4)
    path = tmp_path / "dup-000000.tar"
    with tarfile.open(path, "w") as tar:
        members = [(f"s{i}", extension, data) for i, good in enumerate(goods) for extension, data in good.items()]
        members.append(("s1", "txt", b"a stray caption filed under the second sample's key"))
        for key, extension, data in members:
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    loader = bad_loader(str(path), tokenizer)
    _, keys = collect(loader)
    assert sorted(keys) == ["s0", "s1", "s2", "s3"]  # not five samples with s1 twice
    assert loader.stats.skipped == {"duplicate_key": 1}
