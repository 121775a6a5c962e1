"""Generation: cached decoding equals recomputation, sampling rules, stop sequences, adapter chunk updates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ponderttt.models import load_hf_causal_lm
from ponderttt.models.generate import GenerationConfig, generate, sample_logits
from ponderttt.ttt import TTTConfig

NEW = 7


@nnx.jit
def full_logits(model, ids, mask):
    return model(ids, attention_mask=mask, use_ttt=False).logits


def _prompt(hf_data, name):
    ids = hf_data.golden(name)["input_ids"][:, :6].copy()
    mask = np.ones_like(ids)
    mask[0, :2] = 0  # row 0 is left-padded
    ids[0, :2] = 0
    return ids, mask


@pytest.mark.parametrize("name", ["gpt2_tiny", "gemma3_tiny"])
def test_cached_greedy_decoding_equals_recomputation(hf_data, name):
    model = load_hf_causal_lm(hf_data.dir(name))
    ids, mask = _prompt(hf_data, name)  # gemma3_tiny: window 5 < 6 + 7 tokens
    res = generate(model, ids, mask, GenerationConfig(max_new_tokens=NEW), return_logits=True)
    assert res.tokens.shape == (2, NEW) and res.lengths.tolist() == [NEW, NEW]
    full = np.concatenate([ids, res.tokens[:, :-1]], axis=1)
    full_mask = np.concatenate([mask, np.ones((2, NEW - 1), np.int32)], axis=1)
    ref = np.asarray(full_logits(model, full, full_mask))[:, ids.shape[1] - 1 :]
    np.testing.assert_allclose(res.logits, ref, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(res.tokens, ref.argmax(-1))


def test_stop_sequences_and_eos_end_rows_independently(hf_data):
    model = load_hf_causal_lm(hf_data.dir("gpt2_tiny"))
    ids, mask = _prompt(hf_data, "gpt2_tiny")
    free = generate(model, ids, mask, GenerationConfig(max_new_tokens=NEW))
    stop = tuple(int(t) for t in free.tokens[0, 1:3])
    cfg = GenerationConfig(max_new_tokens=NEW, stop_sequences=(stop,), pad_token_id=-1)
    res = generate(model, ids, mask, cfg)
    row0 = free.tokens[0].tolist()
    end = next(i + 2 for i in range(NEW - 1) if tuple(row0[i : i + 2]) == stop)  # stop included
    assert res.lengths[0] == end < NEW
    np.testing.assert_array_equal(res.tokens[0, :end], free.tokens[0, :end])
    assert (res.tokens[0, end:] == -1).all()
    if stop not in {tuple(free.tokens[1, i : i + 2]) for i in range(NEW - 1)}:
        np.testing.assert_array_equal(res.tokens[1], free.tokens[1])
    eos = generate(model, ids, mask, GenerationConfig(max_new_tokens=NEW, eos_token_id=int(free.tokens[1, 0])))
    assert eos.lengths[1] == 1


def test_sampling_rules():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 2000))
    rng = jax.random.key(0)
    greedy = sample_logits(logits, rng, 0.0, 1.0)
    assert (np.asarray(greedy) == 0).all()
    nucleus = np.asarray(sample_logits(logits, rng, 1.0, 0.7))  # {0, 1} hold 0.8 >= 0.7
    assert set(nucleus.tolist()) == {0, 1}
    assert abs((nucleus == 0).mean() - 0.5 / 0.8) < 0.05
    full = np.asarray(sample_logits(logits, rng, 1.0, 1.0))
    np.testing.assert_allclose(np.bincount(full, minlength=4) / 2000, [0.5, 0.3, 0.15, 0.05], atol=0.04)
    hot = np.asarray(sample_logits(logits, rng, 100.0, 1.0))
    assert abs((hot == 3).mean() - 0.25) < 0.05  # high temperature flattens the distribution
    assert (np.asarray(sample_logits(logits, rng, 1.0, 1e-6)) == 0).all()  # tiny top_p is greedy


def test_sampled_generation_is_reproducible_and_checks_inputs(hf_data):
    model = load_hf_causal_lm(hf_data.dir("gemma3_untied"))
    ids, mask = _prompt(hf_data, "gemma3_untied")
    cfg = GenerationConfig(max_new_tokens=4, temperature=0.8, top_p=0.9, seed=3)
    a, b = generate(model, ids, mask, cfg), generate(model, ids, mask, cfg)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids, mask[:, ::-1], cfg)
    with pytest.raises(ValueError, match="top_p=0"):
        GenerationConfig(top_p=0)


def test_adapter_fast_weights_update_after_each_chunk_as_the_gate_decides(hf_data):
    """Cached generation with a head adapter equals recomputing: full-sequence backbone features, then per
    chunk the adapter without update under the weights that the gate's earlier decisions produced."""
    mbs, chunk, new = 2, 4, 10
    cfg = TTTConfig.tiny(hidden_size=30, num_heads=3, mini_batch_size=mbs, chunk_size=chunk)
    model = load_hf_causal_lm(hf_data.dir("gpt2_tiny"), ttt=cfg)
    model.adapters[0].out_scale[...] = jnp.ones((30,))
    ids, mask = _prompt(hf_data, "gpt2_tiny")
    seen = []

    def gate(ctx):
        seen.append((ctx.chunk_index, ctx.tokens.shape, ctx.probe_loss.shape))
        return np.asarray([1.0, 0.0]) if ctx.chunk_index % 2 else np.asarray([0.5, 2.0])

    res = generate(model, ids, mask, GenerationConfig(max_new_tokens=new), gate=gate, return_logits=True)
    assert seen == [(-1, (2, 6), (2,)), (0, (2, 4), (2,)), (1, (2, 4), (2,))]

    site = model.adapters[0]
    full = np.concatenate([ids, res.tokens[:, :-1]], axis=1)
    full_mask = np.concatenate([mask, np.ones((2, new - 1), np.int32)], axis=1)
    features = nnx.jit(lambda m, x, k: m.backbone(x, attention_mask=k)[0])(model, full, full_mask)
    p = ids.shape[1]
    reset = np.zeros_like(mask, bool)
    reset[0, 2] = True
    run = nnx.jit(lambda s, x, st, lam, r: s(x, state=st, gating_scale=lam, reset_mask=r, chunk_size=6))
    h_prompt, stats = run(site, features[:, :p], None, jnp.asarray(res.gate_scales[0]), jnp.asarray(reset))
    expected = [np.asarray(model.readout(h_prompt[:, -1]))]
    state = stats.state
    chunk_run = nnx.jit(lambda s, x, st, lam: s(x, state=st, gating_scale=lam, chunk_size=chunk))
    for c in range(3):
        part = features[:, p + c * chunk : p + (c + 1) * chunk]
        h_part, _ = chunk_run(site, part, state, jnp.zeros((2,)))
        expected.extend(np.asarray(model.readout(h_part))[:, i] for i in range(part.shape[1]))
        if part.shape[1] == chunk:
            state = chunk_run(site, part, state, jnp.asarray(res.gate_scales[c + 1]))[1].state
    np.testing.assert_allclose(res.logits, np.stack(expected[:new], axis=1), atol=1e-4, rtol=0)
    assert [s.tolist() for s in res.gate_scales] == [[1.0, 0.0], [0.5, 2.0], [1.0, 0.0]]
    with pytest.raises(ValueError, match="KV cache with fast-weight adapters"):
        model(ids, cache=model.init_cache(2, 8))
    # The adapter matters and the updates happened: not the backbone's logits, not the initial fast weights.
    backbone = np.asarray(model.readout(features[:, p - 1 :]))
    assert np.abs(res.logits - backbone).max() > 1e-3
    init = site.layer.init_state(2)
    pairs = zip(jax.tree.leaves(res.ttt_state), jax.tree.leaves(init), strict=True)
    assert max(float(jnp.abs(a - b).max()) for a, b in pairs) > 0


