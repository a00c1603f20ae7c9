"""Train the VQ image tokenizer on shard images (one process; fp32, or its convolutions in bf16).

``opt vq train --config FILE --data SHARDS --out DIR [--device cuda]`` writes
``DIR`` as a VQ directory (config + safetensors) plus ``reconstructions.png``
(originals above their reconstructions) and ``metrics.json`` (val PSNR,
codebook perplexity and the fraction of codes used; on the synthetic world, the fraction of
objects whose colour, size, shape and position the world's analyser reads right off the
reconstructions).

The model, batches and metrics live on one device (default ``cpu``, as every
``--device``: :mod:`opt.devices`). There is no data parallelism: started by a
launcher (``deepspeed``, ``torchrun``) with more than one process, it refuses
at once instead of training the same tokenizer N times into one directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from tqdm import tqdm

from opt.config import Config
from opt.data.pipeline import BatchLoader
from opt.data.world.image_analysis import object_attribute_accuracy
from opt.devices import native_bf16, resolve_device
from opt.engine.threads import adapt_threads
from opt.engine.schedule import warmup_decay
from opt.errors import UserError
from opt.files import write_atomic
from opt.model.vq import VQTokenizer, codebook_usage, psnr, reconstruction_loss, save_vq
from opt.viz import save_image_grid, to_uint8


def _image_only(config: Config) -> Config:
    return dataclasses.replace(config, data=dataclasses.replace(config.data, modalities=["image"], require=["image"]))


def refuse_several_processes() -> None:
    """One line instead of N processes training the same tokenizer into one directory."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise UserError(f"opt vq train runs in one process, but a launcher started {world} (WORLD_SIZE={world}); "
                        "run it without deepspeed or torchrun, or with one process, and pick the GPU with --device")


@torch.no_grad()
def evaluate_vq(model: VQTokenizer, loader: BatchLoader, max_batches: int | None = None) -> dict:
    """Mean PSNR and codebook usage over ``loader`` on the model's device; on the synthetic
    world, also ``reconstruction_attributes``: per attribute, the fraction of the images' objects
    the world's analyser reads right off their reconstructions (colour, size, shape, position).
    Also returns one batch (originals, reconstructions) on the CPU for pictures."""
    model.eval()
    device = next(model.parameters()).device
    scores, codes, first, rebuilt, facts = [], [], None, [], []
    for index, batch in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            break
        pixels = batch["image"]["pixels"].to(device, non_blocking=True)
        out = model(pixels)
        scores.append(psnr(out["reconstruction"], pixels).cpu())
        codes.append(out["codes"].cpu())
        reconstruction = out["reconstruction"].clamp(0, 1).cpu()
        if first is None:
            first = (pixels.cpu(), reconstruction)
        for image, fact in zip(reconstruction, batch.get("meta") or []):
            if isinstance(fact, dict) and fact.get("objects"):  # the synthetic world's facts
                rebuilt.append(to_uint8(image))
                facts.append(fact)
    model.train()
    all_scores = torch.cat(scores)
    metrics = {"psnr": float(all_scores.mean()), "images": int(all_scores.numel())}
    metrics |= codebook_usage(torch.cat(codes), model.codebook_size)
    attributes = object_attribute_accuracy(rebuilt, facts)
    if attributes:  # what the world's analyser reads back from the reconstructions, per object
        metrics["reconstruction_attributes"] = attributes
    return metrics | {"_pictures": first}


def vq_conv_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of the tokenizer's convolutions while it trains (``vq_train.precision``; auto: bf16
    where ``device`` computes it natively, as a CPU with AVX512-BF16 or AMX does)."""
    if precision == "auto":
        precision = "bf16" if native_bf16(device) else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


def train_vq(config: Config, data: str, out: str | Path, *, val: str | None = None, device: str = "cpu",
             progress: bool = True) -> dict:
    """Train a :class:`VQTokenizer` on ``device`` and write its directory; returns the val metrics."""
    refuse_several_processes()
    target = resolve_device(device)
    torch.manual_seed(config.train.seed)
    config = _image_only(config)
    settings = config.vq_train
    loader = BatchLoader(data, config.data, config.audio, None, train=True, seed=config.train.seed,
                         batch_size=settings.batch_size)
    model = VQTokenizer(config.model.vq).to(target)
    conv_dtype = vq_conv_dtype(settings.precision, target)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.99), weight_decay=0.0)
    schedule = warmup_decay(optimizer, warmup=max(1, settings.steps // 20), total=settings.steps, decay_start=0)
    bar = tqdm(total=settings.steps, desc="vq", disable=not progress)
    batches = iter(loader)
    for step in range(settings.steps):
        if target.type == "cpu":
            adapt_threads()  # as many threads as other processes leave cores (opt.engine.threads)
        pixels = next(batches)["image"]["pixels"].to(target, non_blocking=True)
        output = model(pixels, conv_dtype=conv_dtype)
        loss = reconstruction_loss(output["reconstruction"], pixels, foreground_weight=settings.foreground_weight)
        loss = loss + output["commit_loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 10 == 0:
            batch_psnr = float(psnr(output["reconstruction"].detach(), pixels).mean())
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{batch_psnr:.1f}")
        bar.update()
    bar.close()
    val_loader = BatchLoader(val or data, config.data, config.audio, None, train=False, batch_size=64)
    metrics = evaluate_vq(model, val_loader, max_batches=None if val else 4)
    originals, reconstructions = metrics.pop("_pictures")
    out = Path(out)
    save_vq(model.cpu(), out)
    count = min(16, originals.shape[0])
    save_image_grid(list(originals[:count]) + list(reconstructions[:count]), out / "reconstructions.png",
                    columns=count, row_labels=["original", "VQ"])
    metrics |= {"steps": settings.steps, "precision": str(conv_dtype).removeprefix("torch."),
                "codebook_size": model.codebook_size, "data_stats": loader.stats.summary()}
    write_atomic(out / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    return metrics
