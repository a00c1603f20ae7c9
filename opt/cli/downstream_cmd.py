"""``opt caption``, ``opt generate``, ``opt retrieve``, ``opt embed`` and ``opt search``: the
downstream tasks on a model directory (``opt export``), on shards or on files; ``opt eval``
runs them all on a split (:mod:`opt.cli.eval_cmd`). Each runs on ``--device`` (default cpu)
in the precision :func:`~opt.devices.inference_autocast` picks for it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from opt import MODALITIES
from opt.cli.common import (DATA_HELP, add_batch_size, add_device, non_negative_int, output_file, output_folder,
                            positive_int)
from opt.errors import UserError

if TYPE_CHECKING:
    from opt.data.pipeline import DataStats
    from opt.downstream.captioning import Caption

DEFAULT_CANDIDATES = 32  # text-to-image best-of-N (a literal here so the CLI starts without importing torch)
GENERATE_BATCH = 256  # images drawn at once (text_to_image.CANDIDATE_ROWS, a literal for the same reason)
DEFAULT_CAPTION_PRIOR = 0  # retrieval.DEFAULT_CAPTION_PRIOR, a literal for the same reason
MODEL_HELP = "model directory written by opt export (config.json, model.safetensors, vq/, tokenizer.model)"
FILES_HELP = ("{} files: files, folders (their {} files, recursive, sorted) or globs; each file's key is "
              "its path as given or found")


def add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    add_device(parser)


def add_caption_terms(parser: argparse.ArgumentParser) -> None:
    """Re-ranking's caption terms: ``--no-caption-likelihood`` and ``--caption-prior``."""
    parser.add_argument("--no-caption-likelihood", dest="caption_likelihood", action="store_false",
                        help="re-rank without the text decoder's caption likelihood (captions: "
                        "log P(caption | query); images or speech for a text query: log P(query | candidate))")
    parser.add_argument("--caption-prior", type=non_negative_int, default=DEFAULT_CAPTION_PRIOR,
                        help="captions as candidates: take each one's likelihood relative to its mean given this "
                        f"many other queries, 0 = off (default {DEFAULT_CAPTION_PRIOR})")


def add_decoding(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--decoding", default="autoregressive", choices=["parallel", "autoregressive"],
                        help="image-token decoding (default autoregressive: on the demo model it drew colour, "
                             "size and position better than 12 parallel steps, and faster on a CPU)")
    parser.add_argument("--steps", type=positive_int, default=12, help="parallel decoding steps (default 12)")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance, 1 = off (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--candidates", type=positive_int, default=DEFAULT_CANDIDATES,
                        help="draw this many images per requested one and keep the one whose prompt the model's "
                             f"captioner finds most likely (default {DEFAULT_CANDIDATES}; 1 = plain sampling)")


