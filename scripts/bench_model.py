"""Model benchmarks, measured side by side in one run (CPU unless --device says otherwise).

    python scripts/bench_model.py [--quick] [--out bench_model.json]

1. Text decoding, 40 tokens, base text-decoder dims (6 x 1024 x 16 heads), batch 1 and 16:
   our KV cache vs recomputing the whole prefix every step (target >= 8x), and vs a
   transformers GPT-2 of the same sizes with cross-attention, ``generate`` with its own
   cache (target: ours faster).
2. Image decoding, tiny and base dims, batch 4: parallel MaskGIT (12 steps) vs
   autoregressive (64 steps), both with classifier-free guidance (target >= 5x).
3. Forward + backward of the tiny and base cross-modal encoder over a full
   [CLS] + text + image + audio sequence: samples/s and achieved FLOP/s as a fraction
   of this machine's fp32 matmul FLOP/s measured in the same run.
"""

from __future__ import annotations

import argparse
import json
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


def bench_text_decoding(batch: int, tokens: int, repeats: int, vocab: int = 30000) -> dict[str, float]:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = load_config(ROOT / "configs/base.yaml").model.text_decoder
    context_width = 768
    torch.manual_seed(0)
    decoder = TextDecoder(config, vocab_size=vocab, context_width=context_width).eval()
    context = torch.randn(batch, 180, context_width)
    mask = torch.ones(batch, 180, dtype=torch.bool)
    kwargs = dict(bos_id=1, eos_id=-1, max_length=tokens)  # eos never produced: exactly `tokens` tokens
    cached = timed(lambda: generate_text(decoder, context, mask, **kwargs), repeats)
    recomputed = timed(lambda: generate_text(decoder, context, mask, use_cache=False, **kwargs), repeats)
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

    transformers_time = timed(hf_generate, repeats)
    key = f"text_b{batch}"
    return {f"{key}_cached_s": cached, f"{key}_recompute_s": recomputed,
            f"{key}_transformers_gpt2_s": transformers_time, f"{key}_cache_speedup": recomputed / cached,
            f"{key}_vs_transformers_speedup": transformers_time / cached}


def bench_image_decoding(name: str, batch: int, repeats: int, steps: int = 12) -> dict[str, float]:
    config = load_config(ROOT / f"configs/{name}.yaml").model
    torch.manual_seed(0)
    decoder = ImageTokenDecoder(config.image_decoder, codebook_size=config.vq.codebook_size, codes=64,
                                context_width=config.cross.width).eval()
    context = torch.randn(batch, 120, config.cross.width)
    mask = torch.ones(batch, 120, dtype=torch.bool)
    parallel = timed(lambda: generate_image_codes_parallel(decoder, context, mask, steps=steps, guidance=3.0), repeats)
    autoregressive = timed(lambda: generate_image_codes_autoregressive(decoder, context, mask, guidance=3.0), repeats)
    key = f"image_{name}_b{batch}"
    return {f"{key}_parallel_{steps}_steps_s": parallel, f"{key}_autoregressive_64_steps_s": autoregressive,
            f"{key}_parallel_speedup": autoregressive / parallel}


def bench_cross_encoder(name: str, config: CrossModalConfig, batch: int, repeats: int, peak: float) -> dict:
    torch.manual_seed(0)
    encoder = CrossModalEncoder(config, image_tokens=64).train()
    lengths = {"text": 40, "image": 64, "audio": 75}
    inputs = {m: {"tokens": torch.randn(batch, n, config.width), "mask": torch.ones(batch, n, dtype=torch.bool)}
              for m, n in lengths.items()}

    def step():
        encoder(inputs)["states"].float().pow(2).mean().backward()

    with count_flops() as counter:
        step()
    flops = counter.get_total_flops()
    seconds = timed(step, repeats)
    return {f"cross_{name}_samples_per_s": batch / seconds, f"cross_{name}_gflops_per_s": flops / seconds / 1e9,
            f"cross_{name}_fraction_of_fp32_peak": flops / seconds / peak, f"cross_{name}_sequence": 1 + sum(lengths.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller batches")
    parser.add_argument("--out", help="also write the figures as JSON")
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    results: dict[str, float] = {"threads": torch.get_num_threads()}
    peak = matmul_peak()
    results["fp32_matmul_gflops_per_s"] = peak / 1e9
    for batch in (1, 16):
        results |= bench_text_decoding(batch=batch, tokens=40, repeats=repeats)
    for name in ("tiny", "base"):
        results |= bench_image_decoding(name, batch=4, repeats=repeats)
    tiny = load_config(ROOT / "configs/tiny.yaml").model.cross
    base = load_config(ROOT / "configs/base.yaml").model.cross
    results |= bench_cross_encoder("tiny", tiny, batch=32, repeats=repeats, peak=peak)
    results |= bench_cross_encoder("base", base, batch=4 if args.quick else 8, repeats=repeats, peak=peak)
    results["fp32_matmul_gflops_per_s_after"] = matmul_peak() / 1e9  # shared machines drift: report both
    width = max(map(len, results))
    for key, value in results.items():
        print(f"{key:<{width}}  {value:12.4g}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
