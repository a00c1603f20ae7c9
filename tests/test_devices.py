"""Devices, batch sizes and precision of the commands, and the GPU smoke script's parts.

A device this machine lacks is one line for opt vq train and every inference command;
--batch-size bounds the rows each model call sees and leaves the results as they were;
inference autocasts to bf16 only on a CUDA GPU that has it. The smoke script itself
needs a GPU; here it must refuse at once, and its parts are checked on the CPU (its
--cpu-check dry run takes minutes on a 2-core machine: docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opt.cli import build_parser, main
from opt.config import load_config
from opt.data.pipeline import BatchLoader
from opt.devices import inference_autocast, inference_dtype
from opt.downstream.evaluate import EvalSettings
from opt.downstream.index import EmbeddingIndex, save_index
from opt.downstream.text_to_image import CANDIDATE_ROWS
from opt.model.opt_model import OPTModel
from tests.test_inference import model_dir, shard  # noqa: F401 (fixtures: a model that captions images apart)

ROOT = Path(__file__).resolve().parents[1]
# a CUDA device this machine lacks: any on a machine without CUDA, one past the last on a GPU machine
MISSING_CUDA = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


@pytest.fixture(scope="module")
def index_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("devices_index") / "index.safetensors"
    save_index(EmbeddingIndex(torch.nn.functional.normalize(torch.randn(3, 32), dim=-1), ["a", "b", "c"], "image"),
               path)
    return path


def _one_line_error(code: int, capsys) -> str:
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _inference_commands(model: Path, world: Path, shard: str, index: Path, out: Path) -> dict[str, list[str]]:
    models = ["--model", str(model)]
    return {
        "caption": ["caption", *models, "--data", shard, "--out", str(out / "c.jsonl")],
        "generate": ["generate", *models, "--prompt", "a red circle", "--out", str(out / "g")],
        "retrieve": ["retrieve", *models, "--data", shard, "--all"],
        "eval": ["eval", *models, "--data", str(world), "--out", str(out / "report")],
        "embed": ["embed", *models, "--modality", "image", "--data", shard, "--out", str(out / "i.safetensors")],
        "search": ["search", *models, "--index", str(index), "--text", "a red circle"],
    }


@pytest.mark.parametrize("command", ["vq train", "caption", "generate", "retrieve", "eval", "embed", "search"])
def test_a_missing_cuda_device_is_a_one_line_error(command, model_dir, world, shard, index_file, tmp_path, capsys):
    if command == "vq train":
        argv = ["vq", "train", "--data", f"{world}/train-*.tar", "--out", str(tmp_path / "vq")]
    else:
        argv = _inference_commands(model_dir, world, shard, index_file, tmp_path)[command]
    message = _one_line_error(main([*argv, "--device", MISSING_CUDA]), capsys)
    assert f"device {MISSING_CUDA!r}" in message and "CUDA" in message
    assert not any(tmp_path.iterdir())  # refused before writing anything


def test_vq_train_refuses_several_launcher_processes(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = main(["vq", "train", "--data", f"{world}/train-*.tar", "--out", str(tmp_path / "vq")])
    assert "runs in one process, but a launcher started 2" in _one_line_error(code, capsys)


def test_vq_train_runs_on_the_device_it_is_given(world, tmp_path, capsys):
    out = tmp_path / "vq"
    assert main(["vq", "train", "--config", "configs/tiny.yaml", "--device", "cpu", "--data",
                 f"{world}/train-*.tar", "--val", f"{world}/val-*.tar", "--out", str(out),
                 "model.vq.quantizer=vq", "model.vq.codebook_size=32", "model.vq.channels=16", "vq_train.steps=3", "vq_train.batch_size=4",
                 "data.workers=0", "data.shuffle_buffer=0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["images"] == 24 and metrics["psnr"] > 0
    assert "val PSNR" in capsys.readouterr().out


@pytest.fixture()
def rows_seen(monkeypatch) -> list[int]:
    """The batch rows of every single-modal encoding and every fusion the model runs."""
    seen: list[int] = []
    encode, fuse = OPTModel.encode_unimodal, OPTModel.fuse

    def spy_encode(self, batch, *args, **kwargs):
        out = encode(self, batch, *args, **kwargs)
        seen.extend(part["tokens"].shape[0] for part in out.values())
        return out

    def spy_fuse(self, *args, **kwargs):
        out = fuse(self, *args, **kwargs)
        seen.append(out["states"].shape[0])
        return out

    monkeypatch.setattr(OPTModel, "encode_unimodal", spy_encode)
    monkeypatch.setattr(OPTModel, "fuse", spy_fuse)
    return seen


def _outputs(command: str, out: Path) -> object:
    """What a command wrote."""
    if command == "caption":
        return [json.loads(line) for line in (out / "c.jsonl").read_text().splitlines()]
    if command == "retrieve":
        return json.loads((out / "r.json").read_text())
    if command == "embed":
        from opt.downstream.index import load_index

        index = load_index(out / "t.safetensors")
        return index.keys, index.embeddings
    results = json.loads((out / "report" / "metrics.json").read_text())["test"]
    return {"retrieval": results["retrieval"], "captioning": results["captioning"]}


@pytest.mark.parametrize("command", ["caption", "retrieve", "embed", "eval"])
def test_batch_size_bounds_the_rows_and_keeps_the_results(command, model_dir, shard, tmp_path, rows_seen):
    models = ["--model", str(model_dir)]
    texts = tmp_path / "texts.txt"
    texts.write_text("a red circle\na big blue square\na small green triangle\na red square left of a circle\n")
    argv = {
        "caption": ["caption", *models, "--data", shard, "--limit", "6", "--out"],
        "retrieve": ["retrieve", *models, "--data", shard, "--limit", "6", "--all", "--rerank-k", "2", "--out"],
        "embed": ["embed", *models, "--modality", "text", "--texts", str(texts), "--out"],
        "eval": ["eval", *models, "--data", shard, "--name", "test", "--limit", "6", "--rerank-k", "2",
                 "--generate-count", "1", "--candidates", "1", "--no-meteor", "--no-card", "--out"],
    }[command]
    target = {"caption": "c.jsonl", "retrieve": "r.json", "embed": "t.safetensors", "eval": "report"}[command]
    results = {}
    for batch_size in (None, 2):
        out = tmp_path / f"batch_{batch_size}"
        rows_seen.clear()
        assert main([*argv, str(out / target), *(["--batch-size", str(batch_size)] if batch_size else [])]) == 0
        results[batch_size] = (_outputs(command, out), max(rows_seen))
    (default, default_rows), (small, small_rows) = results[None], results[2]
    assert default_rows > 2 and small_rows == 2
    if command == "embed":
        assert default[0] == small[0] and torch.allclose(default[1], small[1], atol=1e-5)
    elif command == "caption":
        assert default == small and len({row["caption"] for row in small}) > 1
    else:
        assert _close(default, small)


def _close(a: object, b: object) -> bool:
    """Equal nested results, floats within 1e-5 (batches of another size sum in another order), timings aside."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[key], b[key]) for key in a if key != "seconds")
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-5, abs=1e-5)
    return a == b