def register(commands: argparse._SubParsersAction) -> None:
    caption = commands.add_parser("caption", help="caption images or speech from shards (with metrics against "
                                  "the references) or from files")
    add_model(caption)
    sources = caption.add_mutually_exclusive_group(required=True)
    sources.add_argument("--data", help=DATA_HELP)
    sources.add_argument("--image", nargs="+", metavar="PATH", help=FILES_HELP.format("image", ".png/.jpg/.jpeg/.webp"))
    sources.add_argument("--audio", nargs="+", metavar="PATH", help=FILES_HELP.format("audio", ".wav/.flac/.ogg"))
    caption.add_argument("--inputs", help="with --data: image, audio or image+audio (default image)")
    caption.add_argument("--out", type=output_file, required=True,
                         help="output JSON lines, one {key, caption} per sample or file (per group where "
                         "samples share an image or clip)")
    caption.add_argument("--beam", type=positive_int, default=1, help="beam size, 1 = greedy (default 1)")
    add_batch_size(caption)
    caption.add_argument("--limit", type=positive_int, help="read at most this many samples (or files)")
    caption.add_argument("--no-references", dest="references", action="store_false",
                         help="skip the metrics against the shard captions (files have none)")
    caption.set_defaults(handler=run_caption)

    generate = commands.add_parser("generate", help="generate images from text prompts (and speech)")
    add_model(generate)
    prompts = generate.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="one prompt")
    prompts.add_argument("--prompts", help="a text file with one prompt per line")
    generate.add_argument("--audio", help="a speech file conditioning every prompt together with its text")
    generate.add_argument("--out", type=output_folder, required=True,
                          help="output directory for PNGs and grid.png")
    generate.add_argument("--n", type=positive_int, default=1, help="images per prompt (default 1)")
    add_batch_size(generate, default=GENERATE_BATCH,
                   what="images drawn at once, each prompt's candidates counted (at least one prompt's)")
    add_decoding(generate)
    generate.set_defaults(handler=run_generate)

    retrieve = commands.add_parser("retrieve", help="cross-modal retrieval over a whole split")
    add_model(retrieve)
    retrieve.add_argument("--data", required=True, help=DATA_HELP)
    retrieve.add_argument("--query", help="query modality: text, image, audio or text+audio")
    retrieve.add_argument("--target", help="target modality: text, image or audio")
    retrieve.add_argument("--all", action="store_true", help="every direction: t2i, i2t, t2a, a2t, ta2i")
    retrieve.add_argument("--rerank-k", type=non_negative_int, default=16,
                          help="top candidates re-ranked by the cross encoder, 0 = off (default 16)")
    retrieve.add_argument("--limit", type=positive_int, help="use at most this many samples")
    add_caption_terms(retrieve)
    retrieve.add_argument("--out", type=output_file, help="write the metrics to this JSON file")
    add_batch_size(retrieve, what="samples encoded, and (query, candidate) pairs re-ranked, at once")
    retrieve.set_defaults(handler=run_retrieve)

    embed = commands.add_parser("embed", help="two-tower embeddings of shards, files or text lines, saved as an "
                                "index for opt search")
    add_model(embed)
    embed.add_argument("--modality", required=True, choices=MODALITIES, help="what to embed")
    sources = embed.add_mutually_exclusive_group(required=True)
    sources.add_argument("--data", help=f"{DATA_HELP}; keys: the sample keys")
    sources.add_argument("--files", nargs="+", metavar="PATH", help=FILES_HELP.format("--modality's", "matching"))
    sources.add_argument("--texts", metavar="FILE",
                         help="a UTF-8 text file, one text per line (--modality text); each line's key is its "
                         "text (blank lines are left out)")
    embed.add_argument("--out", type=output_file, required=True,
                       help="index file (safetensors: the (n, dim) embeddings, keys and modality)")
    add_batch_size(embed)
    embed.set_defaults(handler=run_embed)

    search = commands.add_parser("search", help="rank the entries of an opt embed index against a text, image "
                                 "or audio query")
    add_model(search)
    search.add_argument("--index", required=True, help="index file written by opt embed with this model")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="a text query")
    query.add_argument("--image", metavar="PATH", help="an image file as the query")
    query.add_argument("--audio", metavar="PATH", help="a speech or sound file as the query")
    search.add_argument("--k", type=positive_int, default=10, help="entries shown (default 10)")
    search.add_argument("--json", action="store_true", help="print the ranking as one JSON object")
    search.set_defaults(handler=run_search)


def load_from_args(args: argparse.Namespace):
    from opt.downstream.common import load_model

    return load_model(args.model, device=args.device)


def _print_metrics(title: str, metrics: dict) -> None:
    shown = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                      if not isinstance(v, dict) and v is not None)
    print(f"{title}: {shown}")


def run_caption(args: argparse.Namespace) -> None:
    if args.data is None:
        return _caption_files(args)
    from opt.data.pipeline import DataStats
    from opt.devices import inference_autocast
    from opt.downstream.captioning import caption_metrics, caption_split, parse_inputs
    from opt.downstream.plugins import PLUGINS
    from opt.files import write_atomic

    inputs = args.inputs or "image"
    parse_inputs(inputs)
    read = DataStats()
    loaded = load_from_args(args)
    with inference_autocast(loaded.device, loaded.model):
        captions = caption_split(loaded, args.data, inputs, beam=args.beam, limit=args.limit,
                                 batch_size=args.batch_size, stats=read)
    _write_captions(captions, args.out, read)
    if args.references:
        metrics = caption_metrics(captions, inputs, plugins=PLUGINS) | {"data": read.as_dict()}
        write_atomic(Path(args.out).with_suffix(".metrics.json"), json.dumps(metrics, indent=2).encode())
        _print_metrics("metrics", metrics)


