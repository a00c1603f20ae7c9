"""Image-text (or audio-text) similarity under a trained OPT model: the scorer of
the cleaning filter ``low_similarity`` (:mod:`opt.data.clean`).

Raw shard samples are decoded exactly as for training (the pipeline's
:class:`~opt.data.samples.SampleDecoder` and :class:`~opt.data.batch.Collator`,
with the image size, text length and audio settings the model was built
for), each modality of the pair goes through its single-modal encoder and
two-tower head, and the score is the cosine of the two L2-normalised
embeddings, in [-1, 1]. A sample that lacks one side of the pair, or that the
decoder rejects, gets ``None`` (the filter keeps it).

    scorer = TowerSimilarity.from_pretrained("runs/export", pair=("image", "text"))
    scores = scorer(raw_samples)  # [0.41, None, 0.12, ...]
"""

from __future__ import annotations

from pathlib import Path

import torch

from opt.config import DataConfig
from opt.data.batch import Collator, to_device
from opt.data.samples import DecodedSample, SampleDecoder, SkipSample
from opt.downstream.common import load_model
from opt.model.opt_model import OPTModel
from opt.text.tokenizer import Tokenizer


class TowerSimilarity:
    """Callable scoring raw samples by the cosine of their two-tower embeddings."""

    def __init__(self, model: OPTModel, tokenizer: Tokenizer, *, pair: tuple[str, str] = ("image", "text"),
                 batch_size: int = 32, device: str = "cpu") -> None:
        spec = model.spec
        self.pair = pair
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        data = DataConfig(modalities=list(pair), image_size=spec.image_size, max_text_tokens=spec.max_text_tokens)
        self.decoder = SampleDecoder(data, spec.audio, tokenizer)
        self.collate = Collator(list(pair), tokenizer.pad_id, spec.audio.n_mels, audio_input=spec.audio.input)

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, pair: tuple[str, str] = ("image", "text"),
                        batch_size: int = 32, device: str = "cpu") -> "TowerSimilarity":
        """Load a model directory (``opt export``) with its ``tokenizer.model``."""
        loaded = load_model(directory, device=device)
        return cls(loaded.model, loaded.tokenizer, pair=pair, batch_size=batch_size, device=device)

    def __call__(self, samples: list[dict]) -> list[float | None]:
        scores: list[float | None] = [None] * len(samples)
        usable = [(i, d) for i, d in enumerate(self._decode(raw) for raw in samples) if d is not None]
        for start in range(0, len(usable), self.batch_size):
            chunk = usable[start:start + self.batch_size]
            for (index, _), score in zip(chunk, self.score([d for _, d in chunk]).tolist(), strict=True):
                scores[index] = score
        return scores

    @torch.no_grad()
    def score(self, decoded: list[DecodedSample]) -> torch.Tensor:
        """(b,) cosine similarity of the pair for decoded samples that have both sides."""
        batch = to_device(self.collate(decoded), self.device)
        embeddings = self.model.tower_embeddings(self.model.encode_unimodal(batch, modalities=self.pair))
        first, second = (embeddings[m].float() for m in self.pair)
        return (first * second).sum(dim=-1).cpu()

    def _decode(self, raw: dict) -> DecodedSample | None:
        try:
            decoded = self.decoder(raw)
        except SkipSample:
            return None
        return decoded if all(getattr(decoded, m) is not None for m in self.pair) else None
