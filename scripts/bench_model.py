"""Model benchmarks: decoding and the cross-modal encoder, measured side by side in one run.

    python scripts/bench_model.py [--quick] [--device cpu|cuda] [--out bench_model.json]

Every comparison runs its arms in turns (``--rounds`` rounds, after a warm-up call each) and
reports each arm's median time and range, and the ratio of the medians.

1. Text decoding, 40 tokens, the base text decoder's dims (6 x 1024, 16 heads) over a context of
   180 positions, batch 1 and 16, greedy: our KV cache vs recomputing the whole prefix every step
   (target >= 8x at batch 16), and vs transformers' GPT-2 of the same sizes with cross-attention,
   ``generate`` with its own cache (target: ours faster at batch 1 and 16).
2. Image decoding of 64 codes, tiny and base dims, batch 4, classifier-free guidance 3: parallel
   MaskGIT decoding with the CLI's default 12 steps vs autoregressive decoding (64 steps, KV cache),
   with each one's FLOPs: parallel decoding runs every position through the decoder at every step,
   autoregressive decoding one position per step (target >= 5x).
3. The cross-modal encoder vs transformers' ``BertModel`` of the same layers, width, heads and MLP
   width, at the same dropout (``--dropout``, default 0.0 as the configs use; 0.1 is BERT's
   default), forward and backward over a full [CLS] + text + image + audio sequence of 180 tokens
   (no padding), fp32 and bf16 autocast, tiny and base (target: ours >= 1.2x); with achieved
   FLOP/s over this process's matmul FLOP/s in that precision.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch

from opt.benchmarking import interleaved, matmul_peak, median_and_range, processor_name
from opt.config import load_config
from opt.model.cross import CrossModalEncoder
from opt.model.decoders import ImageTokenDecoder, TextDecoder
from opt.model.generation import (generate_image_codes_autoregressive, generate_image_codes_parallel,
                                  generate_text)
from opt.model.summary import count_flops

ROOT = Path(__file__).resolve().parents[1]
CROSS_LENGTHS = {"text": 40, "image": 64, "audio": 75}  # + [CLS]: 180 positions


class Bench:
    """One device, a number of rounds, and the figures gathered so far."""

    def __init__(self, device: torch.device, rounds: int) -> None:
        self.device, self.rounds = device, rounds
        self.results: dict[str, float | str] = {}

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def compare(self, key: str, arms: dict[str, Callable[[], object]], ratios: dict[str, tuple[str, str]]) -> None:
        """Time ``arms`` in turns; record each one's median seconds and range, and for each
        ``ratios[name] = (slower, faster)`` the median time of ``slower`` over that of ``faster``."""
        times = interleaved(arms, self.rounds, self.synchronize)
        medians = {}
        for arm, values in times.items():
            median, low, high = median_and_range(values)
            medians[arm] = median
            self.results[f"{key}_{arm}_s"] = median
            self.results[f"{key}_{arm}_range_s"] = f"{low:.4g}-{high:.4g}"
        for name, (slower, faster) in ratios.items():
            self.results[f"{key}_{name}"] = medians[slower] / medians[faster]
        self.print_since(key)

    def print_since(self, prefix: str) -> None:
        for name, value in self.results.items():
            if name.startswith(prefix):
                print(f"{name:<52}  {value:12.4g}" if isinstance(value, float) else f"{name:<52}  {value}",
                      flush=True)


def bench_text_decoding(bench: Bench, batch: int, tokens: int = 40, vocab: int = 30000) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = load_config(ROOT / "configs/base.yaml").model.text_decoder
    context_width, device = 768, bench.device
    torch.manual_seed(0)
    decoder = TextDecoder(config, vocab_size=vocab, context_width=context_width).eval().to(device)
    context = torch.randn(batch, 180, context_width, device=device)
    mask = torch.ones(batch, 180, dtype=torch.bool, device=device)
    kwargs = dict(bos_id=1, eos_id=-1, max_length=tokens)  # eos never produced: exactly `tokens` tokens
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=config.width, n_layer=config.layers,
                                      n_head=config.heads, n_positions=config.max_length,
                                      add_cross_attention=True)).eval().to(device)
    projection = torch.nn.Linear(context_width, config.width).to(device)  # GPT-2 cross-attends at its width
    start_ids = torch.ones(batch, 1, dtype=torch.long, device=device)

    @torch.no_grad()
    def gpt2_generate():
        gpt2.generate(start_ids, encoder_hidden_states=projection(context), encoder_attention_mask=mask.long(),
                      max_new_tokens=tokens - 1, min_new_tokens=tokens - 1, do_sample=False, use_cache=True,
                      pad_token_id=0)

    bench.compare(f"text_b{batch}", {
        "cached": lambda: generate_text(decoder, context, mask, **kwargs),
        "recompute": lambda: generate_text(decoder, context, mask, use_cache=False, **kwargs),
        "gpt2_generate": gpt2_generate,
    }, {"cache_speedup": ("recompute", "cached"), "vs_gpt2_speedup": ("gpt2_generate", "cached")})


def bench_image_decoding(bench: Bench, name: str, batch: int = 4, steps: int = 12) -> None:
    config = load_config(ROOT / f"configs/{name}.yaml").model
    device = bench.device
    torch.manual_seed(0)
    decoder = ImageTokenDecoder(config.image_decoder, codebook_size=config.vq.codebook_size, codes=64,
                                context_width=config.cross.width).eval().to(device)
    context = torch.randn(batch, 120, config.cross.width, device=device)
    mask = torch.ones(batch, 120, dtype=torch.bool, device=device)
    arms = {f"parallel_{steps}_steps": lambda: generate_image_codes_parallel(decoder, context, mask, steps=steps,
                                                                             guidance=3.0),
            "autoregressive_64_steps": lambda: generate_image_codes_autoregressive(decoder, context, mask,
                                                                                   guidance=3.0)}
    key = f"image_{name}_b{batch}"
    for arm, function in arms.items():
        with count_flops() as counter:
            function()
        bench.results[f"{key}_{arm}_gflop"] = counter.get_total_flops() / 1e9
    bench.compare(key, arms, {"parallel_speedup": ("autoregressive_64_steps", f"parallel_{steps}_steps")})


def bench_cross_vs_bert(bench: Bench, name: str, batch: int, dropout: float, peaks: dict[str, float]) -> None:
    from transformers import BertConfig, BertModel

    config = load_config(ROOT / f"configs/{name}.yaml").model.cross
    device = bench.device
    torch.manual_seed(0)
    ours = CrossModalEncoder(config, image_tokens=CROSS_LENGTHS["image"], dropout=dropout).train().to(device)
    sequence = 1 + sum(CROSS_LENGTHS.values())
    bert = BertModel(BertConfig(hidden_size=config.width, num_hidden_layers=config.layers,
                                num_attention_heads=config.heads, intermediate_size=4 * config.width,
                                hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                                max_position_embeddings=sequence, vocab_size=2),
                     add_pooling_layer=False).train().to(device)
    inputs = {m: {"tokens": torch.randn(batch, n, config.width, device=device),
                  "mask": torch.ones(batch, n, dtype=torch.bool, device=device)} for m, n in CROSS_LENGTHS.items()}
    embeddings = torch.randn(batch, sequence, config.width, device=device)
    bert_mask = torch.ones(batch, sequence, dtype=torch.long, device=device)

    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

        def step_ours():
            with autocast:
                states = ours(inputs)["states"]
            states.float().pow(2).mean().backward()

        def step_bert():
            with autocast:
                states = bert(inputs_embeds=embeddings, attention_mask=bert_mask).last_hidden_state
            states.float().pow(2).mean().backward()

        key = f"cross_{name}_b{batch}_dropout{dropout:g}_{precision}"
        for arm, function in (("ours", step_ours), ("bert", step_bert)):
            with count_flops() as counter:
                function()
            bench.results[f"{key}_{arm}_gflop"] = counter.get_total_flops() / 1e9
        bench.compare(key, {"ours": step_ours, "bert": step_bert}, {"ours_speedup": ("bert", "ours")})
        seconds = bench.results[f"{key}_ours_s"]
        bench.results[f"{key}_ours_fraction_of_{precision}_matmul"] = (
            bench.results[f"{key}_ours_gflop"] * 1e9 / seconds / peaks[precision])
        bench.print_since(f"{key}_ours_fraction")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 5, smaller base batches")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="the cross-encoder comparison's dropout, both models")
    parser.add_argument("--parts", default="text,image,cross", help="comma-separated: text, image, cross")
    parser.add_argument("--out", help="also write the figures as JSON")
    args = parser.parse_args()
    device = torch.device(args.device)
    bench = Bench(device, rounds=3 if args.quick else 5)
    bench.results |= {"processor": processor_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
                      "torch_threads": torch.get_num_threads()}
    peaks = {"fp32": matmul_peak(torch.float32, device=device), "bf16": matmul_peak(torch.bfloat16, device=device)}
    bench.results |= {f"{precision}_matmul_gflops_per_s": peak / 1e9 for precision, peak in peaks.items()}
    bench.print_since("")
    parts = set(args.parts.split(","))
    if "text" in parts:
        for batch in (1, 16):
            bench_text_decoding(bench, batch)
    if "image" in parts:
        for name in ("tiny", "base"):
            bench_image_decoding(bench, name)
    if "cross" in parts:
        bench_cross_vs_bert(bench, "tiny", batch=32, dropout=args.dropout, peaks=peaks)
        bench_cross_vs_bert(bench, "base", batch=4 if args.quick else 8, dropout=args.dropout, peaks=peaks)
    bench.results["fp32_matmul_gflops_per_s_after"] = matmul_peak(torch.float32, device=device) / 1e9
    bench.print_since("fp32_matmul_gflops_per_s_after")  # shared machines drift: before and after
    if args.out:
        Path(args.out).write_text(json.dumps(bench.results, indent=2) + "\n")


if __name__ == "__main__":
    main()
