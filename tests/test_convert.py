"""Real-corpus converters on fixture corpora written here in the published formats:
Localized Narratives (jsonl + jpg + ogg) with broken rows, missing, corrupt and
truncated files, escaping paths, long narrations and transcripts longer than their
recordings; CSV / JSONL manifests; determinism across worker counts; resuming an
interrupted run; one-line user errors."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds
from PIL import Image

from opt.cli import main
from opt.config import AudioConfig, DataConfig
from opt.data.convert import convert_localized_narratives, convert_manifest
from opt.data.audio import decode_audio
from opt.data.convert.localized_narratives import TIMING_SLACK_SECONDS, LocalizedNarratives
from opt.data.convert.media import Skip, read_speech
from opt.data.samples import SampleDecoder
from opt.errors import UserError

RATE = 22050  # recordings are resampled to 16 kHz


def write_jpeg(path: Path, size=(48, 40), seed=0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)


def write_ogg(path: Path, seconds: float, seed=0, keep: float = 1.0) -> None:
    """A vorbis recording; ``keep`` < 1 cuts the file's bytes to that fraction."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * RATE)) / RATE
    wave = 0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t) + 0.01 * np.random.default_rng(seed).standard_normal(len(t))
    encoded = io.BytesIO()
    sf.write(encoded, wave.astype(np.float32), RATE, format="OGG", subtype="VORBIS")
    path.write_bytes(encoded.getvalue()[: int(len(encoded.getvalue()) * keep)])


def timed(words: list[str], step: float = 1.0) -> list[dict]:
    return [{"utterance": w, "start_time": i * step, "end_time": (i + 1) * step} for i, w in enumerate(words)]


def narration(image_id: str, caption: str, recording: str, *, annotator=7, timing=None) -> str:
    """A row; its default timing spreads the caption's words over the first second."""
    words = caption.split()
    row = {"dataset_id": "open_images", "image_id": image_id, "annotator_id": annotator, "caption": caption,
           "timed_caption": timing if timing is not None else timed(words, step=1.0 / len(words)),
           "traces": [[{"x": 0.1, "y": 0.2, "t": 0.3}]], "voice_recording": recording}
    return json.dumps(row)


def make_corpus(root: Path) -> tuple[list[Path], Path, Path]:
    """Two annotation files, 23 rows: 11 good (three of them cut), 12 that must be skipped."""
    images, audio = root / "images", root / "audio"
    for i in range(8):
        write_jpeg(images / f"img{i}.jpg", seed=i)
    write_jpeg(images / "nested" / "deeper" / "img8.jpg", seed=8)
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = io.BytesIO()
    Image.new("RGB", (40, 40), "red").save(good, format="JPEG")
    (images / "truncated.jpg").write_bytes(good.getvalue()[:200])
    write_jpeg(root / "secret.jpg")  # outside the images folder
    for i in range(12):
        write_ogg(audio / "open_images_train" / f"rec{i}.ogg", 1.5, seed=i)
    write_ogg(audio / "flat.ogg", 1.0)  # found by basename
    write_ogg(audio / "open_images_train" / "long.ogg", 4.0)
    write_ogg(audio / "open_images_train" / "long_untimed.ogg", 4.0)
    (audio / "open_images_train" / "broken.ogg").write_bytes(b"OggS" + bytes(300))
    write_ogg(audio / "open_images_train" / "short.ogg", 1.3)  # whole, but shorter than its transcript
    write_ogg(audio / "open_images_train" / "cut.ogg", 3.0, seed=3, keep=0.5)  # cut short
    write_ogg(root / "outside.ogg", 1.0)
    rec = "open_images_train/rec{}.ogg".format
    first = [
        narration("img0", "a red car on a road", rec(0)),
        narration("img1", "a dog in the park", rec(1)),
        "{not json",  # 2: row_invalid
        narration("img2", "a dog in the park", rec(2)),  # same caption, other image: kept
        narration("missing_image", "nothing here", rec(3)),  # 4: image_missing
        json.dumps([1, 2, 3]),  # 5: row_invalid (not an object)
        narration("img3", "two cats on a sofa", "open_images_train/gone.ogg"),  # 6: audio_missing
        narration("corrupt", "a corrupt picture", rec(4)),  # 7: image_corrupt
        "",
        narration("img4", "a long story about a boat in the sea", "open_images_train/long.ogg",
                  timing=timed(["a long story", "about a boat", "in the", "sea"])),  # 8: cut at 2 s (max 2.5)
        narration("../secret", "escaping image", rec(5)),  # 9: path_escapes
    ]
    second = [
        narration("img5", "a bird on a wire", "../outside.ogg"),  # 10: path_escapes
        narration("img5", "a bird on a wire", "some/where/else/flat.ogg"),  # 11: audio by basename
        narration("img6", "a broken recording", "open_images_train/broken.ogg"),  # 12: audio_corrupt
        narration("img8", "a nested image", rec(6)),  # 13: image found in a sub-folder
        json.dumps({"dataset_id": "open_images", "image_id": "img7"}),  # 14: row_invalid (fields missing)
        narration("truncated", "a truncated picture", rec(7)),  # 15: image_corrupt
        narration("img7", "an untimed long narration", "open_images_train/long_untimed.ogg",
                  timing=[]),  # 16: narration_uncuttable
        narration("img6", "a bowl of fruit", rec(8), annotator="a12"),
        narration("img7", "a window", rec(9)),
        narration("img0", "a red car on a road", rec(10)),  # same image, same caption, other recording
        narration("img1", "a cat sat on the mat all day", "open_images_train/short.ogg",
                  timing=timed(["a cat", "sat on", "the mat", "all day"])),  # 20: transcript cut to "a cat"
        narration("img2", " ".join(CUT_WORDS), "open_images_train/cut.ogg",
                  timing=timed(CUT_WORDS, step=0.25)),  # 21: transcript cut to the words present
        narration("img3", "an untimed cut recording", "open_images_train/cut.ogg", timing=[]),  # 22: audio_truncated
    ]
    paths = [root / "train_part1.jsonl", root / "train_part2.jsonl"]
    paths[0].write_text("\n".join(first) + "\n\n")
    paths[1].write_text("\n".join(second) + "\n")
    return paths, images, audio


