"""The OPT model: three single-modal encoders, the cross-modal encoder, the text
decoder, the image-token decoder, the VQ image tokenizer, two-tower heads and the
small heads the pretext tasks read.

    model = OPTModel(ModelSpec.from_config(config, tokenizer))
    unimodal = model.encode_unimodal(batch)                 # per-modality tokens
    fused = model.fuse(unimodal, ["text", "image"])         # any non-empty subset
    towers = model.tower_embeddings(unimodal)               # normalised (b, dim) each

The model never computes a loss. Inputs follow the batch layout of
:mod:`opt.data.pipeline`; ``hide`` arguments carry the masks the tasks build.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from opt import MODALITIES, TOWER_PAIRS
from opt.config import AudioConfig, ModelConfig, config_from_dict
from opt.errors import UserError
from opt.model.cross import CrossModalEncoder
from opt.model.decoders import ImageTokenDecoder, TextDecoder
from opt.model.encoders import AudioEncoder, TextEncoder, VisionEncoder
from opt.model.io import CONFIG_NAME, load_weights, read_config, save_directory
from opt.model.layers import init_weights
from opt.model.vq import CodeMemory, VQTokenizer, load_vq, save_vq
from opt.text.tokenizer import SPECIAL_IDS

MODEL_TYPE = "opt"  # config.json's model_type, as Hugging Face model directories name their architecture
ITM_CLASSES = 5  # matched, image swapped, audio swapped, image+audio from one other, from two others


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the model: the model config plus the data facts it depends on."""

    model: ModelConfig
    audio: AudioConfig
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    mask_id: int
    image_size: int
    max_text_tokens: int
    # the tokenizer's special ids (never masked or drawn as random tokens by MLM); default: SentencePiece's
    special_ids: tuple[int, ...] = tuple(sorted(SPECIAL_IDS.values()))
    # the transformers configs of pretrained text and audio backbones ({"text": {...}, "audio": {...}}),
    # so that a saved model rebuilds them without the directories they were first read from
    backbones: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_config(cls, config, tokenizer=None) -> "ModelSpec":
        """The spec of ``config`` with ``tokenizer``'s ids; without a tokenizer the
        configured vocabulary size and the fixed special ids are used (summaries, benchmarks)."""
        if tokenizer is None:
            ids = {"vocab_size": config.tokenizer.vocab_size, "pad_id": SPECIAL_IDS["pad"],
                   "bos_id": SPECIAL_IDS["bos"], "eos_id": SPECIAL_IDS["eos"], "mask_id": SPECIAL_IDS["mask"]}
        else:
            ids = {"vocab_size": tokenizer.vocab_size, "pad_id": tokenizer.pad_id, "bos_id": tokenizer.bos_id,
                   "eos_id": tokenizer.eos_id, "mask_id": tokenizer.mask_id,
                   "special_ids": tuple(sorted(i for i in tokenizer.special_ids if i is not None))}
        return cls(model=config.model, audio=config.audio, image_size=config.data.image_size,
                   max_text_tokens=config.data.max_text_tokens, **ids)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelSpec":
        upgraded = {"model": config_from_dict(ModelConfig, values["model"]),
                    "audio": config_from_dict(AudioConfig, values["audio"])}
        if "special_ids" in values:
            upgraded["special_ids"] = tuple(values["special_ids"])
        return cls(**(values | upgraded))

    @property
    def image_codes(self) -> int:
        """VQ codes per image (the VQ tokenizer's grid)."""
        return (self.image_size // self.model.vq.downsample) ** 2

    @property
    def codes_per_patch_side(self) -> int:
        """Masked vision modelling predicts k x k codes per hidden patch, k the patch's side in
        VQ cells rounded (at least 1): 1 for 8-px patches, 2 for 16-px ones; smaller patches
        predict the code of the cell they lie in."""
        return max(1, round(self.model.vision.patch_size / self.model.vq.downsample))


class LearnedScale(nn.Module):
    """A learned positive scale (the contrastive logit scale), stored as its log.

    A module with a forward (not a bare parameter) so hooks such as ZeRO-3's
    gathering see its use; shape (1,), since DeepSpeed cannot broadcast 0-d tensors.
    """

    def __init__(self, initial: float, maximum: float = 100.0) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor([initial]).log())
        self.maximum = maximum

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.maximum)


