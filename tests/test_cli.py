"""The opt command: one-line user errors with exit 2, bad inputs of the model commands,
--debug (every command's --help is tested with the generated reference in
test_reference_docs.py)."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opt.cli import main
from opt.text.tokenizer import TextTokenizer
from tests.test_model import small_model

@pytest.mark.parametrize("argv,message", [
    (["data", "check", "--data", "/nonexistent/shards-*.tar", "data.modalities=[image]"], "no shards match"),
    (["tokenizer", "train", "--data", "/nonexistent", "--out", "x.model"], "no such shard"),
    (["config", "show", "--config", "/nonexistent.yaml"], "config file not found"),
    (["config", "show", "model.cross.nope=1"], "model.cross.nope"),
])
def test_user_errors_print_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_bad_argument_value_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["data", "synth", "--out", "x", "--train", "-5"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_debug_shows_the_traceback():
    result = subprocess.run([sys.executable, "-m", "opt", "--debug", "config", "show", "--config", "/nonexistent.yaml"],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" in result.stderr and "ConfigError" in result.stderr


def test_synth_check_and_preview_end_to_end(tmp_path, tokenizer, capsys):
    out = tmp_path / "w"
    argv = ["data", "synth", "--out", str(out), "--train", "12", "--val", "4", "--test", "4", "--test-novel", "4",
            "--test-unseen", "4", "--seed", "2", "--shard-size", "8", "--workers", "2"]
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 12, "val": 4, "test": 4, "test_novel": 4, "test_unseen": 4}
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(n for names in manifest["shards"].values() for n in names)
    tokenizer.save(tmp_path / "tok.model")
    assert main(["data", "check", "--data", str(out), "--tokenizer", str(tmp_path / "tok.model"),
                 "data.workers=0"]) == 0
    assert "28 samples used; 0 skipped" in capsys.readouterr().out
    assert main(["data", "preview", "--data", f"{out}/test-*.tar", "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(argv[:-6] + ["--seed", "3", "--shard-size", "8"]) == 2  # same dir, other seed: refused


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory) -> Path:
    """An untrained small model directory: loading it is all these tests need."""
    folder = tmp_path_factory.mktemp("cli_model")
    tokenizer.save(folder / "tok.model")
    model, _ = small_model(tokenizer)
    return model.save_pretrained(folder / "model", tokenizer=TextTokenizer.from_file(folder / "tok.model"))


HALF = object()  # stands for the first half of the file's own bytes

# (files written beside a copy of the model directory "model", the command after "--model model", its error line)
BAD_INPUTS = [
    pytest.param({}, ["generate", "--prompt", "a red \udcff circle", "--out", "out"], "--prompt is not valid UTF-8",
                 id="prompt_not_utf8"),  # a byte that is not UTF-8 reaches argv as a lone surrogate
    pytest.param({"p.txt": b"a red circle\n\xff star\n"}, ["generate", "--prompts", "p.txt", "--out", "out"],
                 "prompt file p.txt: line 2 is not valid UTF-8", id="prompt_file_not_utf8"),
    pytest.param({"speech.wav": b"a red circle, written down"},
                 ["generate", "--prompt", "a red circle", "--audio", "speech.wav", "--out", "out"],
                 "--audio speech.wav is not readable audio", id="audio_not_audio"),
    pytest.param({}, ["generate", "--prompt", "a red circle", "--device", "junk", "--out", "out"],
                 "device 'junk' is not a torch device", id="device_junk"),
    pytest.param({}, ["retrieve", "--data", "x", "--all", "--device", "cuda"],
                 "device 'cuda': CUDA is not available on this machine", id="device_cuda_missing"),
    pytest.param({"file": b""}, ["caption", "--data", "x", "--out", "file/c.jsonl"],
                 "cannot create a folder for file/c.jsonl: file is a file", id="out_under_a_file"),
    pytest.param({"report": b""}, ["eval", "--data", "x", "--out", "report"], "report is a file; give a folder",
                 id="out_folder_is_a_file"),
    pytest.param({}, ["retrieve", "--data", "x", "--all", "--out", "model"], "model is a folder; give a file name",
                 id="out_file_is_a_folder"),
    pytest.param({"model/config.json": bytes(range(256))}, ["caption", "--data", "x", "--out", "c.jsonl"],
                 "model/config.json is not a JSON file", id="config_binary"),
    pytest.param({"model/config.json": b"[1, 2]"}, ["caption", "--data", "x", "--out", "c.jsonl"],
                 "model/config.json holds a JSON list, not an object", id="config_not_an_object"),
    pytest.param({"model/model.safetensors": bytes(range(256)) * 4}, ["caption", "--data", "x", "--out", "c.jsonl"],
                 "model/model.safetensors is not a readable safetensors file", id="weights_garbage"),
    pytest.param({"model/model.safetensors": HALF}, ["caption", "--data", "x", "--out", "c.jsonl"],
                 "model/model.safetensors is not a readable safetensors file", id="weights_truncated"),
]


@pytest.mark.parametrize("files, argv, message", BAD_INPUTS)
def test_bad_inputs_of_the_model_commands_are_one_line_errors(files, argv, message, model_dir, tmp_path, monkeypatch,
                                                             capsys):
    shutil.copytree(model_dir, tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    for name, payload in files.items():
        path = Path(name)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2] if payload is HALF else payload)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on machines with a GPU
    try:
        code = main([argv[0], "--model", "model", *argv[1:]])
    except SystemExit as exit_:  # the parser's own errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err


MODEL_FILES = ["config.json", "model.safetensors", "vq/config.json", "vq/model.safetensors", "tokenizer.model"]
MODEL_COMMANDS = [["caption", "--data", "x", "--out", "c.jsonl"], ["retrieve", "--data", "x", "--all"],
                  ["generate", "--prompt", "a red circle", "--out", "out"], ["eval", "--data", "x", "--out", "r"]]


@pytest.mark.parametrize("name", MODEL_FILES)
def test_a_crafted_pickle_in_a_model_directory_never_runs(name, model_dir, tmp_path, monkeypatch, capsys):
    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(tmp_path / 'payload-ran')!r}, 'w').write('ran')",))

    shutil.copytree(model_dir, tmp_path / "model")
    (tmp_path / "model" / name).write_bytes(pickle.dumps(Payload()))
    monkeypatch.chdir(tmp_path)
    for command in MODEL_COMMANDS:
        code = main([command[0], "--model", "model", *command[1:]])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, (command, err)
        assert f"model/{name}" in err, err  # refused while loading, before the data is looked at
    assert not (tmp_path / "payload-ran").exists()


def test_the_deepspeed_launchers_local_rank_before_the_subcommand_is_accepted(capsys):
    """``deepspeed --module opt train ...`` runs ``opt --local_rank=0 train ...``."""
    assert main(["--local_rank=0", "config", "show", "--config", "configs/tiny.yaml"]) == 0
    assert "image_size: 64" in capsys.readouterr().out
