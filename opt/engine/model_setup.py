"""How a training run gets its model: built from the config, or taken from a model directory
(``train.init_from``, fine-tuning), and which of its parameters stay frozen (``train.freeze``)."""

from __future__ import annotations

import dataclasses
from fnmatch import fnmatchcase
from pathlib import Path

import torch

from opt.config import Config, ModelConfig, Precision, to_dict
from opt.devices import auto_precision
from opt.errors import UserError
from opt.logs import info, warn
from opt.model.opt_model import ModelSpec, OPTModel
from opt.text.tokenizer import Tokenizer, load_tokenizer, tokenizer_in

SPEC_NAME = "model_spec.json"  # in a run directory: the resolved model spec (opt export rebuilds from it)


def freeze_parameters(model: torch.nn.Module, patterns: list[str]) -> int:
    """Stop the gradient of every parameter whose name (as in ``named_parameters``) matches one of
    the glob ``patterns``; returns the number of values frozen. A pattern matching nothing is an
    error (a typo must not silently train everything), and so is freezing every parameter."""
    if not patterns:
        return 0
    named = dict(model.named_parameters())
    for pattern in patterns:
        if not any(fnmatchcase(name, pattern) for name in named):
            example = next(iter(named))
            raise UserError(f"train.freeze: {pattern!r} matches no parameter name (names look like "
                            f"{example!r}; 'encoders.image.*' freezes a whole part)")
    frozen = [p for name, p in named.items() if any(fnmatchcase(name, pattern) for pattern in patterns)]
    if len(frozen) == len(named):
        raise UserError(f"train.freeze: {', '.join(patterns)} freeze every parameter; nothing would train")
    for parameter in frozen:
        parameter.requires_grad_(False)
    count, total = sum(p.numel() for p in frozen), sum(p.numel() for p in named.values())
    info(f"train.freeze: {count:,} of {total:,} parameters frozen ({count / total:.1%}, {len(frozen)} tensors)")
    return count


def _flat(values: dict, prefix: str = "") -> dict:
    """A nested mapping as ``{"a.b.c": value}``."""
    flat = {}
    for key, value in values.items():
        flat |= _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return flat


def warn_model_differences(given: ModelConfig, used: ModelConfig, directory: Path) -> None:
    """Warn once when the config sets a model key (away from its default) otherwise than the model
    directory; ``model.dropout`` is not compared (it is the config's)."""
    given_values, used_values = _flat(to_dict(given)), _flat(to_dict(used))
    defaults = _flat(to_dict(ModelConfig()))
    differing = [key for key, value in given_values.items()
                 if key != "dropout" and value != defaults[key] and value != used_values[key]]
    if differing:
        key = differing[0]
        more = f" (and {len(differing) - 1} more model keys)" if len(differing) > 1 else ""
        warn(f"train.init_from: the config sets model.{key}={given_values[key]}, the model directory {directory} "
             f"has {used_values[key]}{more}; the model directory's model section is used")


def load_initial_model(directory: Path, *, dropout: float) -> OPTModel:
    """The model of a model directory (safetensors, VQ tokenizer included) with ``dropout``."""
    if not directory.is_dir():
        raise UserError(f"train.init_from: model directory not found: {directory}")
    if (directory / "config.yaml").is_file() and not (directory / "config.json").is_file():
        raise UserError(f"train.init_from: {directory} is a training run, not a model directory; "
                        f"export it first: opt export {directory} --out MODEL_DIR")
    model = OPTModel.from_pretrained(directory)
    if model.spec.model.dropout != dropout:  # dropout is read where each block is built: rebuild
        spec = dataclasses.replace(model.spec, model=dataclasses.replace(model.spec.model, dropout=dropout))
        weights = model.state_dict()
        model = OPTModel(spec)
        model.load_state_dict(weights)
        model.load_vq(directory / "vq")
    return model.train()


def initial_config(config: Config, spec: ModelSpec, run: Path, tokenizer_name: str) -> Config:
    """``config`` as a run started from a model of ``spec`` has it: the spec's model section, audio
    settings and image and caption sizes, and the run's own copies of the tokenizer and VQ tokenizer."""
    data = dataclasses.replace(config.data, image_size=spec.image_size, max_text_tokens=spec.max_text_tokens)
    tokenizer = dataclasses.replace(config.tokenizer, path=str(run / tokenizer_name))
    train = dataclasses.replace(config.train, vq_path=str(run / "vq"))
    return dataclasses.replace(config, model=spec.model, audio=spec.audio, data=data, tokenizer=tokenizer,
                               train=train)


def build_model(config: Config, run: Path) -> tuple[Config, Tokenizer, OPTModel]:
    """The run's resolved config, tokenizer and model: built from ``config`` (with the VQ tokenizer
    of ``train.vq_path``), or taken from the model directory ``train.init_from``."""
    if not config.train.init_from:
        tokenizer = load_tokenizer(config.tokenizer.path)
        model = OPTModel(ModelSpec.from_config(config, tokenizer))
        if config.train.vq_path:
            model.load_vq(config.train.vq_path)
        return config, tokenizer, model
    directory = Path(config.train.init_from)
    model = load_initial_model(directory, dropout=config.model.dropout)
    tokenizer_path = tokenizer_in(directory)
    tokenizer = load_tokenizer(tokenizer_path)
    warn_model_differences(config.model, model.spec.model, directory)
    info(f"train.init_from: weights, tokenizer and VQ tokenizer from {directory}")
    return initial_config(config, model.spec, run, tokenizer_path.name), tokenizer, model


def resolve_precision(config: Config, model: torch.nn.Module, device: torch.device) -> Config:
    """``config`` with ``train.precision: auto`` replaced by what :func:`opt.devices.auto_precision`
    picks for ``model``'s trainable parameters on ``device`` (the run's saved config records it)."""
    if config.train.precision != Precision.auto:
        return config
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    chosen = Precision(auto_precision(device, trainable))
    info(f"train.precision=auto: {chosen} for {trainable / 1e6:.1f} M trainable parameters on {device.type}")
    return dataclasses.replace(config, train=dataclasses.replace(config.train, precision=chosen))


def compile_model(model: torch.nn.Module) -> None:
    """``torch.compile`` the model's networks in place: each single-modal encoder, and the
    transformer stacks of the cross-modal encoder and both decoders. Parameter names and state
    dicts stay as they are, and the task logic that calls them stays eager. The stacks take
    tensors; the cross-modal encoder's own forward takes a dict of whichever modalities a task
    fuses, and compiled whole it became a graph per combination until torch's recompile limit
    (8) left the tiny step at a tenth of its eager speed."""
    stacks = [model.cross.transformer, model.text_decoder.transformer, model.image_decoder.transformer]
    for module in [*model.encoders.values(), *stacks]:
        module.compile()
