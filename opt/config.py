"""Typed configuration: dataclasses loaded from YAML with dotted overrides.

One dataclass per component, a comment per field (``docs/config.md`` is generated
from them by ``python scripts/make_docs.py``). Loading goes through OmegaConf's
structured configs, which reject unknown keys, values of the wrong type and
enumeration values outside their ``Enum``; numeric ranges are declared beside
each field (:func:`ranged`) and checked after loading, with the few rules that
tie two fields together. Every message is one line naming the key.

    cfg = load_config("configs/tiny.yaml", ["model.cross.layers=4"])

Task keys renamed in this release (``td`` -> ``text_decoding``, ``id`` ->
``image_decoding``, and the settings named after them) are still read, with a
warning, from files and overrides.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from opt import TOWER_PAIRS, pair_name
from opt.errors import ConfigError

BOUNDS = ("ge", "gt", "le", "lt")


def ranged(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, ge: float | None = None,
           gt: float | None = None, le: float | None = None, lt: float | None = None,
           choices: tuple | None = None) -> Any:
    """A dataclass field whose value must lie within the given bounds (or among ``choices``);
    :func:`load_config` checks it and names the key when it does not."""
    limits = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt), ("choices", choices)) if v is not None}
    return field(default=default, default_factory=default_factory, metadata=limits)


class Modality(StrEnum):
    text = "text"
    image = "image"
    audio = "audio"


class Pooling(StrEnum):
    mean = "mean"  # the mean over real tokens
    max = "max"  # the per-channel maximum: finds a small object on a plain background


class VisionStem(StrEnum):
    patch = "patch"  # one linear map per patch (timm's ViT, as in the paper)
    conv = "conv"  # strided 3x3 convolutions with GroupNorm building the same token grid


class AudioFront(StrEnum):
    logmel_conv = "logmel_conv"  # log-mel features, then strided convolutions
    wav2vec2_conv = "wav2vec2_conv"  # torchaudio's wav2vec 2.0 feature extractor on the raw waveform


class QKNorm(StrEnum):
    none = "none"
    cross = "cross"  # the decoders' cross-attention, which reads the fused states
    fusion = "fusion"  # that and the cross-modal encoder
    all = "all"  # every attention layer but BERT's


class AudioInput(StrEnum):
    logmel = "logmel"  # log-mel features (the logmel_conv front)
    waveform = "waveform"  # the raw waveform (the wav2vec2_conv front, or a pretrained wav2vec 2.0 / HuBERT)


class TaskMode(StrEnum):
    sample = "sample"  # one task per step, drawn by weight (the paper)
    sum = "sum"  # the weighted sum of every task with a positive weight


class Decay(StrEnum):
    cosine = "cosine"
    linear = "linear"


class Precision(StrEnum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


@dataclass
class AudioConfig:
    sample_rate: int = ranged(16000, ge=1000)  # every waveform is resampled to this rate (Hz)
    input: AudioInput = AudioInput.logmel  # what the audio encoder reads: log-mel features or the waveform
    # waveform input: scale each utterance to zero mean and unit variance over its real samples
    # (as wav2vec 2.0's feature extractor does with do_normalize)
    normalize_waveform: bool = True
    n_mels: int = ranged(64, ge=1)  # mel bands of the log-mel features
    n_fft: int = ranged(400, ge=2)  # FFT size in samples (25 ms at 16 kHz)
    hop_length: int = ranged(160, ge=1)  # frame step in samples (10 ms at 16 kHz)
    max_seconds: float = ranged(6.0, gt=0)  # longer audio is clipped, shorter is padded (and masked)
    mean_normalize: bool = True  # subtract each utterance's mean per mel band (cepstral mean normalisation)
    # SpecAugment in training (opt/data/augment.py), on the log-mel features every task reads but
    # masked audio modelling (whose targets are those features)
    time_masks: int = ranged(0, ge=0)  # SpecAugment: time spans masked per utterance in training (0: off)
    time_mask_frames: int = ranged(20, ge=1)  # SpecAugment: the widest time span, in frames
    freq_masks: int = ranged(0, ge=0)  # SpecAugment: mel-band spans masked per utterance in training (0: off)
    freq_mask_bands: int = ranged(8, ge=1)  # SpecAugment: the widest mel-band span, in bins
    # speed perturbation in training (Ko et al., 2015): each utterance, each time it is read, is played
    # at one of these speeds, drawn uniformly (tempo and pitch scale together); e.g. [0.9, 1.0, 1.1]; [] off
    speed_factors: list[float] = field(default_factory=list)


@dataclass
class DataConfig:
    train: str = "data/world/train-*.tar"  # training shards: directory, glob or brace pattern
    val: str = "data/world/val-*.tar"  # validation shards
    modalities: list[Modality] = field(default_factory=lambda: list(Modality))  # enabled modalities
    require: list[Modality] = field(default_factory=list)  # a sample missing one of these is skipped
    image_size: int = ranged(64, ge=8)  # images are resized (shorter side) and centre-cropped to this
    max_text_tokens: int = ranged(40, ge=3)  # token ids per caption, bos/eos included
    max_caption_chars: int = ranged(1000, ge=1)  # longer captions are truncated before tokenising
    max_image_pixels: int = ranged(40_000_000, ge=1)  # larger images are skipped (decompression-bomb guard)
    min_audio_seconds: float = ranged(0.05, ge=0)  # shorter audio is skipped
    batch_size: int = ranged(32, ge=1)  # samples per batch on one process
    workers: int = ranged(2, ge=0)  # data loader worker processes
    shuffle_buffer: int = ranged(1000, ge=0)  # samples held for shuffling (0 disables shuffling)
    # training: keep every decoded sample in memory (each worker), for corpora that fit, and the VQ codes of
    # every image (the trainer's process)
    cache_decoded: bool = False
    strict: bool = False  # raise on the first bad sample instead of skipping and counting it


@dataclass
class TokenizerConfig:
    # a SentencePiece model (opt tokenizer train) or a Hugging Face tokenizer directory (local files only,
    # e.g. the directory of a pretrained BERT, whose weights need their own WordPiece vocabulary)
    path: str = "data/tokenizer.model"
    vocab_size: int = ranged(512, ge=16)  # target vocabulary size (byte fallback adds 256 byte pieces)


class Quantizer(StrEnum):
    vq = "vq"  # a learned codebook: EMA updates, k-means initialisation, restarts of dead codes
    # finite scalar quantization (Mentzer et al. 2023): each of len(fsq_levels) latent channels is
    # rounded to one of its level's values; the grid of those values is the codebook, fixed, so no code dies
    fsq = "fsq"


@dataclass
class VQConfig:
    # vq: a learned codebook; fsq: a fixed grid (decay, commitment_weight and dead_code_threshold are vq's alone)
    quantizer: Quantizer = Quantizer.vq
    # discrete image codes (base: 8192); with fsq, the product of fsq_levels (a config error otherwise)
    codebook_size: int = ranged(512, ge=2)
    # size of a codebook vector (fsq: of the latent, projected to len(fsq_levels) channels and back)
    code_dim: int = ranged(64, ge=1)
    channels: int = ranged(32, ge=1)  # channels at full resolution (x1, x2, x4, then x4 down to the code grid)
    # image pixels per code side: 8 (64 px -> 8 x 8 = 64 codes, as in OPT), 16 or 32
    downsample: int = ranged(8, choices=(8, 16, 32))
    res_blocks: int = ranged(1, ge=0)  # residual blocks per stage
    decay: float = ranged(0.99, ge=0, lt=1)  # EMA decay of the codebook
    commitment_weight: float = ranged(0.25, ge=0)  # encoder commitment loss weight
    # codes whose EMA usage falls below this are restarted from the batch
    dead_code_threshold: float = ranged(1.0, ge=0)
    # fsq: values per latent channel, each >= 3; their product is the number of codes
    # ([8, 8, 8]: 512; [8, 5, 5, 5]: 1000, as the paper recommends for about 2^10)
    fsq_levels: list[int] = field(default_factory=lambda: [8, 8, 8])

    @property
    def fsq_codes(self) -> int:
        """The number of codes ``fsq_levels`` give: their product."""
        return math.prod(self.fsq_levels)

    def check_fsq(self) -> None:
        """With ``quantizer: fsq``, the levels must be usable and give ``codebook_size`` codes, the
        count the image decoder and MVM's head read; a one-line :class:`ConfigError` otherwise.
        :func:`load_config` calls it, and so does the tokenizer for a VQConfig built in code."""
        if self.quantizer != Quantizer.fsq:
            return
        if not self.fsq_levels or min(self.fsq_levels) < 3:
            raise ConfigError(f"config key 'model.vq.fsq_levels': needs one level or more, each >= 3, "
                              f"got {self.fsq_levels}")
        if self.codebook_size != self.fsq_codes:
            raise ConfigError(f"config key 'model.vq.codebook_size': fsq levels {self.fsq_levels} give "
                              f"{self.fsq_codes} codes, got {self.codebook_size} "
                              f"(set model.vq.codebook_size={self.fsq_codes})")


@dataclass
class VisionConfig:
    # ViT patch side in pixels, a divisor of data.image_size (conv stem: a power of 2)
    patch_size: int = ranged(8, ge=1)
    layers: int = ranged(2, ge=1)  # transformer blocks
    width: int = ranged(128, ge=1)  # hidden size
    heads: int = ranged(4, ge=1)  # attention heads
    pool: Pooling = Pooling.mean  # two-tower pooling over patches (max finds small objects on a plain background)
    # patch: one linear map per patch (timm's ViT, as in the paper); conv: log2(patch_size) strided
    # 3x3 convolutions with GroupNorm build the same grid of tokens, and see shapes much sooner
    stem: VisionStem = VisionStem.patch
    # conv stem only: two more input channels holding each pixel's x and y in [-1, 1] (CoordConv,
    # Liu et al. 2018), so the stem's nonlinearities tie position to content
    coord_channels: bool = False
    stem_depth: int = ranged(1, ge=1)  # conv stem: 3x3 convolutions per resolution (1: the strided ones alone)
    # add a linear map of the pooled image vector to every patch token, so that a reader whose
    # attention is still near uniform over the patches gets a small object's features undiluted
    pooled_context: bool = False
    # optional local timm ViT weights in timm's names (.safetensors, or a .pth/.bin state dict read
    # weights-only); position embeddings are resampled to the grid, a conv stem stays fresh
    pretrained_path: str | None = None
    # a class token before the patches (None: as the pretrained checkpoint has it, none without one)
    class_token: bool | None = None


@dataclass
class TextEncoderConfig:
    layers: int = ranged(2, ge=1)  # BERT layers
    width: int = ranged(128, ge=1)  # hidden size
    heads: int = ranged(4, ge=1)  # attention heads
    # optional local transformers BERT directory (from_pretrained); its width, layers and heads replace
    # the three above, and it needs its own tokenizer (tokenizer.path = the same directory)
    pretrained_dir: str | None = None


@dataclass
class AudioEncoderConfig:
    front: AudioFront = AudioFront.logmel_conv  # log-mel + conv subsampling, or the raw waveform's conv extractor
    subsample: int = ranged(4, choices=(2, 4, 8))  # time reduction of the logmel_conv front
    layers: int = ranged(2, ge=1)  # transformer blocks
    width: int = ranged(128, ge=1)  # hidden size
    heads: int = ranged(4, ge=1)  # attention heads
    pool: Pooling = Pooling.mean  # two-tower pooling over real frames
    distance_bias: bool = True  # ALiBi: self-attention logits fall linearly with frame distance, per head
    # optional local transformers wav2vec 2.0 or HuBERT directory: it replaces the front and the
    # transformer above (its own sizes apply) and reads the waveform (audio.input=waveform)
    pretrained_dir: str | None = None


@dataclass
class CrossModalConfig:
    layers: int = ranged(2, ge=1)  # transformer blocks of the cross-modal encoder
    width: int = ranged(128, ge=1)  # hidden size (every encoder is projected to it)
    heads: int = ranged(4, ge=1)  # attention heads
    max_text_positions: int = ranged(64, ge=1)  # position embeddings for text tokens
    max_audio_positions: int = ranged(256, ge=1)  # position embeddings for audio frames after subsampling


@dataclass
class TextDecoderConfig:
    layers: int = ranged(2, ge=1)  # causal transformer blocks
    width: int = ranged(128, ge=1)  # hidden size
    heads: int = ranged(4, ge=1)  # attention heads
    label_smoothing: float = ranged(0.1, ge=0, lt=1)  # as in the OPT paper
    max_length: int = ranged(64, ge=2)  # longest generated sequence, bos/eos included


@dataclass
class ImageDecoderConfig:
    layers: int = ranged(2, ge=1)  # transformer blocks over image codes
    width: int = ranged(128, ge=1)  # hidden size
    heads: int = ranged(4, ge=1)  # attention heads
    grid_positions: bool = False  # code positions start as 2-D sine-cosine over the code grid (learnable), not random


@dataclass
class TowerConfig:
    dim: int = ranged(128, ge=1)  # shared embedding size of the two-tower heads
    temperature: float = ranged(0.07, gt=0)  # initial softmax temperature (learned)


@dataclass
class ModelConfig:
    dropout: float = ranged(0.0, ge=0, lt=1)  # dropout in every transformer block (paper: 0.1)
    mlp_ratio: int = ranged(4, ge=1)  # MLP hidden size / width
    # where attention layer-normalises its queries and keys (ViT-22B; opt.model.layers.Attention)
    qk_norm: QKNorm = QKNorm.none
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
    steps: int = ranged(2000, ge=1)  # optimizer steps of `opt vq train`
    batch_size: int = ranged(64, ge=1)  # images per step
    lr: float = ranged(1e-3, gt=0)  # Adam learning rate (cosine decay)
    # > 0 weights pixels far from the image median more (see vq.reconstruction_loss)
    foreground_weight: float = ranged(0.0, ge=0)
    # the convolutions' autocast while training: fp32, bf16, or auto (bf16 where the device computes
    # it natively); the quantizer, the weights and every later encoding stay in fp32
    precision: Precision = Precision.fp32


TASK_NAMES = ("mlm", "mvm", "mam", "text_decoding", "image_decoding", "itm", "contrastive")
# what each generation task may condition on (one of these, or several joined by '+')
GENERATION_CONDITIONS = {"text_decoding": ("image", "audio"), "image_decoding": ("text", "audio")}
# task keys and task settings renamed in this release: old name -> new name (old names warn)
RENAMED_TASKS = {"td": "text_decoding", "id": "image_decoding"}
RENAMED_TASK_KEYS = {"td_conditions": "text_decoding_conditions", "id_conditions": "image_decoding_conditions",
                     "id_parallel_fraction": "image_decoding_parallel_fraction"}


@dataclass
class TaskPhase:
    steps: int = ranged(MISSING, ge=1)  # optimizer steps this phase lasts (required)
    weights: dict[str, float] = field(default_factory=dict)  # the phase's task weights (tasks left out: 0)
    # the phase's text-decoding conditions (None: tasks.text_decoding_conditions)
    text_decoding_conditions: list[str] | None = None
    # the phase's image-decoding conditions (None: tasks.image_decoding_conditions)
    image_decoding_conditions: list[str] | None = None


@dataclass
class TasksConfig:
    mode: TaskMode = TaskMode.sample  # one task per step drawn by weight (the paper), or the weighted sum of all
    weights: dict[str, float] = field(default_factory=lambda: {name: 1.0 for name in TASK_NAMES})  # 0 disables
    # token tasks: probability of hiding one or two other modalities entirely
    modality_drop: float = ranged(0.3, ge=0, le=1)
    mlm_rate: float = ranged(0.15, gt=0, le=1)  # text tokens selected (80% [MASK], 10% random, 10% kept)
    mvm_rate: float = ranged(0.15, gt=0, le=1)  # image patches hidden; targets are their VQ codes
    mam_rate: float = ranged(0.15, gt=0, le=1)  # audio frames hidden; each is found among other frames of its utterance
    mam_temperature: float = ranged(0.1, gt=0)  # InfoNCE temperature of masked audio modelling
    # distractors per hidden frame, other frames of its own utterance (0 = all of them)
    mam_negatives: int = ranged(10, ge=0)
    # image decoding: conditions replaced by the null context (guidance)
    condition_dropout: float = ranged(0.1, ge=0, le=1)
    # image decoding: share of steps on the MaskGIT objective, the rest autoregressive
    image_decoding_parallel_fraction: float = ranged(0.5, ge=0, le=1)
    # ITM: probability a sample loses its image or its audio (labels follow)
    itm_modality_drop: float = ranged(0.3, ge=0, le=1)
    queue_size: int = ranged(1024, ge=1)  # contrastive: momentum embeddings kept per modality as extra negatives
    momentum: float = ranged(0.995, ge=0, le=1)  # contrastive: EMA decay of the momentum encoders
    # contrastive: weight of the momentum encoders' soft targets (0 = off)
    distillation: float = ranged(0.0, ge=0, le=1)
    contrastive_pairs: list[str] = field(default_factory=lambda: [pair_name(p) for p in TOWER_PAIRS])  # aligned pairs
    # what text decoding conditions on, one drawn uniformly per step among those the batch carries
    text_decoding_conditions: list[str] = field(default_factory=lambda: ["image", "audio", "image+audio"])
    # what image decoding conditions on, one drawn uniformly per step among those the batch carries
    image_decoding_conditions: list[str] = field(default_factory=lambda: ["text", "audio", "text+audio"])
    phases: list[TaskPhase] = field(default_factory=list)  # run in order from step 0, then `weights` apply


@dataclass
class TrainConfig:
    seed: int = 0  # seeds model initialisation, masking and data order
    steps: int = ranged(1000, ge=1)  # optimizer steps
    lr: float = ranged(5e-5, gt=0)  # peak learning rate
    warmup_steps: int = ranged(1000, ge=0)  # linear warmup
    schedule: Decay = Decay.cosine  # decay after warmup, to zero at `steps`
    weight_decay: float = ranged(0.01, ge=0)  # AdamW weight decay (not on norms and biases)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # AdamW betas (the paper's)
    grad_clip: float = ranged(5.0, ge=0)  # gradient-norm clipping
    accumulation: int = ranged(1, ge=1)  # micro-batches per optimizer step
    # training precision (the VQ tokenizer always runs in fp32); auto: bf16 where the hardware does it
    # natively and it pays for the model's size (opt.devices.auto_precision), else fp32
    precision: Precision = Precision.fp32
    compile: bool = False  # torch.compile the model's encoders and decoders (the task logic stays eager)
    zero_stage: int = ranged(0, choices=(0, 1, 2, 3))  # DeepSpeed ZeRO stage
    deepspeed_preset: str | None = None  # optional JSON merged under the derived DeepSpeed config
    vq_path: str | None = None  # trained VQ tokenizer directory (opt vq train --out)
    checkpoint_every: int = ranged(500, ge=1)  # steps between checkpoints (one is also written at the end)
    keep_checkpoints: int = ranged(3, ge=1)  # newest checkpoints kept
    log_every: int = ranged(10, ge=1)  # steps between metrics.jsonl / TensorBoard records
    # steps between validation passes over data.val (0 = none); logged as val/TASK/METRIC
    eval_every: int = ranged(0, ge=0)
    eval_batches: int = ranged(4, ge=1)  # validation batches per pass (the same ones each time)
    max_nonfinite: int = ranged(5, ge=1)  # consecutive non-finite steps before the run stops
    # start from a model directory's weights (opt export or opt model init): fresh optimizer, schedule and
    # step count; its model section, tokenizer and VQ tokenizer replace the config's
    init_from: str | None = None
    # glob patterns of parameter names (e.g. 'encoders.image.*') kept frozen: no gradient, no optimizer state
    freeze: list[str] = field(default_factory=list)


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


def _rename(section: Any, names: dict[str, str], where: str) -> None:
    """Rename the old keys of a plain mapping in place, warning once per key."""
    if not isinstance(section, dict):
        return
    for old, new in names.items():
        if old in section:
            warnings.warn(f"config key '{where}.{old}' is now '{where}.{new}'; the old name will stop working "
                          "in the next release", FutureWarning, stacklevel=4)
            section[new] = section.pop(old)


def _upgrade(layer: dict) -> dict:
    """A config layer (file content or one override) with renamed task keys brought up to date."""
    tasks = layer.get("tasks")
    if isinstance(tasks, dict):
        _rename(tasks, RENAMED_TASK_KEYS, "tasks")
        _rename(tasks.get("weights"), RENAMED_TASKS, "tasks.weights")
        for index, phase in enumerate(tasks.get("phases") or []):
            _rename(phase, RENAMED_TASK_KEYS, f"tasks.phases.{index}")
            if isinstance(phase, dict):
                _rename(phase.get("weights"), RENAMED_TASKS, f"tasks.phases.{index}.weights")
    return layer


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a :class:`Config` from defaults, an optional YAML file and dotted overrides.

    Raises :class:`ConfigError` (one line, naming the key) on a missing file, bad
    YAML, an unknown key, a value of the wrong type, outside its enumeration or its
    range, or fields that contradict each other.
    """
    layers = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            content = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise ConfigError(f"config file {path} is not valid YAML: {str(error).splitlines()[0]}") from None
        if not isinstance(content, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        layers.append(_upgrade(content))
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override '{override}' must look like key.path=value")
    try:
        for override in overrides:
            layers.append(_upgrade(OmegaConf.to_container(OmegaConf.from_dotlist([override]))))
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), *layers))
    except OmegaConfBaseException as error:
        raise ConfigError(_one_line(error)) from None
    check_ranges(config)
    _check_consistency(config)
    return config


