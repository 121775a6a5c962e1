"""The `carry` protocol: fast weights run on across the chunks of a document, so a decision changes what
later chunks see and every gate must decide inside the chunk loop.

For an adapter at the head (the default site) the frozen backbone's hidden states do not depend on the
adapter, so they are computed once per batch; then, chunk by chunk: a no-update probe from the carried
state (the gate's causal inputs: its loss and logits), the gate's decision, and the adapter's pass with
that decision, whose final fast weights carry into the next chunk (reset where a document starts).

The budget-matched oracle of a carry record is approximate (decisions interact): it selects chunks by the
per-chunk gain of the always-UPDATE_1 roll-out over the never-update one.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ponderttt.gating import NUM_STEPS, FeatureExtractor, FeatureInputs, GateInput, make_gate
from ponderttt.gating.features import reset_sequences
from ponderttt.models import TTTControl
from ponderttt.train import distributed
from ponderttt.train.adapter import BATCH_KEYS, chunk_losses
from ponderttt.train.compare import UPDATE_ACTION, HeldOut, make_method_gate, method_budgets, method_record
from ponderttt.train.config import DataConfig
from ponderttt.train.metrics import progress_bar


class CarryUnsupported(ValueError):
    """The model's adapters are not only at the head (the chunk loop would need the backbone's KV cache)."""


def _check_head_only(model: Any) -> None:
    if model.sites != ("head",):
        raise CarryUnsupported(f"the carry roll-out supports an adapter at the head only; sites: {model.sites}")


@functools.lru_cache(maxsize=16)
def _hidden_pass(graphdef: Any) -> Any:
    """Jitted: the frozen backbone's final hidden states [B, T, C] (they do not depend on the head adapter)."""
    return jax.jit(lambda state, ids: nnx.merge(graphdef, state).backbone.hidden(ids).h)


@functools.lru_cache(maxsize=16)
def _adapter_pass(graphdef: Any, chunk_size: int, steps: int) -> Any:
    """Jitted: the chunk step at the head from the carried fast weights, with λ [B] and `steps` inner steps:
    (loss, tokens, new fast weights, logits, reconstruction loss at the initial weights, at step 0)."""
    @jax.jit
    def run(state: Any, h: Any, fast: Any, lam: Any, starts: Any, targets: Any, mask: Any) -> Any:
        m = nnx.merge(graphdef, state)
        control = TTTControl(state={"head": fast}, scale=lam, reset_mask=starts, num_steps=steps,
                             chunk_size=chunk_size)
        step = m.step({"head": h}, control)
        logits = m.readout(step.outputs["head"])
        loss, tokens = chunk_losses(logits, targets, mask, chunk_size)
        stats = step.stats["head"]
        return loss[:, 0], tokens[:, 0], stats.state, logits, stats.chunk_loss_init[:, 0], stats.chunk_loss_step0[:, 0]

    return run


@functools.lru_cache(maxsize=4)
def _features_pass(chunk_size: int) -> Any:
    """Jitted: one chunk's gate features from the carried feature state (reset where a document starts)."""
    extractor = FeatureExtractor()

    @jax.jit
    def run(fstate: Any, logits: Any, init: Any, step0: Any, mask: Any, starts: Any) -> Any:
        fstate = reset_sequences(fstate, starts[:, 0])
        return extractor(FeatureInputs(logits=logits, recon_init=init, recon_step0=step0, token_mask=mask), fstate)

    return run


