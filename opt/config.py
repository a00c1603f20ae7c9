"""Typed configuration: dataclasses loaded from YAML with dotted overrides.

One dataclass per component, a comment per field. Loading goes through
OmegaConf's structured configs, which reject unknown keys and wrong types; their
messages are reduced here to one line that names the offending key.

    cfg = load_config("configs/tiny.yaml", ["model.cross.layers=4"])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from opt import TOWER_PAIRS, pair_name
from opt.errors import ConfigError


@dataclass
class AudioConfig:
    sample_rate: int = 16000  # every waveform is resampled to this rate (Hz)
    n_mels: int = 64  # mel bands of the log-mel features
    n_fft: int = 400  # FFT size in samples (25 ms at 16 kHz)
    hop_length: int = 160  # frame step in samples (10 ms at 16 kHz)
    max_seconds: float = 6.0  # longer audio is clipped, shorter is padded (and masked)
    mean_normalize: bool = True  # subtract each utterance's mean per mel band (cepstral mean normalisation)


@dataclass
class DataConfig:
    train: str = "data/world/train-*.tar"  # training shards: directory, glob or brace pattern
    val: str = "data/world/val-*.tar"  # validation shards
    modalities: list[str] = field(default_factory=lambda: ["text", "image", "audio"])  # enabled modalities
    require: list[str] = field(default_factory=list)  # a sample missing one of these is skipped
    image_size: int = 64  # images are resized (shorter side) and centre-cropped to this
    max_text_tokens: int = 40  # token ids per caption, bos/eos included
    max_caption_chars: int = 1000  # longer captions are truncated before tokenising
    max_image_pixels: int = 40_000_000  # larger images are skipped (decompression-bomb guard)
    min_audio_seconds: float = 0.05  # shorter audio is skipped
    batch_size: int = 32  # samples per batch on one process
    workers: int = 2  # data loader worker processes
    shuffle_buffer: int = 1000  # samples held for shuffling (0 disables shuffling)
    cache_decoded: bool = False  # training: keep every decoded sample in memory (each worker), for corpora that fit
    strict: bool = False  # raise on the first bad sample instead of skipping and counting it


@dataclass
class TokenizerConfig:
    path: str = "data/tokenizer.model"  # trained SentencePiece model
    vocab_size: int = 512  # target vocabulary size (byte fallback adds 256 byte pieces)


@dataclass
class VQConfig:
    codebook_size: int = 512  # discrete image codes (base: 8192)
    code_dim: int = 64  # size of a codebook vector
    channels: int = 32  # channels at full resolution (x1, x2, x4, x4 down to 1/8 resolution)
    res_blocks: int = 1  # residual blocks per stage
    decay: float = 0.99  # EMA decay of the codebook
    commitment_weight: float = 0.25  # encoder commitment loss weight
    dead_code_threshold: float = 1.0  # codes whose EMA usage falls below this are restarted from the batch


POOLING = ("mean", "max")
VISION_STEMS = ("patch", "conv")


@dataclass
class VisionConfig:
    patch_size: int = 8  # ViT patch side in pixels (8 at 64 px = the VQ grid)
    layers: int = 2  # transformer blocks
    width: int = 128  # hidden size
    heads: int = 4  # attention heads
    pool: str = "mean"  # two-tower pooling over patches: mean | max (max finds small objects on a plain background)
    # patch: one linear map per patch (timm's ViT, as in the paper); conv: three strided 3x3
    # convolutions with GroupNorm build the same grid of tokens, and see shapes much sooner
    stem: str = "patch"
    # conv stem only: two more input channels holding each pixel's x and y in [-1, 1] (CoordConv,
    # Liu et al. 2018), so the stem's nonlinearities tie position to content
    coord_channels: bool = False
    stem_depth: int = 1  # conv stem: 3x3 convolutions per resolution (1: the strided ones alone)
    # add a linear map of the pooled image vector to every patch token, so that a reader whose
    # attention is still near uniform over the patches gets a small object's features undiluted
    pooled_context: bool = False
    pretrained_path: str | None = None  # optional local timm weights (.safetensors or .pth state dict)


@dataclass
class TextEncoderConfig:
    layers: int = 2  # BERT layers
    width: int = 128  # hidden size
    heads: int = 4  # attention heads
    pretrained_dir: str | None = None  # optional local transformers directory (from_pretrained)


@dataclass
class AudioEncoderConfig:
    front: str = "logmel_conv"  # logmel_conv (log-mel + conv subsampling) | wav2vec2_conv (raw waveform)
    subsample: int = 4  # time reduction of the logmel_conv front (2, 4 or 8)
    layers: int = 2  # transformer blocks
    width: int = 128  # hidden size
    heads: int = 4  # attention heads
    pool: str = "mean"  # two-tower pooling over real frames: mean | max
    distance_bias: bool = True  # ALiBi: self-attention logits fall linearly with frame distance, per head


@dataclass
class CrossModalConfig:
    layers: int = 2  # transformer blocks of the cross-modal encoder
    width: int = 128  # hidden size (every encoder is projected to it)
    heads: int = 4  # attention heads
    max_text_positions: int = 64  # position embeddings for text tokens
    max_audio_positions: int = 256  # position embeddings for audio frames after subsampling


@dataclass
class TextDecoderConfig:
    layers: int = 2  # causal transformer blocks
    width: int = 128  # hidden size
    heads: int = 4  # attention heads
    label_smoothing: float = 0.1  # as in the OPT paper
    max_length: int = 64  # longest generated sequence, bos/eos included


@dataclass
class ImageDecoderConfig:
    layers: int = 2  # transformer blocks over image codes
    width: int = 128  # hidden size
    heads: int = 4  # attention heads
    grid_positions: bool = False  # code positions start as 2-D sine-cosine over the code grid (learnable), not random


@dataclass
class TowerConfig:
    dim: int = 128  # shared embedding size of the two-tower heads
    temperature: float = 0.07  # initial softmax temperature (learned)


@dataclass
class ModelConfig:
    dropout: float = 0.0  # dropout in every transformer block (paper: 0.1)
    mlp_ratio: int = 4  # MLP hidden size / width
    # layer-normalised queries and keys (ViT-22B; opt.model.layers.Attention): none | cross (the
    # decoders' cross-attention, which reads the fused states) | fusion (that and the cross-modal
    # encoder) | all (every attention layer but BERT's)
    qk_norm: str = "none"
    vq: VQConfig = field(default_factory=VQConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    audio: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    cross: CrossModalConfig = field(default_factory=CrossModalConfig)
    text_decoder: TextDecoderConfig = field(default_factory=TextDecoderConfig)
    image_decoder: ImageDecoderConfig = field(default_factory=ImageDecoderConfig)
    towers: TowerConfig = field(default_factory=TowerConfig)


@dataclass
class VQTrainConfig:
    steps: int = 2000  # optimizer steps of `opt vq train`
    batch_size: int = 64  # images per step
    lr: float = 1e-3  # Adam learning rate (cosine decay)
    foreground_weight: float = 0.0  # > 0 weights pixels far from the image median more (see vq.reconstruction_loss)


QK_NORM_SCOPES = ("none", "cross", "fusion", "all")
TASK_NAMES = ("mlm", "mvm", "mam", "td", "id", "itm", "contrastive")


GENERATION_CONDITIONS = {"td": ("image", "audio"), "id": ("text", "audio")}  # what each may condition on


@dataclass
class TaskPhase:
    steps: int = 0  # optimizer steps this phase lasts
    weights: dict[str, float] = field(default_factory=dict)  # the phase's task weights (tasks left out: 0)
    td_conditions: list[str] | None = None  # the phase's text-decoding conditions (None: tasks.td_conditions)
    id_conditions: list[str] | None = None  # the phase's image-decoding conditions (None: tasks.id_conditions)


@dataclass
class TasksConfig:
    mode: str = "sample"  # sample: one task per step drawn by weight (the paper); sum: weighted sum of all
    weights: dict[str, float] = field(default_factory=lambda: {name: 1.0 for name in TASK_NAMES})  # 0 disables
    modality_drop: float = 0.3  # token tasks: probability of hiding one or two other modalities entirely
    mlm_rate: float = 0.15  # text tokens selected (80% [MASK], 10% random, 10% kept)
    mvm_rate: float = 0.15  # image patches hidden; targets are their VQ codes
    mam_rate: float = 0.15  # audio frames hidden; each is found among other frames of its utterance
    mam_temperature: float = 0.1  # InfoNCE temperature of masked audio modelling
    mam_negatives: int = 10  # distractors per hidden frame, other frames of its own utterance (0 = all of them)
    condition_dropout: float = 0.1  # image decoding: conditions replaced by the null context (guidance)
    id_parallel_fraction: float = 0.5  # image decoding: share of steps on the MaskGIT objective, the rest autoregressive
    itm_modality_drop: float = 0.3  # ITM: probability a sample loses its image or its audio (labels follow)
    queue_size: int = 1024  # contrastive: momentum embeddings kept per modality as extra negatives
    momentum: float = 0.995  # contrastive: EMA decay of the momentum encoders
    distillation: float = 0.0  # contrastive: weight of the momentum encoders' soft targets (0 = off)
    contrastive_pairs: list[str] = field(default_factory=lambda: [pair_name(p) for p in TOWER_PAIRS])  # aligned pairs
    # what text / image decoding condition on, one drawn uniformly per step among those the batch carries
    td_conditions: list[str] = field(default_factory=lambda: ["image", "audio", "image+audio"])
    id_conditions: list[str] = field(default_factory=lambda: ["text", "audio", "text+audio"])
    phases: list[TaskPhase] = field(default_factory=list)  # run in order from step 0, then `weights` apply


@dataclass
class TrainConfig:
    seed: int = 0  # seeds model initialisation, masking and data order
    steps: int = 1000  # optimizer steps
    lr: float = 5e-5  # peak learning rate
    warmup_steps: int = 1000  # linear warmup
    schedule: str = "cosine"  # decay after warmup: cosine | linear (to zero at `steps`)
    weight_decay: float = 0.01  # AdamW weight decay (not on norms and biases)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # AdamW betas (the paper's)
    grad_clip: float = 5.0  # gradient-norm clipping
    accumulation: int = 1  # micro-batches per optimizer step
    precision: str = "fp32"  # fp32 | bf16 | fp16 (the VQ tokenizer always runs in fp32)
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3
    deepspeed_preset: str | None = None  # optional JSON merged under the derived DeepSpeed config
    vq_path: str | None = None  # trained VQ tokenizer directory (opt vq train --out)
    checkpoint_every: int = 500  # steps between checkpoints (one is also written at the end)
    keep_checkpoints: int = 3  # newest checkpoints kept
    log_every: int = 10  # steps between metrics.jsonl / TensorBoard records
    eval_every: int = 0  # steps between validation passes over data.val (0 = none); logged as val/TASK/METRIC
    eval_batches: int = 4  # validation batches per pass (the same ones each time)
    max_nonfinite: int = 5  # consecutive non-finite steps before the run stops


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    vq_train: VQTrainConfig = field(default_factory=VQTrainConfig)


def _one_line(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", None)
    message = str(error).splitlines()[0].strip()
    return f"config key '{key}': {message}" if key else f"config: {message}"


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a :class:`Config` from defaults, an optional YAML file and dotted overrides.

    Raises :class:`ConfigError` (one line, naming the key) on a missing file, bad
    YAML, an unknown key or a value of the wrong type.
    """
    schema = OmegaConf.structured(Config)
    layers = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            content = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {str(error).splitlines()[0]}") from None
        if not isinstance(content, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        layers.append(content)
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override '{override}' must look like key.path=value")
    try:
        merged = OmegaConf.merge(schema, *layers, OmegaConf.from_dotlist(list(overrides)))
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise ConfigError(_one_line(error)) from None
    _validate(config)
    return config


def _validate(config: Config) -> None:
    unknown = sorted(set(config.data.modalities + config.data.require) - {"text", "image", "audio"})
    if unknown:
        raise ConfigError(f"config key 'data.modalities': unknown modality {unknown[0]!r} (use text, image, audio)")
    if not config.data.modalities:
        raise ConfigError("config key 'data.modalities': at least one modality must be enabled")
    if config.model.audio.front not in ("logmel_conv", "wav2vec2_conv"):
        raise ConfigError(f"config key 'model.audio.front': {config.model.audio.front!r} is not logmel_conv or wav2vec2_conv")
    if config.model.audio.subsample not in (2, 4, 8):
        raise ConfigError(f"config key 'model.audio.subsample': must be 2, 4 or 8, got {config.model.audio.subsample}")
    for name in ("vision", "audio"):
        if getattr(config.model, name).pool not in POOLING:
            raise ConfigError(f"config key 'model.{name}.pool': {getattr(config.model, name).pool!r} is not {', '.join(POOLING)}")
    if config.model.vision.stem not in VISION_STEMS:
        raise ConfigError(f"config key 'model.vision.stem': {config.model.vision.stem!r} is not {', '.join(VISION_STEMS)}")
    if config.model.vision.stem == "conv" and config.model.vision.pretrained_path:
        raise ConfigError("config key 'model.vision.stem': pretrained ViT weights need the patch stem, not conv")
    if config.model.qk_norm not in QK_NORM_SCOPES:
        raise ConfigError(f"config key 'model.qk_norm': {config.model.qk_norm!r} is not {', '.join(QK_NORM_SCOPES)}")
    if config.model.vision.stem_depth < 1:
        raise ConfigError(f"config key 'model.vision.stem_depth': must be at least 1, got {config.model.vision.stem_depth}")
    if config.model.vision.coord_channels and config.model.vision.stem != "conv":
        raise ConfigError("config key 'model.vision.coord_channels': coordinate channels need model.vision.stem=conv")
    if config.model.vision.stem_depth > 1 and config.model.vision.stem != "conv":
        raise ConfigError("config key 'model.vision.stem_depth': a deeper stem needs model.vision.stem=conv")
    if config.model.vision.patch_size != 8:
        raise ConfigError(f"config key 'model.vision.patch_size': must be 8, the VQ grid cell (masked vision "
                          f"modelling predicts each patch's code), got {config.model.vision.patch_size}")
    if config.data.image_size % 8:
        raise ConfigError(f"config key 'data.image_size': must be a multiple of 8 (the VQ grid), got {config.data.image_size}")
    for name in ("vision", "text", "audio", "cross", "text_decoder", "image_decoder"):
        part = getattr(config.model, name)
        if part.width % part.heads:
            raise ConfigError(f"config key 'model.{name}.width': {part.width} is not divisible by {part.heads} heads")
    for key, weights in [("tasks.weights", config.tasks.weights)] + [
            (f"tasks.phases.{i}.weights", phase.weights) for i, phase in enumerate(config.tasks.phases)]:
        unknown_tasks = sorted(set(weights) - set(TASK_NAMES))
        if unknown_tasks:
            raise ConfigError(f"config key '{key}.{unknown_tasks[0]}': unknown task (tasks: {', '.join(TASK_NAMES)})")
        if sum(weights.values()) <= 0 or min(weights.values()) < 0:
            raise ConfigError(f"config key '{key}': weights must be >= 0 with at least one positive")
    for i, phase in enumerate(config.tasks.phases):
        if phase.steps <= 0:
            raise ConfigError(f"config key 'tasks.phases.{i}.steps': must be positive, got {phase.steps}")
    for task, allowed in GENERATION_CONDITIONS.items():
        for key, conditions in [(f"tasks.{task}_conditions", getattr(config.tasks, f"{task}_conditions"))] + [
                (f"tasks.phases.{i}.{task}_conditions", getattr(p, f"{task}_conditions"))
                for i, p in enumerate(config.tasks.phases)]:
            if conditions is None:
                continue
            bad = [c for c in conditions if not c or not set(c.split("+")) <= set(allowed)
                   or len(set(c.split("+"))) != len(c.split("+"))]
            if bad or not conditions:
                raise ConfigError(f"config key '{key}': {bad[0] if bad else 'empty'!r} is not a condition "
                                  f"(one of {', '.join(allowed)} or both joined by '+')")
    if not 0.0 <= config.tasks.id_parallel_fraction <= 1.0:
        raise ConfigError(f"config key 'tasks.id_parallel_fraction': must be in [0, 1], "
                          f"got {config.tasks.id_parallel_fraction}")
    if config.tasks.mode not in ("sample", "sum"):
        raise ConfigError(f"config key 'tasks.mode': {config.tasks.mode!r} is not sample or sum")
    pairs = [pair_name(p) for p in TOWER_PAIRS]
    unknown_pairs = [p for p in config.tasks.contrastive_pairs if p not in pairs]
    if unknown_pairs or not config.tasks.contrastive_pairs:
        raise ConfigError(f"config key 'tasks.contrastive_pairs': {unknown_pairs[0] if unknown_pairs else 'empty'!r} "
                          f"(use {', '.join(pairs)})")
    if config.train.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"config key 'train.zero_stage': must be 0, 1, 2 or 3, got {config.train.zero_stage}")
    if config.train.schedule not in ("cosine", "linear"):
        raise ConfigError(f"config key 'train.schedule': {config.train.schedule!r} is not cosine or linear")
    if config.train.precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"config key 'train.precision': {config.train.precision!r} is not fp32, bf16 or fp16")
    for name, value in (("data.batch_size", config.data.batch_size), ("data.image_size", config.data.image_size),
                        ("data.max_text_tokens", config.data.max_text_tokens)):
        if value <= 0:
            raise ConfigError(f"config key '{name}': must be positive, got {value}")


def config_from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Rebuild a config dataclass (any section) from plain data, with the same checks as files."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), values))
    except OmegaConfBaseException as error:
        raise ConfigError(_one_line(error)) from None


def to_dict(config: Config) -> dict[str, Any]:
    """The resolved config as plain data (for saving beside runs and checkpoints)."""
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
