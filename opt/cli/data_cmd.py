"""``opt data ...``: make the synthetic world, convert real corpora, clean, check and preview shards."""

from __future__ import annotations

import argparse
import time

from opt.cli.common import (DATA_HELP, add_command_group, add_config_arguments, config_from_args, non_negative_int,
                             output_file, output_folder, positive_int)
from opt.data.clean import FILTERS, CleanSettings, clean_shards, load_boilerplate, report_name
from opt.data.convert import (convert_audio_captions, convert_coco_captions, convert_localized_narratives,
                              convert_manifest)
from opt.data.convert.common import summary_line
from opt.data.pipeline import BatchLoader
from opt.data.preview import preview_grid
from opt.data.shards import resolve_shards
from opt.data.world.synth import synthesize_world
from opt.text.tokenizer import load_tokenizer


def register(commands: argparse._SubParsersAction) -> None:
    sub = add_command_group(commands, "data", "datasets and shards")

    synth = sub.add_parser("synth", help="generate the synthetic tri-modal world as webdataset shards")
    synth.add_argument("--out", type=output_folder, required=True, help="output directory")
    for split, default in (("train", 5000), ("val", 500), ("test", 500), ("test-novel", 500),
                           ("test-unseen", 500)):
        synth.add_argument(f"--{split}", type=non_negative_int, default=default,
                           help=f"samples in {split.replace('-', '_')} (default {default})")
    synth.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    synth.add_argument("--image-size", type=positive_int, default=64, help="canvas side in pixels (default 64)")
    synth.add_argument("--shard-size", type=positive_int, default=1000, help="samples per shard (default 1000)")
    synth.add_argument("--workers", type=positive_int, default=2, help="worker processes (default 2)")
    synth.set_defaults(handler=run_synth)

    check = sub.add_parser("check", help="read shards through the training pipeline and count bad samples")
    check.add_argument("--data", required=True, help=DATA_HELP)
    check.add_argument("--tokenizer", help="tokenizer model (default: config tokenizer.path if text is enabled)")
    add_config_arguments(check)
    check.set_defaults(handler=run_check)

    preview = sub.add_parser("preview", help="write a PNG grid of samples with their captions")
    preview.add_argument("--data", required=True, help=DATA_HELP)
    preview.add_argument("--out", type=output_file, required=True, help="output PNG")
    preview.add_argument("--count", type=positive_int, default=24, help="samples to show (default 24)")
    preview.set_defaults(handler=run_preview)

    narratives = sub.add_parser("localized-narratives",
                                help="Open Images + Localized Narratives (jsonl, jpg, ogg) to shards")
    narratives.add_argument("--annotations", required=True, help="annotation files, comma-separated (FILE.jsonl,...)")
    narratives.add_argument("--images", required=True, help="folder of IMAGE_ID.jpg files (sub-folders are searched)")
    narratives.add_argument("--audio", required=True, help="folder of the voice recordings (.ogg)")
    narratives.add_argument("--max-audio-seconds", type=float, default=10.0,
                            help="cut longer narrations at an utterance boundary; 0 keeps them whole (default 10)")
    _add_conversion_arguments(narratives)
    narratives.set_defaults(handler=run_localized_narratives)

    coco = sub.add_parser("coco-captions", help="COCO caption JSON (or Flickr30k in that format) to shards, "
                          "one sample per caption")
    coco.add_argument("--annotations", required=True, help="caption file (captions_train2017.json ...)")
    coco.add_argument("--images", required=True, help="folder the images' file_name is relative to")
    _add_conversion_arguments(coco)
    coco.set_defaults(handler=run_coco_captions)

    audio_captions = sub.add_parser("audio-captions", help="AudioCaps or Clotho caption CSV to shards, "
                                    "one sample per caption")
    audio_captions.add_argument("--csv", required=True, help="caption CSV (AudioCaps train.csv, Clotho "
                                "clotho_captions_development.csv ...); the layout is told by its header")
    audio_captions.add_argument("--audio", required=True, help="folder of the clips (.wav, .flac, .ogg)")
    audio_captions.add_argument("--max-audio-seconds", type=float, default=0.0,
                                help="keep the first S seconds of longer clips; 0 keeps them whole (default 0)")
    _add_conversion_arguments(audio_captions)
    audio_captions.set_defaults(handler=run_audio_captions)

    manifest = sub.add_parser("manifest", help="a jsonl or csv manifest of image, text, audio to shards")
    manifest.add_argument("--manifest", required=True, help="FILE.jsonl or FILE.csv with image, text, audio")
    manifest.add_argument("--root", help="folder the image and audio paths are relative to (default: the manifest's)")
    _add_conversion_arguments(manifest)
    manifest.set_defaults(handler=run_manifest)

    clean = sub.add_parser("clean", help="filter shards (image size, text, duplicates, model similarity)")
    clean.add_argument("--data", required=True, help=DATA_HELP)
    clean.add_argument("--out", type=output_folder, required=True,
                       help="output directory (shards keep their names; PREFIX-clean-report.json)")
    defaults = CleanSettings()
    clean.add_argument("--require", default="", help="modalities a sample must have, comma-separated (default none)")
    clean.add_argument("--min-image-size", type=non_negative_int, default=defaults.min_image_size,
                       help=f"shorter image side in pixels; 0 disables (default {defaults.min_image_size})")
    clean.add_argument("--min-words", type=non_negative_int, default=defaults.min_words,
                       help=f"fewest caption words (default {defaults.min_words})")
    clean.add_argument("--max-words", type=non_negative_int, default=defaults.max_words,
                       help=f"most caption words; 0 disables (default {defaults.max_words})")
    clean.add_argument("--boilerplate", help="file of boilerplate regexes, one a line (default: a built-in list)")
    clean.add_argument("--keep-duplicates", action="store_true", help="do not drop exact duplicate samples")
    clean.add_argument("--similarity-model", help="model directory (opt export); enables the similarity filter")
    clean.add_argument("--similarity-pair", choices=("image-text", "audio-text"), default="image-text",
                       help="what the similarity filter compares (default image-text)")
    clean.add_argument("--min-similarity", type=float, default=defaults.min_similarity,
                       help=f"drop pairs whose cosine similarity is lower (default {defaults.min_similarity})")
    clean.add_argument("--device", default="cpu", help="device of the similarity model (default cpu)")
    clean.set_defaults(handler=run_clean)


