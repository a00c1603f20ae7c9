"""Downstream commands on a small model trained for a few steps in this session:
captioning, text-to-image, retrieval and the evaluation report, and the samples
each of them used and skipped."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds

from opt.cli import main
from opt.config import load_config
from opt.data.batch import batch_rows
from opt.downstream import retrieval
from opt.downstream.common import EncodedSplit, encode_split, load_model
from opt.downstream.retrieval import DIRECTIONS, rank_metrics, retrieve
from opt.engine.export import export_run
from opt.engine.trainer import Trainer
from tests.test_pipeline import world_samples

METRIC_KEYS = {"r1", "r5", "r10", "mean_rank", "n"}


@pytest.fixture(scope="module")
def model_dir(small_training_overrides, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("downstream_run")
    config = load_config("configs/tiny.yaml", small_training_overrides + ["train.steps=12", "train.warmup_steps=2",
                                                                          "train.log_every=4"])
    Trainer(config, run, progress=False).fit()
    return export_run(run, run / "model")


@pytest.fixture(scope="module")
def encoded(model_dir, world) -> tuple:
    loaded = load_model(model_dir)
    return loaded, encode_split(loaded, f"{world}/test-*.tar")


@pytest.fixture(scope="module")
def damaged(world, tmp_path_factory) -> Path:
    """``some_bad-000000.tar``: five good samples, then a cut PNG, a broken PNG and an empty WAV;
    ``all_bad-000000.tar``: three samples whose PNGs are cut."""
    goods = world_samples(world, 5)
    folder = tmp_path_factory.mktemp("damaged")
    with wds.TarWriter(str(folder / "some_bad-000000.tar")) as shard:
        for i, good in enumerate(goods):
            shard.write({"__key__": f"good{i}", **good})
        shard.write({"__key__": "cut_png", **goods[0], "png": goods[0]["png"][: len(goods[0]["png"]) // 2]})
        shard.write({"__key__": "broken_png", **goods[1], "png": b"\x89PNG\r\n\x1a\nnot really"})
        shard.write({"__key__": "empty_wav", **goods[2], "wav": b""})
    with wds.TarWriter(str(folder / "all_bad-000000.tar")) as shard:
        for i, good in enumerate(goods[:3]):
            shard.write({"__key__": f"bad{i}", **good, "png": good["png"][:40]})
    return folder


def check_ranks(metrics: dict, n: int) -> None:
    assert METRIC_KEYS <= set(metrics) and metrics["n"] == n
    assert 0.0 <= metrics["r1"] <= metrics["r5"] <= metrics["r10"] <= 1.0
    assert 1.0 <= metrics["mean_rank"] <= n


def test_rank_metrics_from_known_ranks():
    metrics = rank_metrics(torch.tensor([1, 2, 6, 11]))
    assert metrics == {"r1": 0.25, "r5": 0.5, "r10": 0.75, "mean_rank": 5.0, "n": 4}


def test_encoded_split_holds_every_sample_and_modality(encoded, world):
    _, split = encoded
    assert len(split) == 24 and len(set(split.keys)) == 24
    assert set(split.unimodal) == {"text", "image", "audio"}
    assert split.pixels.shape[0] == 24 and split.unimodal["audio"]["tokens"].shape[0] == 24


def test_reranking_only_reorders_the_top_k(encoded):
    loaded, split = encoded
    plain = retrieve(loaded, split, ("audio",), "text", rerank_k=0)
    assert {k: plain[k] for k in METRIC_KEYS} == {k: plain["two_tower"][k] for k in METRIC_KEYS}
    for k in (4, 24):
        reranked = retrieve(loaded, split, ("audio",), "text", rerank_k=k)
        check_ranks(reranked, 24)
        assert reranked["two_tower"] == plain["two_tower"]
        if k == 4:  # targets outside the top 4 keep their tower rank
            assert reranked["r5"] >= plain["r5"] - 1e-9 and reranked["r10"] == plain["r10"]
    full = retrieve(loaded, split, ("audio",), "text", rerank_k=24)
    assert full["seconds"]["rerank_pairs"] == 24 * 24


@pytest.mark.parametrize("query, target", [(("image",), "text"), (("text",), "image"), (("text",), "audio")])
def test_reranking_the_whole_pool_ranks_by_matching_tower_and_caption_scores(encoded, query, target):
    """With K = N, the rank of each query's target is its rank by log P(matched) plus the
    towers' contrastive logit, plus the caption's likelihood: log P(candidate caption | query
    image) for I->T, log P(query caption | candidate image or speech) for T->I and T->A."""
    from opt.downstream.retrieval import caption_log_likelihoods, matching_scores, tower_scores

    loaded, split = encoded
    n = len(split)
    queries = torch.arange(n).repeat_interleave(n)
    candidates = torch.arange(n).repeat(n)
    matched = matching_scores(loaded, split, query, target, queries, candidates).reshape(n, n)
    with torch.no_grad():
        scores = matched + float(loaded.model.temperature()) * tower_scores(loaded, split, query, target)
    condition = query if target == "text" else (target,)
    sources, captions = (queries, candidates) if target == "text" else (candidates, queries)
    likelihood = caption_log_likelihoods(loaded, split, condition, sources, captions).reshape(n, n)
    assert (likelihood < 0).all()
    for with_captions, total in ((False, scores), (True, scores + likelihood)):
        expected = 1 + (total > total.diagonal()[:, None]).sum(1)
        result = retrieve(loaded, split, query, target, rerank_k=n, caption_likelihood=with_captions)
        assert result["mean_rank"] == pytest.approx(expected.float().mean().item(), abs=1e-6)
    by_matching_alone = 1 + (matched > matched.diagonal()[:, None]).sum(1)
    assert not torch.equal(1 + (scores > scores.diagonal()[:, None]).sum(1), by_matching_alone)


def test_caption_likelihood_is_the_decoders_log_probability_of_the_caption(encoded):
    from opt.downstream.retrieval import caption_log_likelihoods

    loaded, split = encoded
    model, index = loaded.model, torch.tensor([0, 3])
    ids = split.text_ids[index]
    length = int((ids[0] != loaded.tokenizer.pad_id).sum())
    with torch.no_grad():
        unimodal = {"audio": split.select("audio", index)}
        fused = model.fuse(unimodal, ("audio",))
        expected = 0.0
        for t in range(1, length):  # one token at a time from the bos, sample 0
            logits = model.text_decoder(ids[:1, :t], fused["states"][:1], fused["mask"][:1])[0, -1]
            expected += float(logits.log_softmax(-1)[ids[0, t]])
    scores = caption_log_likelihoods(loaded, split, ("audio",), index, index)
    assert float(scores[0]) == pytest.approx(expected, abs=1e-3)


def test_retrieve_cli_writes_every_direction(model_dir, world, tmp_path):
    out = tmp_path / "metrics.json"
    assert main(["retrieve", "--model", str(model_dir), "--data", f"{world}/test-*.tar", "--all",
                 "--rerank-k", "4", "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics.pop("data") == {"used": 24, "skipped": {}, "repaired": {}}
    assert set(metrics) == set(DIRECTIONS)
    for values in metrics.values():
        check_ranks(values, 24)


def test_retrieve_cli_one_direction(model_dir, world, tmp_path):
    out = tmp_path / "a2t.json"
    assert main(["retrieve", "--model", str(model_dir), "--data", f"{world}/test-*.tar", "--query", "audio",
                 "--target", "text", "--rerank-k", "0", "--out", str(out)]) == 0
    assert list(json.loads(out.read_text())) == ["data", "a2t"]


@pytest.mark.parametrize("directions, line, skipped", [
    (["--all"], "data: used 5 of 8 samples (3 skipped: audio_empty: 1, image_corrupt: 2)",
     {"audio_empty": 1, "image_corrupt": 2}),
    (["--query", "audio", "--target", "text"], "data: used 7 of 8 samples (1 skipped: audio_empty: 1)",
     {"audio_empty": 1}),  # the images are not read
])
def test_retrieve_cli_reports_the_samples_it_skipped(model_dir, damaged, tmp_path, capsys, directions, line,
                                                     skipped):
    out = tmp_path / "metrics.json"
    assert main(["retrieve", "--model", str(model_dir), "--data", str(damaged / "some_bad-000000.tar"), *directions,
                 "--rerank-k", "2", "--out", str(out)]) == 0
    assert line in capsys.readouterr().out.splitlines()
    used = 8 - sum(skipped.values())
    metrics = json.loads(out.read_text())
    assert metrics.pop("data") == {"used": used, "skipped": skipped, "repaired": {}}
    for values in metrics.values():
        check_ranks(values, used)


@pytest.mark.parametrize("inputs", ["image", "audio", "image+audio"])
def test_caption_cli_writes_one_line_per_sample_and_metrics(model_dir, world, tmp_path, inputs):
    out = tmp_path / "new" / "captions.jsonl"  # the missing folder is created
    assert main(["caption", "--model", str(model_dir), "--data", f"{world}/test-*.tar", "--inputs", inputs,
                 "--out", str(out), "--limit", "10"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 10 and all(set(r) == {"key", "caption"} and isinstance(r["caption"], str) for r in rows)
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    for name in ("bleu_4", "rouge_l", "cider", "attribute_accuracy"):
        assert 0.0 <= metrics[name] <= 10.0
    assert 0.0 <= metrics["attribute_accuracy"] <= 1.0
    assert ("wer" in metrics) == (inputs == "audio")
    assert metrics["data"] == {"used": 10, "skipped": {}, "repaired": {}}


@pytest.mark.parametrize("inputs, line, skipped", [
    ("image", "data: used 6 of 8 samples (2 skipped: image_corrupt: 2)", {"image_corrupt": 2}),  # audio not read
    ("audio", "data: used 7 of 8 samples (1 skipped: audio_empty: 1)", {"audio_empty": 1}),
])
def test_caption_cli_reports_the_samples_it_skipped(model_dir, damaged, tmp_path, capsys, inputs, line, skipped):
    out = tmp_path / "captions.jsonl"
    assert main(["caption", "--model", str(model_dir), "--data", str(damaged / "some_bad-000000.tar"),
                 "--inputs", inputs, "--out", str(out)]) == 0
    assert line in capsys.readouterr().out.splitlines()
    used = 8 - sum(skipped.values())
    assert len(out.read_text().splitlines()) == used
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    assert metrics["n"] == used and metrics["data"] == {"used": used, "skipped": skipped, "repaired": {}}


@pytest.mark.parametrize("command", [["caption", "--out", "captions.jsonl"], ["retrieve", "--all"]])
def test_a_shard_without_one_usable_sample_is_a_one_line_error(model_dir, damaged, tmp_path, monkeypatch, capsys,
                                                                command):
    monkeypatch.chdir(tmp_path)
    shard = damaged / "all_bad-000000.tar"
    assert main([command[0], "--model", str(model_dir), "--data", str(shard), *command[1:]]) == 2
    assert capsys.readouterr().err == (f"opt: error: no usable samples in {shard}: "
                                       "used 0 of 3 samples (3 skipped: image_corrupt: 3)\n")
    assert list(tmp_path.iterdir()) == []


def test_generate_cli_writes_one_png_per_prompt_and_sample_and_a_grid(model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small red circle on the left\n\na large blue star above a small green cross\n")
    out = tmp_path / "gen"
    assert main(["generate", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(out),
                 "--n", "2", "--steps", "3"]) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["00000_00.png", "00000_01.png", "00001_00.png", "00001_01.png", "grid.png"]


def test_generate_with_speech_and_autoregressive_decoding(model_dir, world, tmp_path):
    import tarfile

    with tarfile.open(sorted(world.glob("test-*.tar"))[0]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".wav"))
        (tmp_path / "speech.wav").write_bytes(tar.extractfile(member).read())
    out = tmp_path / "gen"
    assert main(["generate", "--model", str(model_dir), "--prompt", "a red square", "--audio",
                 str(tmp_path / "speech.wav"), "--out", str(out), "--decoding", "autoregressive"]) == 0
    assert (out / "00000_00.png").is_file()


def test_prompt_agreement_is_the_captioners_log_likelihood_of_the_prompt(encoded):
    from opt.downstream.retrieval import caption_log_likelihoods
    from opt.downstream.text_to_image import prompt_agreement, prompt_batch

    loaded, split = encoded
    index = torch.arange(5)
    batch = prompt_batch(loaded, split.captions[:5])
    agreement = prompt_agreement(loaded, batch, split.pixels[:5])
    expected = caption_log_likelihoods(loaded, split, ("image",), index, index)
    assert (agreement < 0).all() and torch.allclose(agreement, expected, atol=1e-3)


def test_prompt_batches_are_the_pipelines_batches_of_the_same_captions_and_speech(encoded, world):
    """Prompts are decoded and collated as training reads shards: prompting with the captions
    and speech of a shard's samples gives the tensors the pipeline gives for those samples."""
    import tarfile

    from opt.downstream.common import iterate_batches
    from opt.downstream.text_to_image import prompt_batch

    loaded, _ = encoded
    shard = sorted(world.glob("test-*.tar"))[0]
    read = next(iterate_batches(loaded, str(shard), batch_size=5, limit=5))
    with tarfile.open(shard) as tar:
        speech = {m.name.removesuffix(".wav"): tar.extractfile(m).read() for m in tar if m.name.endswith(".wav")}
    text_only = prompt_batch(loaded, read["captions"])
    with_speech = prompt_batch(loaded, read["captions"], [speech[key] for key in read["keys"]])
    assert set(text_only) - {"keys", "captions", "meta"} == {"text"} and "image" not in with_speech
    for batch in (text_only, with_speech):
        for name, tensor in read["text"].items():
            assert torch.equal(batch["text"][name], tensor), name
    for name, tensor in read["audio"].items():
        assert torch.equal(with_speech["audio"][name], tensor), name
    assert with_speech["captions"] == read["captions"]


