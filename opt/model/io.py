"""Self-describing model directories: ``config.json`` + ``model.safetensors``.

Directories are written under a temporary name and renamed into place, so a
reader never sees a half-written model. Loading uses safetensors only, so it
never unpickles anything; a missing, unreadable or mismatched file is a
:class:`~opt.errors.UserError` naming it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from opt.errors import UserError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_directory(module: nn.Module, config: dict[str, Any], out: str | Path,
                   extra_files: dict[str, bytes] | None = None) -> Path:
    """Write ``module``'s weights, its config and extra files to ``out`` atomically."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_model(module, str(tmp / WEIGHTS_NAME))
    for name, payload in (extra_files or {}).items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(payload)
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    return out


def read_config(directory: str | Path) -> dict[str, Any]:
    """The JSON object of ``directory/config.json``."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise UserError(f"not a model directory (no {CONFIG_NAME}): {directory}")
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a JSON file (not UTF-8 text)") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} holds a JSON {type(config).__name__}, not an object of settings")
    return config


def load_weights(module: nn.Module, directory: str | Path) -> None:
    """Load ``model.safetensors`` from ``directory`` into ``module`` (strict)."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise UserError(f"not a model directory (no {WEIGHTS_NAME}): {directory}")
    try:
        missing, unexpected = load_model(module, str(path), strict=False)
    except SafetensorError as error:
        raise UserError(f"{path} is not a readable safetensors file ({error})") from None
    except RuntimeError as error:  # a tensor of another shape
        mismatch = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), str(error))
        raise UserError(f"{path} does not match the model config: {mismatch}") from None
    if missing or unexpected:
        problem = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise UserError(f"{path} does not match the model config: {problem}")
