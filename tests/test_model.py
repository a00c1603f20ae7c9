"""The OPT model: shapes for every modality subset, padding invariance, KV cache,
decoding, image generation, save/load and seeding."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from opt.config import VisionConfig, load_config
from opt.data.pipeline import BatchLoader
from opt.model.encoders import VisionEncoder, conv_stem, pool
from opt.model.generation import (
    beam_search,
    filter_logits,
    generate_image_codes_autoregressive,
    generate_image_codes_parallel,
    sample_categorical,
    generate_text,
)
from opt.model.layers import Attention, attention_mask, distance_bias, with_bias
from opt.model.opt_model import ModelSpec, OPTModel
from opt.model.summary import count_flops, dummy_batch, parameter_counts, training_step_flops
from opt.tasks.mixture import TaskMixture

ROOT = Path(__file__).resolve().parents[1]

SMALL = ["model.cross.width=64", "model.cross.layers=1", "model.vision.width=64", "model.vision.layers=1",
         "model.text.width=64", "model.text.layers=1", "model.audio.width=64", "model.audio.layers=1",
         "model.text_decoder.width=64", "model.text_decoder.layers=2", "model.image_decoder.width=64",
         "model.image_decoder.layers=1", "model.towers.dim=32", "model.vq.quantizer=vq", "model.vq.codebook_size=64",
         "model.vq.channels=16", "model.vq.res_blocks=0", "data.batch_size=6", "data.workers=0",
         "tasks.phases=[]"]  # tests of a few steps run the whole mixture from step 0


def small_model(tokenizer, *overrides, seed=0):
    config = load_config("configs/tiny.yaml", SMALL + list(overrides))
    torch.manual_seed(seed)
    return OPTModel(ModelSpec.from_config(config, tokenizer)).eval(), config


@pytest.fixture(scope="module")
def model_and_batch(world, tokenizer):
    model, config = small_model(tokenizer)
    batch = next(iter(BatchLoader(f"{world}/val-*.tar", config.data, config.audio, tokenizer, train=False)))
    return model, batch


SUBSETS = [s for r in (1, 2, 3) for s in itertools.combinations(("text", "image", "audio"), r)]


@pytest.mark.parametrize("subset", SUBSETS, ids="+".join)
def test_every_modality_subset_fuses_with_the_right_shapes(model_and_batch, subset):
    model, batch = model_and_batch
    with torch.no_grad():
        unimodal = model.encode_unimodal(batch, modalities=subset)
        fused = model.fuse(unimodal, subset)
    b = len(batch["keys"])
    lengths = {m: unimodal[m]["tokens"].shape[1] for m in subset}
    assert fused["states"].shape == (b, 1 + sum(lengths.values()), 64)
    assert fused["cls"].shape == (b, 64) and fused["mask"].shape == fused["states"].shape[:2]
    assert list(fused["spans"]) == list(subset)
    assert all(end - start == lengths[m] for m, (start, end) in fused["spans"].items())
    assert lengths.get("image", 64) == 64
    assert torch.isfinite(fused["states"]).all()
    towers = model.tower_embeddings(unimodal)
    assert all(t.shape == (b, 32) and torch.allclose(t.norm(dim=-1), torch.ones(b)) for t in towers.values())


def _pad(batch, text_extra, frame_extra):
    padded = {k: (dict(v) if isinstance(v, dict) else v) for k, v in batch.items()}
    ids, mask = batch["text"]["ids"], batch["text"]["mask"]
    padded["text"]["ids"] = torch.cat([ids, torch.zeros(ids.shape[0], text_extra, dtype=ids.dtype)], 1)
    padded["text"]["mask"] = torch.cat([mask, torch.zeros(ids.shape[0], text_extra, dtype=torch.bool)], 1)
    features, frames = batch["audio"]["features"], batch["audio"]["mask"]
    padded["audio"]["features"] = torch.cat([features, torch.randn(features.shape[0], frame_extra, features.shape[2])], 1)
    padded["audio"]["mask"] = torch.cat([frames, torch.zeros(frames.shape[0], frame_extra, dtype=torch.bool)], 1)
    return padded


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_both_vision_stems_make_the_vq_grid_of_tokens(stem):
    torch.manual_seed(0)
    encoder = VisionEncoder(VisionConfig(patch_size=8, layers=1, width=48, heads=4, stem=stem,
                                         coord_channels=stem == "conv"),
                            image_size=64, out_width=32).eval()
    pixels = torch.rand(2, 3, 64, 64)
    changed = pixels.clone()
    changed[:, :, 32:, 32:] = torch.rand(2, 3, 32, 32)  # the lower-right quadrant only
    with torch.no_grad():
        out = encoder(pixels)
        before, after = (encoder.vit.patch_embed(x).reshape(2, 8, 8, -1) for x in (pixels, changed))  # row-major
    assert out["tokens"].shape == (2, 64, 32) and out["pooled"].shape == (2, 48)
    assert not torch.allclose(before[:, 4:, 4:], after[:, 4:, 4:])
    # a patch token sees its own 8 x 8 cell only; a conv token sees past its cell (three 3x3
    # convolutions at stride 2 reach 15 px, and GroupNorm's statistics span the image), so the
    # cell just above-left of the change notices it
    assert torch.equal(before[:, 3, 3], after[:, 3, 3]) == (stem == "patch")
    if stem == "patch":
        assert torch.equal(before[:, :4], after[:, :4]) and torch.equal(before[:, :, :4], after[:, :, :4])


@pytest.mark.parametrize("coord_channels", [False, True])
def test_only_coordinate_channels_let_a_mean_over_the_stem_tell_where_an_object_is(coord_channels):
    """A convolution is blind to where its input is: an object moved by a multiple of the
    stride (and kept away from the borders) gives the same features, moved, so their mean over
    the grid (what a uniform attention reads) is the same. With coordinate channels it is not."""
    torch.manual_seed(0)
    stem = conv_stem(8, 32, coord_channels=coord_channels, depth=2)
    red = torch.tensor([0.9, 0.2, 0.2])[:, None, None]
    left, right = torch.zeros(2, 1, 3, 128, 128)  # 128 px: the stem reaches 27 px, the borders stay out of it
    left[0, :, 56:68, 40:52] = red
    right[0, :, 56:68, 56:68] = red  # the same square, 16 px (two tokens) to the right
    with torch.no_grad():
        features = [stem(x) for x in (left, right)]
    assert features[0].shape == (1, 32, 16, 16)
    if not coord_channels:
        torch.testing.assert_close(features[0][..., 3:8], features[1][..., 5:10])
    means = [f.mean(dim=(2, 3)) for f in features]
    assert torch.allclose(means[0], means[1], atol=1e-5) == (not coord_channels)


def test_pooled_context_gives_a_uniform_reader_a_small_object_whole():
    """Two images that differ in one small object: a mean over the tokens (what attention that
    is still uniform reads) tells them apart several times more clearly with the pooled context,
    whose max is the object's own features; the pooled vector the towers use is unchanged."""
    torch.manual_seed(0)
    config = VisionConfig(patch_size=8, layers=1, width=48, heads=4, stem="conv", pool="max", pooled_context=True)
    encoder = VisionEncoder(config, image_size=64, out_width=32).eval()
    images = torch.full((2, 3, 64, 64), 0.15)
    images[0, :, 20:30, 36:46] = torch.tensor([0.9, 0.2, 0.2])[:, None, None]  # a small red square
    images[1, :, 20:30, 36:46] = torch.tensor([0.2, 0.4, 0.9])[:, None, None]  # the same in blue
    with torch.no_grad():
        with_context = encoder(images)
        context, encoder.context = encoder.context, None
        without = encoder(images)
        encoder.context = context
    torch.testing.assert_close(with_context["pooled"], without["pooled"])
    gaps = [(out["tokens"].mean(1)[0] - out["tokens"].mean(1)[1]).norm() for out in (with_context, without)]
    assert gaps[0] > 3 * gaps[1]  # 5.5x at this seed; 2.4-6x over seeds 0-5