def _out_of_range(value: Any, limits: dict[str, Any]) -> str | None:
    """What is wrong with ``value`` under a field's declared ``limits``, or None."""
    if "choices" in limits and value not in limits["choices"]:
        return f"must be one of {', '.join(map(str, limits['choices']))}, got {value}"
    tests = {"ge": (lambda v, b: v >= b, ">="), "gt": (lambda v, b: v > b, ">"),
             "le": (lambda v, b: v <= b, "<="), "lt": (lambda v, b: v < b, "<")}
    for name, (holds, sign) in tests.items():
        if name in limits and not holds(value, limits[name]):
            return f"must be {sign} {limits[name]}, got {value}"
    return None


def check_ranges(section: Any, where: str = "") -> None:
    """Check every field declared with :func:`ranged` in ``section`` and the sections
    (and lists of sections) below it; raises :class:`ConfigError` naming the first bad key."""
    for item in dataclasses.fields(section):
        value = getattr(section, item.name)
        key = f"{where}{item.name}"
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{key}.")
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for index, element in enumerate(value):
                check_ranges(element, f"{key}.{index}.")
        elif problem := _out_of_range(value, item.metadata):
            raise ConfigError(f"config key '{key}': {problem}")


def _check_task_weights(key: str, weights: dict[str, float]) -> None:
    unknown = sorted(set(weights) - set(TASK_NAMES))
    if unknown:
        raise ConfigError(f"config key '{key}.{unknown[0]}': unknown task (tasks: {', '.join(TASK_NAMES)})")
    if sum(weights.values()) <= 0 or min(weights.values()) < 0:
        raise ConfigError(f"config key '{key}': weights must be >= 0 with at least one positive")