def _caption_files(args: argparse.Namespace) -> None:
    from opt.data.pipeline import DataStats
    from opt.devices import inference_autocast
    from opt.downstream.captioning import caption_batches
    from opt.downstream.files import expand_paths, file_batches

    if args.inputs is not None:
        raise UserError("--inputs is for --data; files are captioned from what they hold (--image or --audio)")
    modality = "image" if args.image else "audio"
    files = expand_paths(args.image or args.audio, modality)[: args.limit]
    loaded = load_from_args(args)
    read = DataStats()
    batches = file_batches(loaded, files, modality, batch_size=args.batch_size, stats=read)
    with inference_autocast(loaded.device, loaded.model):
        captions = caption_batches(loaded, batches, modality, beam=args.beam)
    _write_captions(captions, args.out, read)


def _write_captions(captions: list[Caption], out: str, read: DataStats) -> None:
    from opt.downstream.common import describe_counts
    from opt.files import write_atomic

    write_atomic(out, "".join(json.dumps({"key": c.key, "caption": c.caption}) + "\n" for c in captions).encode())
    print(f"data: {describe_counts(read.as_dict())}")
    print(f"caption: {len(captions)} captions -> {out}")


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        try:
            args.prompt.encode("utf-8")  # bytes that were not UTF-8 reach argv as lone surrogates
        except UnicodeEncodeError:
            raise UserError("--prompt is not valid UTF-8 text") from None
        prompts = [args.prompt]
    else:
        path = Path(args.prompts)
        if not path.is_file():
            raise UserError(f"prompt file not found: {path}")
        payload = path.read_bytes()
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as error:
            line = payload[:error.start].count(b"\n") + 1
            raise UserError(f"prompt file {path}: line {line} is not valid UTF-8 text") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts or not all(prompts):
        raise UserError("no prompt given (empty prompt or prompt file)")
    return prompts


def _read_audio(path: str) -> bytes:
    """The bytes of ``--audio``, checked to be a sound file before the model loads."""
    from opt.data.audio import AudioDecodeError, decode_audio

    if not Path(path).is_file():
        raise UserError(f"audio file not found: {path}")
    payload = Path(path).read_bytes()
    try:
        decode_audio(payload)
    except AudioDecodeError as error:
        raise UserError(f"--audio {path} is not readable audio ({error.reason})") from None
    return payload


def run_generate(args: argparse.Namespace) -> None:
    from opt.devices import inference_autocast
    from opt.downstream.text_to_image import generate_images, prompt_batch, save_generations

    prompts = _read_prompts(args)
    audio = _read_audio(args.audio) if args.audio else None
    loaded = load_from_args(args)
    repeated = [p for p in prompts for _ in range(args.n)]
    batch = prompt_batch(loaded, repeated, [audio] * len(repeated) if audio is not None else None)
    with inference_autocast(loaded.device, loaded.model):
        images = generate_images(loaded, batch, decoding=args.decoding, steps=args.steps, guidance=args.guidance,
                                 candidates=args.candidates, seed=args.seed, batch_size=args.batch_size)
    paths = save_generations(images, prompts, args.out, samples=args.n)
    print(f"generate: {len(paths)} images -> {args.out} (grid: {Path(args.out) / 'grid.png'})")


def _directions(args: argparse.Namespace) -> dict[str, tuple[tuple[str, ...], str]]:
    from opt.downstream.retrieval import DIRECTIONS, direction_name

    if args.all:
        return dict(DIRECTIONS)
    if not args.query or not args.target:
        raise UserError("give --query and --target, or --all")
    query = tuple(args.query.split("+"))
    known = {"text", "image", "audio"}
    if not set(query) <= known or args.target not in known or args.target in query:
        raise UserError(f"cannot retrieve {args.target!r} from {args.query!r} (modalities: text, image, audio)")
    return {direction_name(query, args.target): (query, args.target)}