def test_padding_never_changes_real_positions(model_and_batch):
    model, batch = model_and_batch
    with torch.no_grad():
        reference = model.fuse(model.encode_unimodal(batch))
        padded = model.fuse(model.encode_unimodal(_pad(batch, text_extra=7, frame_extra=40)))
    torch.testing.assert_close(padded["cls"], reference["cls"], atol=1e-5, rtol=1e-4)
    for modality, (start, end) in reference["spans"].items():
        new_start = padded["spans"][modality][0]
        keep = reference["mask"][:, start:end]
        torch.testing.assert_close(padded["states"][:, new_start:new_start + end - start][keep],
                                   reference["states"][:, start:end][keep], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("how", ["mean", "max"])
def test_pooling_reads_only_real_positions(how):
    x = torch.randn(3, 6, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6, [0] * 6], dtype=torch.bool)
    changed = x.clone()
    changed[0, 3:] = 50.0  # padded positions of sample 0
    with torch.no_grad():
        reference, result = pool(x, mask, how), pool(changed, mask, how)
    assert reference.shape == (3, 16)
    torch.testing.assert_close(result, reference)
    assert torch.count_nonzero(reference[2]) == 0  # no real position: zeros


def test_absent_modality_in_one_sample_does_not_touch_the_others(model_and_batch):
    model, batch = model_and_batch
    changed = {k: (dict(v) if isinstance(v, dict) else v) for k, v in batch.items()}
    present = batch["audio"]["present"].clone()
    present[0] = False
    changed["audio"]["present"] = present
    with torch.no_grad():
        reference = model.fuse(model.encode_unimodal(batch))["cls"]
        result = model.fuse(model.encode_unimodal(changed))["cls"]
    torch.testing.assert_close(result[1:], reference[1:])
    assert not torch.allclose(result[0], reference[0])


