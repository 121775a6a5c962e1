"""Comparing gating methods on the same held-out chunks: gate roll-outs and results records.

Under the `reset` protocol every chunk starts from the same initial fast weights, so a chunk's loss depends
only on its own action: one evaluation pass per discrete action gives the table `HeldOut.loss[b, n, a]`,
and any discrete gate's loss is an exact look-up in it (continuous gates need one pass at their λ, given
by `loss_at_scale`). Under `carry` a decision changes the state later chunks see, so the model runs the
gate inside its chunk loop and hands the realised arrays to `carry_record`.

Budgets are met exactly: a causal gate with a score (the reconstruction loss, a learned gate's update
logit or scale) is deployed at budget b by `TopKBudget`, which in every chunk updates exactly round(b · B) of
the B concurrent sequences, those with the highest score (the scores are known before the chunk's update, so
this stays causal). Learned gates are also recorded once with their own decisions (budget None).

Records are built by `ponderttt.eval.summarize_method` (token-weighted losses, document-resampled CIs,
costs, budget adherence, the budget-matched oracle and recovery).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ponderttt.eval import comparison_record, summarize_method
from ponderttt.eval.protocol import ACTION_NAMES, UPDATE_ACTION
from ponderttt.gating import (
    SKIP,
    Gate,
    GateInput,
    GateOutput,
    GumbelGate,
    ReconGate,
    action_to_gating_scale,
    budget_count,
    make_gate,
    roll_gate,
    top_k_mask,
)
from ponderttt.train.config import FIXED_METHODS, TRAINABLE_GATES
from ponderttt.train.metrics import progress_bar

# results.json method name -> gating registry spec (learned gates come from their checkpoints instead)
GATE_SPECS = {
    "skip": "fixed:skip",
    "update_1": "fixed:update_1",
    "update_2": "fixed:update_2",
    "update_4": "fixed:update_4",
    "random": "random:exact",
    "oracle": "oracle:global",
    "recon": "recon",
    "recon_inverted": "recon:inverted",
}
# method -> the cost table's measured overheads its gate pays on every chunk (wall-clock): the threshold gates read
# the reconstruction probe, the learned gates their features (which include the probe's losses)
METHOD_OVERHEADS = {"recon": ("recon_probe",), "recon_inverted": ("recon_probe",),
                    **{name: ("recon_probe", "gate_features") for name in TRAINABLE_GATES}}


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """Per-chunk arrays of the held-out set, [B, N] = (sequence, chunk), from the reset-protocol passes."""

    loss: np.ndarray  # [B, N, 4] mean CE (nats) of the chunk under SKIP, UPDATE_1, UPDATE_2, UPDATE_4
    tokens: np.ndarray  # [B, N] unmasked target tokens
    signal: np.ndarray  # [B, N] step-0 reconstruction loss: the causal no-update probe
    features: np.ndarray  # [B, N, F] the learned gates' input features
    documents: np.ndarray  # [B, N] document id of the chunk (CIs resample documents)
    languages: np.ndarray  # [B, N] language name
    signals: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    """Raw per-chunk signals for the correlation analysis, name -> [B, N] (e.g. entropy, ttt_improvement)."""

    def __post_init__(self) -> None:
        b, n, a = self.loss.shape
        if a != len(ACTION_NAMES):
            raise ValueError(f"HeldOut.loss needs one column per action {ACTION_NAMES}, got shape {self.loss.shape}")
        for name in ("tokens", "signal", "documents", "languages"):
            if np.shape(getattr(self, name)) != (b, n):
                raise ValueError(f"HeldOut.{name} has shape {np.shape(getattr(self, name))}, expected {(b, n)}")
        if self.features.shape[:2] != (b, n):
            raise ValueError(f"HeldOut.features has shape {self.features.shape}, expected ({b}, {n}, F)")

    @property
    def advantage(self) -> np.ndarray:
        """loss(SKIP) − loss(UPDATE_1) per chunk: non-causal, only the oracle reads it."""
        return self.loss[..., 0] - self.loss[..., UPDATE_ACTION]

    def per_document(self, loss: np.ndarray) -> np.ndarray:
        """[D] token-weighted mean of a per-chunk loss [B, N] over each document's chunks (sorted document ids):
        the unit a paired comparison resamples."""
        order = np.unique(self.documents.reshape(-1), return_inverse=True)[1]
        weights = self.tokens.reshape(-1)
        return np.bincount(order, loss.reshape(-1) * weights) / np.maximum(np.bincount(order, weights), 1)


def update_score(gate: Gate, inputs: GateInput, out: GateOutput) -> jax.Array:
    """[B] how strongly a causal gate wants to update this chunk: higher updates first under `TopKBudget`.

    Reconstruction gates: the step-0 reconstruction loss (negated when inverted); gates with action logits
    (gumbel, ppo): log P(any update) − log P(SKIP); continuous gates: their scale λ."""
    if "logits" in out.aux:
        logits = out.aux["logits"]
        # a Gumbel gate's logits follow its configured actions; PPO's follow the action codes
        actions = tuple(gate.cfg.actions) if isinstance(gate, GumbelGate) else tuple(range(logits.shape[-1]))
        skip = actions.index(SKIP)
        others = jnp.asarray([i for i in range(len(actions)) if i != skip])
        return jax.nn.logsumexp(logits[:, others], axis=-1) - logits[:, skip]
    if out.action is None:
        return out.scale
    if inputs.signal is None:
        raise ValueError(f"{type(gate).__name__} has no update score: it needs GateInput.signal")
    return -inputs.signal if isinstance(gate, ReconGate) and gate.cfg.invert else inputs.signal


class TopKBudget:
    """Deploys a scoring gate at an exact budget: in every chunk, exactly round(rate · B) of the B concurrent
    sequences update (UPDATE_1; a continuous gate keeps its λ there and gets λ = 0 elsewhere): those with the
    highest `update_score`. Causal: the scores of a chunk are known before its update. The wrapped gate's own
    state (EMAs, budget credit) evolves from its own proposals."""

    causal = True

    def __init__(self, gate: Any, rate: float) -> None:
        budget_count(rate, 1)  # validates the rate
        self.gate, self.rate, self.kind = gate, float(rate), gate.kind

    def init_state(self, batch_size: int) -> Any:
        """The wrapped gate's initial state for `batch_size` concurrent sequences."""
        return self.gate.init_state(batch_size)

    def __call__(self, inputs: Any, state: Any, key: Any = None, *, train: bool = False) -> Any:
        """One chunk's `GateOutput`: action [B] (UPDATE_1 for the top round(rate · B) scores, else SKIP) and λ [B],
        or for a continuous gate action None and its λ on the chosen rows, 0 elsewhere; aux["score"] [B] holds the
        scores. The wrapped gate always runs in eval mode (`train` is ignored)."""
        out = self.gate(inputs, state, key, train=False)
        score = update_score(self.gate, inputs, out)
        chosen = top_k_mask(score, budget_count(self.rate, score.shape[0]))
        aux = {"score": score}
        if out.action is None:
            return GateOutput(None, jnp.where(chosen, out.scale, 0.0), out.state, aux)
        action = jnp.where(chosen, UPDATE_ACTION, 0).astype(jnp.int32)
        return GateOutput(action, action_to_gating_scale(action), out.state, aux)