@pytest.mark.parametrize("rows_at_once", [256, 8])  # 8: two prompts of 4 candidates, then the third
def test_best_of_candidates_keeps_each_prompts_highest_scoring_sample(encoded, monkeypatch, rows_at_once):
    from opt.downstream import text_to_image

    loaded, split = encoded
    loaded = copy.deepcopy(loaded)
    with torch.no_grad():  # the fixture's VQ is untrained (a zero codebook draws every code alike)
        loaded.model.vq.quantizer._codebook.embed.normal_(generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(text_to_image, "CANDIDATE_ROWS", rows_at_once)
    batch = text_to_image.prompt_batch(loaded, split.captions[:3])
    options = {"decoding": "autoregressive", "steps": 2, "guidance": 1.0, "temperature": 1.0}
    generator = torch.Generator().manual_seed(5)
    samples, scores = [], []
    for prompts in ([0, 1, 2],) if rows_at_once == 256 else ([0, 1], [2]):
        repeated = batch_rows(batch, [p for p in prompts for _ in range(4)])
        samples.append(text_to_image._sample_images(loaded, repeated, generator=generator, **options))
        scores.append(text_to_image.prompt_agreement(loaded, repeated, samples[-1]).reshape(-1, 4))
    samples, scores = torch.cat(samples), torch.cat(scores)
    chosen = text_to_image.generate_images(loaded, batch, candidates=4, seed=5, **options)
    assert chosen.shape == (3, *samples.shape[1:]) and not torch.equal(samples[0], samples[1])
    for prompt in range(3):
        assert torch.equal(chosen[prompt], samples[4 * prompt + int(scores[prompt].argmax())])


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_cli_decoding_defaults_are_the_librarys(command):
    """The CLI keeps its defaults as literals (it starts without importing torch): they must
    stay those of generate_images and EvalSettings."""
    import inspect

    from opt.cli import build_parser
    from opt.downstream.evaluate import EvalSettings
    from opt.downstream.text_to_image import generate_images

    source = ["--prompt", "p"] if command == "generate" else ["--data", "d"]
    args = build_parser().parse_args([command, "--model", "m", "--out", "o", *source])
    library = {name: p.default for name, p in inspect.signature(generate_images).parameters.items()}
    settings = EvalSettings()
    for name in ("decoding", "steps", "guidance", "candidates"):
        assert getattr(args, name) == library[name] == getattr(settings, name), name
    if command == "eval":
        assert args.caption_prior == settings.caption_prior == retrieval.DEFAULT_CAPTION_PRIOR


def test_cli_parser_imports_no_model_code():
    """Every ``opt`` command builds the whole parser first: building it must not import the model
    (transformers, timm, torchaudio), which costs seconds on each start."""
    code = ("import sys; from opt.cli import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m.startswith(('opt.model', 'opt.downstream', 'transformers'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_eval_writes_metrics_report_and_pictures(model_dir, world, tmp_path):
    out = tmp_path / "report"
    assert main(["eval", "--model", str(model_dir), "--data", str(world), "--out", str(out), "--limit", "12",
                 "--generate-count", "4", "--steps", "2", "--rerank-k", "3", "--candidates", "2", "--no-meteor"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("test", "test_novel"):
        assert set(metrics[split]) == {"data", "retrieval", "captioning", "text_to_image"}
        assert metrics[split]["data"] == {"used": 12, "skipped": {}, "repaired": {}}
        assert f"- {split}: used 12 of 12 samples (0 skipped)" in (out / "report.md").read_text()
        assert all(values["data"]["used"] == 12 for values in metrics[split]["captioning"].values())
        for values in metrics[split]["retrieval"].values():
            check_ranks(values, 12)
        assert set(metrics[split]["captioning"]) == {"image", "audio", "image+audio"}
        t2i = metrics[split]["text_to_image"]["text"]
        assert t2i["n"] == 4 and 0.0 <= t2i["attribute_accuracy"] <= 1.0 and 0.0 <= t2i["r_precision"] <= 1.0
        assert (out / f"{split}_generated.png").stat().st_size > 1000
        assert (out / f"{split}_captions.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "## Retrieval" in report and "![generated](test_generated.png)" in report
    assert "| a2t |" in report and "best of 2 samples" in report
    machine = metrics["machine"]
    assert machine["cpus"] >= 1 and machine["fp32_matmul_gflops_per_s"] > 0 and machine["processor"]
    assert f"Machine: {machine['processor']}, {machine['cpus']} CPUs" in report


@pytest.mark.parametrize("argv, message", [
    (["caption", "--model", "/nonexistent", "--data", "x", "--out", "y"], "not a model directory"),
    (["retrieve", "--model", "/nonexistent", "--data", "x", "--query", "audio"], "--target"),
    (["retrieve", "--model", "/nonexistent", "--data", "x", "--query", "smell", "--target", "text"], "cannot retrieve"),
    (["generate", "--model", "/nonexistent", "--prompts", "/nonexistent.txt", "--out", "y"], "prompt file not found"),
])
def test_downstream_user_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_caption_rejects_unknown_inputs(model_dir, capsys):
    assert main(["caption", "--model", str(model_dir), "--data", "x", "--inputs", "smell", "--out", "y"]) == 2
    assert "--inputs" in capsys.readouterr().err


def test_encoded_split_select_returns_rows():
    split = EncodedSplit(keys=["a", "b"], unimodal={"text": {"pooled": torch.arange(4.0).reshape(2, 2)}})
    assert split.select("text", torch.tensor([1]))["pooled"].tolist() == [[2.0, 3.0]]
