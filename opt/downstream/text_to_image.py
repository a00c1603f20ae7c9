"""Text (and/or audio) -> image: the image-token decoder generates VQ codes from
the fused prompt, the VQ tokenizer turns them into pixels.

Decoding is MaskGIT-style parallel (``steps`` steps) or autoregressive, with
classifier-free guidance ``guidance`` (1 = off). With ``candidates`` > 1 each
image is the best of that many samples by the model's own reading of them (as
DALL-E re-ranked its samples with CLIP): the text decoder's log P(prompt |
candidate image), i.e. how likely the model's captioner finds the prompt as a
caption of what was drawn. Evaluation prompts with a split's captions and
reports R-precision: how often the model's own towers rank the prompt first
among itself and 99 other prompts; dataset plug-ins add their own scores of the
pictures (on the synthetic world, the fixed analyser of
:mod:`opt.data.world.image_analysis` against the caption's facts, not the model
under test). Prompts are decoded and collated as training reads shards
(:class:`~opt.data.samples.SampleDecoder`, :class:`~opt.data.batch.Collator`).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from opt.data.batch import Collator, batch_rows, to_device
from opt.data.samples import SampleDecoder, SkipSample
from opt.downstream.common import EncodedSplit, LoadedModel, caption_log_likelihood, data_settings
from opt.downstream.plugins import EvaluationPlugin
from opt.errors import UserError
from opt.files import write_atomic
from opt.model.generation import generate_image_codes_autoregressive, generate_image_codes_parallel
from opt.viz import save_image_grid, to_uint8

DECODINGS = ("parallel", "autoregressive")
# on the demo model autoregressive decoding drew colour, size and position better than
# 12 parallel steps (and is faster on a CPU)
DEFAULT_DECODING = "autoregressive"
DEFAULT_CANDIDATES = 32  # best of 32 by the model's own captioner (README: text-to-image)
CANDIDATE_ROWS = 256  # images (prompts x candidates) drawn at once by default, which bounds the memory


def prompt_batch(loaded: LoadedModel, prompts: list[str], audio: list[bytes] | None = None) -> dict:
    """A batch with the prompts' text (and, when given, one audio clip per prompt), decoded and
    collated exactly as training and evaluation read a shard's captions and speech."""
    modalities = ["text"] if audio is None else ["text", "audio"]
    spec = loaded.model.spec
    decode = SampleDecoder(data_settings(loaded, modalities=modalities), spec.audio, loaded.tokenizer)
    samples = []
    for row, prompt in enumerate(prompts):
        raw = {"__key__": str(row), "txt": prompt.encode("utf-8")}
        if audio is not None:
            raw["wav"] = audio[row]  # the member name only finds it: the bytes tell their format
        try:
            samples.append(decode(raw))
        except SkipSample as skip:
            raise UserError(f"prompt {row + 1} cannot be read: {skip.reason}") from None
    batch = Collator(modalities, loaded.tokenizer.pad_id, spec.audio.n_mels, audio_input=spec.audio.input)(samples)
    return to_device(batch, loaded.device)


@torch.no_grad()
def _sample_images(loaded: LoadedModel, batch: dict, *, decoding: str, steps: int, guidance: float,
                   temperature: float, generator: torch.Generator) -> torch.Tensor:
    """One image (b, 3, H, W) in [0, 1] per prompt row of ``batch``."""
    model = loaded.model
    sources = tuple(m for m in ("text", "audio") if m in batch)
    fused = model.fuse(model.encode_unimodal(batch, modalities=sources), sources)
    if decoding == "parallel":
        codes = generate_image_codes_parallel(model.image_decoder, fused["states"], fused["mask"], steps=steps,
                                              guidance=guidance, temperature=temperature, generator=generator)
    else:
        codes = generate_image_codes_autoregressive(model.image_decoder, fused["states"], fused["mask"],
                                                    guidance=guidance, temperature=temperature, generator=generator)
    return model.decode_image_codes(codes).clamp(0, 1).float()


@torch.no_grad()
def prompt_agreement(loaded: LoadedModel, batch: dict, images: torch.Tensor) -> torch.Tensor:
    """(b,) how well each image fits its text prompt, by the model itself: the text decoder's
    log P(prompt | image), summed over the prompt's tokens (the model captions what was drawn)."""
    model = loaded.model
    present = torch.ones(len(images), dtype=torch.bool, device=images.device)
    fused = model.fuse(model.encode_unimodal({"image": {"pixels": images, "present": present}},
                                             modalities=("image",)), ("image",))
    return caption_log_likelihood(model, fused, batch["text"]["ids"], batch["text"]["mask"])