CUT_WORDS = [f"word{i}" for i in range(12)]  # 0.25 s each, 3 s in all
EXPECTED_SKIPS = {"audio_corrupt": 1, "audio_missing": 1, "audio_truncated": 1, "image_corrupt": 2,
                  "image_missing": 1, "narration_uncuttable": 1, "path_escapes": 2, "row_invalid": 3}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[list[Path], Path, Path]:
    return make_corpus(tmp_path_factory.mktemp("ln"))


def convert(corpus, out: Path, workers: int = 1) -> dict:
    annotations, images, audio = corpus
    return convert_localized_narratives(annotations, images=images, audio=audio, out=out, shard_size=4,
                                        workers=workers, max_audio_seconds=2.5, progress=False)


def read_samples(out: Path) -> dict[str, dict]:
    samples = {}
    for shard in sorted(out.glob("*.tar")):
        for sample in wds.DataPipeline(wds.SimpleShardList([str(shard)]), wds.tarfile_to_samples()):
            samples[sample["__key__"]] = sample
    return samples


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


@pytest.fixture(scope="module")
def converted(corpus, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shards")
    return out, convert(corpus, out, workers=2)


def test_localized_narratives_counts_every_skip_by_reason(converted):
    out, summary = converted
    assert summary["samples_in"] == 23 and summary["samples_out"] == 11
    assert summary["skipped"] == EXPECTED_SKIPS
    assert summary["changes"] == {"narration_cut": 1, "transcript_cut": 2}
    assert summary["modalities"] == {"text": 11, "image": 11, "audio": 11}
    assert summary["shards"] == [f"train-{i:06d}.tar" for i in range(6)]
    rows = {(r["row"], r["reason"]) for r in summary["skipped_rows"]}
    assert rows == {(2, "row_invalid"), (4, "image_missing"), (5, "row_invalid"), (6, "audio_missing"),
                    (7, "image_corrupt"), (9, "path_escapes"), (10, "path_escapes"), (12, "audio_corrupt"),
                    (14, "row_invalid"), (15, "image_corrupt"), (16, "narration_uncuttable"), (22, "audio_truncated")}
    sources = {r["row"]: r["source"] for r in summary["skipped_rows"]}
    assert sources[2] == "train_part1.jsonl:3" and sources[10] == "train_part2.jsonl:1"
    assert json.loads((out / "train-summary.json").read_text()) == summary


def test_localized_narratives_shards_hold_the_triplets_the_pipeline_reads(converted, corpus):
    out, _ = converted
    samples = read_samples(out)
    assert sorted(samples) == [f"train_{i:09d}" for i in (0, 1, 3, 8, 11, 13, 17, 18, 19, 20, 21)]
    decoder = SampleDecoder(DataConfig(image_size=32), AudioConfig(), tokenizer=None)
    for sample in samples.values():
        decoded = decoder(sample)
        assert decoded.image is not None and decoded.audio is not None and decoded.caption
        assert set(sample) >= {"jpg", "txt", "flac", "json"}
    first = samples["train_000000000"]
    assert first["jpg"] == (corpus[1] / "img0.jpg").read_bytes()  # valid JPEGs keep their bytes
    meta = json.loads(first["json"])
    assert meta["image_id"] == "img0" and meta["annotator_id"] == 7 and meta["image_size"] == [48, 40]
    assert meta["row"] == "train_part1.jsonl:1" and meta["narration_cut"] is False
    assert meta["transcript_cut"] is False and meta["audio_truncated"] is False
    assert [u["utterance"] for u in meta["timed_caption"]] == "a red car on a road".split()
    speech, rate = sf.read(io.BytesIO(first["flac"]))
    assert rate == 16000 and speech.ndim == 1 and abs(len(speech) - 1.5 * 16000) <= 2
    assert meta["audio_seconds"] == pytest.approx(1.5, abs=1e-3)
    assert json.loads(samples["train_000000013"]["json"])["image_id"] == "img8"
    assert json.loads(samples["train_000000011"]["json"])["voice_recording"] == "some/where/else/flat.ogg"
    assert json.loads(samples["train_000000017"]["json"])["annotator_id"] == "a12"


def test_long_narration_is_cut_at_the_matching_utterance_boundary(converted):
    out, _ = converted
    sample = read_samples(out)["train_000000008"]
    assert sample["txt"].decode() == "a long story about a boat"  # utterances ending by 2.0 s (max 2.5 s)
    speech, rate = sf.read(io.BytesIO(sample["flac"]))
    assert len(speech) == 2 * 16000
    meta = json.loads(sample["json"])
    assert meta["narration_cut"] is True and meta["audio_seconds"] == 2.0
    assert meta["original_audio_seconds"] == pytest.approx(4.0, abs=1e-3)
    assert [u["end_time"] for u in meta["timed_caption"]] == [1.0, 2.0]


def crash_on_row_9(monkeypatch, converter: type, run, out) -> dict[str, bytes]:
    """Run a conversion whose ``converter`` dies on row 9; returns the shards it left in ``out``."""
    original = converter.__call__

    def dies(self, row):
        if row.index == 9:
            raise RuntimeError("simulated crash")
        return original(self, row)

    monkeypatch.setattr(converter, "__call__", dies)  # forked workers inherit it
    with pytest.raises(RuntimeError, match="simulated crash"):
        run()
    monkeypatch.setattr(converter, "__call__", original)
    return shard_bytes(out)


def test_shards_do_not_depend_on_the_worker_count(converted, corpus, tmp_path):
    out, summary = converted
    assert convert(corpus, tmp_path, workers=1) == summary
    assert shard_bytes(tmp_path) == shard_bytes(out)


def test_interrupted_conversion_resumes_to_the_same_output(converted, corpus, tmp_path, monkeypatch):
    reference, summary = converted
    expected = shard_bytes(reference)
    # shards 0 and 1 finish, shard 2 (rows 8-11) dies
    partial = crash_on_row_9(monkeypatch, LocalizedNarratives, lambda: convert(corpus, tmp_path, workers=1), tmp_path)
    assert {"train-000000.tar", "train-000001.tar"} <= set(partial) and "train-000002.tar" not in partial
    assert all(payload == expected[name] for name, payload in partial.items())
    # what a kill would leave: a stale temporary shard, and a finished tar whose record was never written
    (tmp_path / "train-000002.tar.tmp").write_bytes(b"half a shard")
    (tmp_path / "records" / "train-000000.json").unlink()
    for name in ("train-000000.tar", "train-000001.tar"):
        os.utime(tmp_path / name, ns=(0, 0))
    assert convert(corpus, tmp_path, workers=2) == summary
    assert shard_bytes(tmp_path) == expected
    assert not list(tmp_path.glob("*.tmp"))
    assert (tmp_path / "train-000001.tar").stat().st_mtime_ns == 0  # finished: kept as it was
    assert (tmp_path / "train-000000.tar").stat().st_mtime_ns != 0  # no record: converted again


def test_rerun_of_a_finished_conversion_rewrites_nothing(converted, corpus):
    out, summary = converted
    for shard in out.glob("*.tar"):
        os.utime(shard, ns=(0, 0))
    assert convert(corpus, out) == summary
    assert {p.stat().st_mtime_ns for p in out.glob("*.tar")} == {0}


def test_names_too_long_for_the_file_system_are_skips(corpus):
    _, images, audio = corpus
    converter = LocalizedNarratives(images, audio)
    with pytest.raises(Skip, match="image_missing"):
        converter.find_image("x" * 300)
    with pytest.raises(Skip, match="audio_unreadable"):
        read_speech(converter.find_audio("open_images_train/" + "x" * 300 + ".ogg"))


def test_converted_transcripts_match_the_audio_present(converted, corpus):
    out, _ = converted
    samples = read_samples(out)
    short = samples["train_000000020"]
    assert short["txt"] == b"a cat"
    assert len(sf.read(io.BytesIO(short["flac"]))[0]) == 16000  # cut at the end of "a cat"
    meta = json.loads(short["json"])
    assert meta["transcript_cut"] is True and meta["audio_truncated"] is False
    assert meta["original_audio_seconds"] == pytest.approx(1.3, abs=1e-3) and meta["audio_seconds"] == 1.0
    present = decode_audio((corpus[2] / "open_images_train" / "cut.ogg").read_bytes())
    assert present.truncated is True
    seconds = present.channels.shape[1] / present.rate
    fitting = [w for i, w in enumerate(CUT_WORDS) if (i + 1) * 0.25 <= seconds + TIMING_SLACK_SECONDS]
    assert 0 < len(fitting) < len(CUT_WORDS)
    cut = samples["train_000000021"]
    assert cut["txt"].decode() == " ".join(fitting)
    meta = json.loads(cut["json"])
    assert meta["transcript_cut"] is True and meta["audio_truncated"] is True
    assert [u["utterance"] for u in meta["timed_caption"]] == fitting
    assert meta["audio_seconds"] == pytest.approx(min(len(fitting) * 0.25, seconds), abs=1e-3)


def test_other_settings_in_the_same_output_are_refused(converted, corpus):
    out, _ = converted
    annotations, images, audio = corpus
    with pytest.raises(UserError, match="shard_size"):
        convert_localized_narratives(annotations, images=images, audio=audio, out=out, shard_size=5,
                                     max_audio_seconds=2.5, progress=False)


def write_png(path: Path, size=(20, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, "blue").save(path, format="PNG")


def test_csv_manifest_keeps_partial_rows_and_counts_bad_ones(tmp_path):
    data = tmp_path / "data"
    write_png(data / "a.png")
    Image.new("RGB", (8, 8), "green").save(data / "b.bmp", format="BMP")
    write_ogg(data / "a.ogg", 0.5)
    write_png(tmp_path / "outside.png")
    (data / "manifest.csv").write_text(
        "image,text,audio,id\n"
        "a.png,a blue square,a.ogg,1\n"  # 0: all three
        ",\"a caption, with a comma\",,2\n"  # 1: text only
        "b.bmp,,,3\n"  # 2: image only, BMP re-encoded to JPEG
        ",,a.ogg,4\n"  # 3: audio only
        ",,,5\n"  # 4: row_empty
        "a.png,too,many,fields,6\n"  # 5: row_invalid
        "../outside.png,escape,,7\n"  # 6: path_escapes
        "/etc/hostname,absolute,,8\n"  # 7: path_escapes
        "nope.png,missing,,9\n"  # 8: image_missing
        "\"a.png\",\"a caption\non two lines\",,10\n")  # 9: quoted newline
    summary = convert_manifest(data / "manifest.csv", out=tmp_path / "out", shard_size=3, workers=2, progress=False)
    assert summary["samples_in"] == 10 and summary["samples_out"] == 5
    assert summary["skipped"] == {"image_missing": 1, "path_escapes": 2, "row_empty": 1, "row_invalid": 1}
    assert summary["modalities"] == {"text": 3, "image": 3, "audio": 2}
    samples = read_samples(tmp_path / "out")
    assert set(samples["train_000000000"]) >= {"png", "txt", "flac", "json"}
    assert set(samples["train_000000001"]) == {"__key__", "__url__", "txt", "json"}
    assert samples["train_000000001"]["txt"] == b"a caption, with a comma"
    assert Image.open(io.BytesIO(samples["train_000000002"]["jpg"])).size == (8, 8)
    assert json.loads(samples["train_000000002"]["json"])["image_format"] == "BMP"
    assert set(samples["train_000000003"]) == {"__key__", "__url__", "flac", "json"}
    assert samples["train_000000009"]["txt"] == b"a caption\non two lines"
    meta = json.loads(samples["train_000000000"]["json"])
    assert meta["fields"] == {"id": "1"} and meta["image_size"] == [20, 16] and meta["row"] == "manifest.csv:2"


def test_jsonl_manifest_rows(tmp_path):
    write_png(tmp_path / "img" / "x.png")
    rows = [{"image": "img/x.png", "text": "a square"}, {"image": 3, "text": "not a path"},
            {"text": "", "image": None}, {"text": "only text", "source": {"site": "example"}},
            {"text": "a lone surrogate \ud800"}, {"image": "\ud800.png", "text": "a lone surrogate in a path"}]
    (tmp_path / "m.jsonl").write_text("\ufeff" + "\n\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    summary = convert_manifest(tmp_path / "m.jsonl", out=tmp_path / "out", progress=False)
    assert summary["samples_in"] == 6 and summary["samples_out"] == 2
    assert summary["skipped"] == {"image_unreadable": 1, "row_empty": 1, "row_invalid": 2}
    samples = read_samples(tmp_path / "out")
    assert samples["train_000000000"]["png"] == (tmp_path / "img" / "x.png").read_bytes()
    assert json.loads(samples["train_000000003"]["json"])["row"] == "m.jsonl:7"
    assert json.loads(samples["train_000000003"]["json"])["fields"] == {"source": {"site": "example"}}


def test_csv_byte_order_mark_and_blank_lines_are_not_rows(tmp_path):
    write_png(tmp_path / "a.png")
    (tmp_path / "m.csv").write_bytes(b'\xef\xbb\xbf"image","text","audio"\r\n' b"a.png,a blue square,\r\n" b"\r\n"
                                     b",only text,\r\n" b"   \r\n" b",,\r\n" b"\r\n")
    summary = convert_manifest(tmp_path / "m.csv", out=tmp_path / "out", shard_size=1, progress=False)
    assert summary["samples_in"] == 3 and summary["samples_out"] == 2 and summary["skipped"] == {"row_empty": 1}
    assert [row["source"] for row in summary["skipped_rows"]] == ["m.csv:6"]
    samples = read_samples(tmp_path / "out")
    assert samples["train_000000001"]["txt"] == b"only text"
    assert json.loads(samples["train_000000001"]["json"])["row"] == "m.csv:4"


def test_output_that_is_a_file_is_a_user_error(tmp_path):
    (tmp_path / "m.csv").write_text("image,text,audio\n,a caption,\n")
    (tmp_path / "out").write_text("")
    with pytest.raises(UserError, match="not a directory"):
        convert_manifest(tmp_path / "m.csv", out=tmp_path / "out", progress=False)


def test_csv_header_without_the_columns_is_a_user_error(tmp_path):
    (tmp_path / "m.csv").write_text("path,caption\na.png,x\n")
    with pytest.raises(UserError, match="header"):
        convert_manifest(tmp_path / "m.csv", out=tmp_path / "out", progress=False)


@pytest.mark.parametrize("argv,message", [
    (["--images", "{root}/nope", "--audio", "{root}/audio", "--annotations", "{root}/a.jsonl"], "--images"),
    (["--images", "{root}", "--audio", "{root}", "--annotations", "{root}/missing.jsonl"], "cannot read"),
    (["--images", "{root}", "--audio", "{root}", "--annotations", "{root}/a.jsonl", "--max-audio-seconds", "nan"],
     "--max-audio-seconds"),
])
def test_localized_narratives_user_errors_are_one_line(tmp_path, capsys, argv, message):
    argv = [a.format(root=tmp_path) for a in argv]
    assert main(["data", "localized-narratives", *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_cli_converts_a_manifest(tmp_path, capsys):
    write_png(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("image,text,audio\na.png,a square,\n")
    assert main(["data", "manifest", "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "1 rows -> 1 samples" in out and (tmp_path / "out" / "train-000000.tar").is_file()
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        assert tar.getnames() == ["train_000000000.png", "train_000000000.txt", "train_000000000.json"]


def test_cli_converts_localized_narratives_like_the_library(converted, corpus, tmp_path, capsys):
    reference, summary = converted
    annotations, images, audio = corpus
    argv = ["data", "localized-narratives", "--annotations", ",".join(map(str, annotations)), "--images", str(images),
            "--audio", str(audio), "--out", str(tmp_path), "--shard-size", "4", "--max-audio-seconds", "2.5"]
    assert main(argv) == 0
    assert "23 rows -> 11 samples in 6 shards; skipped 12 (audio_corrupt: 1, audio_missing: 1, audio_truncated: 1," \
        in capsys.readouterr().out
    assert json.loads((tmp_path / "train-summary.json").read_text()) == summary
    assert shard_bytes(tmp_path) == shard_bytes(reference)
