"""Train the VQ image tokenizer on shard images (single process, fp32).

``opt vq train --config FILE --data SHARDS --out DIR`` writes ``DIR`` as a VQ
directory (config + safetensors) plus ``reconstructions.png`` (originals
above their reconstructions) and ``metrics.json`` (val PSNR, codebook
perplexity and the fraction of codes used).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from tqdm import tqdm

from opt.config import Config
from opt.data.pipeline import BatchLoader
from opt.engine.schedule import warmup_decay
from opt.files import write_atomic
from opt.model.vq import VQTokenizer, codebook_usage, psnr, reconstruction_loss, save_vq
from opt.viz import save_image_grid


def _image_only(config: Config) -> Config:
    return dataclasses.replace(config, data=dataclasses.replace(config.data, modalities=["image"], require=["image"]))


@torch.no_grad()
def evaluate_vq(model: VQTokenizer, loader: BatchLoader, max_batches: int | None = None) -> dict:
    """Mean PSNR and codebook usage over ``loader``; also returns one batch for pictures."""
    model.eval()
    scores, codes, first = [], [], None
    for index, batch in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            break
        pixels = batch["image"]["pixels"]
        out = model(pixels)
        scores.append(psnr(out["reconstruction"], pixels))
        codes.append(out["codes"])
        if first is None:
            first = (pixels, out["reconstruction"].clamp(0, 1))
    model.train()
    all_scores = torch.cat(scores)
    metrics = {"psnr": float(all_scores.mean()), "images": int(all_scores.numel())}
    metrics |= codebook_usage(torch.cat(codes), model.codebook_size)
    return metrics | {"_pictures": first}


def train_vq(config: Config, data: str, out: str | Path, *, val: str | None = None,
             progress: bool = True) -> dict:
    """Train a :class:`VQTokenizer` and write its directory; returns the val metrics."""
    torch.manual_seed(config.train.seed)
    config = _image_only(config)
    settings = config.vq_train
    loader = BatchLoader(data, config.data, config.audio, None, train=True, seed=config.train.seed,
                         batch_size=settings.batch_size)
    model = VQTokenizer(config.model.vq)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.99), weight_decay=0.0)
    schedule = warmup_decay(optimizer, warmup=max(1, settings.steps // 20), total=settings.steps, decay_start=0)
    bar = tqdm(total=settings.steps, desc="vq", disable=not progress)
    batches = iter(loader)
    for step in range(settings.steps):
        pixels = next(batches)["image"]["pixels"]
        output = model(pixels)
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
    save_vq(model, out)
    count = min(16, originals.shape[0])
    save_image_grid(list(originals[:count]) + list(reconstructions[:count]), out / "reconstructions.png",
                    columns=count, row_labels=["original", "VQ"])
    metrics |= {"steps": settings.steps, "codebook_size": model.codebook_size, "data_stats": loader.stats.summary()}
    write_atomic(out / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    return metrics
