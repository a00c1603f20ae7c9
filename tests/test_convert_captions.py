"""Caption-benchmark converters on fixtures in the published formats: a COCO caption JSON
(3 images x 5 captions plus unusable annotations), a Clotho CSV and an AudioCaps CSV.
One sample per caption, grouped by image or clip; counted skips; resuming a killed run;
the training pipeline reads the shards in strict mode with the group in ``meta``."""

from __future__ import annotations

import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from opt.cli import main
from opt.config import load_config
from opt.data.convert import convert_audio_captions, convert_coco_captions
from opt.data.convert.coco_captions import CocoCaptions
from opt.data.pipeline import BatchLoader
from opt.errors import UserError
from tests.test_convert import crash_on_row_9, read_samples, shard_bytes, write_jpeg, write_png

CAPTIONS = {image: [f"image {image} caption {i}" for i in range(5)] for image in (10, 20, 30)}


def make_coco(root: Path) -> tuple[Path, Path]:
    """3 good images x 5 captions (20 annotations in all), in shuffled annotation order."""
    images = root / "images"
    write_jpeg(images / "a.jpg", seed=1)
    write_png(images / "sub" / "b.png")
    write_jpeg(images / "c.jpg", seed=2)
    write_jpeg(root / "secret.jpg")
    entries = [{"id": 10, "file_name": "a.jpg"}, {"id": 20, "file_name": "sub/b.png"}, {"id": 30, "file_name": "c.jpg"},
               {"id": 40, "file_name": "../secret.jpg"}, {"id": 50, "file_name": "gone.jpg"}, {"file_name": "x.jpg"}]
    annotations = [{"id": 100 * image + i, "image_id": image, "caption": caption}
                   for i in range(5) for image, captions in CAPTIONS.items() for caption in [captions[i]]]
    annotations += [{"id": 1, "image_id": 10, "caption": "   "}, {"id": 2, "image_id": 99, "caption": "no such image"},
                    {"id": 3, "image_id": 40, "caption": "escaping"}, "not an object",
                    {"id": 4, "image_id": 50, "caption": "a missing file"}]
    path = root / "captions_val2014.json"
    with open(path, "w") as file:
        json.dump({"info": {}, "images": entries, "annotations": annotations}, file)
    return path, images


def convert_coco(coco: tuple[Path, Path], out: Path, workers: int = 2) -> dict:
    return convert_coco_captions(coco[0], images=coco[1], out=out, prefix="val", shard_size=4, workers=workers,
                                 progress=False)


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> tuple[Path, Path]:
    return make_coco(tmp_path_factory.mktemp("coco"))


