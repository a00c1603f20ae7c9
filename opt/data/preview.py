"""A PNG contact sheet of shard samples: each image with its caption and audio length."""

from __future__ import annotations

import io
import tarfile
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import soundfile as sf  # noqa: E402
from PIL import Image  # noqa: E402

from opt.data.samples import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS  # noqa: E402
from opt.viz import save_figure  # noqa: E402


def _first_samples(shards: list[str], count: int) -> list[dict]:
    samples: dict[str, dict] = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                key, _, extension = member.name.partition(".")
                if key not in samples and len(samples) == count:
                    return list(samples.values())
                samples.setdefault(key, {"__key__": key})[extension] = tar.extractfile(member).read()
    return list(samples.values())


def preview_grid(shards: list[str], out: str | Path, *, count: int = 24, columns: int = 6) -> Path:
    """Write a grid of the first ``count`` samples to ``out`` (PNG) and return its path."""
    samples = _first_samples(shards, count)
    rows = max(1, -(-len(samples) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 2.4, rows * 2.9), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, sample in zip(axes.flat, samples):
        image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
        if image is not None:
            axis.imshow(Image.open(io.BytesIO(image)).convert("RGB"), interpolation="nearest")
        audio = next((sample[e] for e in AUDIO_EXTENSIONS if e in sample), None)
        seconds = f"{sf.info(io.BytesIO(audio)).duration:.1f} s speech" if audio else "no audio"
        caption = sample.get("txt", b"").decode("utf-8", "replace")
        axis.set_title("\n".join(textwrap.wrap(caption, 26)[:4]) + f"\n[{seconds}]", fontsize=7)
    return save_figure(figure, out)