@torch.no_grad()
def generate_images(loaded: LoadedModel, batch: dict, *, decoding: str = DEFAULT_DECODING, steps: int = 12,
                    guidance: float = 3.0, temperature: float = 1.0, candidates: int = DEFAULT_CANDIDATES,
                    seed: int = 0, batch_size: int | None = None) -> torch.Tensor:
    """Images (b, 3, H, W) in [0, 1] for a prompt batch (text and/or audio); with ``candidates``
    > 1 each is the best of that many samples by :func:`prompt_agreement`. At most
    ``batch_size`` images (prompts x candidates; default ``CANDIDATE_ROWS``) are drawn at once,
    and at least one prompt's candidates; the draws depend on it, so one seed and batch size
    give the same images."""
    if decoding not in DECODINGS:
        raise UserError(f"--decoding {decoding!r} is not parallel or autoregressive")
    if candidates < 1:
        raise UserError(f"--candidates must be at least 1, got {candidates}")
    if candidates > 1 and "text" not in batch:
        raise UserError("choosing among candidates reads them against a text prompt; give one or --candidates 1")
    generator = torch.Generator(device=loaded.device).manual_seed(seed)
    options = {"decoding": decoding, "steps": steps, "guidance": guidance, "temperature": temperature,
               "generator": generator}
    prompts = len(batch["keys"])
    per_chunk = max(1, (batch_size or CANDIDATE_ROWS) // candidates)
    chosen = []
    for start in range(0, prompts, per_chunk):
        index = [row for row in range(start, min(start + per_chunk, prompts)) for _ in range(candidates)]
        repeated = batch_rows(batch, index)  # each prompt ``candidates`` times in a row
        images = _sample_images(loaded, repeated, **options)
        if candidates > 1:
            scores = prompt_agreement(loaded, repeated, images).reshape(-1, candidates)
            images = images[scores.argmax(1) + candidates * torch.arange(scores.shape[0], device=scores.device)]
        chosen.append(images.cpu())
    return torch.cat(chosen)


def save_generations(images: torch.Tensor, prompts: list[str], out: str | Path, *, samples: int) -> list[Path]:
    """``out/{prompt:05d}_{sample:02d}.png`` per image (prompt-major order) and ``out/grid.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        prompt, sample = divmod(index, samples)
        buffer = io.BytesIO()
        Image.fromarray(to_uint8(image)).save(buffer, format="PNG")
        paths.append(write_atomic(out / f"{prompt:05d}_{sample:02d}.png", buffer.getvalue()))
    titles = [prompts[i // samples] for i in range(len(images))]
    save_image_grid(list(images), out / "grid.png", titles=titles, columns=max(samples, min(4, len(images))))
    return paths


@torch.no_grad()
def r_precision(loaded: LoadedModel, images: torch.Tensor, split: EncodedSplit, prompt_rows: torch.Tensor, *,
                distractors: int = 99, seed: int = 0) -> float:
    """Fraction of images whose prompt the towers rank first among it and ``distractors`` other prompts,
    drawn from other groups (another caption of the prompt's own image or clip is no distractor)."""
    model = loaded.model
    image_embeddings = model.tower_embeddings(model.encode_unimodal(
        {"image": {"pixels": images.to(loaded.device), "present": torch.ones(len(images), dtype=torch.bool)}},
        modalities=("image",)))["image"].float().cpu()
    text_embeddings = model.tower_embeddings({"text": {"pooled": split.unimodal["text"]["pooled"].to(loaded.device)}}
                                             )["text"].float().cpu()
    generator = torch.Generator().manual_seed(seed)
    groups = split.groups()
    hits = 0
    for image, row in zip(image_embeddings, prompt_rows.tolist()):
        eligible = torch.tensor([other for other, group in enumerate(groups) if group != groups[row]],
                                dtype=torch.long)
        others = eligible[torch.randperm(len(eligible), generator=generator)[: min(distractors, len(eligible))]]
        pool = torch.cat([torch.tensor([row]), others])
        hits += int((text_embeddings[pool] @ image).argmax() == 0)
    return hits / len(prompt_rows)


def evaluate_text_to_image(loaded: LoadedModel, split: EncodedSplit, *, count: int = 64, batch_size: int = 32,
                           decoding: str = DEFAULT_DECODING, steps: int = 12, guidance: float = 3.0,
                           temperature: float = 1.0, candidates: int = DEFAULT_CANDIDATES, seed: int = 0,
                           plugins: Sequence[EvaluationPlugin] = ()
                           ) -> tuple[dict[str, float], torch.Tensor, list[str]]:
    """Generate from the first ``count`` captions of ``split`` and score the pictures: each
    plug-in's metrics, then R-precision.

    Returns the metrics, the images and their prompts.
    """
    rows = torch.arange(min(count, len(split)))
    prompts = [split.captions[i] for i in rows.tolist()]
    images = torch.cat([
        generate_images(loaded, prompt_batch(loaded, prompts[start:start + batch_size]), decoding=decoding,
                        steps=steps, guidance=guidance, temperature=temperature, candidates=candidates,
                        seed=seed + start)
        for start in range(0, len(prompts), batch_size)
    ])
    metrics: dict[str, float | str] = {"n": len(prompts), "decoding": decoding, "guidance": guidance,
                                       "candidates": candidates}
    pictures = [to_uint8(image) for image in images] if plugins else []
    metas = [split.meta[i] for i in rows.tolist()]
    for plugin in plugins:
        metrics |= plugin.image_metrics(pictures, metas)
    metrics["r_precision"] = r_precision(loaded, images, split, rows, seed=seed)
    return metrics, images, prompts
