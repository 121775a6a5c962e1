import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ponderttt.eval.cost import (
    AdapterSpec,
    BackboneSpec,
    WallClock,
    action_flops,
    action_steps,
    backbone_chunk_flops,
    build_cost_table,
    chunk_costs,
    chunk_wall_clock,
    published_cost,
)


def test_published_convention():
    assert [published_cost(a) for a in ("skip", "update_1", "UPDATE_2", "update_4")] == [1.0, 3.0, 5.0, 9.0]
    assert published_cost(3) == 7.0
    assert action_steps("Update-4") == 4
    with pytest.raises(ValueError, match="unknown action 'jump'"):
        action_steps("jump")


def test_backbone_flops_by_hand():
    # 1 layer, hidden 4, 2 heads, vocab 10, seq 4 in chunks of 2, MLP 16.
    spec = BackboneSpec(num_layers=1, hidden_size=4, num_heads=2, vocab_size=10, seq_len=4, chunk_size=2)
    dense_per_token = 2 * 4 * 12 + 2 * 4 * 4 + 2 * 2 * 4 * 16 + 2 * 4 * 10  # qkv, out, mlp (2 mats), lm head
    attention = 4 * 4 * (1 + 2 + 3 + 4)  # QKᵀ and AV over the causal pairs of the whole sequence
    assert backbone_chunk_flops(spec) == dense_per_token * 2 + attention / 2


def test_gpt2_125m_matches_kaplan_estimate():
    spec = BackboneSpec.gpt2_125m(seq_len=1024, chunk_size=512)
    n_non_embedding = 12 * 12 * 768**2  # 12 d² per layer (attention 4 d², MLP 8 d²)
    kaplan = 2 * n_non_embedding + 2 * 768 * 50257 + 2 * 12 * 1024 * 768  # per token (Kaplan et al. 2020, Table 1)
    per_token = backbone_chunk_flops(spec) / 512
    # Kaplan charges QKᵀ against the full context (2·L·n_ctx·d); we count QKᵀ and AV (4·L·d per key) over the
    # causal keys, (n_ctx + 1) / 2 on average: the same figure plus one key.
    assert per_token == pytest.approx(kaplan + 2 * 12 * 768, rel=1e-12)


def test_ttt_linear_inner_step_count():
    bb = BackboneSpec(num_layers=2, hidden_size=64, num_heads=4, vocab_size=100, seq_len=32, chunk_size=16)
    ad = AdapterSpec.for_backbone(bb, "linear", mini_batch_size=4)
    d, h, b, tokens = 16, 4, 4, 16
    skip = action_flops(bb, ad, "skip")
    up1 = action_flops(bb, ad, "update_1")
    up4 = action_flops(bb, ad, 4)
    outer = 4 * 2 * 64 * 64 + 2 * 64 * h  # Q, K, V, O projections and the learning-rate head
    assert skip.adapter == (outer + h * 2 * d * d) * tokens
    assert skip.inner == 0 and skip.probe == 0
    carry = h * (2 * d * d + 2 * d * d)  # keys through W, then the weight gradient
    output = h * 2 * d * d + h * 6 * b * d  # queries through W plus the dual form's [b, b] products
    assert up1.inner == (carry + output) * tokens
    assert up4.inner == (4 * carry + output) * tokens
    assert up1.adapter == outer * tokens and up1.backbone == skip.backbone


def test_ttt_mlp_and_lora_shapes_and_probe():
    bb = BackboneSpec.gpt2_125m()
    mlp = AdapterSpec.for_backbone(bb, "mlp")
    assert mlp.inner_shapes() == [(64, 256), (256, 64)]
    lora = AdapterSpec.for_backbone(bb, "lora", inner_dim=8)
    assert lora.inner_shapes() == [(768, 8), (8, 768)] and lora.resolved_projections == 0
    probed = AdapterSpec.for_backbone(bb, "linear", probe=True, gate_flops_per_chunk=1000.0)
    plain = AdapterSpec.for_backbone(bb, "linear")
    diff = action_flops(bb, probed, "skip").total - action_flops(bb, plain, "skip").total
    assert diff == 12 * 2 * 64 * 64 * 512 + 1000.0
    with pytest.raises(ValueError, match="num_heads must be 1"):
        AdapterSpec(kind="lora", width=768, num_heads=2, inner_dim=8)
    with pytest.raises(ValueError, match="adapter width 64"):
        action_flops(bb, AdapterSpec(kind="linear", width=64, num_heads=1, inner_dim=64), "skip")


