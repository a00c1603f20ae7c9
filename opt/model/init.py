"""``opt model init``: a model directory before any training, with the pretrained parts loaded.

The directory is complete (config, weights, VQ tokenizer, text tokenizer, model card), so it
can be inspected, evaluated as a baseline, or trained from with ``train.init_from``. The
pretrained sources the config names are read once here; the directory's config records what
rebuilding needs (see :func:`opt.model.opt_model.resolved_spec`), not the sources' paths.
"""

from __future__ import annotations

from pathlib import Path

import torch

from opt.config import Config
from opt.logs import warn
from opt.model.opt_model import ModelSpec, OPTModel
from opt.text.tokenizer import load_tokenizer


def init_model(config: Config, out: str | Path) -> OPTModel:
    """Build the model ``config`` describes (seeded by ``train.seed``), load its pretrained parts and
    the VQ tokenizer of ``train.vq_path``, and write it to ``out`` (the encoders log their load reports)."""
    tokenizer = load_tokenizer(config.tokenizer.path)
    torch.manual_seed(config.train.seed)
    model = OPTModel(ModelSpec.from_config(config, tokenizer))
    if config.train.vq_path:
        model.load_vq(config.train.vq_path)
    else:
        warn("train.vq_path is not set: the directory's VQ image tokenizer is untrained (opt vq train makes one)")
    with torch.no_grad():
        model.save_pretrained(out, tokenizer=tokenizer)
    return model
