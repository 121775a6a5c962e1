"""Baseline gates: fixed actions, random at a target update rate, and the budget-matched oracle (non-causal)."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ponderttt.gating.actions import NUM_ACTIONS, SKIP, UPDATE_1, action_from_name, action_to_gating_scale
from ponderttt.gating.base import GateInput, GateOutput, register_gate


def _check_action(action: int, what: str) -> int:
    if not 0 <= int(action) < NUM_ACTIONS:
        raise ValueError(f"{what} must be an action code in [0, {NUM_ACTIONS}), got {action}")
    return int(action)


def _check_rate(rate: float, what: str = "rate") -> float:
    if not 0.0 <= float(rate) <= 1.0:
        raise ValueError(f"{what} must be a fraction in [0, 1], got {rate}")
    return float(rate)


def _discrete_output(action: jax.Array, state, aux=None) -> GateOutput:
    action = action.astype(jnp.int32)
    return GateOutput(action, action_to_gating_scale(action), state, aux or {})


@dataclasses.dataclass(frozen=True)
class FixedGate:
    """Always the same action for every sequence and chunk."""

    action: int = UPDATE_1
    kind = "discrete"
    causal = True

    def __post_init__(self):
        _check_action(self.action, "FixedGate.action")

    def init_state(self, batch_size: int) -> tuple:
        """Stateless: ``()``."""
        return ()

    def __call__(
        self, inputs: GateInput, state: tuple, key: jax.Array | None = None, *, train: bool = False
    ) -> GateOutput:
        """[B] int32 ``self.action`` (B from ``inputs.features``); ``state`` passes through, ``key`` is unused."""
        batch = inputs.features.shape[0]
        return _discrete_output(jnp.full((batch,), self.action, jnp.int32), state)


@register_gate("fixed")
def _make_fixed(variant: str | None = None, action: int | str | None = None) -> FixedGate:
    if variant is not None and action is not None:
        raise ValueError(f"fixed gate: give the action once, as 'fixed:{variant}' or action={action!r}")
    chosen = variant if variant is not None else action
    if chosen is None:
        raise ValueError(
            "fixed gate needs an action: 'fixed:skip', 'fixed:update_1', 'fixed:update_2', 'fixed:update_4'"
        )
    return FixedGate(action_from_name(chosen) if isinstance(chosen, str) else int(chosen))


def _rank_descending(score: jax.Array) -> jax.Array:
    """Rank of every entry of a 1-D score (0 = largest); ties broken by position, so ranks are a permutation."""
    order = jnp.argsort(-score, stable=True)
    return jnp.zeros(score.shape, jnp.int32).at[order].set(jnp.arange(score.shape[0], dtype=jnp.int32))


def budget_count(rate: float, n: int) -> int:
    """Number of updates a budget of ``rate`` allows among ``n`` chunks: round(rate * n), a Python int."""
    return int(round(_check_rate(rate) * n))


def top_k_mask(score: jax.Array, k: int) -> jax.Array:
    """[n] score -> [n] bool, True at exactly ``k`` largest entries (ties broken by position)."""
    return _rank_descending(score) < k


@dataclasses.dataclass(frozen=True)
class RandomGate:
    """Updates each sequence independently with probability ``rate`` (or, with ``exact``, exactly
    round(rate * B) randomly chosen sequences per chunk). Needs an explicit PRNG ``key`` at every call."""

    rate: float = 0.5
    update_action: int = UPDATE_1
    exact: bool = False
    kind = "discrete"
    causal = True

    def __post_init__(self):
        _check_rate(self.rate, "RandomGate.rate")
        _check_action(self.update_action, "RandomGate.update_action")

    def init_state(self, batch_size: int) -> tuple:
        """Stateless: ``()`` (randomness comes from the per-call ``key``)."""
        return ()

    def __call__(
        self, inputs: GateInput, state: tuple, key: jax.Array | None = None, *, train: bool = False
    ) -> GateOutput:
        """[B] actions, ``update_action`` or SKIP, drawn with ``key``. Raises ValueError when ``key`` is None."""
        if key is None:
            raise ValueError("RandomGate needs a PRNG key: call gate(inputs, state, jax.random.key(seed))")
        batch = inputs.features.shape[0]
        if self.exact:
            update = top_k_mask(jax.random.uniform(key, (batch,)), budget_count(self.rate, batch))
        else:
            update = jax.random.bernoulli(key, self.rate, (batch,))
        return _discrete_output(jnp.where(update, self.update_action, SKIP), state)


@register_gate("random")
def _make_random(variant: str | None = None, **cfg) -> RandomGate:
    if variant is not None:
        if variant != "exact":
            raise ValueError(f"random gate variants: 'random' or 'random:exact', got 'random:{variant}'")
        cfg["exact"] = True
    if isinstance(cfg.get("update_action"), str):
        cfg["update_action"] = action_from_name(cfg["update_action"])
    return RandomGate(**cfg)


ORACLE_SCOPES = ("global", "per_sequence", "batch")


def oracle_update_mask(advantage: jax.Array, rate: float, scope: str = "global") -> jax.Array:
    """Budget-matched oracle (NON-CAUSAL: uses every chunk's realised advantage).

    advantage: [B, N] loss(SKIP) - loss(UPDATE) for B sequences of N chunks.
    scope "global":       exactly round(rate * B * N) updates over the whole table, on the largest advantages.
    scope "per_sequence": exactly round(rate * N) updates in every sequence.
    scope "batch":        exactly round(rate * B) updates in every chunk column.
    Returns [B, N] bool. Ties are broken by position, so the count is exact.
    """
    if advantage.ndim != 2:
        raise ValueError(f"oracle_update_mask needs advantage [B, N], got shape {advantage.shape}")
    b, n = advantage.shape
    if scope == "global":
        return top_k_mask(advantage.reshape(-1), budget_count(rate, b * n)).reshape(b, n)
    if scope == "per_sequence":
        return jax.vmap(lambda row: top_k_mask(row, budget_count(rate, n)))(advantage)
    if scope == "batch":
        return jax.vmap(lambda col: top_k_mask(col, budget_count(rate, b)), in_axes=1, out_axes=1)(advantage)
    raise ValueError(f"unknown oracle scope {scope!r}; use one of {ORACLE_SCOPES}")


class OracleState(NamedTuple):
    """The oracle's position in the document: which column of the [B, N] advantage table comes next."""

    chunk: jax.Array  # int32 scalar: index of the next chunk (used by the "global" and "per_sequence" scopes)


@dataclasses.dataclass(frozen=True)
class OracleGate:
    """Budget-matched top-k oracle. NON-CAUSAL by definition: it reads realised advantages.

    scope "batch": ``inputs.advantage`` is [B] (the current chunk); updates the top round(rate * B).
    scope "global" / "per_sequence": ``inputs.advantage`` is the whole [B, N] table of the documents; the gate
    picks the top-k over the table (see ``oracle_update_mask``) and returns column ``state.chunk``.
    """

    rate: float = 0.5
    scope: str = "global"
    update_action: int = UPDATE_1
    kind = "discrete"
    causal = False

    def __post_init__(self):
        _check_rate(self.rate, "OracleGate.rate")
        _check_action(self.update_action, "OracleGate.update_action")
        if self.scope not in ORACLE_SCOPES:
            raise ValueError(f"unknown oracle scope {self.scope!r}; use one of {ORACLE_SCOPES}")

    def init_state(self, batch_size: int) -> OracleState:
        """Start at chunk 0 (one counter shared by the batch)."""
        return OracleState(jnp.zeros((), jnp.int32))

    def __call__(
        self, inputs: GateInput, state: OracleState, key: jax.Array | None = None, *, train: bool = False
    ) -> GateOutput:
        """[B] actions for chunk ``state.chunk`` from ``inputs.advantage`` ([B] for scope "batch", else [B, N]);
        ``aux["non_causal"]`` is True. Raises ValueError when the advantage is missing or has the wrong rank."""
        adv = inputs.advantage
        if adv is None:
            raise ValueError("the oracle gate (non-causal) needs GateInput.advantage = loss(SKIP) - loss(UPDATE)")
        if self.scope == "batch":
            if adv.ndim != 1:
                raise ValueError(f"oracle scope 'batch' needs advantage [B] for the current chunk, got {adv.shape}")
            update = top_k_mask(adv, budget_count(self.rate, adv.shape[0]))
        else:
            if adv.ndim != 2:
                raise ValueError(f"oracle scope {self.scope!r} needs the whole advantage table [B, N], got {adv.shape}")
            column = jax.lax.dynamic_index_in_dim(oracle_update_mask(adv, self.rate, self.scope), state.chunk, 1, False)
            update = column
        action = jnp.where(update, self.update_action, SKIP)
        return _discrete_output(action, OracleState(state.chunk + 1), {"non_causal": jnp.ones((), bool)})


@register_gate("oracle")
def _make_oracle(variant: str | None = None, **cfg) -> OracleGate:
    if variant is not None:
        cfg["scope"] = variant
    if isinstance(cfg.get("update_action"), str):
        cfg["update_action"] = action_from_name(cfg["update_action"])
    return OracleGate(**cfg)