def assert_cached_steps_match_a_full_pass(model, batch):
    with torch.no_grad():
        fused = model.fuse(model.encode_unimodal(batch))
        ids = batch["text"]["ids"][:, :12]
        full = model.text_decoder(ids, fused["states"], fused["mask"])
        cache = model.text_decoder.new_cache()
        stepped = torch.cat([model.text_decoder(ids[:, i:i + 1], fused["states"], fused["mask"], cache=cache)
                             for i in range(ids.shape[1])], dim=1)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-4)


def test_kv_cache_logits_match_full_recompute(model_and_batch):
    assert_cached_steps_match_a_full_pass(*model_and_batch)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_qk_norm_makes_attention_independent_of_the_query_and_key_weights_scale(qk_norm):
    torch.manual_seed(0)
    attention = Attention(width=32, heads=4, context_width=24, qk_norm=qk_norm)
    x, context = torch.randn(2, 5, 32), torch.randn(2, 7, 24)
    with torch.no_grad():
        before = attention(x, context=context)
        attention.query.weight.mul_(10)
        attention.query.bias.mul_(10)
        attention.key_value.weight[:32].mul_(10)  # the keys' half; values unchanged
        attention.key_value.bias[:32].mul_(10)
        after = attention(x, context=context)
    assert torch.allclose(after, before, atol=1e-4) == qk_norm


def test_qk_norm_keys_have_no_bias_and_older_models_key_biases_load_without_effect():
    """A key bias shifts all of a query's logits alike: the softmax removes it, so it is not a
    parameter, and a model saved with one loads and computes the same."""
    torch.manual_seed(0)
    attention = Attention(width=32, heads=4, context_width=24, qk_norm=True)
    assert attention.key_norm.bias is None and attention.query_norm.bias is not None
    x, context = torch.randn(2, 5, 32), torch.randn(2, 7, 24)
    older = attention.state_dict() | {"key_norm.bias": torch.randn(8)}
    loaded = Attention(width=32, heads=4, context_width=24, qk_norm=True)
    loaded.load_state_dict(older)  # strict: the old key is dropped, nothing else is missing
    with torch.no_grad():
        biased = torch.nn.LayerNorm(8)
        biased.weight.copy_(attention.key_norm.weight)
        biased.bias.copy_(older["key_norm.bias"])
        expected = attention(x, context=context)
        assert torch.allclose(loaded(x, context=context), expected, atol=1e-6)
        attention.key_norm = biased
        assert torch.allclose(attention(x, context=context), expected, atol=1e-5)


