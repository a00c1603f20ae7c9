"""The opt command: one-line user errors with exit 2, --debug (every command's --help is
tested with the generated reference in test_reference_docs.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from opt.cli import main

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
            "--seed", "2", "--shard-size", "8", "--workers", "2"]
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 12, "val": 4, "test": 4, "test_novel": 4}
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(n for names in manifest["shards"].values() for n in names)
    tokenizer.save(tmp_path / "tok.model")
    assert main(["data", "check", "--data", str(out), "--tokenizer", str(tmp_path / "tok.model"),
                 "data.workers=0"]) == 0
    assert "24 samples used; 0 skipped" in capsys.readouterr().out
    assert main(["data", "preview", "--data", f"{out}/test-*.tar", "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(argv[:-6] + ["--seed", "3", "--shard-size", "8"]) == 2  # same dir, other seed: refused