def run_retrieve(args: argparse.Namespace) -> None:
    from opt import MODALITIES
    from opt.devices import inference_autocast
    from opt.downstream.common import describe_counts, encode_split
    from opt.downstream.retrieval import retrieve
    from opt.files import write_atomic

    directions = _directions(args)
    needed = [m for m in MODALITIES if any(m in (*query, target) for query, target in directions.values())]
    loaded = load_from_args(args)
    with inference_autocast(loaded.device, loaded.model):
        split = encode_split(loaded, args.data, modalities=needed, limit=args.limit, batch_size=args.batch_size)
    results: dict = {"data": split.data_stats.as_dict()}
    print(f"data: {describe_counts(results['data'])}")
    for name, (query, target) in directions.items():
        with inference_autocast(loaded.device, loaded.model):
            results[name] = retrieve(loaded, split, query, target, rerank_k=args.rerank_k,
                                     caption_likelihood=args.caption_likelihood, caption_prior=args.caption_prior,
                                     batch_size=args.batch_size)
        _print_metrics(f"{name} (n={results[name]['n']})", results[name])
        seconds = results[name]["seconds"]
        print(f"  two-tower {seconds['two_tower']:.2f} s, re-rank {seconds['rerank']:.2f} s")
    if args.out:
        write_atomic(args.out, json.dumps(results, indent=2).encode())


def run_embed(args: argparse.Namespace) -> None:
    from opt.data.pipeline import DataStats
    from opt.devices import inference_autocast
    from opt.downstream.common import describe_counts, iterate_batches
    from opt.downstream.files import expand_paths, file_batches, input_batches, read_text_lines
    from opt.downstream.index import embed_batches, save_index

    modality = args.modality
    if args.texts is not None and modality != "text":
        raise UserError(f"--texts holds text, not {modality}; give --modality text")
    files = expand_paths(args.files, modality) if args.files else None
    texts = read_text_lines(args.texts) if args.texts else None
    loaded = load_from_args(args)
    read = DataStats()
    if args.data is not None:
        batches = iterate_batches(loaded, args.data, modalities=[modality], require=[modality],
                                  batch_size=args.batch_size, stats=read)
    elif files is not None:
        batches = file_batches(loaded, files, modality, batch_size=args.batch_size, stats=read)
    else:
        batches = input_batches(loaded, texts, ["text"], batch_size=args.batch_size, stats=read)
    with inference_autocast(loaded.device, loaded.model):
        index = embed_batches(loaded, batches, modality)
    save_index(index, args.out)
    print(f"data: {describe_counts(read.as_dict())}")
    print(f"embed: {len(index)} {modality} embeddings ({index.dim}-d) -> {args.out}")


def _query(args: argparse.Namespace) -> tuple[str, str, bytes]:
    """``(modality, key, bytes)`` of the query, read before the model loads."""
    if args.text is not None:
        try:
            return "text", "--text", args.text.encode("utf-8")
        except UnicodeEncodeError:  # bytes that were not UTF-8 reach argv as lone surrogates
            raise UserError("--text is not valid UTF-8 text") from None
    modality, path = ("image", args.image) if args.image is not None else ("audio", args.audio)
    if not Path(path).is_file():
        raise UserError(f"{modality} file not found: {path}")
    return modality, path, Path(path).read_bytes()


def run_search(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from opt.devices import inference_autocast
    from opt.downstream.index import check_model_fits, embed_query, load_index, search

    index = load_index(args.index)
    modality, key, payload = _query(args)
    loaded = load_from_args(args)
    check_model_fits(loaded, index, args.index)
    with inference_autocast(loaded.device, loaded.model):
        query = embed_query(loaded, modality, payload, key=key)
    hits = search(index, query, k=args.k)
    if args.json:
        print(json.dumps({"query": {"modality": modality, "key": key}, "index": {"modality": index.modality,
                          "size": len(index)}, "hits": [asdict(hit) for hit in hits]}))
        return
    for hit in hits:
        print(f"{hit.rank:>4}  {hit.score:7.4f}  {hit.key}")