@pytest.fixture(scope="module")
def coco_converted(coco, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("coco-shards")
    return out, convert_coco(coco, out)


def groups_of(out: Path) -> dict[str, list[tuple[int, str]]]:
    """group -> [(caption_index, caption)] over every sample of the shards, in key order."""
    groups = defaultdict(list)
    for _, sample in sorted(read_samples(out).items()):
        meta = json.loads(sample["json"])
        groups[meta["group"]].append((meta["caption_index"], sample["txt"].decode()))
    return dict(groups)


def test_coco_captions_give_one_sample_per_caption_grouped_by_image(coco_converted, coco):
    out, summary = coco_converted
    assert summary["samples_in"] == 20 and summary["samples_out"] == 15
    assert summary["skipped"] == {"caption_empty": 1, "image_missing": 1, "image_unknown": 1, "path_escapes": 1,
                                  "row_invalid": 1}
    assert summary["modalities"] == {"text": 15, "image": 15, "audio": 0}
    assert groups_of(out) == {f"val:{image}": list(enumerate(captions)) for image, captions in CAPTIONS.items()}
    details = {row["reason"]: row["detail"] for row in summary["skipped_rows"]}
    assert details["image_unknown"] == "annotations[16]: image_id 99" and details["row_invalid"].startswith(
        "annotations[18]")
    samples = read_samples(out)
    first = samples["val_000000000"]
    assert first["jpg"] == (coco[1] / "a.jpg").read_bytes()
    assert json.loads(first["json"]) == {"group": "val:10", "image_id": 10, "file_name": "a.jpg", "caption_index": 0,
                                         "annotation_id": 1000, "source": "coco-captions", "row": "annotations[0]",
                                         "image_size": [48, 40], "image_format": "JPEG"}
    assert samples["val_000000006"]["png"] == (coco[1] / "sub" / "b.png").read_bytes()


def test_coco_conversion_resumes_after_a_kill_to_the_same_bytes(coco_converted, coco, tmp_path, monkeypatch):
    reference, summary = coco_converted
    expected = shard_bytes(reference)
    partial = crash_on_row_9(monkeypatch, CocoCaptions, lambda: convert_coco(coco, tmp_path, workers=1), tmp_path)
    assert {"val-000000.tar", "val-000001.tar"} <= set(partial) and "val-000002.tar" not in partial
    assert all(payload == expected[name] for name, payload in partial.items())
    (tmp_path / "val-000002.tar.tmp").write_bytes(b"half a shard")
    assert convert_coco(coco, tmp_path, workers=2) == summary
    assert shard_bytes(tmp_path) == expected and not list(tmp_path.glob("*.tmp"))


def test_coco_rerun_with_another_source_file_is_refused(coco_converted, coco, tmp_path):
    out, _ = coco_converted
    other = tmp_path / coco[0].name  # the same captions written otherwise: the same rows, another source
    other.write_text(json.dumps(json.loads(coco[0].read_text()), indent=1))
    with pytest.raises(UserError, match="options"):
        convert_coco((other, coco[1]), out)


def loader_batches(out: Path, modality: str) -> list[dict]:
    config = load_config(None, [f"data.modalities=[{modality}]", "data.workers=0", "data.batch_size=4",
                                "data.strict=true"])
    return list(BatchLoader(f"{out}/*.tar", config.data, config.audio, None, train=False))


def test_batch_loader_reads_coco_shards_with_the_group(coco_converted):
    out, _ = coco_converted
    batches = loader_batches(out, "image")
    groups = [meta["group"] for batch in batches for meta in batch["meta"]]
    assert groups == ["val:10"] * 5 + ["val:20"] * 5 + ["val:30"] * 5
    assert all(batch["image"]["present"].all() for batch in batches)


def test_coco_file_that_is_not_a_caption_file_is_a_user_error(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps([1, 2]))
    argv = ["data", "coco-captions", "--annotations", str(tmp_path / "c.json"), "--images", str(tmp_path),
            "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a COCO caption file" in err


# -- audio captions ----------------------------------------------------------------------------------

def write_wav(path: Path, seconds: float, rate: int = 44100, seed: int = 0, keep: float = 1.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    encoded = io.BytesIO()
    sf.write(encoded, (0.3 * np.sin(2 * np.pi * (220 + 40 * seed) * t)).astype(np.float32), rate, format="WAV")
    path.write_bytes(encoded.getvalue()[: int(len(encoded.getvalue()) * keep)])


CLOTHO = {"rain on a roof.wav": [f"rain falls {i}" for i in range(5)],
          "a dog, barking.wav": [f"a dog barks {i}" for i in range(5)]}


def make_clotho(root: Path) -> Path:
    """2 good clips x 5 captions at 44.1 kHz, one missing clip, one cut short, one malformed row."""
    for seed, name in enumerate(CLOTHO):
        write_wav(root / "audio" / name, 1.0 + seed, seed=seed)
    write_wav(root / "audio" / "cut.wav", 2.0, keep=0.5)
    lines = ["file_name,caption_1,caption_2,caption_3,caption_4,caption_5"]
    lines += [f'"{name}",' + ",".join(captions) for name, captions in CLOTHO.items()]
    lines += ["gone.wav,a,b,c,d,e", "cut.wav,a,b,c,d,", "too,few"]
    (root / "clotho_captions_evaluation.csv").write_text("\n".join(lines) + "\n")
    return root / "clotho_captions_evaluation.csv"


def test_clotho_gives_one_sample_per_caption_grouped_by_clip(tmp_path):
    path = make_clotho(tmp_path)
    summary = convert_audio_captions(path, audio=tmp_path / "audio", out=tmp_path / "out", prefix="test",
                                     shard_size=3, workers=2, max_audio_seconds=1.5, progress=False)
    assert summary["samples_in"] == 21 and summary["samples_out"] == 10
    assert summary["skipped"] == {"audio_missing": 5, "audio_truncated": 4, "caption_empty": 1, "row_invalid": 1}
    assert summary["changes"] == {"audio_cut": 5} and summary["modalities"] == {"text": 10, "image": 0, "audio": 10}
    assert groups_of(tmp_path / "out") == {f"test:{name}": list(enumerate(captions))
                                           for name, captions in CLOTHO.items()}
    samples = read_samples(tmp_path / "out")
    speech, rate = sf.read(io.BytesIO(samples["test_000000005"]["flac"]))
    assert rate == 16000 and len(speech) == 24000  # 2 s at 44.1 kHz, resampled and cut to 1.5 s
    meta = json.loads(samples["test_000000005"]["json"])
    assert meta["file_name"] == "a dog, barking.wav" and meta["row"] == "clotho_captions_evaluation.csv:3"
    assert meta["original_audio_seconds"] == 2.0 and meta["audio_seconds"] == 1.5
    batches = loader_batches(tmp_path / "out", "audio")
    assert [meta["group"] for batch in batches for meta in batch["meta"]] == \
        ["test:rain on a roof.wav"] * 5 + ["test:a dog, barking.wav"] * 5
    assert all(batch["audio"]["present"].all() for batch in batches)


def test_audiocaps_rows_of_one_clip_share_a_group(tmp_path):
    write_wav(tmp_path / "audio" / "abc_30.wav", 1.0)  # aac-datasets naming
    write_wav(tmp_path / "audio" / "Yxyz.wav", 1.0, rate=22050, seed=1)  # AudioSet naming
    (tmp_path / "train.csv").write_text("audiocap_id,youtube_id,start_time,caption\n"
                                        "1,abc,30,a car passes\n"
                                        "2,xyz,0,birds sing\n"
                                        "3,abc,30,an engine revs\n"
                                        "4,../up,0,escaping\n"
                                        "5,nope,10,not downloaded\n"
                                        "6,abc,soon,bad start\n")
    summary = convert_audio_captions(tmp_path / "train.csv", audio=tmp_path / "audio", out=tmp_path / "out",
                                     progress=False)
    assert summary["samples_in"] == 6 and summary["samples_out"] == 3
    assert summary["skipped"] == {"audio_missing": 1, "path_escapes": 1, "row_invalid": 1}
    assert groups_of(tmp_path / "out") == {"train:abc_30": [(0, "a car passes"), (1, "an engine revs")],
                                           "train:xyz_0": [(0, "birds sing")]}
    meta = json.loads(read_samples(tmp_path / "out")["train_000000001"]["json"])
    assert meta == {"group": "train:abc_30", "audiocap_id": "3", "youtube_id": "abc", "start_time": "30",
                    "caption_index": 1, "source": "audio-captions", "row": "train.csv:4", "audio_seconds": 1.0,
                    "original_audio_seconds": 1.0}


def test_cli_audio_captions_refuses_an_unknown_layout(tmp_path, capsys):
    (tmp_path / "x.csv").write_text("path,text\na.wav,b\n")
    argv = ["data", "audio-captions", "--csv", str(tmp_path / "x.csv"), "--audio", str(tmp_path),
            "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neither the Clotho header" in err
