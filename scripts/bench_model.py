"""Model benchmarks on this machine's CPU, the arms of each comparison measured side by side in
one run.

    python scripts/bench_model.py [--quick] [--repeats N] [--out bench_model.json]
    python scripts/bench_model.py --model runs/demo/model --data 'data/world/test-*.tar' [--count 300]

1. Text decoding, 40 tokens, base text-decoder dims (6 x 1024 x 16 heads, vocabulary 30,000,
   a 180-position context), batch 1 and 16: our KV cache vs recomputing the whole prefix every
   step (target >= 8x at batch 16), and vs a transformers GPT-2 of the same sizes with
   cross-attention, ``generate`` with its own cache (target: ours faster).
2. Image decoding, tiny and base dims, batch 4, classifier-free guidance 3: parallel MaskGIT
   at 12 steps (the text-to-image default) and 8 (``generate_image_codes_parallel``'s default)
   vs autoregressive (one step per code, 64) (target >= 5x).
3. The base cross-modal encoder (12 x 768 x 12 heads) vs transformers' ``BertModel`` of the same
   size (sdpa attention), forward + backward over [CLS] + text + image + audio (180 positions),
   batch 8, both at the base config's dropout, in fp32 and under bf16 autocast (target >= 1.2x).
4. Forward + backward of the tiny and base cross-modal encoder: samples/s and achieved FLOP/s
   as a fraction of this machine's fp32 matmul FLOP/s measured in the same run.
5. With ``--model``: that model's text-to-image evaluation (:mod:`opt.downstream.text_to_image`)
   on the first ``--count`` captions of ``--data``, parallel vs autoregressive decoding at the
   evaluation's defaults (guidance 3, 12 parallel steps, ``--candidates`` per prompt): the
   world's attribute accuracy and the seconds each took. Only this part runs when given.

The arms of a comparison run interleaved (a, b, a, b, ...) after one warm-up call each and are
reported as medians, so a shared machine's drift falls on every arm alike. Run it alone
(``flock /tmp/opt-timing.lock``) and treat the figures as those of this machine at that time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from opt.benchmarking import matmul_peak, timed
from opt.config import CrossModalConfig, load_config
from opt.model.cross import CrossModalEncoder
from opt.model.decoders import ImageTokenDecoder, TextDecoder
from opt.model.generation import (generate_image_codes_autoregressive, generate_image_codes_parallel,
                                  generate_text)
from opt.model.summary import count_flops

ROOT = Path(__file__).resolve().parents[1]
CROSS_LENGTHS = {"text": 40, "image": 64, "audio": 75}  # with [CLS]: 180 positions


def interleaved(arms: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each arm over ``repeats`` rounds that call every arm once in turn,
    after one warm-up call of each."""
    for arm in arms.values():
        arm()
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(repeats):
        for name, arm in arms.items():
            start = time.perf_counter()
            arm()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def bench_text_decoding(batch: int, tokens: int, repeats: int, vocab: int = 30000) -> dict[str, float]:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = load_config(ROOT / "configs/base.yaml").model.text_decoder
    context_width = 768
    torch.manual_seed(0)
    decoder = TextDecoder(config, vocab_size=vocab, context_width=context_width).eval()
    context = torch.randn(batch, 180, context_width)
    mask = torch.ones(batch, 180, dtype=torch.bool)
    kwargs = dict(bos_id=1, eos_id=-1, max_length=tokens)  # eos never produced: exactly `tokens` tokens
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=config.width, n_layer=config.layers,
                                      n_head=config.heads, n_positions=config.max_length,
                                      add_cross_attention=True)).eval()
    projection = torch.nn.Linear(context_width, config.width)  # GPT-2 cross-attends at its own width
    start_ids = torch.ones(batch, 1, dtype=torch.long)

    def hf_generate():
        with torch.no_grad():
            gpt2.generate(start_ids, encoder_hidden_states=projection(context), encoder_attention_mask=mask.long(),
                          max_new_tokens=tokens - 1, min_new_tokens=tokens - 1, do_sample=False, use_cache=True,
                          pad_token_id=0)

    seconds = interleaved({"cached": lambda: generate_text(decoder, context, mask, **kwargs),
                           "recompute": lambda: generate_text(decoder, context, mask, use_cache=False, **kwargs),
                           "transformers_gpt2": hf_generate}, repeats)
    key = f"text_b{batch}"
    return {f"{key}_{name}_s": value for name, value in seconds.items()} | {
        f"{key}_cache_speedup": seconds["recompute"] / seconds["cached"],
        f"{key}_vs_transformers_speedup": seconds["transformers_gpt2"] / seconds["cached"]}


