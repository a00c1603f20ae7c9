"""Benchmarks with several captions per image or clip (COCO, Flickr30k, Clotho, AudioCaps):
retrieval with several true matches and captioning against every reference of a group, on
cases small enough to work out by hand, and the synthetic world (no groups) unchanged."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import webdataset as wds
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from opt.downstream import caption_metrics as metrics_module
from opt.downstream.caption_metrics import caption_scores, word_error_rate
from opt.downstream.captioning import Caption, caption_metrics, caption_split
from opt.downstream.common import group_of
from opt.downstream.retrieval import (DIRECTIONS, best_match_ranks, caption_log_likelihoods, matching_scores,
                                      rank_metrics, reranked_ranks, retrieve, side_rows, tower_scores, true_matches)
from tests.test_downstream import encoded, model_dir  # noqa: F401 (fixtures)
from tests.test_pipeline import world_samples

# 3 images (groups A, B, C) x 6 captions, two per image: caption i describes image i // 2.
GROUPS = ["A", "A", "B", "B", "C", "C"]
TEXT_TO_IMAGE = torch.tensor([
    [0.9, 0.1, 0.2],  # A: its image first -> rank 1
    [0.3, 0.8, 0.1],  # A: B above -> rank 2
    [0.5, 0.4, 0.6],  # B: C and A above -> rank 3
    [0.1, 0.7, 0.2],  # B: rank 1
    [0.6, 0.2, 0.5],  # C: A above -> rank 2
    [0.2, 0.3, 0.9],  # C: rank 1
])


def test_a_side_with_text_is_every_sample_and_one_without_is_each_groups_first():
    assert side_rows(GROUPS, ("text",)).tolist() == [0, 1, 2, 3, 4, 5]
    assert side_rows(GROUPS, ("text", "audio")).tolist() == [0, 1, 2, 3, 4, 5]
    assert side_rows(GROUPS, ("image",)).tolist() == [0, 2, 4]
    assert side_rows(["A", "B", "A", "C", "B"], ("audio",)).tolist() == [0, 1, 3]
    assert group_of("k1", {}) == "k1" and group_of("k1", {"group": "img7"}) == "img7"


def test_text_to_image_ranks_each_caption_by_its_groups_image():
    images = [GROUPS[i] for i in side_rows(GROUPS, ("image",)).tolist()]
    ranks = best_match_ranks(TEXT_TO_IMAGE, true_matches(GROUPS, images))
    assert ranks.tolist() == [1, 2, 3, 1, 2, 1]
    metrics = rank_metrics(ranks)
    assert metrics["r1"] == 0.5 and metrics["n"] == 6
    assert float((ranks <= 2).float().mean()) == pytest.approx(5 / 6)
    assert metrics["mean_rank"] == pytest.approx(10 / 6)


def test_image_to_text_finds_an_image_when_any_of_its_captions_ranks_high():
    """Image B: its captions score 0.4 and 0.7, caption 1 (of A) 0.8 above both -> rank 2."""
    ranks = best_match_ranks(TEXT_TO_IMAGE.T, true_matches(["A", "B", "C"], GROUPS))
    assert ranks.tolist() == [1, 2, 1]
    metrics = rank_metrics(ranks)
    assert metrics["r1"] == pytest.approx(2 / 3) and metrics["n"] == 3
    assert float((ranks <= 2).float().mean()) == 1.0
    assert metrics["mean_rank"] == pytest.approx(4 / 3)


def test_ties_go_to_the_query_and_groups_of_one_rank_by_the_diagonal():
    scores = torch.tensor([[0.5, 0.5, 0.1], [0.9, 0.2, 0.3], [0.1, 0.2, 0.3]])
    assert best_match_ranks(scores, torch.eye(3, dtype=torch.bool)).tolist() == [1, 3, 1]
    assert true_matches(["x", "y", "z"], ["x", "y", "z"]).equal(torch.eye(3, dtype=torch.bool))


def test_reranking_moves_the_best_true_match_inside_the_top_k_only():
    tower_ranks = torch.tensor([2, 4, 1, 1])
    top_scores = torch.tensor([[0.1, 0.5], [0.9, 0.8], [0.3, 0.2], [0.1, 0.9]])  # (4 queries, k = 2)
    top_matches = torch.tensor([[False, True], [False, False], [True, True], [True, False]])
    # 0: its match re-ranked first; 1: no match in its top 2, keeps rank 4;
    # 2: two matches, the better first; 3: its match overtaken -> 2
    assert reranked_ranks(tower_ranks, top_scores, top_matches).tolist() == [1, 4, 1, 2]


def test_a_caption_identical_to_the_second_reference_is_a_perfect_bleu_1():
    references = {"a": ["a dog runs on the grass", "a brown dog is running"],
                  "b": ["two cats sleep on a sofa", "cats sleeping together"]}
    predictions = {"a": "a brown dog is running", "b": "cats sleeping together"}
    scores = caption_scores(predictions, references, with_meteor=False)
    assert scores["bleu_1"] == pytest.approx(1.0) and scores["bleu_4"] == pytest.approx(1.0)
    assert scores["rouge_l"] == pytest.approx(1.0)


def test_every_reference_clips_the_unigrams_bleu_1_counts():
    """"a blue ball": "a" and "ball" from the first reference, "blue" from the second: 3 of 3
    words (2 of 3 against the first alone), all references three words long."""
    prediction = {"x": "a blue ball"}
    assert caption_scores(prediction, {"x": ["a red ball"]}, with_meteor=False)["bleu_1"] == pytest.approx(2 / 3)
    both = caption_scores(prediction, {"x": ["a red ball", "the blue cube"]}, with_meteor=False)
    assert both["bleu_1"] == pytest.approx(1.0)


def test_scores_with_two_references_are_pycocoevalcaps():
    references = {"a": ["a dog runs on the grass", "a brown dog is running"],
                  "b": ["two cats sleep on a sofa", "cats sleeping together"],
                  "c": ["a red car on the road", "a car parked by the road"]}
    predictions = {"a": "a dog on the grass", "b": "a cat on a sofa", "c": "a red car"}
    scores = caption_scores(predictions, references, with_meteor=False)
    single = {key: [text] for key, text in predictions.items()}
    bleu, _ = Bleu(4).compute_score(references, single, verbose=0)
    cider, _ = Cider().compute_score(references, single)
    assert scores["bleu_1"] == pytest.approx(bleu[0]) and scores["bleu_4"] == pytest.approx(bleu[3])
    assert scores["cider"] == pytest.approx(cider) and 0 < scores["cider"]


def test_spice_is_skipped_with_a_warning_and_never_downloads(monkeypatch, tmp_path):
    def refuse():
        raise AssertionError("SPICE must not start (it would download Stanford CoreNLP)")

    monkeypatch.setattr(metrics_module, "spice_models", lambda: [tmp_path / "stanford-corenlp-3.6.0.jar"])
    monkeypatch.setattr(metrics_module, "Spice", refuse)
    with pytest.warns(UserWarning, match="SPICE is not computed"):
        scores = caption_scores({"a": "a dog"}, {"a": ["a dog", "the dog"]}, with_meteor=False)
    assert scores["spice"] is None


def test_spice_runs_when_java_and_the_corenlp_jars_are_present(monkeypatch, tmp_path):
    jars = [tmp_path / "stanford-corenlp-3.6.0.jar", tmp_path / "stanford-corenlp-3.6.0-models.jar"]
    for jar in jars:
        jar.touch()
    seen = {}

    class FakeSpice:
        def compute_score(self, references, predictions):
            seen.update(references=references, predictions=predictions)
            return 0.25, []

    monkeypatch.setattr(metrics_module, "spice_models", lambda: jars)
    monkeypatch.setattr(metrics_module, "_java_available", lambda: True)
    monkeypatch.setattr(metrics_module, "Spice", FakeSpice)
    monkeypatch.setattr(metrics_module, "tokenize", metrics_module._simple_tokenize)
    scores = caption_scores({"a": "a dog"}, {"a": ["a dog", "the dog"]}, with_meteor=False)
    assert scores["spice"] == 0.25 and seen["references"] == {"a": ["a dog", "the dog"]}


def test_caption_metrics_score_each_group_against_all_its_references_and_wer_against_its_own():
    captions = [Caption("k0", "a brown dog is running", "a dog runs on the grass", {},
                        ["a dog runs on the grass", "a brown dog is running"]),
                Caption("k2", "two cats sleep on a sofa", "two cats sleep on a sofa", {},
                        ["two cats sleep on a sofa", "cats sleeping together"])]
    metrics = caption_metrics(captions, "audio", with_meteor=False)
    assert metrics["n"] == 2 and metrics["bleu_1"] == pytest.approx(1.0)
    expected = word_error_rate({"k0": "a brown dog is running", "k2": "two cats sleep on a sofa"},
                               {"k0": "a dog runs on the grass", "k2": "two cats sleep on a sofa"})
    assert metrics["wer"] == pytest.approx(expected) and metrics["wer"] > 0


@pytest.fixture(scope="module")
def grouped_shard(world, tmp_path_factory):
    """Six world samples in three groups, not contiguous: g0 g1 g0 g2 g1 g2."""
    folder = tmp_path_factory.mktemp("grouped")
    samples, groups = world_samples(world, 6), ["g0", "g1", "g0", "g2", "g1", "g2"]
    with wds.TarWriter(str(folder / "grouped-000000.tar")) as shard:
        for i, (sample, group) in enumerate(zip(samples, groups)):
            meta = json.loads(sample["json"]) | {"group": group}
            shard.write({"__key__": f"s{i}", **sample, "json": json.dumps(meta).encode()})
    with wds.TarWriter(str(folder / "plain-000000.tar")) as shard:
        for i, sample in enumerate(samples):
            shard.write({"__key__": f"s{i}", **sample})
    return folder, [sample["txt"].decode() for sample in samples]


def test_caption_split_captions_each_groups_first_sample_with_every_caption_as_reference(encoded, grouped_shard):
    loaded, _ = encoded
    folder, texts = grouped_shard
    grouped = caption_split(loaded, str(folder / "grouped-000000.tar"), "image", batch_size=2)
    plain = {c.key: c for c in caption_split(loaded, str(folder / "plain-000000.tar"), "image", batch_size=2)}
    assert len(plain) == 6 and all(c.references == [c.reference] for c in plain.values())
    assert [c.key for c in grouped] == ["s0", "s1", "s3"]
    assert [c.references for c in grouped] == [[texts[0], texts[2]], [texts[1], texts[4]], [texts[3], texts[5]]]
    assert [c.caption for c in grouped] == [plain[key].caption for key in ("s0", "s1", "s3")]
    assert [c.reference for c in grouped] == [texts[0], texts[1], texts[3]]


def reference_retrieval(loaded, split, query, target, k):
    """Retrieval as it was written for one caption per sample: the target of query i is candidate i."""
    scores = tower_scores(loaded, split, query, target)
    n = len(split)
    truth = torch.arange(n)
    tower = 1 + (scores > scores.diagonal()[:, None]).sum(1)
    top = scores.topk(k, dim=1).indices
    matched = matching_scores(loaded, split, query, target, truth.repeat_interleave(k), top.reshape(-1))
    matched = matched.reshape(n, k) + float(loaded.model.temperature()) * scores.gather(1, top)
    if target == "text":
        likelihood = caption_log_likelihoods(loaded, split, query, truth.repeat_interleave(k), top.reshape(-1))
    elif "text" in query:
        likelihood = caption_log_likelihoods(loaded, split, (target,), top.reshape(-1), truth.repeat_interleave(k))
    else:
        likelihood = torch.zeros(n * k)
    matched = matched + likelihood.reshape(n, k)
    ranks = tower.clone()
    for i in range(n):
        where = (top[i] == i).nonzero()
        if len(where):
            ranks[i] = 1 + int((matched[i] > matched[i, where[0, 0]]).sum())
    return rank_metrics(ranks), rank_metrics(tower)


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_the_world_without_groups_gives_the_one_to_one_numbers(encoded, name):
    loaded, split = encoded
    query, target = DIRECTIONS[name]
    with torch.no_grad():
        expected, expected_tower = reference_retrieval(loaded, split, query, target, 4)
    result = retrieve(loaded, split, query, target, rerank_k=4)
    assert {key: result[key] for key in expected} == expected
    assert result["two_tower"] == expected_tower and result["candidates"] == len(split) == result["n"]


def test_retrieval_over_groups_of_two_counts_each_image_once(encoded):
    """World samples paired into groups: T->I ranks 24 captions among 12 images, I->T 12 images
    among 24 captions, each by its best true match."""
    loaded, split = encoded
    grouped = dataclasses.replace(split, meta=[m | {"group": f"g{i // 2}"} for i, m in enumerate(split.meta)])
    with torch.no_grad():
        scores = tower_scores(loaded, split, ("text",), "image")  # (24 texts, 24 images)
    for query, target in ((("text",), "image"), (("image",), "text")):
        result = retrieve(loaded, grouped, query, target, rerank_k=0)
        by_row = scores if target == "image" else scores.T  # (queries, candidates) over every row
        ranks = []
        for i in side_rows(grouped.groups(), query).tolist():
            columns = side_rows(grouped.groups(), (target,)).tolist()
            best = max(float(by_row[i, j]) for j in columns if j // 2 == i // 2)
            ranks.append(1 + sum(float(by_row[i, j]) > best for j in columns))
        assert result["n"] == len(ranks) == (24 if target == "image" else 12)
        assert result["candidates"] == (12 if target == "image" else 24)
        assert result["mean_rank"] == pytest.approx(sum(ranks) / len(ranks), abs=1e-6)
        assert result["r1"] == pytest.approx(sum(r == 1 for r in ranks) / len(ranks))
    reranked = retrieve(loaded, grouped, ("image",), "text", rerank_k=24)
    assert reranked["seconds"]["rerank_pairs"] == 12 * 24 and reranked["two_tower"]["n"] == 12


def test_r_precision_draws_distractors_from_other_groups_only(encoded):
    """Without groups the draws are those of one caption per sample (every other prompt); with the
    whole split one group there is no distractor left, so every prompt ranks first."""
    from opt.downstream.text_to_image import r_precision

    loaded, split = encoded
    images, rows = split.pixels[:6], torch.arange(6)
    with torch.no_grad():
        image_embeddings = loaded.model.tower_embeddings(loaded.model.encode_unimodal(
            {"image": {"pixels": images, "present": torch.ones(6, dtype=torch.bool)}}, modalities=("image",)))["image"]
        text_embeddings = loaded.model.tower_embeddings({"text": {"pooled": split.unimodal["text"]["pooled"]}})["text"]
    generator, hits = torch.Generator().manual_seed(0), 0
    for image, row in zip(image_embeddings.float(), rows.tolist()):
        others = torch.randperm(len(split) - 1, generator=generator)[:5]
        pool = torch.cat([torch.tensor([row]), others + (others >= row).long()])
        hits += int((text_embeddings.float()[pool] @ image).argmax() == 0)
    assert r_precision(loaded, images, split, rows, distractors=5) == hits / 6
    one_group = dataclasses.replace(split, meta=[m | {"group": "all"} for m in split.meta])
    assert r_precision(loaded, images, one_group, rows, distractors=5) == 1.0
