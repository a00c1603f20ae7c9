"""Pictures people look at: image grids with titles, written atomically as PNG."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def to_uint8(image: torch.Tensor):
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8 numpy."""
    return (image.permute(1, 2, 0) * 255).round().clamp(0, 255).byte().numpy()


def save_image_grid(images: list[torch.Tensor], out: str | Path, *, titles: list[str] | None = None,
                    columns: int = 8, row_labels: list[str] | None = None, title_lines: int = 4) -> Path:
    """Write ``images`` ((3, H, W) in [0, 1]) as a grid PNG with optional titles
    (each line of a title wrapped, at most ``title_lines`` lines shown)."""
    rows = max(1, -(-len(images) // columns))
    title_height = 0.14 * title_lines if titles else 0.0
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.7, rows * (1.7 + title_height)),
                                squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for index, (axis, image) in enumerate(zip(axes.flat, images)):
        axis.imshow(image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
        if titles:
            lines = [wrapped for line in titles[index].split("\n") for wrapped in textwrap.wrap(line, 26)]
            axis.set_title("\n".join(lines[:title_lines]), fontsize=6)
    for row, label in enumerate(row_labels or []):
        axes[row, 0].text(-0.1, 0.5, label, transform=axes[row, 0].transAxes, ha="right", va="center", fontsize=8)
    return save_figure(figure, out, dpi=120)


def save_figure(figure, out: str | Path, *, dpi: int = 110) -> Path:
    """Lay out, write as PNG under a temporary name, rename into place, close."""
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    figure.savefig(tmp, dpi=dpi)
    plt.close(figure)
    os.replace(tmp, out)
    return out