def make_method_gate(method: str, budget: float | None, calibration_signal: np.ndarray | None,
                     trained: Mapping[str, Any]) -> Any:
    """The gate that plays `method` at `budget` (learned gates: the trained ones in `trained`; budget None plays
    a learned gate's own decisions)."""
    if method in TRAINABLE_GATES:
        if method not in trained:
            raise KeyError(f"method {method!r} needs a trained gate; trained: {sorted(trained)}")
        return trained[method] if budget is None else TopKBudget(trained[method], budget)
    spec = GATE_SPECS[method]
    if method in FIXED_METHODS:
        return make_gate(spec)
    if budget is None:
        raise ValueError(f"method {method!r} needs a budget")
    if method in ("random", "oracle"):
        return make_gate(spec, rate=budget)
    if budget >= 1.0:  # every chunk updates
        return make_gate("fixed:update_1")
    return TopKBudget(make_gate(spec, target_rate=budget, calibration_signal=calibration_signal), budget)


def roll_out(gate: Any, held: HeldOut, *, seed: int) -> tuple[np.ndarray | None, np.ndarray]:
    """The gate's decisions over the chunks in order: (actions [B, N] or None for continuous gates, λ [B, N]).

    `ponderttt.gating.roll_gate` (one jitted scan over the chunks; the gate's state carries from chunk to chunk);
    the oracle reads the whole advantage table."""
    n = held.tokens.shape[1]
    inputs = (jnp.asarray(held.features, jnp.float32), jax.random.split(jax.random.key(seed), n))
    signal, advantage = jnp.asarray(held.signal, jnp.float32), jnp.asarray(held.advantage, jnp.float32)
    decide = jax.jit(lambda f, k, s, a: roll_gate(gate, f, k, signal=s, advantage=a)[0])
    out = jax.device_get(decide(*inputs, signal, advantage))
    return (None if out.action is None else np.asarray(out.action, np.int32)), np.asarray(out.scale, np.float32)