def roll_out_carry(model: Any, gate: Any, batches: Sequence[dict[str, Any]], *, data: DataConfig, mesh: Any,
                   seed: int) -> dict[str, np.ndarray]:
    """One method under carry: {"loss", "actions" (or absent), "scales", "tokens"} as [B_total, N] arrays."""
    _check_head_only(model)
    c = data.chunk_size
    extractor = FeatureExtractor()
    graphdef, state = nnx.split(model)
    hidden = _hidden_pass(graphdef)
    passes = {k: _adapter_pass(graphdef, c, k) for k in (1, 2, 4)}
    features_of = _features_pass(c)
    decide = jax.jit(lambda inputs, gstate, key: gate(inputs, gstate, key, train=False))

    def select(mask_b: Any, a: Any, b: Any) -> Any:
        return jax.tree.map(lambda x, y: jnp.where(mask_b.reshape((-1,) + (1,) * (x.ndim - 1)), x, y), a, b)

    key = jax.random.key(seed)
    out: dict[str, list[np.ndarray]] = {"loss": [], "actions": [], "scales": [], "tokens": []}
    with jax.set_mesh(mesh):
        for raw in batches:
            batch = {k: distributed.global_batch(np.asarray(raw[k]), mesh, data.batch_size) for k in BATCH_KEYS}
            h_all = hidden(state, batch["input_ids"])
            b = h_all.shape[0]
            fast = model.init_state(b)["head"]
            fstate, gstate = extractor.init_state(b), gate.init_state(b)
            row = {k: [] for k in out}
            for j in range(data.chunks_per_sequence):
                part = slice(j * c, (j + 1) * c)
                args = (h_all[:, part], fast)
                tail = (batch["doc_start"][:, part], batch["targets"][:, part], batch["loss_mask"][:, part])
                skip_loss, tokens, _, logits, init, step0 = passes[1](state, *args, jnp.zeros((b,)), *tail)
                features, fstate = features_of(fstate, logits, init, step0, batch["loss_mask"][:, part],
                                               batch["doc_start"][:, part])
                key, sub = jax.random.split(key)
                upd_loss, _, upd_fast, _, _, _ = passes[1](state, *args, jnp.ones((b,)), *tail)
                decision = decide(GateInput(features=features, signal=step0, advantage=skip_loss - upd_loss),
                                  gstate, sub)
                gstate = decision.state
                if decision.action is None:  # continuous: one pass at the gate's λ
                    loss, _, fast, _, _, _ = passes[1](state, *args, decision.scale, *tail)
                else:
                    action = distributed.to_host(decision.action)
                    loss, new_fast = skip_loss, fast
                    for code in sorted(set(action.tolist()) - {0}):
                        chosen = jnp.asarray(action == code)
                        if code == UPDATE_ACTION:
                            code_loss, code_fast = upd_loss, upd_fast
                        else:
                            code_loss, _, code_fast, _, _, _ = passes[NUM_STEPS[code]](
                                state, *args, jnp.ones((b,)), *tail)
                        loss = jnp.where(chosen, code_loss, loss)
                        new_fast = select(chosen, code_fast, new_fast)
                    fast = new_fast
                    row["actions"].append(action)
                row["loss"].append(distributed.to_host(loss))
                row["scales"].append(distributed.to_host(decision.scale))
                row["tokens"].append(distributed.to_host(tokens))
            for k, v in row.items():
                if v:
                    out[k].append(np.stack(v, axis=1))
    return {k: np.concatenate(v) for k, v in out.items() if v}


def compare_carry(model: Any, batches: Sequence[dict[str, Any]], held: HeldOut, methods: Sequence[str],
                  budgets: Sequence[float], *, data: DataConfig, mesh: Any, calibration_signal: np.ndarray,
                  trained: Mapping[str, Any] | None = None, cost_table: Any = None,
                  n_resamples: int = 1000, seed: int = 0, progress: bool = False) -> list[dict[str, Any]]:
    """Every (method, budget) under carry on the same sequences as `held` (which must come from `batches`);
    `progress`: a bar over the records (each a roll-out of the model)."""
    trained = dict(trained or {})
    pairs = method_budgets(methods, budgets)
    never = roll_out_carry(model, make_method_gate("skip", None, None, {}), batches, data=data, mesh=mesh, seed=seed)
    always = roll_out_carry(model, make_method_gate("update_1", None, None, {}), batches, data=data, mesh=mesh,
                            seed=seed)
    carry_table = HeldOut(loss=np.stack([never["loss"], always["loss"], always["loss"], always["loss"]], -1),
                          tokens=held.tokens, signal=held.signal, features=held.features, documents=held.documents,
                          languages=held.languages)
    records = []
    for method, budget in progress_bar(pairs, "carry protocol: roll-outs", enabled=progress, unit="record"):
        if method == "oracle":
            gate = make_method_gate_batch_oracle(budget)
        else:
            gate = make_method_gate(method, budget, calibration_signal, trained)
        result = {"skip": never, "update_1": always}.get(method) or roll_out_carry(
            model, gate, batches, data=data, mesh=mesh, seed=seed)
        records.append(method_record(
            method, budget, "carry", carry_table, loss=result["loss"], actions=result.get("actions"),
            scales=result["scales"], loss_update=always["loss"], cost_table=cost_table, n_resamples=n_resamples,
            seed=seed, extra={"oracle_reference": "always-update_1 vs never-update carry roll-outs (approximate)"}))
    return records


def make_method_gate_batch_oracle(budget: float) -> Any:
    """Under carry the whole [B, N] advantage table is not known in order: the oracle picks, in every chunk, the
    round(budget · B) sequences whose myopic gain (from the carried state) is largest."""
    return make_gate("oracle:batch", rate=budget)