def _audio_input(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    audio = batch["audio"]
    return (audio["features"] if "features" in audio else audio["waveform"]), audio["mask"]


def resolved_spec(spec: ModelSpec, encoders: nn.ModuleDict) -> ModelSpec:
    """``spec`` as the built encoders are: what rebuilding needs beside the pretrained sources read
    once (the text and audio backbones' configs in ``backbones``, which the encoders prefer to their
    ``pretrained_dir``; the ViT's class token; the backbones' sizes), so a saved model loads from its
    own weights on any machine. ``pretrained_dir`` stays as a record (the audio input rules read it);
    the ViT's ``pretrained_path`` is cleared, its source kept in ``backbones["image"]``."""
    model = spec.model
    backbones = dict(spec.backbones)
    for name, encoder in (("text", encoders["text"]), ("audio", encoders["audio"])):
        if encoder.backbone_config is not None:
            source = getattr(model, name).pretrained_dir or backbones.get(name, {}).get("source")
            backbones[name] = {"source": source, "config": encoder.backbone_config}
    vision = dataclasses.replace(model.vision, pretrained_path=None, class_token=encoders["image"].class_token)
    if model.vision.pretrained_path:
        backbones["image"] = {"source": model.vision.pretrained_path}
    text = dataclasses.replace(model.text, **encoders["text"].sizes)
    audio = dataclasses.replace(model.audio, **encoders["audio"].sizes)
    model = dataclasses.replace(model, vision=vision, text=text, audio=audio)
    return dataclasses.replace(spec, model=model, backbones=backbones)


class OPTModel(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        config = spec.model
        width, ratio, dropout = config.cross.width, config.mlp_ratio, config.dropout
        encoders_qk_norm = config.qk_norm == "all"  # the single-modal encoders (timm's ViT, audio)
        fusion_qk_norm = config.qk_norm in ("fusion", "all")  # the cross-modal encoder
        decoders_qk_norm = "all" if config.qk_norm == "all" else "none" if config.qk_norm == "none" else "cross"
        self.encoders = nn.ModuleDict({
            "text": TextEncoder(config.text, vocab_size=spec.vocab_size, pad_id=spec.pad_id,
                                max_positions=max(spec.max_text_tokens, config.cross.max_text_positions),
                                out_width=width, mlp_ratio=ratio, dropout=dropout,
                                backbone=spec.backbones.get("text")),
            "image": VisionEncoder(config.vision, image_size=spec.image_size, out_width=width, mlp_ratio=ratio,
                                   dropout=dropout, qk_norm=encoders_qk_norm),
            "audio": AudioEncoder(config.audio, n_mels=spec.audio.n_mels, max_positions=config.cross.max_audio_positions,
                                  out_width=width, mlp_ratio=ratio, dropout=dropout, qk_norm=encoders_qk_norm,
                                  backbone=spec.backbones.get("audio")),
        })
        self.spec = spec = resolved_spec(spec, self.encoders)
        config = spec.model
        patches = self.encoders["image"].patches
        self.cross = CrossModalEncoder(config.cross, image_tokens=patches, mlp_ratio=ratio, dropout=dropout,
                                       qk_norm=fusion_qk_norm)
        self.text_decoder = TextDecoder(config.text_decoder, vocab_size=spec.vocab_size, context_width=width,
                                        mlp_ratio=ratio, dropout=dropout, qk_norm=decoders_qk_norm)
        self.image_decoder = ImageTokenDecoder(config.image_decoder, codebook_size=config.vq.codebook_size,
                                               codes=spec.image_codes, context_width=width, mlp_ratio=ratio,
                                               dropout=dropout, qk_norm=decoders_qk_norm)
        self.towers = nn.ModuleDict({m: nn.Linear(self.encoders[m].width, config.towers.dim) for m in MODALITIES})
        self.temperature = LearnedScale(1.0 / config.towers.temperature)
        self.heads = nn.ModuleDict({
            "mlm": nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width),
                                 nn.Linear(width, spec.vocab_size)),
            "mvm": nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width),
                                 nn.Linear(width, config.vq.codebook_size * spec.codes_per_patch_side ** 2)),
            "mam": nn.Linear(width, self.encoders["audio"].frame_width),
            "itm": nn.Sequential(nn.Linear(width + len(TOWER_PAIRS), width), nn.GELU(), nn.Linear(width, ITM_CLASSES)),
        })
        for name in ("cross", "text_decoder", "image_decoder", "towers", "heads"):
            getattr(self, name).apply(init_weights)
        self.image_decoder.reset_positions()
        # the audio positions start small like BERT's (an N(0, 1) start is ~35x the front end's
        # frames and drowns them: audio-text alignment learned several times slower)
        audio = self.encoders["audio"]
        if audio.backbone is None:  # a pretrained backbone keeps its own
            for part in (audio.transformer, audio.positions):
                part.apply(init_weights)
        # The VQ tokenizer is trained separately (opt vq train) and frozen here. It is a plain
        # attribute, not a submodule: optimizers, mixed-precision casts and ZeRO partitioning
        # never see it, so it stays whole and in fp32. It follows the inputs' device.
        vq = VQTokenizer(config.vq).requires_grad_(False).eval()
        vq.skip_kmeans_init()
        self.__dict__["vq"] = vq

    def load_vq(self, directory: str | Path) -> None:
        """Use a trained VQ tokenizer directory (written by ``opt vq train``)."""
        vq = load_vq(directory)
        if vq.config != self.spec.model.vq:
            raise UserError(f"the VQ tokenizer in {directory} does not match model.vq in the config")
        self.__dict__["vq"] = vq.requires_grad_(False).eval()
        if "code_memory" in self.__dict__:  # codes of the tokenizer before are not this one's
            self.__dict__["code_memory"] = CodeMemory()

    # -- encoding -------------------------------------------------------------------------------

    def encode_unimodal(self, batch: dict, *, modalities=MODALITIES, text_ids: torch.Tensor | None = None,
                        hide_patches: torch.Tensor | None = None, hide_frames: torch.Tensor | None = None,
                        encoders: nn.ModuleDict | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """Run the single-modal encoders on the modalities present in ``batch``.

        ``text_ids`` replaces the batch's ids (masked language modelling);
        ``hide_patches`` (b, n) and ``hide_frames`` (b, frames) hide image
        patches and audio frames behind mask embeddings. ``encoders`` runs other
        encoders of the same architecture in place of the model's own (the contrastive
        task's momentum copies).
        """
        encoders = self.encoders if encoders is None else encoders
        out = {}
        if "text" in modalities and "text" in batch:
            ids = batch["text"]["ids"] if text_ids is None else text_ids
            out["text"] = encoders["text"](ids, batch["text"]["mask"])
        if "image" in modalities and "image" in batch:
            out["image"] = encoders["image"](batch["image"]["pixels"], hidden=hide_patches)
        if "audio" in modalities and "audio" in batch:
            out["audio"] = encoders["audio"](*_audio_input(batch), hidden=hide_frames)
        for modality, result in out.items():  # a modality absent from a sample contributes no tokens
            present = batch[modality]["present"].to(result["mask"].device)
            result["mask"] = result["mask"] & present[:, None]
        return out

    def audio_frames(self, batch: dict) -> torch.Tensor:
        """(b, frames) True where an audio token will exist (front-end output of present audio)."""
        return self.encoders["audio"].frame_mask(*_audio_input(batch)) & batch["audio"]["present"][:, None]

    def fuse(self, unimodal: dict[str, dict[str, torch.Tensor]], modalities=MODALITIES) -> dict:
        """Cross-modal encoding of the given subset of modalities."""
        return self.cross({m: unimodal[m] for m in MODALITIES if m in modalities and m in unimodal})

    def tower_embeddings(self, unimodal: dict[str, dict[str, torch.Tensor]], *,
                         towers: nn.ModuleDict | None = None) -> dict[str, torch.Tensor]:
        """L2-normalised two-tower embeddings (b, dim) per modality (``towers``: others in place of the model's)."""
        towers = self.towers if towers is None else towers
        return {m: F.normalize(towers[m](out["pooled"]), dim=-1) for m, out in unimodal.items()}

    def match_logits(self, unimodal: dict[str, dict[str, torch.Tensor]], fused: dict) -> torch.Tensor:
        """5-way matching logits (b, 5) from the fused [CLS] and the pairwise two-tower cosines.

        Align before fuse: the head sees the towers' text-image, text-audio and
        image-audio similarities (0 where a modality is absent) beside the
        cross-modal [CLS], so matching starts from what contrastive alignment
        learned and the cross encoder adds what the towers miss. The cosines
        enter as the contrastive logits (times the learned scale, not trained
        from here): raw cosines in [-1, 1] beside the [CLS] features were nearly
        ignored (a head trained 80 steps on a fixed model reached 0.46 5-way
        accuracy with raw cosines, 0.77 with scaled ones).
        """
        scale = self.temperature().detach()
        towers = self.tower_embeddings(unimodal)
        present = {m: out["mask"].any(dim=1) for m, out in unimodal.items()}
        cls = fused["cls"]
        similarities = []
        for a, b in TOWER_PAIRS:
            if a in towers and b in towers:
                both = (present[a] & present[b]).to(cls.dtype)
                similarities.append((scale * (towers[a] * towers[b]).sum(-1)).to(cls.dtype) * both)
            else:
                similarities.append(cls.new_zeros(cls.shape[0]))
        return self.heads["itm"](torch.cat([cls, torch.stack(similarities, dim=-1)], dim=-1))

    def remember_image_codes(self) -> CodeMemory:
        """From now on keep the VQ codes of every image encoded (:class:`~opt.model.vq.CodeMemory`):
        for training on a corpus held in memory, whose images come back every epoch unchanged."""
        if "code_memory" not in self.__dict__:  # a plain attribute, as the tokenizer itself
            self.__dict__["code_memory"] = CodeMemory()
        return self.__dict__["code_memory"]

    @torch.no_grad()
    def image_codes(self, pixels: torch.Tensor) -> torch.Tensor:
        """VQ codes (b, n) of images in [0, 1]."""
        encode = self.vq.to(pixels.device).encode
        memory = self.__dict__.get("code_memory")
        return encode(pixels) if memory is None else memory(pixels, encode)

    @torch.no_grad()
    def patch_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """The VQ codes (b, n_codes) of each vision patch: (b, n_patches, k * k) with
        k = ``spec.codes_per_patch_side``. The code grid is resampled (nearest) to k cells
        per patch side; where the patch is a whole number of cells (or of cells per
        patch) this is exact."""
        patches_per_side = self.spec.image_size // self.spec.model.vision.patch_size
        k = self.spec.codes_per_patch_side
        side = math.isqrt(codes.shape[1])
        grid = codes.view(-1, 1, side, side)
        if side != patches_per_side * k:
            grid = F.interpolate(grid.float(), size=(patches_per_side * k,) * 2, mode="nearest").long()
        grid = grid.view(-1, patches_per_side, k, patches_per_side, k)  # (b, rows, k, columns, k)
        return grid.permute(0, 1, 3, 2, 4).reshape(grid.shape[0], patches_per_side ** 2, k * k)

    @torch.no_grad()
    def decode_image_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Images (b, 3, H, W) in [0, 1] from VQ codes (b, n)."""
        return self.vq.to(codes.device).decode(codes)

    # -- save / load -------------------------------------------------------------------------------

    def save_pretrained(self, out: str | Path, *, tokenizer=None, training=None) -> Path:
        """Write ``config.json``, ``model.safetensors``, ``vq/`` (the VQ tokenizer directory), the
        text tokenizer's files (``tokenizer.model`` or ``tokenizer/``) and the model card
        ``README.md`` (``training``: a :class:`~opt.model.card.TrainingFacts`) atomically."""
        from opt.model.card import CARD_NAME, model_card

        extra = dict(tokenizer.files()) if tokenizer is not None else {}
        extra[CARD_NAME] = model_card(self, training).encode()
        with tempfile.TemporaryDirectory() as tmp:
            save_vq(self.vq, Path(tmp) / "vq")
            extra |= {f"vq/{p.name}": p.read_bytes() for p in (Path(tmp) / "vq").iterdir()}
        config = {"model_type": MODEL_TYPE, "kind": "opt_model", "spec": self.spec.to_dict()}
        return save_directory(self, config, out, extra_files=extra)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "OPTModel":
        """Load a directory written by :meth:`save_pretrained` (safetensors; nothing is unpickled)."""
        config, path = read_config(directory), Path(directory) / CONFIG_NAME
        if not isinstance(config.get("spec"), dict):
            raise UserError(f'{path} does not describe an OPT model (no "spec" object)')
        try:
            spec = ModelSpec.from_dict(config["spec"])
        except (KeyError, TypeError) as error:
            raise UserError(f"{path}: the model spec does not fit this version of opt ({error})") from None
        model = cls(spec)
        load_weights(model, directory)
        model.load_vq(Path(directory) / "vq")
        return model.eval()
