"""VQ image tokenizer: a convolutional VQ-VAE mapping images to a grid of codes and back.

Choices:
- x8 downsampling in three stride-2 stages (64 px -> 8 x 8 = 64 codes, as in OPT) by default,
  channels x1, x2, x4, x4 of ``channels`` from full to 1/8 resolution; ``downsample`` 16 or 32
  adds stages at x4 channels (224 px at x16: 14 x 14 codes, one per ViT-B/16 patch);
- the quantizer (``quantizer: vq``, the default) is ``vector_quantize_pytorch.VectorQuantize``:
  EMA codebook updates, k-means initialisation from the first batch, and restarts of dead
  codes (EMA usage below a threshold) from the current batch. It is a
  well-kept implementation of exactly these techniques, and it syncs the
  codebook across processes under ``torch.distributed``;
- or (``quantizer: fsq``) the same library's ``FSQ``, finite scalar quantization: the
  ``code_dim`` latent is projected to one channel per entry of ``fsq_levels``, each bounded
  and rounded to its level's values, and projected back. The codebook is that fixed grid,
  so there is nothing to initialise, no commitment loss and no dead code; a code's index
  is its grid point's mixed-radix number, in [0, product of the levels);
- always fp32: every forward runs with autocast disabled, also inside a
  mixed-precision training run, because codebook distances and EMA statistics
  are fragile in half precision.

Pixels are floats in [0, 1] at the interface; internally [-1, 1].
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict

import torch
from torch import nn
from vector_quantize_pytorch import FSQ, VectorQuantize

from opt.config import Quantizer, VQConfig
from opt.model.io import load_weights, read_config, save_directory

class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _widths(config: VQConfig) -> list[int]:
    """Channels at full resolution, then after each stride-2 stage: x1, x2, x4, then x4 again."""
    stages = config.downsample.bit_length() - 1
    return [config.channels * min(2 ** stage, 4) for stage in range(stages + 1)]


def _encoder(config: VQConfig) -> nn.Sequential:
    widths = _widths(config)
    layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, padding=1)]
    for stage in range(len(widths) - 1):
        layers += [ResidualBlock(widths[stage]) for _ in range(config.res_blocks)]
        layers += [nn.Conv2d(widths[stage], widths[stage + 1], 4, stride=2, padding=1), nn.SiLU()]
    last = widths[-1]
    layers += [ResidualBlock(last), nn.GroupNorm(8, last), nn.SiLU(), nn.Conv2d(last, config.code_dim, 1)]
    return nn.Sequential(*layers)


def _decoder(config: VQConfig) -> nn.Sequential:
    widths = _widths(config)
    layers: list[nn.Module] = [nn.Conv2d(config.code_dim, widths[-1], 3, padding=1), ResidualBlock(widths[-1])]
    for stage in range(len(widths) - 1, 0, -1):
        layers += [ResidualBlock(widths[stage]) for _ in range(config.res_blocks)]
        layers += [nn.ConvTranspose2d(widths[stage], widths[stage - 1], 4, stride=2, padding=1), nn.SiLU()]
    layers += [nn.GroupNorm(8, widths[0]), nn.SiLU(), nn.Conv2d(widths[0], 3, 3, padding=1)]
    return nn.Sequential(*layers)


def _quantizer(config: VQConfig) -> nn.Module:
    """The quantizer between encoder and decoder: both take and give ``(b, code_dim, h, w)`` latents."""
    if config.quantizer == Quantizer.fsq:
        config.check_fsq()  # load_config checked it; a VQConfig built in code is checked here
        return FSQ(levels=list(config.fsq_levels), dim=config.code_dim)
    return VectorQuantize(
        dim=config.code_dim, codebook_size=config.codebook_size, decay=config.decay,
        commitment_weight=config.commitment_weight, kmeans_init=True,
        threshold_ema_dead_code=config.dead_code_threshold, accept_image_fmap=True,
    )


class VQTokenizer(nn.Module):
    """Images (b, 3, H, W) in [0, 1] <-> codes (b, (H/s) * (W/s)) in [0, codebook_size), s = ``downsample``."""

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = _encoder(config)
        self.quantizer = _quantizer(config)
        self.decoder = _decoder(config)

    def skip_kmeans_init(self) -> None:
        """Mark the codebook as initialised, so an untrained tokenizer used inside a larger
        model never re-initialises it from a batch (weights loaded later replace it anyway).
        ``initted`` is the quantizer's own buffer for this; FSQ has no codebook to initialise."""
        if self.config.quantizer == Quantizer.vq:
            self.quantizer._codebook.initted.fill_(True)

    def _quantize(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(quantized latent, codes (b, h, w) as int64, commitment loss) for either quantizer."""
        if self.config.quantizer == Quantizer.fsq:
            quantized, codes = self.quantizer(latent)
            # FSQ gives int32 indices; callers index embeddings and concatenate with int64 ids.
            # The grid is fixed and its straight-through rounding needs no commitment term.
            return quantized, codes.long(), latent.new_zeros(())
        return self.quantizer(latent)

    def _dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """Quantized latents ``(b, code_dim, h, w)`` of codes ``(b, h, w)``."""
        if self.config.quantizer == Quantizer.fsq:
            return self.quantizer.indices_to_codes(codes)
        return self.quantizer.get_output_from_indices(codes)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def forward(self, pixels: torch.Tensor, *, conv_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Reconstruct: ``{"reconstruction" (b, 3, H, W) in [0, 1] (unclamped), "codes" (b, n), "commit_loss"}``.

        Whatever autocast surrounds the call, the tokenizer runs in fp32, unless ``conv_dtype`` asks for
        the encoder's and decoder's convolutions in bf16 (training on hardware with native bf16); the
        quantizer always sees fp32 latents and the reconstruction is fp32."""
        device = pixels.device.type
        low = conv_dtype != torch.float32
        with torch.autocast(device, enabled=False):
            with torch.autocast(device, dtype=conv_dtype, enabled=low):
                latent = self.encoder(pixels.float() * 2 - 1)
            quantized, codes, commit_loss = self._quantize(latent.float())
            with torch.autocast(device, dtype=conv_dtype, enabled=low):
                reconstruction = (self.decoder(quantized) + 1) / 2
        return {"reconstruction": reconstruction.float(), "codes": codes.flatten(1), "commit_loss": commit_loss}

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Codes ``(b, n)`` of images in [0, 1]; never updates the codebook."""
        training = self.quantizer.training
        self.quantizer.eval()
        with torch.autocast(pixels.device.type, enabled=False):
            _, codes, _ = self._quantize(self.encoder(pixels.float() * 2 - 1))
        self.quantizer.train(training)
        return codes.flatten(1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Images ``(b, 3, H, W)`` in [0, 1] from codes ``(b, n)`` on a square grid."""
        side = int(round(codes.shape[1] ** 0.5))
        with torch.autocast(codes.device.type, enabled=False):
            quantized = self._dequantize(codes.reshape(-1, side, side))
            return ((self.decoder(quantized.float()) + 1) / 2).clamp(0, 1)


class CodeMemory:
    """The codes of images a frozen tokenizer has already encoded, keyed by a digest of each
    image's pixels: an image's codes never change, so a run that sees the same images every
    epoch (``data.cache_decoded``) encodes each one once. An image whose pixels differ in any
    way (an augmentation, another crop) is another key. The codes live on the CPU."""

    def __init__(self) -> None:
        self.codes: dict[bytes, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def __call__(self, pixels: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Codes (b, n) of ``pixels`` (b, 3, H, W): the remembered ones, and where any image is new,
        ``encode`` of the batch for it."""
        digests = [hashlib.blake2b(image.numpy().tobytes(), digest_size=16).digest()
                   for image in pixels.detach().float().cpu().contiguous()]
        found = {row: self.codes[digest] for row, digest in enumerate(digests) if digest in self.codes}
        missing = [row for row in range(len(digests)) if row not in found]
        if missing:  # the whole batch, as without the memory: a lone image can take other conv kernels
            fresh = encode(pixels).cpu()
            for row in missing:
                found[row] = self.codes[digests[row]] = fresh[row].clone()  # not a view of the batch
        self.hits += len(digests) - len(missing)
        self.misses += len(missing)
        return torch.stack([found[row] for row in range(len(digests))]).to(pixels.device)


def reconstruction_loss(reconstruction: torch.Tensor, pixels: torch.Tensor, *,
                        foreground_weight: float = 0.0) -> torch.Tensor:
    """Mean squared error in [0, 1] pixel units, optionally foreground-weighted.

    With ``foreground_weight`` w > 0 each pixel's error is weighted by
    ``1 + w * |pixel - image median|`` (mean over channels): pixels that differ
    from the dominant background count more. On images of small objects on a
    plain background (the synthetic world) plain MSE first learns a grey
    silhouette and only very slowly the objects' colours; the weighting makes
    colour appear within a few hundred steps.
    """
    error = (reconstruction - pixels) ** 2
    if foreground_weight <= 0:
        return error.mean()
    median = pixels.flatten(2).median(dim=-1).values[..., None, None]  # (b, 3, 1, 1)
    weight = 1 + foreground_weight * (pixels - median).abs().mean(dim=1, keepdim=True)
    return (weight * error).mean()


def psnr(reconstruction: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, per image ``(b,)``, for images in [0, 1]."""
    mse = ((reconstruction.clamp(0, 1) - pixels) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def codebook_usage(codes: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Perplexity of the code distribution and the fraction of codes used."""
    counts = torch.bincount(codes.flatten(), minlength=codebook_size).float()
    probabilities = counts / counts.sum()
    entropy = -(probabilities[probabilities > 0] * probabilities[probabilities > 0].log()).sum()
    return {"perplexity": float(entropy.exp()), "used_fraction": float((counts > 0).float().mean())}


def save_vq(model: VQTokenizer, out) -> None:
    """Write a VQ tokenizer directory (``config.json`` + ``model.safetensors``)."""
    save_directory(model, {"kind": "vq_tokenizer", "vq": asdict(model.config)}, out)


def load_vq(directory) -> VQTokenizer:
    """Load a directory written by :func:`save_vq`."""
    model = VQTokenizer(VQConfig(**read_config(directory)["vq"]))
    load_weights(model, directory)
    return model.eval()
