"""Generation: cached decoding equals recomputation, sampling rules, stop sequences, adapter chunk updates."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ponderttt.models import AdaptedLM, TTTControl, load_hf_causal_lm
from ponderttt.models.generate import GenerationConfig, generate, sample_logits
from ponderttt.ttt import TTTConfig

NEW = 7


@nnx.jit
def full_logits(model, ids, mask):
    backbone = model.backbone if isinstance(model, AdaptedLM) else model
    return backbone(ids, attention_mask=mask).logits


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


def test_stop_strings_end_rows_and_the_gate_sees_only_live_rows(hf_data):
    """A stop string may span tokens: a row ends at the token that completes it; from the next chunk on the gate's
    context marks the row inactive and its λ is 0 whatever the gate returns."""
    backbone = load_hf_causal_lm(hf_data.dir("gpt2_tiny"))
    ids, mask = _prompt(hf_data, "gpt2_tiny")
    sampled = GenerationConfig(max_new_tokens=NEW, temperature=1.0, seed=3)  # greedy repeats one token here
    free = generate(backbone, ids, mask, sampled)
    decode = lambda tokens: "".join(f"<{t}>" for t in tokens)
    # the end of token i and the start of token i + 1 of row 0, for the latest i whose string row 1 lacks
    stop = next(s for i in (4, 3, 2, 1) if (s := f"{free.tokens[0, i]}><{free.tokens[0, i + 1]}")
                not in decode(free.tokens[1].tolist()))
    ends = [next((n for n in range(1, NEW + 1) if stop in decode(row[:n].tolist())), NEW) for row in free.tokens]
    assert 2 <= ends[0] < NEW and ends[1] == NEW
    with pytest.raises(ValueError, match="stop_strings needs generate"):
        generate(backbone, ids, mask, dataclasses.replace(sampled, stop_strings=(stop,)))
    cfg = dataclasses.replace(sampled, stop_strings=(stop,), pad_token_id=-1)
    model = load_hf_causal_lm(hf_data.dir("gpt2_tiny"), ttt=TTTConfig.tiny(hidden_size=30, num_heads=3,
                                                                           mini_batch_size=2, chunk_size=2))
    seen = []

    def gate(ctx):
        seen.append(ctx.active.copy())
        return np.ones(2, np.float32)

    res = generate(model, ids, mask, cfg, gate=gate, decode=decode)
    assert res.lengths.tolist() == ends and (res.tokens[0, ends[0]:] == -1).all()
    np.testing.assert_array_equal(res.tokens[0, : ends[0]], free.tokens[0, : ends[0]])
    assert seen[0].tolist() == [True, True] and len(seen) == 1 + (NEW - 1) // 2
    for active, lam in zip(seen, res.gate_scales, strict=True):
        assert lam.tolist() == active.astype(np.float32).tolist()
    assert not seen[-1][0]  # row 0 stopped before the last decision


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


@nnx.jit(static_argnames=("prompt_len", "chunk"))
def _generation_reference(model, full, full_mask, reset, scales, prompt_len, chunk):
    """No-cache recomputation of what generation does, layer by layer over the whole sequence: each adapter runs
    the prompt as one chunk with the prompt's λ, then every generated chunk without update under the weights
    that the earlier chunks' λ produced (the update on a chunk's inputs coming after it). -> (logits, states)."""
    from ponderttt.models.layers import causal_mask

    b, t = full.shape
    valid = jnp.asarray(full_mask, bool)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0)
    slots = jnp.arange(t, dtype=jnp.int32)
    mbs = model.ttt_config.mini_batch_size
    states = {}

    def run_site(name, h):
        def step(x, state, lam, **options):  # the chunk step at one site
            out = model.step({name: x}, TTTControl(state={name: state}, scale=lam, **options))
            return out.outputs[name], out.state[name]

        prompt_chunk = -(-prompt_len // mbs) * mbs
        out, state = step(h[:, :prompt_len], None, jnp.asarray(scales[0]), reset_mask=reset, chunk_size=prompt_chunk)
        pieces = [out]
        for c, start in enumerate(range(prompt_len, t, chunk)):
            part = h[:, start : start + chunk]
            pieces.append(step(part, state, 0.0, chunk_size=chunk)[0])
            if part.shape[1] == chunk:
                state = step(part, state, jnp.asarray(scales[c + 1]), chunk_size=chunk)[1]
        states[name] = state
        return jnp.concatenate(pieces, axis=1)

    backbone = model.backbone
    h = backbone.embed(jnp.asarray(full), positions)
    for i, block in enumerate(backbone.blocks):
        mask = causal_mask(jnp.broadcast_to(slots, (b, t)), slots, valid, backbone.attention_window(i))
        h, _ = block(h, positions, mask, None)
        if f"block_{i}" in model.sites:
            h = run_site(f"block_{i}", h)
    h = backbone.final_norm(h)
    if "head" in model.sites:
        h = run_site("head", h)
    return model.readout(h), states


@pytest.mark.parametrize(
    ("name", "sites"), [("gpt2_tiny", ("head",)), ("gpt2_tiny", (0, "head")), ("gemma3_tiny", (1, 3))]
)
def test_adapter_generation_equals_recomputation_without_cache(hf_data, name, sites):
    """Adapters at the head and/or inside blocks: cached generation equals recomputing the whole sequence layer by
    layer, each adapter running every chunk under the fast weights the gate's earlier decisions produced."""
    mbs, chunk, new = 2, 4, 11
    model = load_hf_causal_lm(hf_data.dir(name))
    hidden = model.config.hidden_size
    cfg = TTTConfig.tiny(hidden_size=hidden, num_heads=3, mini_batch_size=mbs, chunk_size=chunk)
    model = load_hf_causal_lm(hf_data.dir(name), ttt=cfg, sites=sites)
    for i, site in enumerate(model.adapters):
        site.out_scale[...] = jnp.full((hidden,), 0.5 + 0.25 * i)
    ids, mask = _prompt(hf_data, name)
    decisions = {-1: [0.5, 2.0], 0: [1.0, 0.0], 1: [0.0, 1.5]}
    seen = []

    def gate(ctx):
        seen.append(ctx)
        return np.asarray(decisions[ctx.chunk_index])

    res = generate(model, ids, mask, GenerationConfig(max_new_tokens=new), gate=gate, return_logits=True)
    names = model.sites
    assert [(c.chunk_index, c.tokens.shape) for c in seen] == [(-1, (2, 6)), (0, (2, chunk)), (1, (2, chunk))]
    assert [s.tolist() for s in res.gate_scales] == list(decisions.values())
    for ctx in seen:
        assert set(ctx.probe_losses) == set(names) and set(ctx.state) == set(names)
        np.testing.assert_allclose(ctx.probe_loss, np.mean([ctx.probe_losses[s] for s in names], axis=0), rtol=1e-6)
        assert ctx.features.shape == (2, 6 if ctx.chunk_index < 0 else chunk, hidden)

    full = np.concatenate([ids, res.tokens[:, :-1]], axis=1)
    full_mask = np.concatenate([mask, np.ones((2, new - 1), np.int32)], axis=1)
    reset = np.zeros(ids.shape, bool)
    reset[0, 2] = True  # row 0's first real token: fresh fast weights there
    ref_logits, ref_states = _generation_reference(
        model, full, full_mask, reset, res.gate_scales, prompt_len=ids.shape[1], chunk=chunk
    )
    np.testing.assert_allclose(res.logits, np.asarray(ref_logits)[:, ids.shape[1] - 1 :], atol=1e-4, rtol=0)
    for site in names:
        for got, want in zip(
            jax.tree.leaves(res.ttt_state[site]), jax.tree.leaves(ref_states[site]), strict=True
        ):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # The adapters matter (not the backbone's logits) and updated (not the initial fast weights).
    backbone = np.asarray(full_logits(model, full, full_mask))[:, ids.shape[1] - 1 :]
    assert np.abs(res.logits - backbone).max() > 1e-3
    for site, adapter in zip(names, model.adapters, strict=True):
        init = adapter.layer.init_state(2)
        pairs = zip(jax.tree.leaves(res.ttt_state[site]), jax.tree.leaves(init), strict=True)
        assert max(float(jnp.abs(a - b).max()) for a, b in pairs) > 0
    # Carrying the state into a second call; a state naming a site the model lacks is refused.
    again = generate(model, ids, mask, GenerationConfig(max_new_tokens=2), ttt_state=res.ttt_state)
    assert again.tokens.shape == (2, 2)
    if len(names) > 1:
        with pytest.raises(ValueError, match="block_9"):
            generate(model, ids, mask, GenerationConfig(max_new_tokens=2), ttt_state={"block_9": None})
    with pytest.raises(ValueError, match="KV cache with fast-weight adapters"):
        model(ids, cache=model.init_cache(2, 8))