def test_generate_draws_at_most_batch_size_images_at_once(model_dir, tmp_path, rows_seen):
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\na green triangle\n")
    assert main(["generate", "--model", str(model_dir), "--prompts", str(tmp_path / "prompts.txt"),
                 "--candidates", "2", "--batch-size", "5", "--out", str(tmp_path / "g")]) == 0
    # two prompts' candidates (4 rows) fit in 5, the third prompt's 2 follow
    assert sorted(set(rows_seen)) == [2, 4]
    assert len(list((tmp_path / "g").glob("0000*_00.png"))) == 3


def test_cli_batch_size_defaults_are_the_librarys():
    parser = build_parser()
    generate = parser.parse_args(["generate", "--model", "m", "--prompt", "p", "--out", "o"])
    evaluate = parser.parse_args(["eval", "--model", "m", "--data", "d", "--out", "o"])
    assert generate.batch_size == CANDIDATE_ROWS and evaluate.batch_size == EvalSettings().batch_size == 64
    for command in (["caption", "--data", "d", "--out", "o"], ["retrieve", "--data", "d", "--all"],
                    ["embed", "--modality", "text", "--data", "d", "--out", "o"]):
        assert parser.parse_args([command[0], "--model", "m", *command[1:]]).batch_size == 64


def test_inference_runs_in_fp32_on_the_cpu_and_bf16_only_on_a_cuda_gpu_that_has_it(monkeypatch):
    cpu = torch.device("cpu")
    assert inference_dtype(cpu) == torch.float32
    with inference_autocast(cpu):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert inference_dtype(torch.device("cuda")) == torch.bfloat16
    assert inference_dtype(cpu) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)  # e.g. a V100
    assert inference_dtype(torch.device("cuda", 0)) == torch.float32