@pytest.mark.parametrize("scope, parts", [
    ("none", set()), ("cross", {"text_decoder", "image_decoder"}),
    ("fusion", {"cross", "text_decoder", "image_decoder"}), ("all", {"encoders", "cross", "text_decoder", "image_decoder"})])
def test_qk_norm_scope_picks_the_attention_layers(tokenizer, scope, parts):
    model, _ = small_model(tokenizer, f"model.qk_norm={scope}")
    normalised = [name for name, module in model.named_modules()
                  if name.endswith(("query_norm", "q_norm")) and isinstance(module, torch.nn.LayerNorm)]
    assert {name.split(".")[0] for name in normalised} == parts
    decoders = [name for name in normalised if name.endswith("decoder") or "decoder." in name]
    # below "all" the decoders' self-attention stays plain: only their cross-attention reads the fused states
    assert all(".cross." in name for name in decoders) == (scope != "all")


def test_kv_cache_matches_full_recompute_with_qk_norm(world, tokenizer):
    """Keys are normalised before they are cached, so cached steps still equal a full pass."""
    model, config = small_model(tokenizer, "model.qk_norm=all")
    loader = BatchLoader(f"{world}/val-*.tar", config.data, config.audio, tokenizer, train=False)
    assert_cached_steps_match_a_full_pass(model, next(iter(loader)))


def test_cached_and_uncached_greedy_decoding_agree(model_and_batch, tokenizer):
    model, batch = model_and_batch
    fused = model.fuse(model.encode_unimodal(batch, modalities=("image",)), ("image",))
    kwargs = dict(bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, max_length=16)
    cached = generate_text(model.text_decoder, fused["states"], fused["mask"], **kwargs)
    uncached = generate_text(model.text_decoder, fused["states"], fused["mask"], use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("mode", ["greedy", "top_k", "top_p", "beam"])
def test_decoding_respects_max_length_and_eos(model_and_batch, tokenizer, mode):
    model, batch = model_and_batch
    fused = model.fuse(model.encode_unimodal(batch))
    context = (model.text_decoder, fused["states"], fused["mask"])
    kwargs = dict(bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, max_length=10)
    generator = torch.Generator().manual_seed(0)
    if mode == "beam":
        ids = beam_search(*context, beam_size=3, **kwargs)
    else:
        ids = generate_text(*context, sample=mode != "greedy", top_k=5 if mode == "top_k" else 0,
                            top_p=0.8 if mode == "top_p" else 1.0, generator=generator, **kwargs)
    assert ids.shape[0] == len(batch["keys"]) and ids.shape[1] <= 10
    assert (ids[:, 0] == tokenizer.bos_id).all()
    for row in ids.tolist():
        if tokenizer.eos_id in row:
            after = row[row.index(tokenizer.eos_id):]
            assert set(after) == {tokenizer.eos_id}


def test_beam_search_finds_a_sequence_at_least_as_likely_as_greedy(model_and_batch, tokenizer):
    model, batch = model_and_batch
    fused = model.fuse(model.encode_unimodal(batch))
    kwargs = dict(bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, max_length=8)
    greedy = generate_text(model.text_decoder, fused["states"], fused["mask"], **kwargs)
    beam = beam_search(model.text_decoder, fused["states"], fused["mask"], beam_size=4, length_penalty=0.0, **kwargs)

    def log_prob(ids):
        logits = model.text_decoder(ids[:, :-1], fused["states"], fused["mask"]).log_softmax(-1)
        token = logits.gather(-1, ids[:, 1:, None]).squeeze(-1)
        alive = torch.ones_like(token, dtype=torch.bool)
        alive[:, 1:] = ids[:, 1:-1] != tokenizer.eos_id  # nothing after the first eos counts
        return (token * alive).sum(1)

    with torch.no_grad():
        assert (log_prob(beam) >= log_prob(greedy) - 1e-4).all()


def test_filter_logits_keeps_top_k_and_the_nucleus():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isfinite(filter_logits(logits, top_k=2)).sum() == 2
    probabilities = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, ...
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))[0]
    assert kept.tolist() == [True, True, False, False, False] and probabilities[0] < 0.7


