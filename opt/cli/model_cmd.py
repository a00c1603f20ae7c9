"""``opt vq train``, ``opt model init`` and ``opt model summary``."""

from __future__ import annotations

import argparse

from opt.cli.common import (DATA_HELP, add_command_group, add_config_arguments, add_device, config_from_args,
                            output_folder)


def register(commands: argparse._SubParsersAction) -> None:
    vq_sub = add_command_group(commands, "vq", "the VQ image tokenizer")
    train = vq_sub.add_parser("train", help="train the VQ image tokenizer on shard images")
    train.add_argument("--data", required=True, help=DATA_HELP)
    train.add_argument("--val", help="validation shards for PSNR and codebook usage (default: a few training batches)")
    train.add_argument("--out", type=output_folder, required=True,
                       help="output directory (config.json, model.safetensors, PNG, metrics)")
    add_device(train, inference=False)
    add_config_arguments(train)
    train.set_defaults(handler=run_vq_train)

    model_sub = add_command_group(commands, "model", "make or inspect a model")
    init = model_sub.add_parser("init", help="write an untrained model directory, with the pretrained parts the "
                                "config names loaded (the start of a run, or something to inspect)")
    init.add_argument("--out", type=output_folder, required=True,
                      help="model directory to write (config.json, model.safetensors, vq/, tokenizer, README.md)")
    add_config_arguments(init)
    init.set_defaults(handler=run_init)
    summary = model_sub.add_parser("summary", help="parameters per part and FLOPs per sample of a training step")
    add_config_arguments(summary)
    summary.set_defaults(handler=run_summary)


def run_vq_train(args: argparse.Namespace) -> None:
    from opt.engine.vq import train_vq

    metrics = train_vq(config_from_args(args), args.data, args.out, val=args.val, device=args.device)
    print(f"vq: val PSNR {metrics['psnr']:.2f} dB over {metrics['images']} images; codebook perplexity "
          f"{metrics['perplexity']:.1f}, {100 * metrics['used_fraction']:.1f}% of {metrics['codebook_size']} codes "
          f"used -> {args.out} (reconstructions.png, metrics.json)")
    attributes = metrics.get("reconstruction_attributes")
    if attributes:
        print(f"vq: of {attributes['objects']} val objects, the reconstructions keep the colour of "
              f"{attributes['color']:.3f}, size {attributes['size']:.3f}, "
              f"position {attributes['position_or_relation']:.3f}, shape {attributes['shape']:.3f} "
              "(read by the world's analyser)")


def run_init(args: argparse.Namespace) -> None:
    from opt.model.init import init_model

    model = init_model(config_from_args(args), args.out)
    trainable = sum(p.numel() for p in model.parameters())
    loaded = [encoder.load_report for encoder in model.encoders.values() if encoder.load_report is not None]
    print(f"model init: {trainable / 1e6:,.1f} M parameters, {len(loaded)} pretrained part(s) -> {args.out}")


def run_summary(args: argparse.Namespace) -> None:
    from opt.model.opt_model import ModelSpec, OPTModel
    from opt.model.summary import dummy_batch, parameter_counts
    from opt.tasks.mixture import TaskMixture, schedule_flops, task_flops

    config = config_from_args(args)
    tokenizer = None
    if config.model.text.pretrained_dir:  # a pretrained BERT's vocabulary is its own tokenizer's
        from opt.text.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(config.tokenizer.path)
    model = OPTModel(ModelSpec.from_config(config, tokenizer))
    counts = parameter_counts(model)
    width = max(map(len, counts))
    for name, count in counts.items():
        print(f"{name:<{width}}  {count / 1e6:10.2f} M")
    spec = model.spec
    print(f"image codes per image: {spec.image_codes} (codebook {spec.model.vq.codebook_size}); "
          f"text <= {spec.max_text_tokens} tokens; audio <= {spec.audio.max_seconds:g} s")
    mixture = TaskMixture(config, model, rank=0)
    flops = task_flops(mixture, model.train(), dummy_batch(model, 3))  # 5-way matching needs three samples
    print(f"training step, forward + backward per sample (each task on a batch at the maximum sizes):")
    for name, value in flops.items():
        print(f"  {name:<{width - 2}}{value / 1e9:10.2f} GFLOP")
    print(f"  mean over the config's {config.train.steps} steps (tasks.mode {config.tasks.mode}, phases and "
          f"weights): {schedule_flops(mixture, flops, config.train.steps) / 1e9:.2f} GFLOP")
