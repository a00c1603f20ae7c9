"""Inference on files: opt caption on image and audio files, opt embed and opt search over
an index, and the Python API, each checked against the same samples read from a shard
(same preprocessing, same captions, same tower embeddings). A small model with random
weights: these test plumbing, not quality."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from opt import OPT, OPTModel
from opt.cli import main
from opt.downstream.captioning import caption_split
from opt.downstream.common import iterate_batches, load_model
from opt.downstream.index import EmbeddingIndex, load_index, save_index
from opt.errors import UserError
from opt.text.tokenizer import TextTokenizer
from tests.test_model import small_model

SAMPLES = 4  # the first samples of the world's test shard, written out as files
WEIGHT_STD = 0.2  # freshly initialised, the model captions every image alike; weights this large tell them apart


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inference_model")
    tokenizer.save(folder / "tok.model")
    model, _ = small_model(tokenizer)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0, WEIGHT_STD, generator=generator)
    return model.save_pretrained(folder / "model", tokenizer=TextTokenizer.from_file(folder / "tok.model"))


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(model_dir)


@pytest.fixture(scope="module")
def shard(world) -> str:
    return str(sorted(world.glob("test-*.tar"))[0])


@pytest.fixture(scope="module")
def media(shard, tmp_path_factory) -> dict:
    """The first samples of ``shard`` as files: ``images/NN_KEY.png`` and ``speech/NN_KEY.wav``
    (sorted as in the shard), plus each sample's key and caption."""
    folder = tmp_path_factory.mktemp("media")
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for member in tar:
            key, _, extension = member.name.partition(".")
            if key not in members and len(members) == SAMPLES:
                break
            members.setdefault(key, {})[extension] = tar.extractfile(member).read()
    (folder / "images").mkdir()
    (folder / "speech").mkdir()
    found = {"keys": list(members), "captions": [], "images": [], "audio": []}
    for row, (key, files) in enumerate(members.items()):
        found["images"].append(folder / "images" / f"{row:02d}_{key}.png")
        found["images"][-1].write_bytes(files["png"])
        found["audio"].append(folder / "speech" / f"{row:02d}_{key}.wav")
        found["audio"][-1].write_bytes(files["wav"])
        found["captions"].append(files["txt"].decode())
    found["folder"] = folder
    return found


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _one_line_error(code: int, capsys) -> str:
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_caption_of_image_files_matches_the_shard_and_skips_a_corrupt_one(model_dir, loaded, shard, media,
                                                                        tmp_path, capsys):
    (media["folder"] / "images" / "99_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    try:
        out = tmp_path / "captions.jsonl"
        assert main(["caption", "--model", str(model_dir), "--image", str(media["folder"] / "images"),
                     "--out", str(out)]) == 0
    finally:
        (media["folder"] / "images" / "99_broken.png").unlink()
    printed = capsys.readouterr().out
    assert "data: used 4 of 5 samples (1 skipped: image_corrupt: 1)" in printed
    rows = _read_jsonl(out)
    assert [row["key"] for row in rows] == [str(path) for path in media["images"]]
    from_shard = {c.key: c.caption for c in caption_split(loaded, shard, "image", limit=SAMPLES)}
    assert len(set(from_shard.values())) == SAMPLES  # the model tells these images apart
    assert [row["caption"] for row in rows] == [from_shard[key] for key in media["keys"]]


def test_caption_of_audio_files_by_glob_matches_the_shard(model_dir, loaded, shard, media, tmp_path):
    out = tmp_path / "transcripts.jsonl"
    assert main(["caption", "--model", str(model_dir), "--audio", str(media["folder"] / "speech" / "*.wav"),
                 "--out", str(out)]) == 0
    rows = _read_jsonl(out)
    assert [row["key"] for row in rows] == [str(path) for path in media["audio"]]
    from_shard = {c.key: c.caption for c in caption_split(loaded, shard, "audio", limit=SAMPLES)}
    assert len(set(from_shard.values())) > 1
    assert [row["caption"] for row in rows] == [from_shard[key] for key in media["keys"]]


def test_a_path_that_matches_nothing_is_a_one_line_error(model_dir, tmp_path, capsys):
    code = main(["caption", "--model", str(model_dir), "--image", str(tmp_path / "nothing-*.png"),
                 "--out", str(tmp_path / "c.jsonl")])
    assert "matches no image file" in _one_line_error(code, capsys)


@pytest.fixture(scope="module")
def image_index(model_dir, media, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("index") / "images.safetensors"
    assert main(["embed", "--model", str(model_dir), "--modality", "image", "--files",
                 *map(str, media["images"]), "--out", str(out)]) == 0
    return out


def test_index_holds_the_towers_embeddings_and_search_ranks_as_the_model_does(model_dir, loaded, shard, media,
                                                                             image_index, capsys):
    index = load_index(image_index)
    assert index.modality == "image" and index.keys == [str(path) for path in media["images"]]
    batch = next(iterate_batches(loaded, shard, modalities=["image", "text"], require=["image", "text"],
                                 limit=SAMPLES))
    with torch.no_grad():
        towers = loaded.model.tower_embeddings(loaded.model.encode_unimodal(batch, modalities=("image", "text")))
    assert index.embeddings.dtype == torch.float32
    assert torch.allclose(index.embeddings, towers["image"], atol=1e-5)
    capsys.readouterr()
    query = 2
    assert main(["search", "--model", str(model_dir), "--index", str(image_index),
                 "--text", media["captions"][query]]) == 0
    lines = capsys.readouterr().out.splitlines()
    ranked = [line.split(maxsplit=2) for line in lines]
    assert [int(rank) for rank, _, _ in ranked] == list(range(1, SAMPLES + 1))
    expected = torch.argsort(towers["text"][query] @ towers["image"].T, descending=True, stable=True)
    assert [key for _, _, key in ranked] == [str(media["images"][i]) for i in expected.tolist()]
    scores = towers["text"][query] @ towers["image"][expected].T
    assert [float(score) for _, score, _ in ranked] == pytest.approx(scores.tolist(), abs=1e-3)


def test_index_of_shards_is_keyed_by_sample_and_matches_the_files(model_dir, media, shard, image_index, tmp_path):
    out = tmp_path / "shard.safetensors"
    assert main(["embed", "--model", str(model_dir), "--modality", "image", "--data", shard, "--out", str(out)]) == 0
    from_shard, from_files = load_index(out), load_index(image_index)
    assert from_shard.keys[:SAMPLES] == media["keys"]
    assert torch.allclose(from_shard.embeddings[:SAMPLES], from_files.embeddings, atol=1e-5)


def test_search_json_with_a_query_of_the_index_modality(model_dir, media, image_index, capsys):
    capsys.readouterr()
    assert main(["search", "--model", str(model_dir), "--index", str(image_index), "--image",
                 str(media["images"][1]), "--k", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["query"] == {"modality": "image", "key": str(media["images"][1])}
    assert [hit["rank"] for hit in result["hits"]] == [1, 2]
    assert result["hits"][0]["key"] == str(media["images"][1])  # an image is closest to itself
    assert result["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)


def _wrong_dim_index(path: Path) -> None:
    save_index(EmbeddingIndex(torch.nn.functional.normalize(torch.randn(3, 8), dim=-1), ["a", "b", "c"], "image"),
               path)


@pytest.mark.parametrize("write, message", [
    (lambda path: path.write_bytes(bytes(range(256)) * 4), "is not a readable safetensors file"),
    (lambda path: save_file({"embeddings": torch.zeros(2, 32)}, str(path)), "is not an OPT embedding index"),
    (_wrong_dim_index, "holds 8-d embeddings but this model's towers give 32-d ones"),
], ids=["garbage", "other_safetensors", "other_dim"])
def test_a_bad_index_is_a_one_line_error(write, message, model_dir, tmp_path, capsys):
    path = tmp_path / "bad.safetensors"
    write(path)
    code = main(["search", "--model", str(model_dir), "--index", str(path), "--text", "a red circle"])
    assert message in _one_line_error(code, capsys)


def test_api_captions_like_the_cli_from_a_path_bytes_or_a_pil_image(model_dir, media, tmp_path):
    out = tmp_path / "one.jsonl"
    path = media["images"][0]
    assert main(["caption", "--model", str(model_dir), "--image", str(path), "--out", str(out)]) == 0
    (cli_caption,) = [row["caption"] for row in _read_jsonl(out)]
    opt = OPT.load(model_dir)
    assert isinstance(opt.model, OPTModel)
    assert opt.caption(images=[path, path.read_bytes(), Image.open(path)]) == [cli_caption] * 3
    with pytest.raises(UserError, match=r"images\[1\] cannot be read \(image_corrupt\)"):
        opt.caption(images=[path, b"not an image"])


def test_api_text_embeddings_equal_the_index_rows_of_a_text_file(model_dir, tmp_path, capsys):
    texts = ["a big red circle", "a small blue square to the left of a green triangle"]
    (tmp_path / "texts.txt").write_bytes(f"{texts[0]}\n\n\xff not UTF-8\n{texts[1]}\n".encode("latin-1"))
    out = tmp_path / "texts.safetensors"
    assert main(["embed", "--model", str(model_dir), "--modality", "text", "--texts", str(tmp_path / "texts.txt"),
                 "--out", str(out)]) == 0
    assert "data: used 2 of 3 samples (1 skipped: text_not_utf8: 1)" in capsys.readouterr().out
    index = load_index(out)
    assert index.keys == texts and index.modality == "text"
    embeddings = OPT.load(model_dir).embed(texts=texts)
    assert embeddings.shape == (2, 32)
    assert torch.allclose(embeddings, index.embeddings, atol=1e-5)


def test_api_generates_n_images_per_prompt(model_dir):
    images = OPT.load(model_dir).generate("a red circle", n=2, candidates=1)
    assert len(images) == 2 and all(isinstance(image, Image.Image) and image.size == (64, 64) for image in images)