def bench_image_decoding(name: str, batch: int, repeats: int, steps: tuple[int, ...] = (12, 8)) -> dict[str, float]:
    config = load_config(ROOT / f"configs/{name}.yaml").model
    torch.manual_seed(0)
    decoder = ImageTokenDecoder(config.image_decoder, codebook_size=config.vq.codebook_size, codes=64,
                                context_width=config.cross.width).eval()
    context = torch.randn(batch, 120, config.cross.width)
    mask = torch.ones(batch, 120, dtype=torch.bool)
    arms = {f"parallel_{count}_steps": (lambda count=count: generate_image_codes_parallel(
        decoder, context, mask, steps=count, guidance=3.0)) for count in steps}
    arms["autoregressive_64_steps"] = lambda: generate_image_codes_autoregressive(decoder, context, mask, guidance=3.0)
    seconds = interleaved(arms, repeats)
    key = f"image_{name}_b{batch}"
    figures = {f"{key}_{arm}_s": value for arm, value in seconds.items()}
    for count in steps:
        figures[f"{key}_parallel_{count}_steps_speedup"] = (seconds["autoregressive_64_steps"]
                                                            / seconds[f"parallel_{count}_steps"])
    return figures


def _cross_inputs(batch: int, width: int) -> dict[str, dict[str, torch.Tensor]]:
    return {m: {"tokens": torch.randn(batch, n, width), "mask": torch.ones(batch, n, dtype=torch.bool)}
            for m, n in CROSS_LENGTHS.items()}