@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(["linear", "mlp", "lora"]),
    layers=st.integers(1, 4),
    heads=st.sampled_from([1, 2, 4]),
    chunks=st.integers(1, 4),
)
def test_costs_increase_with_steps(kind, layers, heads, chunks):
    bb = BackboneSpec(
        num_layers=layers, hidden_size=32, num_heads=heads, vocab_size=50, seq_len=8 * chunks, chunk_size=8
    )
    table = build_cost_table(bb, AdapterSpec.for_backbone(bb, kind))
    flops = [table[a].flops for a in ("skip", "update_1", "update_2", "update_4")]
    assert all(b > a for a, b in zip(flops, flops[1:], strict=False))
    assert table["skip"].relative_flops == 1.0
    assert table["update_2"].relative_flops == pytest.approx(flops[2] / flops[0])


def test_bad_specs_name_the_value():
    with pytest.raises(ValueError, match="seq_len=1000 is not a multiple of chunk_size=512"):
        BackboneSpec(12, 768, 12, 50257, 1000)
    with pytest.raises(ValueError, match="num_layers must be a positive int, got 0"):
        BackboneSpec(0, 768, 12, 50257, 1024)
    with pytest.raises(ValueError, match="unknown adapter kind 'ttt_conv'"):
        AdapterSpec(kind="ttt_conv", width=8, num_heads=1, inner_dim=8)


def test_wall_clock_and_chunk_costs():
    bb = BackboneSpec.gpt2_125m()
    table = build_cost_table(bb, AdapterSpec.for_backbone(bb))
    assert not table.has_wall_clock
    with pytest.raises(ValueError, match=r"missing for actions \['update_4'\]"):
        table.with_wall_clock({"skip": 1.0, "update_1": 2.0, "update_2": 3.0})
    timed = table.with_wall_clock({"skip": 1.0, "update_1": 2.0, "update_2": 3.0, 4: 5.0})
    assert timed["update_4"].wall_clock_s == 5.0
    costs = chunk_costs(timed, actions=["skip", "update_4", 2, 0], unit="wall_clock_s")
    np.testing.assert_array_equal(costs, [1.0, 5.0, 3.0, 1.0])
    lam = chunk_costs(timed, lambdas=[0.0, 0.3, 3.5], unit="published")
    np.testing.assert_array_equal(lam, [1.0, 3.0, 3.0])  # λ > 0 is one scaled pass
    with pytest.raises(ValueError, match="call CostTable.with_wall_clock"):
        chunk_costs(table, actions=[0], unit="wall_clock_s")
    roundtrip = type(timed).from_dict(timed.to_dict())
    assert roundtrip == timed


def test_wall_clock_from_repeated_timings_and_overheads():
    bb = BackboneSpec.gpt2_125m()
    samples = {"skip": [1.0, 1.2, 1.1, 0.9, 5.0], "update_1": [2.0] * 5, "update_2": [3.0] * 5, "update_4": 4.0}
    timed = build_cost_table(bb, AdapterSpec.for_backbone(bb), wall_clock_s=samples,
                             overheads={"recon_probe": [0.4, 0.5, 0.6, 0.7, 0.5], "gate_features": [-0.1] * 5})
    skip = timed["skip"]
    assert (skip.wall_clock_s, skip.wall_clock_repeats) == (1.1, 5)  # the median: the outlier 5.0 does not move it
    assert skip.wall_clock_spread_s == pytest.approx(1.2 - 1.0)  # IQR
    assert (timed["update_4"].wall_clock_spread_s, timed["update_4"].wall_clock_repeats) == (0.0, 1)
    assert WallClock.of([0.4, 0.5, 0.6, 0.7, 0.5]) == timed.overheads["recon_probe"]
    cost, spread = chunk_wall_clock(timed, actions=["skip", "update_2"], overheads=("recon_probe",))
    np.testing.assert_allclose(cost, [1.1 + 0.5, 3.0 + 0.5])
    np.testing.assert_allclose(spread, [0.2 + 0.1, 0.0 + 0.1])
    cost, _ = chunk_wall_clock(timed, lambdas=[0.0, 0.7], overheads=("gate_features",))
    np.testing.assert_allclose(cost, [1.1, 2.0])  # an overhead timed below the noise adds nothing
    with pytest.raises(ValueError, match=r"overheads \['probe'\] are not measured"):
        chunk_wall_clock(timed, actions=[0], overheads=("probe",))
    assert type(timed).from_dict(timed.to_dict(), timed.overheads_to_dict()) == timed
    with pytest.raises(ValueError, match="names of actions"):
        type(timed)(timed.actions, {"skip": WallClock(1.0, 0.0, 1)})
    with pytest.raises(ValueError, match="need the actions' wall-clock"):
        build_cost_table(bb, AdapterSpec.for_backbone(bb), overheads={"recon_probe": 1.0})
    with pytest.raises(ValueError, match="finite"):
        WallClock.of([1.0, float("nan")])
