"""Parameter counts per part and FLOPs of a training step, from a config alone.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on a
forward and backward pass of a representative full step on a dummy batch at
the configured maximum sizes: all three single-modal encoders, the
cross-modal encoder over all modalities, the text decoder (teacher forcing)
and the image decoder (one pass over the 64 codes). Matmul and attention
FLOPs are counted; elementwise work is not. :func:`count_flops` is the counter
every FLOP figure of the project goes through: torch's own counter has no formula
for the fused CPU attention kernel and would count attention as free there.
"""

from __future__ import annotations

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from opt.model.opt_model import OPTModel


def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# the CPU's fused attention kernels, which torch.utils.flop_counter has no formula for (shapes as arguments)
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}


def count_flops() -> FlopCounterMode:
    """A ``FlopCounterMode`` that also counts attention run by the CPU's fused kernel."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)


def dummy_batch(model: OPTModel, batch_size: int, *, seed: int = 0) -> dict:
    """A batch of the pipeline's layout at the model's maximum sizes, random content."""
    spec = model.spec
    generator = torch.Generator().manual_seed(seed)
    text_length = spec.max_text_tokens
    frames = int(spec.audio.max_seconds * spec.audio.sample_rate) // spec.audio.hop_length + 1
    present = torch.ones(batch_size, dtype=torch.bool)
    audio = {"mask": torch.ones(batch_size, frames, dtype=torch.bool), "present": present}
    if spec.audio.input == "waveform":
        samples = int(spec.audio.max_seconds * spec.audio.sample_rate)
        audio |= {"waveform": torch.randn(batch_size, samples, generator=generator) * 0.1,
                  "mask": torch.ones(batch_size, samples, dtype=torch.bool)}
    else:
        audio["features"] = torch.randn(batch_size, frames, spec.audio.n_mels, generator=generator)
    return {
        "keys": [f"dummy-{index}" for index in range(batch_size)],
        "text": {"ids": torch.randint(7, spec.vocab_size, (batch_size, text_length), generator=generator),
                 "mask": torch.ones(batch_size, text_length, dtype=torch.bool), "present": present},
        "image": {"pixels": torch.rand(batch_size, 3, spec.image_size, spec.image_size, generator=generator),
                  "present": present},
        "audio": audio,
    }


def full_step_loss(model: OPTModel, batch: dict) -> torch.Tensor:
    """A scalar touching every trainable part, for counting FLOPs and timing steps."""
    unimodal = model.encode_unimodal(batch)
    fused = model.fuse(unimodal)
    ids = batch["text"]["ids"]
    text_logits = model.text_decoder.teacher_forced(ids, fused["states"], fused["mask"])
    codes = model.image_codes(batch["image"]["pixels"])
    image_logits = model.image_decoder(codes, fused["states"], fused["mask"], causal=False)
    return (text_logits.logsumexp(-1).mean() + image_logits.float().logsumexp(-1).mean()
            + model.match_logits(unimodal, fused).float().mean())


def parameter_counts(model: OPTModel) -> dict[str, int]:
    """Parameters per part (encoders listed per modality) and the trainable total."""
    counts = {f"encoders.{m}": sum(p.numel() for p in encoder.parameters()) for m, encoder in model.encoders.items()}
    for name, part in model.named_children():
        if name != "encoders":
            counts[name] = sum(p.numel() for p in part.parameters())
    counts["vq (frozen)"] = sum(p.numel() for p in model.vq.parameters())
    counts["total"] = sum(counts.values())
    counts["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return counts


def training_step_flops(model: OPTModel, batch_size: int = 2) -> float:
    """FLOPs per sample of one forward + backward pass of :func:`full_step_loss`."""
    batch = dummy_batch(model, batch_size)
    model.train()
    with count_flops() as counter:
        full_step_loss(model, batch).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch_size
