"""Cleaning filters: each removes exactly its samples (image size, text, boilerplate,
duplicates, required modalities, similarity with a fake scorer), the report
counts and shows them, and the model scorer matches the model's own towers."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from opt.cli import main
from opt.data.clean import FILTERS, CleanSettings, clean_shards, load_boilerplate, read_shard, report_name
from opt.data.shards import ShardWriter
from opt.downstream.similarity import TowerSimilarity
from opt.errors import UserError
from opt.text.tokenizer import TextTokenizer, train_tokenizer
from tests.test_model import small_model


def png(size=(80, 80), seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, format="PNG")
    return encoded.getvalue()


def flac(seed=0) -> bytes:
    encoded = io.BytesIO()
    wave = 0.1 * np.random.default_rng(seed).standard_normal(8000)
    sf.write(encoded, wave, 16000, format="FLAC", subtype="PCM_16")
    return encoded.getvalue()


CAPTION = "a red circle on green grass"
SHARDS = [
    {
        "k00": {"png": png(), "txt": CAPTION},
        "k01": {"png": png((30, 100)), "txt": "a tall thin picture"},  # image_too_small
        "k02": {"png": b"\x89PNG garbage", "txt": "a broken picture"},  # image_unreadable
        "k03": {"png": png(seed=3), "txt": "   "},  # text_empty
        "k04": {"png": png(seed=4), "txt": "dog"},  # text_too_short
        "k05": {"png": png(seed=5), "txt": " ".join(["word"] * 11)},  # text_too_long
        "k06": {"png": png(seed=6), "txt": "Stock photo of a happy family"},  # text_boilerplate
        "k07": {"png": png(), "txt": "  a red circle   on green grass "},  # duplicate of k00
        "k08": {"png": png(seed=8), "txt": CAPTION},  # repeated caption, other image: kept
        "k09": {"png": png(), "txt": "the same picture, another caption"},  # kept
    },
    {
        "k10": {"png": png(seed=10), "txt": b"\xff\xfe not utf-8"},  # text_unreadable
        "k11": {"txt": "a caption without a picture"},  # kept (no modality required)
        "k12": {"png": png(), "txt": CAPTION},  # duplicate of k00, in another shard
        "k13": {"png": png(), "txt": CAPTION, "flac": flac()},  # speech makes it another sample: kept
        "k14": {"png": png(seed=14), "txt": "see https://example.com for more"},  # text_boilerplate
    },
]
KEPT = ["k00", "k08", "k09", "k11", "k13"]
REMOVED = {"image_too_small": ["k01"], "image_unreadable": ["k02"], "text_empty": ["k03"], "text_too_short": ["k04"],
           "text_too_long": ["k05"], "text_boilerplate": ["k06", "k14"], "duplicate": ["k07", "k12"],
           "text_unreadable": ["k10"]}


def write_shards(directory: Path, shards=SHARDS) -> list[str]:
    paths = []
    for index, samples in enumerate(shards):
        path = directory / f"train-{index:06d}.tar"
        with ShardWriter(path) as writer:
            for key, members in samples.items():
                writer.write(key, {e: v.encode() if isinstance(v, str) else v for e, v in members.items()})
        paths.append(str(path))
    return paths


def kept_keys(out: Path) -> list[str]:
    return [s["__key__"] for shard in sorted(out.glob("*.tar")) for s in read_shard(str(shard))]


SETTINGS = dict(min_image_size=64, min_words=2, max_words=10)


def test_each_filter_removes_exactly_its_samples(tmp_path):
    shards = write_shards(tmp_path / "in")
    report = clean_shards(shards, tmp_path / "out", CleanSettings(**SETTINGS), progress=False)
    assert kept_keys(tmp_path / "out") == KEPT
    assert report["samples_in"] == 15 and report["samples_out"] == len(KEPT)
    assert report["similarity_filter"] is False
    assert report["removed"] == {name: len(REMOVED.get(name, [])) for name in FILTERS}
    for name, keys in REMOVED.items():
        assert [example["key"] for example in report["examples"][name]] == keys
    assert report["examples"]["image_too_small"][0]["detail"] == "30x100 px"
    assert report["examples"]["duplicate"][1] == {"key": "k12", "shard": "train-000001.tar", "text": CAPTION,
                                                  "detail": "same content as k00"}
    assert json.loads((tmp_path / "out" / "train-clean-report.json").read_text()) == report
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]


def test_kept_samples_keep_every_member_byte_for_byte(tmp_path):
    clean_shards(write_shards(tmp_path / "in"), tmp_path / "out", CleanSettings(**SETTINGS), progress=False)
    kept = {s["__key__"]: s for shard in sorted((tmp_path / "out").glob("*.tar")) for s in read_shard(str(shard))}
    assert kept["k13"]["flac"] == flac() and kept["k13"]["png"] == png() and kept["k13"]["txt"] == CAPTION.encode()


def test_filters_can_be_turned_off(tmp_path):
    settings = CleanSettings(min_image_size=0, min_words=0, max_words=0, boilerplate=[], deduplicate=False)
    report = clean_shards(write_shards(tmp_path / "in"), tmp_path / "out", settings, progress=False)
    assert {name for name, n in report["removed"].items() if n} == {"image_unreadable", "text_empty",
                                                                    "text_unreadable"}


def test_required_modalities_remove_partial_samples(tmp_path):
    settings = CleanSettings(**SETTINGS, require=["image", "text"])
    report = clean_shards(write_shards(tmp_path / "in"), tmp_path / "out", settings, progress=False)
    assert report["removed"]["missing_modality"] == 1 and "k11" not in kept_keys(tmp_path / "out")


def test_similarity_filter_drops_pairs_below_the_threshold(tmp_path):
    scores = {"k00": 0.9, "k08": 0.1, "k09": 0.3, "k11": None, "k13": 0.25}
    batches = []

    def scorer(samples):
        batches.append([s["__key__"] for s in samples])
        return [scores[s["__key__"]] for s in samples]

    settings = CleanSettings(**SETTINGS, batch_size=2)
    report = clean_shards(write_shards(tmp_path / "in"), tmp_path / "out", settings, scorer=scorer, progress=False)
    assert kept_keys(tmp_path / "out") == ["k00", "k09", "k11"]
    assert report["removed"]["low_similarity"] == 2
    assert [e["detail"] for e in report["examples"]["low_similarity"]] == ["similarity 0.100", "similarity 0.250"]
    assert batches == [["k00", "k08"], ["k09"], ["k11", "k13"]]  # only survivors, batched within a shard


def test_boilerplate_patterns_from_a_file(tmp_path):
    (tmp_path / "patterns.txt").write_text("# mine\n\n^a red\n")
    settings = CleanSettings(**(SETTINGS | {"boilerplate": load_boilerplate(tmp_path / "patterns.txt")}))
    report = clean_shards(write_shards(tmp_path / "in"), tmp_path / "out", settings, progress=False)
    assert [e["key"] for e in report["examples"]["text_boilerplate"]] == ["k00", "k08", "k12", "k13"]
    with pytest.raises(UserError, match="bad boilerplate pattern"):
        clean_shards([], tmp_path / "out2", CleanSettings(boilerplate=["(unclosed"]), progress=False)


def test_report_is_named_after_the_shard_prefix():
    assert report_name(["val-000000.tar", "val-000001.tar"]) == "val-clean-report.json"
    assert report_name(["val-000000.tar", "train-000000.tar"]) == report_name(["x.tar"]) == "clean-report.json"


def test_cleaning_into_the_input_directory_is_refused(tmp_path):
    shards = write_shards(tmp_path)
    with pytest.raises(UserError, match="holds the input shards"):
        clean_shards(shards, tmp_path, CleanSettings(), progress=False)


def test_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(UserError, match="not a directory"):
        clean_shards(write_shards(tmp_path / "in"), tmp_path / "out", CleanSettings(), progress=False)


@pytest.fixture(scope="module")
def model_directory(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("model")
    captions = [s["txt"] for shard in SHARDS for s in shard.values() if isinstance(s.get("txt"), str)]
    tokenizer = train_tokenizer(captions * 4, directory / "tok.model", vocab_size=300)
    model, _ = small_model(tokenizer)
    model.save_pretrained(directory / "model", tokenizer=TextTokenizer.from_file(directory / "tok.model"))
    return directory / "model"


def test_model_scorer_is_the_cosine_of_the_model_towers(model_directory):
    scorer = TowerSimilarity.from_pretrained(model_directory, batch_size=2)
    samples = [dict(members, __key__=key, __url__="x.tar") for key, members in SHARDS[1].items()]
    samples = [{k: v.encode() if isinstance(v, str) else v for k, v in s.items()} for s in samples]
    scores = scorer(samples)
    assert scores[0] is None and scores[1] is None  # k10: text not UTF-8; k11: no image
    assert all(-1.0 <= s <= 1.0 for s in scores[2:])
    assert scores[2] == pytest.approx(scores[3], abs=1e-6)  # same image and caption
    decoded = [scorer.decoder(samples[i]) for i in (2, 4)]
    batch = scorer.collate(decoded)
    with torch.no_grad():
        towers = scorer.model.tower_embeddings(scorer.model.encode_unimodal(batch, modalities=("image", "text")))
    expected = (towers["image"] * towers["text"]).sum(-1)
    assert [scores[2], scores[4]] == pytest.approx(expected.tolist(), abs=1e-5)


def test_cli_clean_with_a_similarity_model(model_directory, tmp_path, capsys):
    shards = write_shards(tmp_path / "in")
    scorer = TowerSimilarity.from_pretrained(model_directory)
    survivors = [dict(s) for shard in shards for s in read_shard(shard) if s["__key__"] in KEPT]
    scores = {s["__key__"]: score for s, score in zip(survivors, scorer(survivors))}
    distinct = sorted({v for v in scores.values() if v is not None})
    gap = max(range(len(distinct) - 1), key=lambda i: distinct[i + 1] - distinct[i])
    threshold = (distinct[gap] + distinct[gap + 1]) / 2  # far from every score
    argv = ["data", "clean", "--data", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--min-words", "2",
            "--max-words", "10", "--similarity-model", str(model_directory), "--min-similarity", str(threshold)]
    assert main(argv) == 0
    expected = [k for k in KEPT if scores[k] is None or scores[k] >= threshold]
    assert kept_keys(tmp_path / "out") == expected and len(expected) < len(KEPT)
    assert "low_similarity" in capsys.readouterr().out