def method_record(method: str, budget: float | None, protocol: str, held: HeldOut, *, loss: np.ndarray,
                  actions: np.ndarray | None, scales: np.ndarray | None, loss_update: np.ndarray,
                  cost_table: Any = None, n_resamples: int = 1000, seed: int = 0,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A results.json record: the method's per-chunk losses with its decisions, on `held`'s chunks."""
    def flat(a: Any) -> np.ndarray:
        return np.asarray(a).reshape(-1)

    names = None if actions is None else np.asarray(ACTION_NAMES)[flat(actions)]
    extra = dict(extra or {})
    if actions is not None and np.any(np.asarray(actions) > UPDATE_ACTION) and held.loss.shape[-1] > 2:
        # the method also took UPDATE_2 / UPDATE_4: its oracle may pick the best update action of every chunk
        loss_update = np.nanmin(held.loss[..., 1:], axis=-1)
        extra["oracle_update"] = "best of update_1, update_2, update_4 per chunk"
    return summarize_method(
        method, protocol, loss=flat(loss), tokens=flat(held.tokens), actions=names,
        lambdas=None if actions is not None else flat(scales), budget=budget,
        budget_unit=None if budget is None else "update_rate", cost_table=cost_table,
        overheads=METHOD_OVERHEADS.get(method, ()) if cost_table is not None and cost_table.overheads else (),
        loss_skip=flat(held.loss[..., 0]), loss_update=flat(loss_update), languages=flat(held.languages),
        documents=flat(held.documents), n_resamples=n_resamples, seed=seed, extra=extra or None)


def method_budgets(methods: Sequence[str], budgets: Sequence[float]) -> list[tuple[str, float | None]]:
    """(method, budget) pairs to evaluate: fixed schedules once (no budget), every other method per budget, and
    learned gates also once with their own decisions (budget None)."""
    pairs: list[tuple[str, float | None]] = []
    for method in methods:
        if method in FIXED_METHODS or method in TRAINABLE_GATES:
            pairs.append((method, None))
        if method not in FIXED_METHODS:
            pairs.extend((method, float(b)) for b in budgets)
    return pairs


def compare_reset(held: HeldOut, methods: Sequence[str], budgets: Sequence[float], *,
                  calibration_signal: np.ndarray, trained: Mapping[str, Any] | None = None,
                  loss_at_scale: Callable[[np.ndarray], np.ndarray] | None = None, cost_table: Any = None,
                  n_resamples: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """Every (method, budget) under the reset protocol, on the same chunks: the records of `run_reset`."""
    return run_reset(held, methods, budgets, calibration_signal=calibration_signal, trained=trained,
                     loss_at_scale=loss_at_scale, cost_table=cost_table, n_resamples=n_resamples, seed=seed)[0]


def run_reset(held: HeldOut, methods: Sequence[str], budgets: Sequence[float], *,
              calibration_signal: np.ndarray, trained: Mapping[str, Any] | None = None,
              loss_at_scale: Callable[[np.ndarray], np.ndarray] | None = None, cost_table: Any = None,
              n_resamples: int = 1000, seed: int = 0, progress: bool = False
              ) -> tuple[list[dict[str, Any]], dict[tuple[str, float | None], np.ndarray]]:
    """Every (method, budget) under the reset protocol, on the same chunks: (results.json records, the per-chunk
    losses [B, N] of each (method, budget), for paired comparisons). Discrete gates read the loss table;
    continuous gates (no actions) are evaluated by `loss_at_scale(λ [B, N]) -> loss [B, N]`. `progress`: a bar over
    the records."""
    records, losses = [], {}
    for method, budget in progress_bar(method_budgets(methods, budgets), "reset protocol: records", enabled=progress,
                                       unit="record"):
        gate = make_method_gate(method, budget, calibration_signal, trained or {})
        actions, scales = roll_out(gate, held, seed=seed)
        if actions is not None:
            loss = np.take_along_axis(held.loss, actions[..., None], axis=-1)[..., 0]
        else:
            if loss_at_scale is None:
                raise ValueError(f"method {method!r} is continuous: compare_reset needs loss_at_scale")
            loss = np.asarray(loss_at_scale(scales))
        losses[(method, budget)] = loss
        records.append(method_record(method, budget, "reset", held, loss=loss, actions=actions, scales=scales,
                                     loss_update=held.loss[..., UPDATE_ACTION], cost_table=cost_table,
                                     n_resamples=n_resamples, seed=seed))
    return records, losses


def paired_comparisons(held: HeldOut, losses: Mapping[tuple[str, float | None], np.ndarray], *,
                       n_resamples: int, seed: int) -> list[dict[str, Any]]:
    """The paired comparisons over documents (reset protocol) that verdicts are drawn from: UPDATE_1 vs SKIP,
    then every budgeted gate vs random at the same budget."""
    pairs = []
    if ("update_1", None) in losses and ("skip", None) in losses:
        pairs.append((("update_1", None), ("skip", None)))
    pairs += [((method, budget), ("random", budget)) for method, budget in losses
              if budget is not None and method != "random" and ("random", budget) in losses]
    return [comparison_record((*a, "reset"), (*b, "reset"), held.per_document(losses[a]),
                              held.per_document(losses[b]), n_resamples=n_resamples, seed=seed)
            for a, b in pairs]
