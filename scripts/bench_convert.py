"""Conversion throughput: Localized Narratives rows to shards with 1 and 2 workers.

    python scripts/bench_convert.py [--rows 240] [--seconds 10] [--out bench_convert.json]

The fixture is written first, in the published format: a jsonl of ``--rows``
narrations over 60 distinct 640x480 JPEG photo-like images and 40 distinct OGG
Vorbis recordings (48 kHz, ``--seconds`` long; encoding them is the slow part of
the set-up), with utterance timings. Each
conversion (verify the JPEG, decode the OGG, resample to 16 kHz, cut at 8 s on
an utterance boundary, FLAC-encode, write the shard) runs into a fresh directory;
the figures are samples per second of wall time (worker start-up included) and
the workers' CPU time per sample: on a machine shared with other work, compare
the two to tell a lack of free cores from a lack of parallelism.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageFilter

from opt.data.convert import convert_localized_narratives

IMAGES = 60
RECORDINGS = 40
RECORDING_RATE = 48000


def write_fixture(root: Path, rows: int, seconds: float) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "audio").mkdir()
    for i in range(IMAGES):
        noise = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).resize((640, 480))
        noise.filter(ImageFilter.GaussianBlur(3)).save(root / "images" / f"{i:016x}.jpg", quality=90)
    t = np.arange(int(seconds * RECORDING_RATE)) / RECORDING_RATE
    for i in range(RECORDINGS):
        wave = 0.2 * np.sin(2 * np.pi * (150 + 10 * i) * t) + 0.02 * rng.standard_normal(len(t))
        sf.write(root / "audio" / f"rec_{i:05d}.ogg", wave.astype(np.float32), RECORDING_RATE, format="OGG",
                 subtype="VORBIS")
    words = ["in", "this", "image", "we", "can", "see", "a", "dog", "on", "the", "grass"]
    step = seconds / len(words)
    timed = [{"utterance": w, "start_time": i * step, "end_time": (i + 1) * step} for i, w in enumerate(words)]
    lines = []
    for row in range(rows):
        lines.append(json.dumps({"dataset_id": "open_images", "image_id": f"{row % IMAGES:016x}", "annotator_id": row,
                                 "caption": " ".join(words), "timed_caption": timed, "traces": [],
                                 "voice_recording": f"open_images_train/rec_{row % RECORDINGS:05d}.ogg"}))
    annotations = root / "open_images_train_localized_narratives.jsonl"
    annotations.write_text("\n".join(lines) + "\n")
    return annotations


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def bench(annotations: Path, root: Path, workers: int, out: Path) -> tuple[int, float, float]:
    """Samples written, wall seconds and CPU seconds of the worker processes."""
    cpu, start = _children_cpu(), time.perf_counter()
    summary = convert_localized_narratives([str(annotations)], images=root / "images", audio=root / "audio", out=out,
                                           shard_size=20, workers=workers, max_audio_seconds=8.0, progress=False)
    return summary["samples_out"], time.perf_counter() - start, _children_cpu() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=240, help="narrations in the fixture")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each recording")
    parser.add_argument("--out", help="also write the figures as JSON")
    args = parser.parse_args()
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        annotations = write_fixture(root / "corpus", args.rows, args.seconds)
        print(f"fixture: {args.rows} rows, {IMAGES} images, {RECORDINGS} recordings of {args.seconds:g} s "
              f"({time.perf_counter() - start:.1f} s to write)")
        print(f"{'workers':>7} {'samples':>8} {'seconds':>8} {'samples/s':>10} {'worker CPU ms/sample':>21}")
        for workers in (1, 2):
            samples, seconds, cpu = bench(annotations, root / "corpus", workers, root / f"out{workers}")
            results[f"convert_samples_per_s_workers_{workers}"] = samples / seconds
            print(f"{workers:>7} {samples:>8} {seconds:>8.2f} {samples / seconds:>10.1f} {1000 * cpu / samples:>21.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