def test_sample_categorical_draws_each_index_at_its_probability_and_never_a_zero_one():
    probabilities = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    draws = sample_categorical(probabilities.expand(40000, -1), torch.Generator().manual_seed(0))
    frequencies = torch.bincount(draws, minlength=6) / len(draws)
    assert frequencies[probabilities == 0].sum() == 0
    # binomial standard error at n = 40,000 is at most 0.0025: 4 of them
    torch.testing.assert_close(frequencies, probabilities, atol=0.01, rtol=0)
    first = sample_categorical(probabilities.expand(8, -1), torch.Generator().manual_seed(3))
    assert torch.equal(first, sample_categorical(probabilities.expand(8, -1), torch.Generator().manual_seed(3)))


def test_selected_positions_get_the_logits_of_the_full_forward(model_and_batch):
    model, batch = model_and_batch
    fused = model.fuse(model.encode_unimodal(batch, modalities=("text",)), ("text",))
    decoder = model.image_decoder.eval()
    tokens = torch.randint(0, 64, (len(batch["keys"]), 64))
    tokens[:, ::3] = decoder.mask_id
    select = (tokens == decoder.mask_id).nonzero()[:, 1].reshape(len(tokens), -1)
    with torch.no_grad():
        full = decoder(tokens, fused["states"], fused["mask"], causal=False)
        chosen = decoder(tokens, fused["states"], fused["mask"], causal=False, select=select)
    assert chosen.shape == (len(tokens), 22, full.shape[-1])
    torch.testing.assert_close(chosen, full.gather(1, select[..., None].expand(-1, -1, full.shape[-1])))


@pytest.mark.parametrize("decoding", ["parallel", "autoregressive"])
def test_image_decoding_returns_valid_codes_and_images(model_and_batch, decoding):
    model, batch = model_and_batch
    fused = model.fuse(model.encode_unimodal(batch, modalities=("text",)), ("text",))
    generator = torch.Generator().manual_seed(0)
    if decoding == "parallel":
        codes = generate_image_codes_parallel(model.image_decoder, fused["states"], fused["mask"], steps=6,
                                              guidance=2.0, generator=generator)
    else:
        codes = generate_image_codes_autoregressive(model.image_decoder, fused["states"], fused["mask"],
                                                    guidance=2.0, generator=generator)
    assert codes.shape == (len(batch["keys"]), 64) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 64  # no [MASK] or [BOS] left
    images = model.decode_image_codes(codes)
    assert images.shape == (len(batch["keys"]), 3, 64, 64) and 0 <= images.min() and images.max() <= 1


def test_save_and_load_give_identical_outputs(model_and_batch, tokenizer, tmp_path):
    model, batch = model_and_batch
    model.save_pretrained(tmp_path / "model", tokenizer=tokenizer)
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["README.md", "config.json",
                                                                      "model.safetensors", "tokenizer.model", "vq"]
    loaded = OPTModel.from_pretrained(tmp_path / "model")
    with torch.no_grad():
        a = model.fuse(model.encode_unimodal(batch))
        b = loaded.fuse(loaded.encode_unimodal(batch))
        torch.testing.assert_close(b["states"], a["states"], atol=0, rtol=0)
        codes = torch.randint(0, 64, (2, 64))
        torch.testing.assert_close(loaded.decode_image_codes(codes), model.decode_image_codes(codes), atol=0, rtol=0)
    assert loaded.spec == model.spec


def test_same_seed_same_model_other_seed_other_model(tokenizer):
    a, _ = small_model(tokenizer, seed=1)
    b, _ = small_model(tokenizer, seed=1)
    c, _ = small_model(tokenizer, seed=2)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_summary_counts_parameters(tokenizer):
    model, _ = small_model(tokenizer)
    counts = parameter_counts(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters()) + counts["vq (frozen)"]
    assert counts["trainable"] == counts["total"] - counts["vq (frozen)"]
    assert sum(v for k, v in counts.items() if k not in ("total", "trainable")) == counts["total"]