def test_base_config_reads_the_64px_world_at_224px(world, tokenizer):
    """The smoke script trains configs/base.yaml on the synthetic world: the pipeline resizes its images."""
    config = load_config("configs/base.yaml", [f"data.train={world}/train-*.tar", "data.image_size=224",
                                               "data.workers=0", "data.batch_size=3"])
    batch = next(iter(BatchLoader(config.data.train, config.data, config.audio, tokenizer, train=False)))
    assert batch["image"]["pixels"].shape == (3, 3, 224, 224)
    assert batch["audio"]["waveform"].dim() == 2 and batch["audio"]["present"].all()


def test_gpu_smoke_stops_at_once_with_one_line_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the script would run")
    result = subprocess.run(["bash", "scripts/gpu_smoke.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env=os.environ | {"PYTHON": sys.executable})
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("gpu_smoke: no CUDA GPU"), result.stderr


@pytest.fixture(scope="module")
def smoke_report():
    spec = importlib.util.spec_from_file_location("gpu_smoke_report", ROOT / "scripts" / "gpu_smoke_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_throughput_leaves_out_the_first_window(smoke_report, tmp_path):
    records = [{"step": 5, "samples_per_s": 1.0}, {"step": 5, "val/loss": 2.0}, {"step": 10, "samples_per_s": 20.0},
               {"step": 15, "samples_per_s": 30.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    assert smoke_report.logged_samples_per_second(tmp_path) == (15, 25.0)


def test_step_flops_follow_the_mixture():
    from opt.tasks.mixture import combined_flops

    flops, weights = torch.tensor([4.0, 8.0, 100.0], dtype=torch.float64), torch.tensor([1.0, 3.0, 0.0])
    assert combined_flops(flops, weights, "sample") == pytest.approx(7.0)  # one task a step, by weight
    assert combined_flops(flops, weights, "sum") == pytest.approx(12.0)  # every weighted task a step


def test_auto_precision_is_bf16_only_where_the_hardware_has_it_and_the_model_is_large(monkeypatch, tmp_path):
    import opt.devices as devices

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
                       "processor\t: 1\nflags\t\t: fpu\n")
    assert devices.cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512f", "avx512_bf16"}  # the first processor's
    assert devices.cpu_flags(tmp_path / "absent") == set()
    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "cpu_flags", lambda: {"avx2", "avx512f"})  # bf16 emulated: never
    assert devices.auto_precision(cpu, 10**9) == "fp32"
    monkeypatch.setattr(devices, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert devices.auto_precision(cpu, 10**9) == "bf16"
    assert devices.auto_precision(cpu, 3_500_000) == "fp32"  # the tiny model: bf16 cost it time
    assert devices.inference_dtype(cpu) == torch.float32  # no model: fp32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert devices.auto_precision(torch.device("cuda"), 1000) == "bf16"


def test_train_precision_auto_is_resolved_and_recorded(monkeypatch, capsys):
    import opt.devices as devices
    from opt.config import load_config
    from opt.engine.model_setup import resolve_precision
    from opt.model.opt_model import ModelSpec, OPTModel

    config = load_config("configs/tiny.yaml", ["train.precision=auto"])
    model = OPTModel(ModelSpec.from_config(config))
    monkeypatch.setattr(devices, "cpu_flags", lambda: {"avx512_bf16"})
    resolved = resolve_precision(config, model, torch.device("cpu"))
    assert resolved.train.precision == "fp32" and config.train.precision == "auto"
    assert "train.precision=auto: fp32 for 3.5 M trainable parameters on cpu" in capsys.readouterr().err
    monkeypatch.setattr(devices, "CPU_BF16_MIN_PARAMETERS", 1_000_000)
    assert resolve_precision(config, model, torch.device("cpu")).train.precision == "bf16"
    fixed = load_config("configs/tiny.yaml", ["train.precision=fp32"])
    assert resolve_precision(fixed, model, torch.device("cpu")) is fixed
