"""Single-modal encoders. Each returns a dict with

- ``tokens`` (b, n, d_cross): token embeddings projected to the cross-modal width,
- ``mask`` (b, n): True on real tokens,
- ``pooled`` (b, d_encoder): one vector per sample, for the two-tower heads.

Vision: a timm ``VisionTransformer`` built from config (never downloaded;
optional local weights). Text: a transformers ``BertModel`` built from a
``BertConfig`` (or a local ``from_pretrained`` directory). Audio: a
convolutional front end (log-mel + strided convs, or torchaudio's wav2vec 2.0
feature extractor on raw waveforms) followed by transformer blocks.

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