def bench_cross_vs_bert(batch: int, repeats: int) -> dict[str, float]:
    """Seconds of forward + backward, ours vs BertModel, fp32 and bf16 autocast, at the same dropout."""
    from transformers import BertConfig, BertModel

    model = load_config(ROOT / "configs/base.yaml").model
    config = model.cross
    torch.manual_seed(0)
    ours = CrossModalEncoder(config, image_tokens=64, mlp_ratio=model.mlp_ratio, dropout=model.dropout).train()
    bert = BertModel(BertConfig(hidden_size=config.width, num_hidden_layers=config.layers,
                                num_attention_heads=config.heads, intermediate_size=model.mlp_ratio * config.width,
                                max_position_embeddings=512, hidden_dropout_prob=model.dropout,
                                attention_probs_dropout_prob=model.dropout, attn_implementation="sdpa"),
                     add_pooling_layer=False).train()
    inputs = _cross_inputs(batch, config.width)
    embeds = torch.randn(batch, 1 + sum(CROSS_LENGTHS.values()), config.width)
    mask = torch.ones(batch, embeds.shape[1], dtype=torch.long)
    figures: dict[str, float] = {"cross_vs_bert_dropout": model.dropout}
    for precision in ("fp32", "bf16"):
        def autocast():
            if precision == "fp32":
                return contextlib.nullcontext()
            return torch.autocast("cpu", dtype=torch.bfloat16)

        def ours_step():
            with autocast():
                states = ours(inputs)["states"]
            states.float().pow(2).mean().backward()

        def bert_step():
            with autocast():
                states = bert(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
            states.float().pow(2).mean().backward()

        seconds = interleaved({"cross": ours_step, "bert": bert_step}, repeats)
        figures |= {f"cross_base_{precision}_step_s": seconds["cross"],
                    f"bert_base_{precision}_step_s": seconds["bert"],
                    f"cross_vs_bert_{precision}_speedup": seconds["bert"] / seconds["cross"]}
    return figures


def bench_cross_encoder(name: str, config: CrossModalConfig, batch: int, repeats: int, peak: float) -> dict:
    torch.manual_seed(0)
    encoder = CrossModalEncoder(config, image_tokens=64).train()
    inputs = _cross_inputs(batch, config.width)

    def step():
        encoder(inputs)["states"].float().pow(2).mean().backward()

    with count_flops() as counter:
        step()
    flops = counter.get_total_flops()
    seconds = timed(step, repeats)
    return {f"cross_{name}_samples_per_s": batch / seconds, f"cross_{name}_gflops_per_s": flops / seconds / 1e9,
            f"cross_{name}_fraction_of_fp32_peak": flops / seconds / peak,
            f"cross_{name}_sequence": 1 + sum(CROSS_LENGTHS.values())}


def bench_text_to_image_accuracy(model: str, data: str, count: int, candidates: int) -> dict[str, float]:
    """The text-to-image evaluation of ``model`` with each decoding: attribute accuracy and seconds."""
    from opt.downstream.common import encode_split, load_model
    from opt.downstream.plugins import PLUGINS
    from opt.downstream.text_to_image import evaluate_text_to_image

    loaded = load_model(model)
    split = encode_split(loaded, data, limit=max(count, 100))
    figures: dict[str, float] = {"t2i_prompts": min(count, len(split)), "t2i_candidates": candidates}
    for decoding in ("parallel", "autoregressive"):
        start = time.perf_counter()
        metrics, _, _ = evaluate_text_to_image(loaded, split, count=count, decoding=decoding, candidates=candidates,
                                               plugins=PLUGINS)
        figures[f"t2i_{decoding}_s"] = time.perf_counter() - start
        figures |= {f"t2i_{decoding}_{name}": value for name, value in metrics.items()
                    if name.startswith("attribute_") or name == "r_precision"}
    figures["t2i_parallel_speedup"] = figures["t2i_autoregressive_s"] / figures["t2i_parallel_s"]
    if figures.get("t2i_autoregressive_attribute_accuracy"):
        figures["t2i_parallel_accuracy_ratio"] = (figures["t2i_parallel_attribute_accuracy"]
                                                  / figures["t2i_autoregressive_attribute_accuracy"])
    return figures


def report(figures: dict[str, float]) -> None:
    for key, value in figures.items():
        print(f"{key:<48}  {value:12.4g}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one timed round per comparison, smaller batches")
    parser.add_argument("--repeats", type=int, help="timed rounds per comparison (default 3, 1 with --quick)")
    parser.add_argument("--model", help="a model directory: run only the text-to-image comparison (5)")
    parser.add_argument("--data", default=str(ROOT / "data/world/test-*.tar"), help="shards for --model")
    parser.add_argument("--count", type=int, default=300, help="prompts for --model (the first captions)")
    parser.add_argument("--candidates", type=int, default=1, help="samples per prompt for --model (best of N)")
    parser.add_argument("--out", help="also write the figures as JSON")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    results: dict[str, float] = {"threads": torch.get_num_threads()}
    report(results)
    if args.model:
        measures = [lambda: bench_text_to_image_accuracy(args.model, args.data, args.count, args.candidates)]
    else:
        peak = matmul_peak()
        tiny = load_config(ROOT / "configs/tiny.yaml").model.cross
        base = load_config(ROOT / "configs/base.yaml").model.cross
        measures = [lambda: {"fp32_matmul_gflops_per_s": peak / 1e9},
                    lambda: bench_text_decoding(batch=1, tokens=40, repeats=repeats),
                    lambda: bench_text_decoding(batch=16, tokens=40, repeats=repeats),
                    lambda: bench_image_decoding("tiny", batch=4, repeats=repeats),
                    lambda: bench_image_decoding("base", batch=4, repeats=repeats),
                    lambda: bench_cross_vs_bert(batch=4 if args.quick else 8, repeats=repeats),
                    lambda: bench_cross_encoder("tiny", tiny, batch=32, repeats=repeats, peak=peak),
                    lambda: bench_cross_encoder("base", base, batch=4 if args.quick else 8, repeats=repeats,
                                                peak=peak),
                    # shared machines drift: the peak again, after
                    lambda: {"fp32_matmul_gflops_per_s_after": matmul_peak() / 1e9}]
    for measure in measures:
        figures = measure()
        report(figures)
        results |= figures
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
