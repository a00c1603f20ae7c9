"""``opt eval``: every downstream task on a model directory, into a report."""

from __future__ import annotations

import argparse
from pathlib import Path

from opt.cli.common import add_batch_size, non_negative_int, output_folder, positive_int
from opt.cli.downstream_cmd import add_caption_terms, add_decoding, add_model, load_from_args


def register(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser("eval", help="every downstream task on evaluation shards -> report/")
    add_model(evaluate)
    evaluate.add_argument("--data", required=True,
                          help="shards (directory, glob or brace pattern); a synthetic-world directory gives its "
                          "test, test_novel and test_unseen splits")
    evaluate.add_argument("--name", help="name of the split in the report (default: the world's split names, "
                          "else 'eval'); with a name, --data is always one split")
    evaluate.add_argument("--out", type=output_folder, required=True,
                          help="report directory (metrics.json, report.md, PNGs)")
    evaluate.add_argument("--run-dir", help="training run whose curves go into the report")
    evaluate.add_argument("--limit", type=positive_int, help="samples per split (default all)")
    evaluate.add_argument("--rerank-k", type=non_negative_int, default=16, help="retrieval re-ranking (default 16)")
    add_caption_terms(evaluate)
    evaluate.add_argument("--beam", type=positive_int, default=1, help="captioning beam size (default 1)")
    evaluate.add_argument("--generate-count", type=positive_int, default=64,
                          help="text-to-image prompts per split (default 64)")
    evaluate.add_argument("--no-meteor", dest="meteor", action="store_false", help="skip METEOR (needs java)")
    evaluate.add_argument("--no-card", dest="card", action="store_false",
                          help="leave the model directory's README.md (model card) as it is; by default its "
                          "evaluation section gets these figures")
    add_batch_size(evaluate, what="samples encoded or captioned, and (query, candidate) pairs re-ranked, at "
                   "once; text-to-image draws 256 images at once, as opt generate")
    add_decoding(evaluate)
    evaluate.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> None:
    from opt.devices import inference_autocast
    from opt.downstream.common import describe_counts
    from opt.downstream.evaluate import EvalSettings, evaluate_directory, record_in_model_card
    from opt.downstream.report import headline, split_names

    curves = None
    if args.run_dir:
        from opt.engine.plot import plot_run

        curves = plot_run(args.run_dir)
    settings = EvalSettings(limit=args.limit, batch_size=args.batch_size, rerank_k=args.rerank_k,
                            caption_likelihood=args.caption_likelihood, caption_prior=args.caption_prior,
                            beam=args.beam,
                            generate_count=args.generate_count, decoding=args.decoding, steps=args.steps,
                            guidance=args.guidance, candidates=args.candidates, seed=args.seed,
                            with_meteor=args.meteor)
    loaded = load_from_args(args)
    with inference_autocast(loaded.device, loaded.model):
        results = evaluate_directory(loaded, args.data, args.out, settings=settings, name=args.name, curves=curves,
                                     model_name=Path(args.model).name)
    if args.card:
        record_in_model_card(args.model, results, args.data, args.out)
    for split in split_names(results):
        print(f"{split}: {describe_counts(results[split]['data'])}")
        print(f"{split}: {headline(results[split])}")
    print(f"eval: report in {Path(args.out) / 'report.md'}")

