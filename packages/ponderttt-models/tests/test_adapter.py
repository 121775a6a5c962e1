"""Fast-weight adapters in the backbone: exact at init, frozen backbone, gating, reset / carry protocols."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from ponderttt.models import load_hf_causal_lm
from ponderttt.models.adapter import BACKBONE, TRAINABLE, AdaptedLM, AdapterSpec, TTTControl
from ponderttt.ttt import TTTConfig

CHUNK = 4


def ttt_config(hidden: int) -> TTTConfig:
    return TTTConfig.tiny(hidden_size=hidden, num_heads=3, mini_batch_size=2, chunk_size=CHUNK)


@nnx.jit(static_argnames=("use_ttt", "protocol"))
def forward(model, ids, gating_scale, state, use_ttt=True, protocol="carry"):
    control = TTTControl(state=state, scale=gating_scale, protocol=protocol)
    out = model(ids, ttt=control, use_ttt=use_ttt, return_hidden_states=True)
    return out.logits, out.hidden_states[-1], out.ttt_stats, out.ttt_state


@nnx.jit
def site_logits(model, features, state):
    """Logits of the head adapter run alone on final-norm features (the chunk step; for checking the protocols)."""
    return model.readout(model.step({"head": features}, TTTControl(state=state)).outputs["head"])


@pytest.fixture(scope="module")
def gemma(hf_data):
    folder = hf_data.dir("gemma3_tiny")
    model = load_hf_causal_lm(folder, ttt=ttt_config(36))
    return model, hf_data.golden("gemma3_tiny")


def _set_out_scale(model, value: float):
    for site in model.adapters:
        site.out_scale[...] = jnp.full_like(site.out_scale[...], value)


def test_adapter_model_equals_backbone_at_init(gemma):
    model, g = gemma
    ids = g["input_ids"]
    with_ttt = forward(model, ids, None, None)[0]
    without = forward(model, ids, None, None, use_ttt=False)[0]
    np.testing.assert_array_equal(np.asarray(with_ttt), np.asarray(without))
    np.testing.assert_allclose(np.asarray(with_ttt), g["logits"], atol=1e-4, rtol=0)


def test_stats_are_per_sequence_per_chunk_and_gating_matters(hf_data):
    model = load_hf_causal_lm(hf_data.dir("gpt2_tiny"), ttt=ttt_config(30))
    _set_out_scale(model, 1.0)
    ids = hf_data.golden("gpt2_tiny")["input_ids"]  # [2, 13]: 4 chunks of 4 (the last one short)
    logits, _, stats, state = forward(model, ids, jnp.ones((2, 4)), None)
    assert set(stats) == set(state) == {"head"}  # always a mapping site -> stats / state
    assert stats["head"].chunk_loss_step0.shape == (2, 4) and stats["head"].chunk_loss_after.shape == (2, 4, 1)
    assert jax.tree.map(jnp.shape, state) == jax.tree.map(jnp.shape, model.init_state(2))
    skip = forward(model, ids, jnp.zeros((2, 4)), None)[0]
    backbone = forward(model, ids, None, None, use_ttt=False)[0]
    assert np.abs(np.asarray(logits - skip)).max() > 1e-4  # updates change the output
    assert np.abs(np.asarray(skip - backbone)).max() > 1e-4  # the adapter runs even without updates
    # Per-sequence decisions: updating only row 1 leaves row 0 equal to the no-update run.
    row1 = forward(model, ids, jnp.asarray([[0.0] * 4, [1.0] * 4]), None)[0]
    np.testing.assert_allclose(np.asarray(row1[0]), np.asarray(skip[0]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(row1[1]), np.asarray(logits[1]), atol=1e-6)


def test_reset_protocol_starts_every_chunk_fresh_and_carry_uses_the_given_state(hf_data):
    model = load_hf_causal_lm(hf_data.dir("gpt2_tiny"), ttt=ttt_config(30))
    _set_out_scale(model, 1.0)
    ids = hf_data.golden("gpt2_tiny")["input_ids"][:, :12]
    logits, features, _, _ = forward(model, ids, None, None, protocol="reset")
    for c in range(3):
        part = features[:, c * CHUNK : (c + 1) * CHUNK]
        fresh = site_logits(model, part, None)  # fresh fast weights on this chunk alone
        np.testing.assert_allclose(np.asarray(fresh), np.asarray(logits[:, c * CHUNK : (c + 1) * CHUNK]), atol=1e-5)
    carried_logits, features, _, state = forward(model, ids, None, None)
    again, _, _, _ = forward(model, ids, None, state)
    np.testing.assert_allclose(np.asarray(site_logits(model, features, state)), np.asarray(again), atol=1e-5)
    assert np.abs(np.asarray(again - carried_logits)).max() > 1e-4


def test_only_adapter_parameters_receive_gradients(hf_data):
    model = load_hf_causal_lm(hf_data.dir("gpt2_tiny"), ttt=ttt_config(30), sites=("head", 0))
    _set_out_scale(model, 0.5)
    ids = jnp.asarray(hf_data.golden("gpt2_tiny")["input_ids"])

    def loss(m):
        logits = m(ids[:, :-1]).logits
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1).mean()

    grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, TRAINABLE)))(model)
    paths = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(grads)]
    assert paths and all(p.startswith("adapters.") for p in paths)
    assert {"adapters.0.layer.W1", "adapters.1.layer.W1", "adapters.1.norm.scale", "adapters.0.out_scale"} <= set(paths)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads) if g.size > 1)

    backbone_before = jax.tree.map(np.asarray, nnx.state(model, BACKBONE))
    adapters_before = jax.tree.map(np.asarray, nnx.state(model, TRAINABLE))
    params = nnx.state(model, TRAINABLE)
    nnx.update(model, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads))
    for a, b in zip(jax.tree.leaves(backbone_before), jax.tree.leaves(nnx.state(model, BACKBONE)), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    changed = [
        not np.array_equal(a, np.asarray(b))
        for a, b in zip(jax.tree.leaves(adapters_before), jax.tree.leaves(nnx.state(model, TRAINABLE)), strict=True)
    ]
    assert sum(changed) >= len(changed) - 2  # all but zero-gradient leaves such as unused offsets moved
    n_backbone = sum(x.size for x in jax.tree.leaves(nnx.state(model, BACKBONE)))
    n_train = sum(x.size for x in jax.tree.leaves(nnx.state(model, TRAINABLE)))
    checkpoint = load_file(hf_data.dir("gpt2_tiny") / "model.safetensors")
    assert n_backbone == sum(t.size for t in checkpoint.values()) and 0 < n_train


def test_block_sites_states_and_errors(hf_data):
    model = load_hf_causal_lm(hf_data.dir("gemma3_untied"), ttt=ttt_config(36), sites=(2, "head"))
    assert model.sites == ("block_2", "head")
    ids = hf_data.golden("gemma3_untied")["input_ids"]
    state = model.init_state(2)
    logits, _, stats, new_state = forward(model, ids, 1.0, state)
    assert set(stats) == set(new_state) == {"block_2", "head"}
    np.testing.assert_allclose(np.asarray(logits), hf_data.golden("gemma3_untied")["logits"], atol=1e-4)
    with pytest.raises(ValueError, match="hidden_size=32 but the model's hidden size is 36"):
        load_hf_causal_lm(hf_data.dir("gemma3_untied"), ttt=TTTConfig.tiny())
    with pytest.raises(ValueError, match="kind='conv' is not known"):
        AdapterSpec(ttt_config(36), kind="conv")
    with pytest.raises(ValueError, match="block index must be in"):
        AdaptedLM(load_hf_causal_lm(hf_data.dir("gemma3_untied")), AdapterSpec(ttt_config(36), sites=(9,)))
    with pytest.raises(ValueError, match="sites \\['block_9'\\] that the model lacks"):
        model.step({"block_9": ids}, TTTControl())
    with pytest.raises(ValueError, match="protocol='chunked'"):
        TTTControl(protocol="chunked")


def test_lora_adapter_starts_exact_and_adapts(hf_data):
    """LoRA-TTT (TTT-MLP plugs in the same way, through the same site code)."""
    kind = "lora"
    cfg = ttt_config(30).replace(lora_rank=4)
    model = load_hf_causal_lm(hf_data.dir("gpt2_tiny"), ttt=cfg, kind=kind)
    ids = hf_data.golden("gpt2_tiny")["input_ids"]
    backbone = np.asarray(forward(model, ids, None, None, use_ttt=False)[0])
    np.testing.assert_array_equal(np.asarray(forward(model, ids, None, None)[0]), backbone)
    _set_out_scale(model, 1.0)
    adapted = np.asarray(forward(model, ids, jnp.ones((2,)), None)[0])
    assert np.abs(adapted - backbone).max() > 1e-4
    # No frozen projection of LoRA-TTT is trainable.
    paths = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, TRAINABLE))]
    assert not any("frozen" in p for p in paths)
