"""Generate the synthetic world as webdataset shards.

Each sample's content is a function of ``(seed, split, index)``: its own random
generator draws the scene, noise, phrasing, voice and audio noise. The speech
synthesizer also carries state from one utterance to the next, so every shard
is written by a fresh process (forked from a clean server process, one shard
per process): a shard's bytes then depend only on the seed and the shard, not
on the worker count or on which shards came before. A rerun into the same directory keeps finished shards and
writes only the missing ones.

Layout: ``OUT/{split}-{i:06d}.tar`` with members ``KEY.png``, ``KEY.txt``,
``KEY.wav`` (16 kHz mono PCM16) and ``KEY.json``; ``OUT/manifest.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from opt.data.shards import ShardWriter
from opt.data.world.captions import caption
from opt.data.world.facts import held_out_pairs, sample_scene
from opt.data.world.render import render
from opt.data.world.speech import UNSEEN_VOICES, VOICES, Speaker, Voice
from opt.errors import UserError
from opt.files import write_atomic

# 1.1 added test_unseen; 2.0 widened train's voices, prosody, noise and phrasings (the other
# splits' samples are byte for byte those of 1.1)
GENERATOR_VERSION = "2.0"
SPLITS = ("train", "val", "test", "test_novel", "test_unseen")
SAMPLE_RATE = 16000

_speaker: Speaker | None = None  # one per process: eSpeak NG keeps global state


def _get_speaker() -> Speaker:
    global _speaker
    if _speaker is None:
        _speaker = Speaker(SAMPLE_RATE)
    return _speaker


def sample_key(split: str, index: int) -> str:
    return f"{split}_{index:07d}"


# how a split's captions are phrased (captions.PHRASINGS) and who speaks them
SpeechStyle = tuple[str, Callable[[np.random.Generator], Voice]]


def speech_style(split: str) -> SpeechStyle:
    if split == "train":  # many voices and more phrasings (speech.py, captions.py)
        return "train", Voice.sample_training
    if split == "test_unseen":  # voices and phrasings that no other split has
        return "unseen", functools.partial(Voice.sample, voices=UNSEEN_VOICES)
    return "test", functools.partial(Voice.sample, voices=VOICES)


def make_sample(split: str, index: int, *, seed: int, image_size: int, held_out: set[tuple[str, str]],
                style: SpeechStyle | None = None) -> tuple[str, dict[str, bytes]]:
    """Generate one sample: its key and its members as bytes. ``style`` replaces the split's own
    phrasings and voices, keeping its scenes (a diagnostic: test's scenes with unseen voices)."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    scene = sample_scene(rng, image_size, novel=split == "test_novel", held_out=held_out)
    image = render(scene, image_size, rng)
    phrasings, sample_voice = style or speech_style(split)
    text = caption(scene, rng, phrasings=phrasings)
    voice = sample_voice(rng)
    wave = _get_speaker().speak(text, voice, rng)

    png = io.BytesIO()
    image.save(png, format="PNG")
    wav = io.BytesIO()
    sf.write(wav, wave, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    meta = scene.facts() | {"split": split, "seed": seed, "index": index, "voice": dataclasses.asdict(voice)}
    members = {
        "png": png.getvalue(),
        "txt": text.encode("utf-8"),
        "wav": wav.getvalue(),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }
    return sample_key(split, index), members


@dataclasses.dataclass(frozen=True)
class _ShardJob:
    path: str
    split: str
    start: int
    stop: int
    seed: int
    image_size: int
    held_out: tuple[tuple[str, str], ...]


def _write_shard(job: _ShardJob) -> int:
    held_out = set(job.held_out)
    with ShardWriter(job.path) as shard:
        for index in range(job.start, job.stop):
            key, members = make_sample(job.split, index, seed=job.seed, image_size=job.image_size, held_out=held_out)
            shard.write(key, members)
    return job.stop - job.start


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def _process_pool(workers: int):
    """A pool whose every task runs in a new process forked from a clean server."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context.Pool(workers, initializer=_worker_init, maxtasksperchild=1)


# earlier generator versions whose samples this one reproduces byte for byte (none: 2.0 changed train)
COMPATIBLE_VERSIONS = (GENERATOR_VERSION,)


def _check_existing(out: Path, manifest: dict) -> None:
    """Refuse to mix two worlds in one directory. A rerun may add a split the directory does
    not hold yet (its count was 0, or the generator that made it did not know the split):
    the samples already written are then exactly the ones this run would write."""
    existing = out / "manifest.json"
    if not existing.is_file():
        return
    try:
        old = json.loads(existing.read_text())
    except (UnicodeDecodeError, ValueError):
        old = None
    if not isinstance(old, dict) or not isinstance(old.get("counts", {}), dict):
        raise UserError(f"{existing} is not a world manifest this generator can read; choose another --out")
    for field in ("seed", "image_size", "shard_size"):
        if old.get(field) != manifest[field]:
            raise UserError(f"{out} already holds a world with a different {field} "
                            f"({old.get(field)} vs {manifest[field]}); choose another --out")
    if old.get("version") not in COMPATIBLE_VERSIONS:
        raise UserError(f"{out} already holds a world of generator version {old.get('version')} "
                        f"(this is {GENERATOR_VERSION}); choose another --out")
    old_counts = old.get("counts") or {}
    for split, count in manifest["counts"].items():
        if old_counts.get(split, 0) not in (0, count):
            raise UserError(f"{out} already holds a world with {old_counts[split]} {split} samples "
                            f"(this run asks for {count}); choose another --out")


def synthesize_world(out: str | Path, counts: dict[str, int], *, seed: int = 0, image_size: int = 64,
                     shard_size: int = 1000, workers: int = 1, progress: bool = True) -> dict:
    """Write the world's shards and manifest into ``out`` and return the manifest."""
    unknown = set(counts) - set(SPLITS)
    if unknown:
        raise UserError(f"unknown split {sorted(unknown)[0]!r}; splits are {', '.join(SPLITS)}")
    if any(n < 0 for n in counts.values()):
        raise UserError("sample counts must be >= 0")
    if image_size < 32:
        raise UserError(f"--image-size must be at least 32, got {image_size}")
    if shard_size <= 0 or workers <= 0:
        raise UserError("--shard-size and --workers must be positive")
    out = Path(out)
    held_out = held_out_pairs(seed)
    counts = {split: int(counts.get(split, 0)) for split in SPLITS}
    jobs: list[_ShardJob] = []
    shards: dict[str, list[str]] = {}
    for split, total in counts.items():
        shards[split] = []
        for shard_index, start in enumerate(range(0, total, shard_size)):
            name = f"{split}-{shard_index:06d}.tar"
            shards[split].append(name)
            jobs.append(_ShardJob(str(out / name), split, start, min(start + shard_size, total),
                                  seed, image_size, tuple(held_out)))
    manifest = {
        "generator": "opt synthetic world",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "sample_rate": SAMPLE_RATE,
        "shard_size": shard_size,
        "counts": counts,
        "held_out_pairs": [list(pair) for pair in held_out],
        "shards": shards,
    }
    _check_existing(out, manifest)
    out.mkdir(parents=True, exist_ok=True)
    # written first, so that a resumed run can check it
    write_atomic(out / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
    todo = [job for job in jobs if not os.path.isfile(job.path)]
    total = sum(job.stop - job.start for job in todo)
    with tqdm(total=total, unit="sample", desc="synth", disable=not progress) as bar:
        if todo:
            with _process_pool(min(workers, len(todo))) as pool:
                for done in pool.imap_unordered(_write_shard, todo):
                    bar.update(done)
    return manifest

