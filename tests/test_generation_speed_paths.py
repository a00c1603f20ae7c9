"""The fast paths of decoding compute what the plain ones do: preallocated KV caches, the fused
self-attention projection (and loading models saved before it), single-query attention,
unmasked attention without padding, logits of chosen positions only, inverse-CDF sampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from opt.config import ImageDecoderConfig
from opt.model.decoders import ImageTokenDecoder
from opt.model.generation import generate_image_codes_autoregressive, sample_categorical
from opt.model.layers import KVCache, SelfAttention, Transformer, key_padding_mask, single_query_attention
from opt.model.opt_model import OPTModel
from tests.test_model import model_and_batch  # noqa: F401 (a fixture)


def _old_layout(state: dict) -> dict:
    """A state dict as models saved before the fused projection: self-attention ``query`` and
    ``key_value`` in place of ``qkv``."""
    old = {}
    for name, tensor in state.items():
        if ".attention.qkv." in name:
            width = tensor.shape[0] // 3
            old[name.replace(".qkv.", ".query.")] = tensor[:width].clone()
            old[name.replace(".qkv.", ".key_value.")] = tensor[width:].clone()
        else:
            old[name] = tensor
    return old


def test_models_saved_with_separate_query_and_key_value_load_into_the_fused_projection(
        model_and_batch, tokenizer, tmp_path):
    from safetensors.torch import load_file, save_file

    model, batch = model_and_batch
    directory = model.save_pretrained(tmp_path / "model", tokenizer=tokenizer)
    saved = load_file(directory / "model.safetensors")
    old = _old_layout(saved)
    assert any(".attention.query." in name for name in old) and not any(".attention.qkv." in name for name in old)
    save_file(old, directory / "model.safetensors")
    loaded = OPTModel.from_pretrained(directory)  # strict: every old tensor finds its place
    with torch.no_grad():
        fused = model.fuse(model.encode_unimodal(batch))
        torch.testing.assert_close(loaded.fuse(loaded.encode_unimodal(batch))["states"], fused["states"],
                                   atol=0, rtol=0)
        ids = batch["text"]["ids"][:, :8]
        torch.testing.assert_close(loaded.text_decoder(ids, fused["states"], fused["mask"]),
                                   model.text_decoder(ids, fused["states"], fused["mask"]), atol=0, rtol=0)


def test_fused_projection_equals_separate_query_key_value_projections():
    torch.manual_seed(0)
    attention = SelfAttention(width=32, heads=4, qk_norm=True).eval()
    query, key_value = torch.nn.Linear(32, 32), torch.nn.Linear(32, 96 - 32)
    with torch.no_grad():
        query.weight.copy_(attention.qkv.weight[:32]), query.bias.copy_(attention.qkv.bias[:32])
        key_value.weight.copy_(attention.qkv.weight[32:]), key_value.bias.copy_(attention.qkv.bias[32:])
        x = torch.randn(2, 5, 32)
        q = attention.query_norm(query(x).unflatten(-1, (4, 8))).transpose(1, 2)
        k, v = key_value(x).chunk(2, dim=-1)
        k = attention.key_norm(k.unflatten(-1, (4, 8))).transpose(1, 2)
        v = v.unflatten(-1, (4, 8)).transpose(1, 2)
        expected = attention.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        torch.testing.assert_close(attention(x), expected, atol=1e-6, rtol=1e-5)


def test_kv_cache_writes_in_place_grows_past_its_capacity_and_reorders():
    cache = KVCache(capacity=3)
    steps = [torch.randn(2, 4, 1, 8) for _ in range(5)]
    for step in steps:
        keys, values = cache.append(step, 2 * step)
    assert cache.length == 5 and cache.keys.shape == (2, 4, 5, 8)
    torch.testing.assert_close(cache.keys, torch.cat(steps, dim=2), atol=0, rtol=0)
    torch.testing.assert_close(cache.values, 2 * torch.cat(steps, dim=2), atol=0, rtol=0)
    cache.reorder(torch.tensor([1, 1]))
    torch.testing.assert_close(cache.keys[0], torch.cat(steps, dim=2)[1], atol=0, rtol=0)
    context = KVCache()  # cross-attention: the context's keys are kept as they are
    keys = torch.randn(2, 4, 7, 8)
    assert context.append(keys, keys)[0] is keys and context.length == 7


def test_single_query_attention_and_unmasked_attention_equal_sdpa():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 1, 8), torch.randn(3, 4, 9, 8), torch.randn(3, 4, 9, 8)
    real = torch.rand(3, 9) > 0.3
    real[:, 0] = True
    mask = real[:, None, None, :]
    torch.testing.assert_close(single_query_attention(q, k, v, mask),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-6, rtol=1e-5)
    assert key_padding_mask(torch.ones(3, 9, dtype=torch.bool)) is None
    assert torch.equal(key_padding_mask(real), mask)


def test_cached_image_decoding_steps_match_a_full_causal_pass_with_guidance():
    torch.manual_seed(0)
    decoder = ImageTokenDecoder(ImageDecoderConfig(layers=2, width=32, heads=4), codebook_size=16, codes=9,
                                context_width=24).eval()
    with torch.no_grad():
        decoder.null_context.normal_()
        context, mask = decoder.guided_context(torch.randn(2, 5, 24), torch.tensor([[1, 1, 1, 0, 0]] * 2).bool())
        tokens = torch.randint(0, 16, (4, 9))
        full = decoder(tokens, context, mask, causal=True)
        cache = decoder.new_cache()
        stepped = torch.cat([decoder(tokens[:, i:i + 1], context, mask, causal=True, cache=cache)
                             for i in range(9)], dim=1)
        torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-4)
        at = torch.tensor([[0, 4, 8]] * 4)
        torch.testing.assert_close(decoder(tokens, context, mask, causal=False, at=at),
                                   decoder(tokens, context, mask, causal=False)[:, [0, 4, 8]], atol=1e-6, rtol=1e-5)


def test_guided_context_is_the_condition_then_the_null_context_as_condition_dropout_builds_it():
    torch.manual_seed(0)
    decoder = ImageTokenDecoder(ImageDecoderConfig(layers=1, width=32, heads=4), codebook_size=16, codes=9,
                                context_width=24).eval()
    context, mask = torch.randn(2, 5, 24), torch.ones(2, 5, dtype=torch.bool)
    tokens = torch.randint(0, 16, (2, 9))
    guided, guided_mask = decoder.guided_context(context, mask)
    with torch.no_grad():
        expected = decoder(tokens.repeat(2, 1), torch.cat([context, context]), torch.cat([mask, mask]), causal=True,
                           drop_condition=torch.tensor([False, False, True, True]))
        torch.testing.assert_close(decoder(tokens.repeat(2, 1), guided, guided_mask, causal=True), expected,
                                   atol=0, rtol=0)
    assert guided_mask[2:].sum(1).tolist() == [1, 1]


def test_greedy_autoregressive_image_decoding_is_the_argmax_of_a_full_recompute():
    torch.manual_seed(0)
    decoder = ImageTokenDecoder(ImageDecoderConfig(layers=2, width=32, heads=4), codebook_size=16, codes=9,
                                context_width=24).eval()
    context, mask = torch.randn(3, 5, 24), torch.ones(3, 5, dtype=torch.bool)
    codes = generate_image_codes_autoregressive(decoder, context, mask, temperature=0.0)
    with torch.no_grad():
        inputs = torch.cat([torch.full((3, 1), decoder.bos_id), codes[:, :-1]], dim=1)
        assert torch.equal(decoder(inputs, context, mask, causal=True).argmax(-1), codes)


def test_categorical_sampling_follows_the_probabilities_and_never_draws_a_zero():
    generator = torch.Generator().manual_seed(0)
    probabilities = torch.tensor([0.0, 0.1, 0.0, 0.2, 0.3, 0.4, 0.0]).expand(50_000, 7)
    draws = sample_categorical(probabilities, generator)
    frequencies = draws.bincount(minlength=7) / len(draws)
    assert frequencies[[0, 2, 6]].sum() == 0
    torch.testing.assert_close(frequencies, probabilities[0], atol=0.01, rtol=0)
    one_hot = torch.zeros(4, 3, 7)
    one_hot[..., 2] = 1.0
    assert (sample_categorical(one_hot, generator) == 2).all()  # (b, m, V) -> (b, m)


def test_transformer_without_padding_runs_unmasked_and_equals_the_masked_pass():
    torch.manual_seed(0)
    transformer = Transformer(layers=2, width=32, heads=4).eval()
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        torch.testing.assert_close(transformer(x, mask=key_padding_mask(torch.ones(2, 6, dtype=torch.bool))),
                                   transformer(x, mask=torch.ones(2, 1, 1, 6, dtype=torch.bool)),
                                   atol=1e-6, rtol=1e-5)
