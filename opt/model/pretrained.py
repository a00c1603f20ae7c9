"""Reading pretrained checkpoints, and what loading them did, tensor by tensor, so that nothing is
dropped silently.

:func:`read_state_dict` reads a state dict from one local file without unpickling anything but
tensors; :class:`LoadReport` records where each tensor of the checkpoint and of the part went.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from opt.errors import UserError

TORCH_SUFFIXES = (".pth", ".pt", ".bin")


@dataclass
class LoadReport:
    """Which tensors of one part came from a pretrained checkpoint.

    ``loaded``: copied as they are; ``resampled``: copied after resampling or trimming (position
    embeddings on another grid or without the checkpoint's class position, a patch embedding of
    another patch size); ``fresh``: the part's tensors the checkpoint had nothing for (initialised
    as a model built from scratch); ``unused``: the checkpoint's tensors the part has no place for
    (a classifier head, a class token the config leaves out). Every checkpoint tensor is in exactly
    one of loaded, resampled and unused; every tensor of the part in one of loaded, resampled, fresh.
    """

    part: str  # "image", "text" or "audio"
    source: str  # the file or directory read
    loaded: list[str] = field(default_factory=list)
    resampled: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: counts, with the first few names of what was resampled, left fresh or unused."""
        def some(names: list[str]) -> str:
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            return f" ({shown})" if names else ""

        return (f"{self.part}: {len(self.loaded) + len(self.resampled)} tensors from {self.source}: "
                f"{len(self.loaded)} loaded, {len(self.resampled)} resampled{some(self.resampled)}, "
                f"{len(self.fresh)} fresh{some(self.fresh)}, {len(self.unused)} unused{some(self.unused)}")


def read_state_dict(path: str, *, what: str) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint at ``path``, by name; ``what`` names it in errors
    (e.g. "pretrained ViT").

    Reads ``.safetensors`` with safetensors and ``.pth``/``.pt``/``.bin`` with
    ``torch.load(weights_only=True)``, so a file holding pickled objects other than tensors is
    refused. Accepts a flat state dict, one nested under a ``state_dict`` or ``model`` key (as
    training scripts save it beside optimizer state), and one whose every key starts with
    ``module.`` (saved from a ``DistributedDataParallel`` wrapper). Raises a one-line
    :class:`UserError` naming the file for a missing file, another suffix, an unreadable file
    or anything that is not a dict of tensors.
    """
    if not Path(path).is_file():
        raise UserError(f"{what} {path}: file not found")
    if path.endswith(".safetensors"):
        try:
            state = load_file(path)
        except SafetensorError as error:
            raise UserError(f"{what} {path}: not a readable safetensors file ({error})") from None
    elif path.endswith(TORCH_SUFFIXES):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise UserError(f"{what} {path}: torch.load(weights_only=True) refused it, as it holds pickled "
                            f"objects other than tensors; save a plain state dict or a .safetensors file") from None
        except (RuntimeError, EOFError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UserError(f"{what} {path}: not a readable torch checkpoint ({reason})") from None
    else:
        raise UserError(f"{what} {path}: expected a .safetensors, .pth, .pt or .bin file")
    return _unwrapped(state, path=path, what=what)


def _unwrapped(state: object, *, path: str, what: str) -> dict[str, torch.Tensor]:
    """The flat state dict inside ``state`` (see :func:`read_state_dict`)."""
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state:
        raise UserError(f"{what} {path}: expected a state dict (names to tensors), got {type(state).__name__}")
    if all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{what} {path}: {name} is a {type(value).__name__}, not a tensor; "
                            f"expected a state dict in timm's names")
    return state


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' own loading chatter (its load-report table, progress bars, warnings about
    unused weights) silenced while a backbone loads: the :class:`LoadReport` line says it once."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