def _check_conditions(key: str, conditions: list[str] | None, allowed: tuple[str, ...]) -> None:
    if conditions is None:
        return
    bad = [c for c in conditions if not c or not set(c.split("+")) <= set(allowed)
           or len(set(c.split("+"))) != len(c.split("+"))]
    if bad or not conditions:
        raise ConfigError(f"config key '{key}': {bad[0] if bad else 'empty'!r} is not a condition "
                          f"(one of {', '.join(allowed)} or several joined by '+')")


def _check_consistency(config: Config) -> None:
    """The rules that tie two or more fields together."""
    data, model, tasks = config.data, config.model, config.tasks
    if not data.modalities:
        raise ConfigError("config key 'data.modalities': at least one modality must be enabled")
    vision = model.vision
    if data.image_size % vision.patch_size:
        raise ConfigError(f"config key 'model.vision.patch_size': {vision.patch_size} does not divide "
                          f"data.image_size {data.image_size}")
    model.vq.check_fsq()
    if config.vq_train.precision == Precision.fp16:
        raise ConfigError("config key 'vq_train.precision': fp16 is not offered for the VQ tokenizer "
                          "(no loss scaling); use fp32, bf16 or auto")
    if data.image_size % model.vq.downsample:
        raise ConfigError(f"config key 'data.image_size': must be a multiple of model.vq.downsample "
                          f"{model.vq.downsample} (the VQ tokenizer's grid cell), got {data.image_size}")
    if vision.stem == VisionStem.conv and vision.patch_size & (vision.patch_size - 1):
        raise ConfigError(f"config key 'model.vision.patch_size': the conv stem halves the resolution per "
                          f"convolution, so it needs a power of 2, got {vision.patch_size}")
    audio_encoder, audio = model.audio, config.audio
    reads_waveform = audio_encoder.front == AudioFront.wav2vec2_conv or bool(audio_encoder.pretrained_dir)
    if reads_waveform != (audio.input == AudioInput.waveform):
        reader = ("a pretrained audio encoder" if audio_encoder.pretrained_dir
                  else f"model.audio.front={audio_encoder.front}")
        raise ConfigError(f"config key 'audio.input': {reader} reads "
                          f"{'the waveform' if reads_waveform else 'log-mel features'}, set audio.input="
                          f"{'waveform' if reads_waveform else 'logmel'}")
    if any(not 0.5 <= factor <= 2.0 for factor in audio.speed_factors):
        raise ConfigError(f"config key 'audio.speed_factors': each speed must lie in [0.5, 2], "
                          f"got {list(audio.speed_factors)}")
    if vision.stem != VisionStem.conv and (vision.coord_channels or vision.stem_depth > 1):
        key = "coord_channels" if vision.coord_channels else "stem_depth"
        raise ConfigError(f"config key 'model.vision.{key}': needs model.vision.stem=conv")
    for name in ("vision", "text", "audio", "cross", "text_decoder", "image_decoder"):
        part = getattr(model, name)
        if part.width % part.heads:
            raise ConfigError(f"config key 'model.{name}.width': {part.width} is not divisible by {part.heads} heads")
    _check_task_weights("tasks.weights", tasks.weights)
    for task, allowed in GENERATION_CONDITIONS.items():
        _check_conditions(f"tasks.{task}_conditions", getattr(tasks, f"{task}_conditions"), allowed)
    for index, phase in enumerate(tasks.phases):
        _check_task_weights(f"tasks.phases.{index}.weights", phase.weights)
        for task, allowed in GENERATION_CONDITIONS.items():
            _check_conditions(f"tasks.phases.{index}.{task}_conditions", getattr(phase, f"{task}_conditions"),
                              allowed)
    pairs = [pair_name(p) for p in TOWER_PAIRS]
    unknown_pairs = [p for p in tasks.contrastive_pairs if p not in pairs]
    if unknown_pairs or not tasks.contrastive_pairs:
        raise ConfigError(f"config key 'tasks.contrastive_pairs': {unknown_pairs[0] if unknown_pairs else 'empty'!r} "
                          f"(use {', '.join(pairs)})")
    if len(config.train.betas) != 2 or not all(0 <= b < 1 for b in config.train.betas):
        raise ConfigError(f"config key 'train.betas': must be two numbers in [0, 1), got {config.train.betas}")


def config_from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Rebuild a config dataclass (any section) from plain data, with the type, enumeration
    and range checks of files (the rules tying sections together need a whole :class:`Config`)."""
    try:
        section = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), values))
    except OmegaConfBaseException as error:
        raise ConfigError(_one_line(error)) from None
    check_ranges(section)
    return section


def to_dict(config: Any) -> dict[str, Any]:
    """A resolved config (or section) as plain data: enumerations as their values (for YAML and JSON)."""
    return OmegaConf.to_container(OmegaConf.structured(config), enum_to_str=True)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
