"""Training-step benchmark, measured side by side in one run (CPU, 2 threads here).

    python scripts/bench_train.py [--quick] [--out bench_train.json]

1. A full training step (all three encoders, the cross-modal encoder, both decoders,
   forward + backward + the trainer's AdamW, ``build_optimizer``: fused, decay groups)
   for the tiny and base configs in fp32: samples/s and
   achieved FLOP/s as a fraction of the fp32 matmul peak measured in the same run
   (target >= 40% for base). ``--bf16`` adds base under bf16 autocast against the
   measured bf16 matmul peak (on the 2-core CPU machine a 2048^2 bf16 matmul took
   about a minute in this torch build, so it is off by default).
2. Our cross-modal encoder vs a transformers ``BertModel`` encoder of the same size
   (12 layers, 768 wide, 12 heads, sequence 180): forward + backward step time.
3. The AdamW step alone on the tiny model's parameters: the fused implementation (the
   trainer's) against torch's per-tensor loop and its multi-tensor ``foreach`` path.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

from opt.benchmarking import matmul_peak, timed
from opt.config import load_config
from opt.engine.trainer import build_optimizer, parameter_groups
from opt.model.cross import CrossModalEncoder
from opt.model.opt_model import ModelSpec, OPTModel
from opt.model.summary import count_flops, dummy_batch, full_step_loss

ROOT = Path(__file__).resolve().parents[1]


def bench_step(name: str, batch_size: int, repeats: int, peak: float, dtype: torch.dtype | None = None) -> dict:
    torch.manual_seed(0)
    config = load_config(ROOT / f"configs/{name}.yaml")
    model = OPTModel(ModelSpec.from_config(config)).train()
    optimizer, _ = build_optimizer(model, config)
    batch = dummy_batch(model, batch_size)

    def step():
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = full_step_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with count_flops() as counter:
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = full_step_loss(model, batch)
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    seconds = timed(step, repeats)
    key = f"{name}_{'bf16' if dtype else 'fp32'}"
    flops = counter.get_total_flops()
    return {f"{key}_samples_per_s": batch_size / seconds, f"{key}_gflops_per_s": flops / seconds / 1e9,
            f"{key}_fraction_of_peak": flops / seconds / peak}


def bench_cross_vs_bert(batch: int, repeats: int) -> dict:
    config = load_config(ROOT / "configs/base.yaml").model.cross
    torch.manual_seed(0)
    ours = CrossModalEncoder(config, image_tokens=64).train()
    bert = BertModel(BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                                max_position_embeddings=512, attn_implementation="sdpa"),
                     add_pooling_layer=False).train()
    lengths = {"text": 40, "image": 64, "audio": 75}
    inputs = {m: {"tokens": torch.randn(batch, n, 768), "mask": torch.ones(batch, n, dtype=torch.bool)}
              for m, n in lengths.items()}
    embeds = torch.randn(batch, 1 + sum(lengths.values()), 768)
    mask = torch.ones(batch, embeds.shape[1], dtype=torch.long)
    ours_s = timed(lambda: ours(inputs)["states"].pow(2).mean().backward(), repeats)
    bert_s = timed(lambda: bert(inputs_embeds=embeds, attention_mask=mask).last_hidden_state.pow(2).mean().backward(),
                   repeats)
    return {"cross_base_step_s": ours_s, "bert_base_step_s": bert_s, "cross_vs_bert_speedup": bert_s / ours_s}


def bench_optimizer_step(repeats: int) -> dict[str, float]:
    """Milliseconds of one AdamW step over the tiny model's parameters, three implementations."""
    config = load_config(ROOT / "configs/tiny.yaml")
    torch.manual_seed(0)
    model = OPTModel(ModelSpec.from_config(config)).train()
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter) if parameter.requires_grad else None
    figures = {}
    for label, options in (("fused", {"fused": True}), ("foreach", {"foreach": True}), ("loop", {"foreach": False})):
        optimizer = torch.optim.AdamW(parameter_groups(model, config.train.weight_decay), lr=1e-4, **options)
        figures[f"tiny_adamw_{label}_ms"] = 1e3 * timed(optimizer.step, max(repeats, 5))
    figures["tiny_adamw_fused_vs_loop_speedup"] = figures["tiny_adamw_loop_ms"] / figures["tiny_adamw_fused_ms"]
    return figures


def bench_bf16(enabled: bool, repeats: int) -> dict[str, float]:
    if not enabled:
        return {}
    peak = matmul_peak(torch.bfloat16)
    return {"bf16_matmul_gflops_per_s": peak / 1e9} | bench_step("base", 2, repeats, peak, dtype=torch.bfloat16)


def report(figures: dict[str, float]) -> None:
    for key, value in figures.items():
        print(f"{key:<40}  {value:12.4g}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one timed repeat")
    parser.add_argument("--bf16", action="store_true", help="also time base under bf16 autocast")
    parser.add_argument("--out", help="also write the figures as JSON")
    args = parser.parse_args()
    repeats = 1 if args.quick else 2
    fp32_peak = matmul_peak(torch.float32)
    results = {"threads": torch.get_num_threads(), "fp32_matmul_gflops_per_s": fp32_peak / 1e9}
    report(results)
    for measured in (lambda: bench_cross_vs_bert(8, repeats),
                     lambda: bench_step("tiny", 32, repeats, fp32_peak),
                     lambda: bench_step("base", 2, repeats, fp32_peak),
                     lambda: bench_optimizer_step(repeats),
                     lambda: bench_bf16(args.bf16, repeats),
                     lambda: {"fp32_matmul_gflops_per_s_after": matmul_peak(torch.float32) / 1e9}):
        figures = measured()
        report(figures)
        results |= figures
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
