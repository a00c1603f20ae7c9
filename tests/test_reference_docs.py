"""The generated references: docs/*.md match the code, every config key is explained, every command has help."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from opt.cli import build_parser, main
from opt.reference import (UndocumentedConfigError, cli_reference, config_reference, config_sections,
                           section_markdown, undocumented_config_keys, walk_commands)

DOCS = Path(__file__).resolve().parents[1] / "docs"
COMMANDS = list(walk_commands(build_parser()))


def _assert_current(name: str, generated: str) -> None:
    path = DOCS / name
    assert path.is_file() and path.read_text() == generated, \
        f"docs/{name} is stale: run python scripts/make_docs.py"


def test_cli_doc_matches_the_parser():
    _assert_current("cli.md", cli_reference(build_parser()))


def test_config_doc_matches_the_config_dataclasses():
    _assert_current("config.md", config_reference())


def test_every_config_key_has_a_meaning():
    missing = undocumented_config_keys()
    assert not missing, f"add a comment beside these fields in opt/config.py: {', '.join(missing)}"


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: command.name)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command.words, "--help"])
    assert exit_.value.code == 0
    assert f"usage: {command.name}" in capsys.readouterr().out


def test_command_tree_holds_groups_and_leaves():
    names = {command.name for command in COMMANDS}
    assert {"opt", "opt data", "opt data synth", "opt vq train", "opt model summary", "opt train"} <= names


def test_config_table_shows_a_known_key_with_its_default():
    vision = next(section for section in config_sections() if section.prefix == "model.vision")
    assert "| `model.vision.patch_size` | `int` | `8` | ViT patch side in pixels" in section_markdown(vision)


def test_cli_reference_shows_a_known_flag_of_its_command():
    text = cli_reference(build_parser())
    train = text.split("## `opt train`\n", 1)[1].split("\n## ", 1)[0]
    assert "| `--run-dir` | `RUN_DIR` | `runs/train` |  |  | run directory:" in train
    assert "--local_rank" not in train  # hidden flags stay hidden


class Pooling(enum.Enum):
    MEAN = "mean"  # the average
    MAX = "max"


@dataclass
class Inner:
    # a block comment
    # over two lines
    pool: Pooling = Pooling.MAX  # and a trailing one
    kind: Literal["a", "b"] = "a"  # a literal
    rate: float = field(default=0.5, metadata={"ge": 0, "lt": 1})  # a bounded rate
    sizes: list[int] = field(default_factory=lambda: [1, 2])  # compact JSON
    path: str | None = None  # optional


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    items: list[Inner] = field(default_factory=list)  # one per item


@dataclass
class Unexplained:
    documented: int = 1  # has a comment
    bare: int = 2


def test_config_sections_read_types_defaults_and_comments():
    sections = {section.prefix: section for section in config_sections(Outer)}
    assert list(sections) == ["", "inner", "items.N"]  # a list of dataclasses is a key and a section
    assert [key.key for key in sections[""].keys] == ["items"]
    keys = {key.key: key for key in sections["inner"].keys}
    assert (keys["inner.pool"].type, keys["inner.pool"].default) == ("{mean, max}", "max")
    assert keys["inner.pool"].meaning == "a block comment over two lines and a trailing one"
    assert keys["inner.pool"].values == "`mean`: the average"  # members explained by their own comments
    assert (keys["inner.kind"].type, keys["inner.kind"].default) == ("{a, b}", "a")
    assert keys["inner.rate"].range == ">= 0, < 1"
    assert "a bounded rate (range: >= 0, < 1)" in section_markdown(sections["inner"])
    assert (keys["inner.sizes"].type, keys["inner.sizes"].default) == ("list[int]", "[1, 2]")
    assert (keys["inner.path"].type, keys["inner.path"].default) == ("str | None", "null")
    assert "`str \\| None`" in section_markdown(sections["inner"])  # pipes are escaped in tables
    assert [key.key for key in sections["items.N"].keys][0] == "items.N.pool"


def test_a_field_without_comment_stops_the_generator():
    assert undocumented_config_keys(Unexplained) == ["bare"]
    with pytest.raises(UndocumentedConfigError, match="bare"):
        config_reference(Unexplained)
