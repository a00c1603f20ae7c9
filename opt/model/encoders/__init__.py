"""Single-modal encoders. Each returns a dict with

- ``tokens`` (b, n, d_cross): token embeddings projected to the cross-modal width,
- ``mask`` (b, n): True on real tokens,
- ``pooled`` (b, d_encoder): one vector per sample, for the two-tower heads.

Vision (:mod:`.vision`): a timm ``VisionTransformer`` built from config, optionally from a local
timm state dict (resampled to the grid, every tensor reported). Text (:mod:`.text`): a
transformers ``BertModel`` built from a ``BertConfig`` or a local pretrained directory. Audio
(:mod:`.audio`): a convolutional front end (log-mel + strided convs, or torchaudio's wav2vec 2.0
feature extractor on the waveform) followed by transformer blocks, or a local pretrained
wav2vec 2.0 / HuBERT in their place. Nothing is ever downloaded.

Each encoder also accepts a mask of positions to hide behind a learned
``[MASK]`` embedding (image patches, audio frames) for the token-level tasks;
text is masked at the id level.
"""

from opt.model.encoders.audio import AudioEncoder, LogMelConvFront, Wav2Vec2ConvFront
from opt.model.encoders.common import pool
from opt.model.encoders.text import TextEncoder
from opt.model.encoders.vision import VisionEncoder, conv_stem

__all__ = ["AudioEncoder", "LogMelConvFront", "TextEncoder", "VisionEncoder", "Wav2Vec2ConvFront", "conv_stem",
           "pool"]