def test_sliding_window_layers_cache_a_ring_buffer_of_their_window(hf_data):
    """gemma3_tiny has window 5: its local layers keep 5 slots however long the generation, and decoding 20
    tokens after a left-padded prompt still equals recomputing the whole sequence without a cache."""
    model = load_hf_causal_lm(hf_data.dir("gemma3_tiny"))
    window, new = model.config.sliding_window, 20
    cache = model.init_cache(2, 64)
    for i, layer_type in enumerate(model.config.layer_types):
        assert cache.keys[i].shape[1] == (window if layer_type == "sliding_attention" else 64)
    ids, mask = _prompt(hf_data, "gemma3_tiny")
    ids, mask = ids[:, 2:], mask[:, 2:]  # 4 prompt slots, row 0 with 2 of them padding
    res = generate(model, ids, mask, GenerationConfig(max_new_tokens=new), return_logits=True)
    full = np.concatenate([ids, res.tokens[:, :-1]], axis=1)
    full_mask = np.concatenate([mask, np.ones((2, new - 1), np.int32)], axis=1)
    ref = np.asarray(full_logits(model, full, full_mask))[:, ids.shape[1] - 1 :]
    np.testing.assert_allclose(res.logits, ref, atol=1e-4, rtol=0)


@nnx.jit
def cached_step(model, ids, mask, cache):
    out = model(ids, attention_mask=mask, cache=cache)
    return out.logits, out.cache


def test_cache_extended_by_chunks_shorter_and_longer_than_the_window(hf_data):
    model = load_hf_causal_lm(hf_data.dir("gemma3_tiny"))
    g = hf_data.golden("gemma3_tiny")
    ids, mask = g["padded_input_ids"], g["padded_mask"]  # 13 tokens, row 0 starts with 4 pads
    cache = model.init_cache(2, ids.shape[1])
    pieces, start = [], 0
    for size in (7, 1, 2, 3):  # 7 > window 5: the prefill overwrites its own ring entries
        logits, cache = cached_step(model, ids[:, start : start + size], mask[:, start : start + size], cache)
        pieces.append(np.asarray(logits))
        start += size
    got = np.concatenate(pieces, axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], g["padded_logits"][real], atol=1e-4, rtol=0)
    assert int(cache.index) == 13 and cache.keys[0].shape[1] == model.config.sliding_window