def transformer_flops(tokens: int, width: int, layers: int, ratio: int, *, context: int = 0,
                      context_width: int = 0) -> int:
    """Analytic matmul FLOPs of one forward pass of pre-LN blocks over ``tokens`` tokens (2 per
    multiply-add): the projections and the MLP, self-attention's two products, and with a
    ``context`` of that many tokens cross-attention's query, output, key-value and two products."""
    self_attention = 2 * tokens * 4 * width * width + 4 * tokens * tokens * width
    mlp = 2 * tokens * 2 * ratio * width * width
    cross = (2 * tokens * 2 * width * width + 2 * context * context_width * 2 * width
             + 4 * tokens * context * width) if context else 0
    return layers * (self_attention + mlp + cross)


def test_flop_counts_match_an_analytic_count_of_the_fusion_and_the_text_decoder(tokenizer):
    model, config = small_model(tokenizer, "model.cross.layers=2")
    batch, width, ratio = 3, config.model.cross.width, config.model.mlp_ratio
    lengths = {"text": 12, "image": 64, "audio": 30}
    inputs = {m: {"tokens": torch.randn(batch, n, width, requires_grad=True),
                  "mask": torch.ones(batch, n, dtype=torch.bool)} for m, n in lengths.items()}
    with count_flops() as counter:
        fused = model.cross(inputs)
        fused["states"].sum().backward()
    sequence = 1 + sum(lengths.values())  # [CLS] + every modality's tokens
    expected = 3 * batch * transformer_flops(sequence, width, 2, ratio)  # backward: twice the forward
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.1)

    decoder, text = model.text_decoder, config.model.text_decoder
    ids = torch.randint(7, model.spec.vocab_size, (batch, 20))
    context = fused["states"].detach().requires_grad_(True)
    with count_flops() as counter:
        decoder.teacher_forced(ids, context, fused["mask"]).sum().backward()
    steps = ids.shape[1] - 1
    forward = (transformer_flops(steps, text.width, text.layers, ratio, context=sequence, context_width=width)
               + 2 * steps * text.width * model.spec.vocab_size)  # the tied output head
    assert counter.get_total_flops() == pytest.approx(3 * batch * forward, rel=0.1)


def test_training_step_flops_exceed_the_fusion_forward_and_backward_alone(tokenizer):
    model, config = small_model(tokenizer)
    fused_text_and_image = 1 + model.spec.max_text_tokens + model.spec.image_codes  # audio frames come on top
    fusion = 3 * transformer_flops(fused_text_and_image, config.model.cross.width, config.model.cross.layers,
                                   config.model.mlp_ratio)
    assert training_step_flops(model) > 2 * fusion  # the encoders and both decoders cost more than the fusion
    assert not model.vq.quantizer.training


def test_base_and_large_build_on_the_meta_device_with_the_readmes_parameter_counts():
    readme = (ROOT / "README.md").read_text()
    for name in ("base", "large"):
        config = load_config(ROOT / "configs" / f"{name}.yaml")
        with torch.device("meta"):
            model = OPTModel(ModelSpec.from_config(config))
        counts = parameter_counts(model)
        assert all(p.is_meta for p in model.parameters())
        row = f"| `{name}` | {counts['trainable'] / 1e6:,.1f} M | {counts['vq (frozen)'] / 1e6:,.1f} M |"
        assert row in readme, f"README's model table lacks {row!r}"