def _add_conversion_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=output_folder, required=True,
                        help="output directory (a rerun resumes it)")
    parser.add_argument("--prefix", default="train", help="shard name prefix, e.g. train or val (default train)")
    parser.add_argument("--shard-size", type=positive_int, default=1000, help="input rows per shard (default 1000)")
    parser.add_argument("--workers", type=positive_int, default=2, help="worker processes (default 2)")


def run_synth(args: argparse.Namespace) -> None:
    counts = {"train": args.train, "val": args.val, "test": args.test, "test_novel": args.test_novel,
              "test_unseen": args.test_unseen}
    start = time.perf_counter()
    manifest = synthesize_world(args.out, counts, seed=args.seed, image_size=args.image_size,
                                shard_size=args.shard_size, workers=args.workers)
    seconds = time.perf_counter() - start
    held_out = ", ".join(f"{c} {s}" for c, s in manifest["held_out_pairs"])
    print(f"world: {sum(counts.values())} samples in {args.out} ({seconds:.1f} s); held out: {held_out}")


def run_check(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    tokenizer = None
    if "text" in config.data.modalities:
        tokenizer = load_tokenizer(args.tokenizer or config.tokenizer.path)
    loader = BatchLoader(args.data, config.data, config.audio, tokenizer, train=False)
    batches = sum(1 for _ in loader)
    print(f"{batches} batches from {len(loader.shards)} shards; {loader.stats.summary()}")


def run_preview(args: argparse.Namespace) -> None:
    print(f"preview: {preview_grid(resolve_shards(args.data), args.out, count=args.count)}")


def run_localized_narratives(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    summary = convert_localized_narratives(
        [path for path in args.annotations.split(",") if path], images=args.images, audio=args.audio, out=args.out,
        prefix=args.prefix, shard_size=args.shard_size, workers=args.workers,
        max_audio_seconds=args.max_audio_seconds)
    _print_conversion(summary, args, time.perf_counter() - start)


def run_coco_captions(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    summary = convert_coco_captions(args.annotations, images=args.images, out=args.out, prefix=args.prefix,
                                    shard_size=args.shard_size, workers=args.workers)
    _print_conversion(summary, args, time.perf_counter() - start)


def run_audio_captions(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    summary = convert_audio_captions(args.csv, audio=args.audio, out=args.out, prefix=args.prefix,
                                     shard_size=args.shard_size, workers=args.workers,
                                     max_audio_seconds=args.max_audio_seconds)
    _print_conversion(summary, args, time.perf_counter() - start)


def run_manifest(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    summary = convert_manifest(args.manifest, out=args.out, root=args.root, prefix=args.prefix,
                               shard_size=args.shard_size, workers=args.workers)
    _print_conversion(summary, args, time.perf_counter() - start)


def _print_conversion(summary: dict, args: argparse.Namespace, seconds: float) -> None:
    print(f"{summary_line(summary)} ({seconds:.1f} s)")
    print(f"summary: {args.out}/{args.prefix}-summary.json")


def run_clean(args: argparse.Namespace) -> None:
    settings = CleanSettings(require=[m for m in args.require.split(",") if m], min_image_size=args.min_image_size,
                             min_words=args.min_words, max_words=args.max_words,
                             deduplicate=not args.keep_duplicates, min_similarity=args.min_similarity,
                             similarity_pair=args.similarity_pair.split("-"))
    if args.boilerplate:
        settings.boilerplate = load_boilerplate(args.boilerplate)
    scorer = None
    if args.similarity_model:
        from opt.downstream.similarity import TowerSimilarity  # the model is imported only when needed

        scorer = TowerSimilarity.from_pretrained(args.similarity_model, pair=tuple(settings.similarity_pair),
                                                 batch_size=settings.batch_size, device=args.device)
    report = clean_shards(resolve_shards(args.data), args.out, settings, scorer=scorer)
    print(f"clean: {report['samples_in']} samples in, {report['samples_out']} out")
    for name in FILTERS:
        print(f"  {name:<18} {report['removed'][name]:>8}")
    print(f"report: {args.out}/{report_name(report['shards'])}")
