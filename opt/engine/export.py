"""Turn a run's newest checkpoint (any ZeRO stage) into a plain model directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from opt.config import load_config
from opt.engine import checkpoints
from opt.engine.deepspeed_backend import fp32_state_dict
from opt.engine.model_setup import SPEC_NAME
from opt.errors import UserError
from opt.logs import warn
from opt.model.card import TrainingFacts
from opt.model.opt_model import ModelSpec, OPTModel
from opt.text.tokenizer import load_tokenizer, tokenizer_in


def _newest_readable(candidates: list[Path]) -> tuple[Path, dict[str, torch.Tensor]]:
    """The first checkpoint of ``candidates`` whose weights can be read (loaded weights-only),
    falling back past unreadable ones with a warning, as training does."""
    for directory in candidates:
        try:
            return directory, {k: v.float() for k, v in fp32_state_dict(directory).items()}
        except Exception as error:  # truncated, refused or incomplete: try the one before
            warn(f"checkpoint {directory} cannot be read ({checkpoints.describe(error)}); "
                 "trying the previous one")
    raise UserError(f"no readable checkpoint among {', '.join(str(c) for c in candidates)}")


def run_spec(run: Path, config, tokenizer) -> ModelSpec:
    """The model spec of a run: ``model_spec.json`` as the trainer resolved it (pretrained backbones'
    configs included, so nothing is read from where they came from), else (older runs) the config's."""
    path = run / SPEC_NAME
    if not path.is_file():
        return ModelSpec.from_config(config, tokenizer)
    try:
        return ModelSpec.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path} is not a model spec this version of opt reads ({error})") from None


def export_run(run: str | Path, out: str | Path, *, checkpoint: str | Path | None = None) -> Path:
    """Write ``out`` as a model directory (``from_pretrained`` loads it) from ``run``."""
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise UserError(f"not a training run directory (no config.yaml): {run}")
    candidates = [Path(checkpoint)] if checkpoint else checkpoints.list_checkpoints(run)
    if not candidates:
        raise UserError(f"no checkpoint in {run}/checkpoints")
    config = load_config(run / "config.yaml")
    tokenizer = load_tokenizer(tokenizer_in(run))
    model = OPTModel(run_spec(run, config, tokenizer))
    directory, state = _newest_readable(candidates)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"text_decoder.head.weight"}  # tied to text_decoder.embed.weight
    if set(missing) - tied or unexpected:
        raise UserError(f"checkpoint {directory} does not match the run's config: "
                        f"missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]}")
    model.load_vq(run / "vq")
    numbered = checkpoints.PATTERN.match(directory.name)
    step = int(numbered.group(1)) if numbered else 0
    training = TrainingFacts(data=config.data.train, steps=step,
                             batch_size=config.data.batch_size * config.train.accumulation,
                             tasks=dict(config.tasks.weights), init_from=config.train.init_from)
    with torch.no_grad():
        return model.save_pretrained(out, tokenizer=tokenizer, training=training)
