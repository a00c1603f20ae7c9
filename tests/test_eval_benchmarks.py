"""``opt eval --data SHARDS --name NAME`` on caption benchmarks converted from their published
formats (a COCO caption JSON with five captions per image, a Clotho CSV with five per clip),
checked against figures worked out by hand.

The model's scores are replaced by known ones so the answers can be known: the two towers
score a caption against an image or clip by a rule on the caption's index, and the captioner
writes one fixed sentence. Everything else is the real path: converter, shards, loader,
grouping, ranking, pycocoevalcap and the report.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from opt.cli import main
from opt.data.convert import convert_audio_captions
from opt.downstream import captioning, retrieval
from tests.test_convert_captions import convert_coco, make_clotho, make_coco
from tests.test_model import small_model


def rule_scores(loaded, split, query, target, *, queries, candidates) -> torch.Tensor:
    """A caption with index 0-2 scores its own group 1 and the others 0; one with index 3-4 the
    reverse (so its true match ranks below every other group)."""
    text_rows, other_rows = (queries, candidates) if query == ("text",) else (candidates, queries)
    groups = split.groups()
    scores = torch.tensor([[float((groups[t] == groups[o]) == (split.meta[t]["caption_index"] < 3))
                            for o in other_rows.tolist()] for t in text_rows.tolist()])
    return scores if query == ("text",) else scores.T


@pytest.fixture()
def scripted_model(monkeypatch, tokenizer, tmp_path):
    """A small model directory whose towers score by :func:`rule_scores` and whose captioner
    writes ``caption`` (set on the returned dict)."""
    model, _ = small_model(tokenizer)
    path = model.save_pretrained(tmp_path / "model", tokenizer=tokenizer)
    script = {"caption": ""}
    monkeypatch.setattr(retrieval, "tower_scores", rule_scores)
    monkeypatch.setattr(captioning, "caption_batch",
                        lambda loaded, batch, sources, beam=1: [script["caption"]] * len(batch["keys"]))
    return path, script


def run_eval(model, data, out, name="val") -> dict:
    argv = ["eval", "--model", str(model), "--data", str(data), "--name", name, "--out", str(out),
            "--rerank-k", "0", "--no-meteor", "--generate-count", "2", "--candidates", "1"]
    assert main(argv) == 0
    return json.loads((out / "metrics.json").read_text())[name]


def test_coco_with_five_captions_per_image_by_hand(scripted_model, tmp_path, capsys):
    model, script = scripted_model
    convert_coco(make_coco(tmp_path / "coco"), tmp_path / "shards")  # 3 images x 5 captions
    script["caption"] = "image 10 caption 0"
    metrics = run_eval(model, tmp_path / "shards", tmp_path / "report")
    assert set(metrics["retrieval"]) == {"t2i", "i2t"} and set(metrics["captioning"]) == {"image"}
    t2i, i2t = metrics["retrieval"]["t2i"], metrics["retrieval"]["i2t"]
    # 15 captions over 3 images: indices 0-2 (9 captions) rank their image first, 3-4 (6) third
    assert (t2i["n"], t2i["candidates"]) == (15, 3)
    assert t2i["r1"] == pytest.approx(9 / 15) and t2i["r5"] == 1.0
    assert t2i["mean_rank"] == pytest.approx((9 * 1 + 6 * 3) / 15)
    # each image: its captions 0-2 score 1, tied with the other images' captions 3-4 (ties go to the query)
    assert (i2t["n"], i2t["candidates"], i2t["r1"]) == (3, 15, 1.0)
    # "image 10 caption 0" against each image's five references: 4 of 4 words for image 10, 3 of 4
    # ("image", "caption", "0") for 20 and 30; candidate and references all 4 words: no brevity penalty
    captions = metrics["captioning"]["image"]
    assert captions["n"] == 3 and captions["bleu_1"] == pytest.approx(10 / 12, abs=1e-6)
    assert "text_to_image" in metrics and metrics["data"]["used"] == 15
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| val | " in report and "| t2i |" in report and "| a2t |" not in report
    assert "val: t2i R@1 0.600" in capsys.readouterr().out
    card = (model / "README.md").read_text()  # the model card's evaluation section holds the figures
    assert "Not evaluated yet" not in card and "**val** (used 15 of 15 samples (0 skipped)): t2i R@1 0.600" in card


def test_a_model_directory_describes_itself_and_old_ones_still_load(scripted_model):
    from opt.model.opt_model import OPTModel

    model, _ = scripted_model
    config = json.loads((model / "config.json").read_text())
    assert config["model_type"] == "opt" and config["kind"] == "opt_model"
    card = (model / "README.md").read_text()
    assert "# OPT model" in card and "| trainable |" in card and "Not trained" in card and "```yaml" in card
    del config["model_type"], config["spec"]["backbones"]  # as written before this release
    (model / "config.json").write_text(json.dumps(config))
    (model / "README.md").unlink()
    assert OPTModel.from_pretrained(model).spec.backbones == {}


def test_clotho_with_five_captions_per_clip_by_hand(scripted_model, tmp_path):
    model, script = scripted_model
    convert_audio_captions(make_clotho(tmp_path / "clotho"), audio=tmp_path / "clotho" / "audio",
                           out=tmp_path / "shards", prefix="test", max_audio_seconds=1.5, progress=False)
    script["caption"] = "rain falls 0"
    metrics = run_eval(model, tmp_path / "shards", tmp_path / "report", name="clotho")
    assert set(metrics["retrieval"]) == {"t2a", "a2t"} and set(metrics["captioning"]) == {"audio"}
    assert "text_to_image" not in metrics
    t2a, a2t = metrics["retrieval"]["t2a"], metrics["retrieval"]["a2t"]
    # 10 captions over 2 clips: indices 0-2 (6) rank their clip first, 3-4 (4) second
    assert (t2a["n"], t2a["candidates"]) == (10, 2)
    assert t2a["r1"] == pytest.approx(6 / 10) and t2a["mean_rank"] == pytest.approx((6 + 4 * 2) / 10)
    assert (a2t["n"], a2t["candidates"], a2t["r1"]) == (2, 10, 1.0)
    captions = metrics["captioning"]["audio"]
    # "rain falls 0": 3 of 3 words for the rain clip, 1 ("0") for the dog clip; 6 candidate words
    # against references of 3 ("rain falls i") and 4 ("a dog barks i") words: brevity penalty exp(1 - 7/6)
    assert captions["bleu_1"] == pytest.approx(4 / 6 * math.exp(1 - 7 / 6), abs=1e-6)
    # WER against each clip's captioned sample (its caption 0): "rain falls 0" 0 edits of 3 words,
    # "a dog barks 0" 3 edits (two substitutions, one deletion) of 4
    assert captions["wer"] == pytest.approx(3 / 7)


def test_a_world_directory_without_a_name_gives_its_splits_and_any_shards_one(tokenizer, world, tmp_path):
    from opt.downstream.evaluate import evaluation_splits
    from opt.downstream.plugins import PLUGINS

    splits, plugins = evaluation_splits(world)
    assert set(splits) == {"test", "test_novel", "test_unseen"} and len(plugins) == 1
    splits, plugins = evaluation_splits(f"{world}/val-*.tar")
    assert splits == {"eval": f"{world}/val-*.tar"} and plugins == PLUGINS
    assert evaluation_splits(world, "all")[0] == {"all": str(world)}