def test_wav2vec2_front_encodes_raw_waveforms(tokenizer):
    model, _ = small_model(tokenizer, "model.audio.front=wav2vec2_conv", "audio.input=waveform")
    batch = dummy_batch(model, 2)
    out = model.encode_unimodal(batch, modalities=("audio",))["audio"]
    assert out["tokens"].shape[1] == out["mask"].shape[1] == min(6 * 16000 // 320 - 1, 256)


def test_audio_positions_start_smaller_than_the_front_ends_frames(model_and_batch):
    """Positions drawn N(0, 1) were ~35x the frames' norm and drowned them (audio learned far slower)."""
    model, batch = model_and_batch
    audio = model.encoders["audio"]
    frames, mask = audio.front(batch["audio"]["features"], batch["audio"]["mask"])
    frame_norm = frames[mask].norm(dim=-1).mean()
    position_norm = audio.positions.weight.norm(dim=-1).mean()
    assert position_norm < 2 * frame_norm


@pytest.mark.parametrize("grid", [True, False])
def test_image_decoder_grid_positions_start_as_a_smooth_2d_map_at_the_code_embeddings_scale(tokenizer, grid):
    model, _ = small_model(tokenizer, f"model.image_decoder.grid_positions={str(grid).lower()}")
    decoder = model.image_decoder
    positions = F.normalize(decoder.positions.weight.detach(), dim=-1).reshape(8, 8, -1)  # (row, column, d)
    assert float(decoder.positions.weight.std()) == pytest.approx(float(decoder.embed.weight.std()), rel=0.1)
    right = (positions[:, :-1] * positions[:, 1:]).sum(-1)  # cosine of each cell with its right neighbour
    below = (positions[:-1] * positions[1:]).sum(-1)
    far = (positions[:, :2] * positions[:, -2:]).sum(-1)  # cells six columns apart
    if grid:  # neighbours alike in both directions, far cells not
        assert right.min() > 0.7 and below.min() > 0.7 and far.max() < 0.45
    else:  # random: no cell is like its neighbours
        assert right.abs().max() < 0.5 and below.abs().max() < 0.5


def test_distance_bias_is_alibi_and_keeps_padded_keys_out():
    bias = distance_bias(5, 4)
    assert bias.shape == (1, 4, 5, 5)
    slopes = torch.tensor([2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8])
    torch.testing.assert_close(bias[0, :, 1, 4], -3 * slopes)  # three frames apart
    assert (bias.diagonal(dim1=-2, dim2=-1) == 0).all() and torch.equal(bias, bias.transpose(-1, -2))
    keys = torch.tensor([[True, True, True, False, False]])
    additive = with_bias(attention_mask(keys, 5), bias, torch.float32)
    assert additive.shape == (1, 4, 5, 5)
    assert additive[..., 3:].eq(float("-inf")).all() and additive[..., :3].isfinite().all()


@pytest.mark.parametrize("patch_size", [4, 8, 16])
def test_patch_codes_are_the_vq_cells_each_patch_covers(tokenizer, patch_size):
    model, _ = small_model(tokenizer, f"model.vision.patch_size={patch_size}")
    codes = torch.arange(2 * 64).reshape(2, 64)  # an 8 x 8 code grid per image, every code distinct
    per_patch = model.patch_codes(codes)
    patches_per_side = 64 // patch_size
    assert per_patch.shape == (2, patches_per_side ** 2, max(1, patch_size // 8) ** 2)
    grid = codes.view(2, 8, 8)
    for row, column in [(0, 0), (1, 0), (patches_per_side - 1, patches_per_side - 2)]:
        top, left = row * patch_size // 8, column * patch_size // 8  # the first VQ cell under the patch
        cells = max(1, patch_size // 8)
        expected = grid[:, top:top + cells, left:left + cells].reshape(2, -1)
        assert torch.equal(per_patch[:, row * patches_per_side + column], expected)


def test_masked_vision_modelling_trains_with_16_pixel_patches(tokenizer, world):
    model, config = small_model(tokenizer, "model.vision.patch_size=16", "model.vision.stem=conv")
    loader = BatchLoader(f"{world}/val-*.tar", config.data, config.audio, tokenizer, train=False)
    batch = next(iter(loader))
    mixture = TaskMixture(config, model.train())
    output = mixture.task("mvm")(model, batch, mixture.generators)
    assert torch.isfinite(output.loss) and model.encoders["image"].patches == 16
    output.loss.backward()
    assert model.heads["mvm"][-1].weight.grad.abs().sum() > 0 and model.heads["mvm"][-1].out_features == 4 * 64
