"""``opt eval``: every downstream task on a model directory, into a report."""

from __future__ import annotations

import argparse
from pathlib import Path

from opt.cli.common import non_negative_int, output_folder, positive_int
from opt.cli.downstream_cmd import add_decoding, add_model, load_from_args


def register(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser("eval", help="all downstream tasks on test and test_novel -> report/")
    add_model(evaluate)
    evaluate.add_argument("--data", required=True, help="directory with test-*.tar and test_novel-*.tar shards")
    evaluate.add_argument("--out", type=output_folder, required=True,
                          help="report directory (metrics.json, report.md, PNGs)")
    evaluate.add_argument("--run-dir", help="training run whose curves go into the report")
    evaluate.add_argument("--limit", type=positive_int, help="samples per split (default all)")
    evaluate.add_argument("--rerank-k", type=non_negative_int, default=16, help="retrieval re-ranking (default 16)")
    evaluate.add_argument("--no-caption-likelihood", dest="caption_likelihood", action="store_false",
                          help="re-rank without the text decoder's caption likelihood (captions: "
                          "log P(caption | query); images or speech for a text query: log P(query | candidate))")
    evaluate.add_argument("--beam", type=positive_int, default=1, help="captioning beam size (default 1)")
    evaluate.add_argument("--generate-count", type=positive_int, default=64,
                          help="text-to-image prompts per split (default 64)")
    evaluate.add_argument("--no-meteor", dest="meteor", action="store_false", help="skip METEOR (needs java)")
    add_decoding(evaluate)
    evaluate.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> None:
    from opt.downstream.common import describe_counts
    from opt.downstream.evaluate import EvalSettings, evaluate_directory
    from opt.downstream.report import split_names

    curves = None
    if args.run_dir:
        from opt.engine.plot import plot_run

        curves = plot_run(args.run_dir)
    settings = EvalSettings(limit=args.limit, rerank_k=args.rerank_k, caption_likelihood=args.caption_likelihood,
                            beam=args.beam,
                            generate_count=args.generate_count, decoding=args.decoding, steps=args.steps,
                            guidance=args.guidance, candidates=args.candidates, seed=args.seed,
                            with_meteor=args.meteor)
    results = evaluate_directory(load_from_args(args), args.data, args.out, settings=settings, curves=curves,
                                 model_name=Path(args.model).name)
    for split in split_names(results):
        print(f"{split}: {describe_counts(results[split]['data'])}")
        retrieval = results[split]["retrieval"]
        captions = results[split]["captioning"]
        print(f"{split}: a2t R@1 {retrieval['a2t']['r1']:.3f}, t2i R@1 {retrieval['t2i']['r1']:.3f}, "
              f"caption attributes image {captions['image'].get('attribute_accuracy', float('nan')):.3f} "
              f"audio {captions['audio'].get('attribute_accuracy', float('nan')):.3f}, text-to-image "
              f"attributes {results[split]['text_to_image']['text'].get('attribute_accuracy', float('nan')):.3f}")
    print(f"eval: report in {Path(args.out) / 'report.md'}")
