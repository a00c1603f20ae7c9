"""The synthetic world follows its spec (docs/world.md)."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds
from PIL import Image

from opt.data.world.attributes import score_caption
from opt.data.world.captions import (
    ONE_OBJECT,
    POSITION_PHRASES,
    RELATION_PHRASES,
    TRAIN_ONE_OBJECT,
    TRAIN_POSITION_PHRASES,
    TRAIN_TWO_OBJECTS,
    TWO_OBJECTS,
    UNSEEN_ONE_OBJECT,
    UNSEEN_POSITION_PHRASES,
    UNSEEN_TWO_OBJECTS,
)
from opt.data.world.facts import COLORS, POSITIONS, RELATIONS, SHAPES, SIZES, held_out_pairs
from opt.data.world.speech import (
    PITCH,
    RATE_WPM,
    SNR_DB,
    TRAIN_RATE_WPM,
    TRAIN_SNR_DB,
    TRAIN_WIDE_VOICES,
    UNSEEN_VOICES,
    VOICES,
)
from opt.data.world.synth import synthesize_world
from opt.errors import UserError
from tests.conftest import WORLD_COUNTS, WORLD_SEED


def read_split(world, split):
    samples = []
    for shard in sorted(world.glob(f"{split}-*.tar")):
        grouped = {}
        with tarfile.open(shard) as tar:
            for member in tar:
                key, _, extension = member.name.partition(".")
                grouped.setdefault(key, {})[extension] = tar.extractfile(member).read()
        samples.extend(grouped.values())
    return samples


@pytest.fixture(scope="module")
def splits(world):
    return {split: read_split(world, split) for split in WORLD_COUNTS}


def facts(sample):
    return json.loads(sample["json"])


def test_manifest_lists_counts_held_out_pairs_and_version(world):
    manifest = json.loads((world / "manifest.json").read_text())
    assert manifest["counts"] == WORLD_COUNTS
    assert manifest["seed"] == WORLD_SEED
    assert manifest["version"]
    pairs = [tuple(p) for p in manifest["held_out_pairs"]]
    assert len(set(pairs)) >= 6
    assert all(c in COLORS and s in SHAPES for c, s in pairs)
    assert pairs == held_out_pairs(WORLD_SEED)


def test_split_sizes_and_members(splits):
    for split, samples in splits.items():
        assert len(samples) == WORLD_COUNTS[split]
        for sample in samples:
            assert set(sample) == {"png", "txt", "wav", "json"}
            assert facts(sample)["split"] == split


def test_every_attribute_value_occurs_in_train(splits):
    objects = [o for s in splits["train"] for o in facts(s)["objects"]]
    assert {o["shape"] for o in objects} == set(SHAPES)
    assert {o["color"] for o in objects} == set(COLORS)
    assert {o["size"] for o in objects} == set(SIZES)
    assert {o["position"] for o in objects} - {None} == set(POSITIONS)
    assert {facts(s)["relation"] for s in splits["train"]} - {None} == set(RELATIONS)
    counts = Counter(len(facts(s)["objects"]) for s in splits["train"])
    assert 0.35 < counts[1] / len(splits["train"]) < 0.65


def test_held_out_pairs_never_in_train_or_val_and_always_in_test_novel(splits):
    held_out = set(held_out_pairs(WORLD_SEED))
    for split in ("train", "val", "test"):
        for sample in splits[split]:
            assert not {(o["color"], o["shape"]) for o in facts(sample)["objects"]} & held_out
    for sample in splits["test_novel"]:
        assert {(o["color"], o["shape"]) for o in facts(sample)["objects"]} & held_out


def _named_objects(caption):
    words = "|".join
    pattern = rf"\b({words(SIZES)}) ({words(COLORS)}) ({words(SHAPES)})\b"
    return [dict(zip(("size", "color", "shape"), m)) for m in re.findall(pattern, caption)]


def test_captions_state_the_facts_in_the_metadata(splits):
    for sample in [s for samples in splits.values() for s in samples]:
        caption = sample["txt"].decode()
        meta = facts(sample)
        assert caption == caption.lower() and caption.strip() == caption
        named = _named_objects(caption)
        expected = [{k: o[k] for k in ("size", "color", "shape")} for o in meta["objects"]]
        assert named == expected, caption
        if meta["relation"] is None:
            places = {"test_unseen": [UNSEEN_POSITION_PHRASES],
                      "train": [POSITION_PHRASES, TRAIN_POSITION_PHRASES]}.get(meta["split"], [POSITION_PHRASES])
            assert any(phrases[meta["objects"][0]["position"]] in caption for phrases in places), caption
            assert not any(phrase in caption for phrase in RELATION_PHRASES.values())
        else:
            joined = caption.replace(" is ", " ").replace(" sits ", " ").replace(" lies ", " ")
            assert f"{named[0]['shape']} {RELATION_PHRASES[meta['relation']]}" in joined


def test_several_phrasings_are_used(splits):
    templates = Counter()
    for sample in splits["train"]:
        caption = sample["txt"].decode()
        for obj in _named_objects(caption):
            caption = caption.replace(f"{obj['size']} {obj['color']} {obj['shape']}", "X")
        for phrase in [*TRAIN_POSITION_PHRASES.values(), *POSITION_PHRASES.values(), *RELATION_PHRASES.values()]:
            caption = caption.replace(phrase, "P")
        templates[caption] += 1
    assert len(templates) >= 4 + 3


def _frame(caption: str, meta: dict) -> str:
    """The caption with its objects as {obj} / {first} / {second} and its place as {where} or {relation}."""
    objects = meta["objects"]
    names = ["obj"] if len(objects) == 1 else ["first", "second"]
    for name, obj in zip(names, objects):
        caption = caption.replace(f"{obj['size']} {obj['color']} {obj['shape']}", "{" + name + "}", 1)
    if meta["relation"] is None:
        # "over on the right" and "on the right side" before "on the right"
        for places in (TRAIN_POSITION_PHRASES, UNSEEN_POSITION_PHRASES, POSITION_PHRASES):
            caption = caption.replace(places[objects[0]["position"]], "{where}")
    return caption.replace(RELATION_PHRASES.get(meta["relation"] or "", "-"), "{relation}")


def test_test_unseen_has_voices_and_phrasings_no_other_split_has(splits):
    heard = set(VOICES + TRAIN_WIDE_VOICES)
    assert not set(UNSEEN_VOICES) & heard
    assert not {v.split("+")[0] for v in UNSEEN_VOICES} & {v.split("+")[0] for v in heard}  # accents too
    assert not {v.partition("+")[2] for v in UNSEEN_VOICES} & {v.partition("+")[2] for v in heard}  # timbres
    assert not set(UNSEEN_POSITION_PHRASES.values()) & {*POSITION_PHRASES.values(), *TRAIN_POSITION_PHRASES.values()}
    seen_frames, unseen_frames = set(TRAIN_ONE_OBJECT + TRAIN_TWO_OBJECTS), set(UNSEEN_ONE_OBJECT + UNSEEN_TWO_OBJECTS)
    assert set(ONE_OBJECT + TWO_OBJECTS) <= seen_frames and not seen_frames & unseen_frames
    held_out = set(held_out_pairs(WORLD_SEED))
    for split, samples in splits.items():
        unseen = split == "test_unseen"
        for sample in samples:
            meta = facts(sample)
            assert (meta["voice"]["name"] in UNSEEN_VOICES) == unseen, (split, meta["voice"])
            assert (_frame(sample["txt"].decode(), meta) in unseen_frames) == unseen, (split, sample["txt"])
            # the world's caption reader reads every phrasing, seen or not
            assert score_caption(sample["txt"].decode(), meta)["overall"] == 1.0, sample["txt"]
            if unseen:  # the facts are the training distribution's: no held-out pair
                assert not {(o["color"], o["shape"]) for o in meta["objects"]} & held_out
    assert len({facts(s)["voice"]["name"] for s in splits["test_unseen"]}) >= 3


def _within(value, bounds):
    return bounds[0] <= value <= bounds[1]


def test_train_hears_many_voices_and_phrasings_and_the_test_splits_keep_theirs(splits):
    """Generator 2.0: train speaks with 160+ voices over wider rate, pitch and noise ranges and
    more frames; val, test and test_novel keep the six voices, the ranges and the frames of 1.x."""
    test_frames = set(ONE_OBJECT + TWO_OBJECTS)
    for split in ("val", "test", "test_novel"):
        for sample in splits[split]:
            meta = facts(sample)
            voice = meta["voice"]
            assert voice["name"] in VOICES
            assert _within(voice["rate"], RATE_WPM) and _within(voice["pitch"], PITCH)
            assert _within(voice["snr_db"], SNR_DB)
            assert _frame(sample["txt"].decode(), meta) in test_frames, sample["txt"]
    train = [facts(s) for s in splits["train"]]
    names = Counter(meta["voice"]["name"] for meta in train)
    assert set(names) <= set(VOICES + TRAIN_WIDE_VOICES)
    assert len(names) >= 60  # of 240 samples: half over six voices, half over 168
    assert 0.35 < sum(names[v] for v in VOICES) / len(train) < 0.65
    assert any(not _within(meta["voice"]["rate"], RATE_WPM) for meta in train)
    assert any(not _within(meta["voice"]["snr_db"], SNR_DB) for meta in train)
    train_frames = Counter(_frame(s["txt"].decode(), facts(s)) for s in splits["train"])
    assert set(train_frames) <= set(TRAIN_ONE_OBJECT + TRAIN_TWO_OBJECTS)
    assert len(set(train_frames) - test_frames) >= 6
    assert any(phrase in s["txt"].decode() for s in splits["train"] for phrase in TRAIN_POSITION_PHRASES.values())


def test_a_split_can_be_added_to_an_existing_world_and_nothing_else_changes(tmp_path):
    counts = {"train": 6, "val": 0, "test": 0, "test_novel": 0, "test_unseen": 0}
    synthesize_world(tmp_path, counts, seed=5, shard_size=10, workers=1, progress=False)
    train = (tmp_path / "train-000000.tar").read_bytes()
    manifest = synthesize_world(tmp_path, counts | {"test_unseen": 4}, seed=5, shard_size=10, workers=1,
                                progress=False)
    assert manifest["counts"]["test_unseen"] == 4 and (tmp_path / "test_unseen-000000.tar").is_file()
    assert (tmp_path / "train-000000.tar").read_bytes() == train
    with pytest.raises(UserError, match="already holds a world with 6 train samples"):
        synthesize_world(tmp_path, counts | {"train": 8}, seed=5, shard_size=10, workers=1, progress=False)
    with pytest.raises(UserError, match="different seed"):
        synthesize_world(tmp_path, counts, seed=6, shard_size=10, workers=1, progress=False)
    (tmp_path / "manifest.json").write_text('{"seed": 5, "counts": [6]')  # cut short
    with pytest.raises(UserError, match="not a world manifest"):
        synthesize_world(tmp_path, counts, seed=5, shard_size=10, workers=1, progress=False)
    # a 1.x world's train split is not 2.0's: adding to it would mix two worlds
    manifest["version"] = "1.1"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="generator version 1.1 \\(this is 2.0\\)"):
        synthesize_world(tmp_path, counts, seed=5, shard_size=10, workers=1, progress=False)


def test_images_match_their_facts(splits):
    for sample in splits["train"][:80]:
        image = np.asarray(Image.open(io.BytesIO(sample["png"])))
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        meta = facts(sample)
        boxes = [o["bbox"] for o in meta["objects"]]
        for obj in meta["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            low, high = SIZES[obj["size"]]
            assert low <= x1 - x0 <= high
            centre = image[(y0 + y1) // 2, (x0 + x1) // 2].astype(int)
            assert np.abs(centre - np.array(COLORS[obj["color"]])).max() <= 15 + 2, (obj, centre)
            if obj["position"] is not None:
                cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
                rx, ry = POSITIONS[obj["position"]]
                assert abs(cx - rx) <= 8.5 and abs(cy - ry) <= 8.5
        if len(boxes) == 2:
            a, b = boxes
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], "objects overlap"
        corner = image[:3, :3].astype(float)
        assert 20 - 15 <= corner.mean() <= 70 + 15


def test_relation_matches_object_centres(splits):
    for sample in splits["train"]:
        meta = facts(sample)
        if meta["relation"] is None:
            continue
        (a, b) = [((o["bbox"][0] + o["bbox"][2]) / 2, (o["bbox"][1] + o["bbox"][3]) / 2) for o in meta["objects"]]
        dx, dy = a[0] - b[0], a[1] - b[1]
        expected = {"left of": -dx, "right of": dx, "above": -dy, "below": dy}[meta["relation"]]
        assert expected >= 19  # >= 20 px between centres, up to rounding of the boxes


def test_speech_is_16k_mono_and_plausibly_long(splits):
    durations, voices = [], set()
    for sample in splits["train"]:
        data, rate = sf.read(io.BytesIO(sample["wav"]), always_2d=True)
        assert rate == 16000 and data.shape[1] == 1
        assert np.abs(data).max() > 0.3  # speech, not silence
        durations.append(len(data) / rate)
        voice = facts(sample)["voice"]
        voices.add(voice["name"])
        assert _within(voice["rate"], TRAIN_RATE_WPM) and _within(voice["snr_db"], TRAIN_SNR_DB)
    assert 0.8 < min(durations) and max(durations) < 7.0
    assert 1.5 <= float(np.median(durations)) <= 3.5
    assert len(voices) >= 4


def test_stock_webdataset_reads_the_shards(world):
    dataset = wds.WebDataset(str(world / "train-{000000..000002}.tar"), shardshuffle=False).decode("pil")
    samples = list(dataset)
    assert len(samples) == WORLD_COUNTS["train"]
    first = samples[0]
    assert first["png"].size == (64, 64)
    assert isinstance(first["txt"], str) and first["txt"]
    assert isinstance(first["json"], dict) and first["json"]["objects"]
    assert isinstance(first["wav"], bytes)


def test_same_seed_gives_identical_shards_whatever_the_worker_count(tmp_path):
    counts = {"train": 30, "val": 6, "test": 0, "test_novel": 6}
    one = synthesize_world(tmp_path / "one", counts, seed=11, shard_size=10, workers=1, progress=False)
    two = synthesize_world(tmp_path / "two", counts, seed=11, shard_size=10, workers=2, progress=False)
    assert one == two
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    synthesize_world(tmp_path / "other", counts, seed=12, shard_size=10, workers=1, progress=False)
    assert (tmp_path / "other" / "train-000000.tar").read_bytes() != (tmp_path / "one" / "train-000000.tar").read_bytes()


def test_rerun_completes_missing_shards_and_ignores_leftover_temp_files(tmp_path):
    counts = {"train": 20, "val": 0, "test": 0, "test_novel": 0}
    synthesize_world(tmp_path, counts, seed=5, shard_size=10, workers=1, progress=False)
    reference = (tmp_path / "train-000001.tar").read_bytes()
    (tmp_path / "train-000001.tar").unlink()
    (tmp_path / "train-000001.tar.tmp").write_bytes(b"half a shard")
    synthesize_world(tmp_path, counts, seed=5, shard_size=10, workers=1, progress=False)
    assert (tmp_path / "train-000001.tar").read_bytes() == reference
    assert not (tmp_path / "train-000001.tar.tmp").exists()
