"""Continuous gate: a small MLP maps the normalised features and the remaining budget to λ ∈ [0, λ_max].

λ multiplies the inner learning rate (λ = k stands for "as much update as k steps"). The gate carries a
per-sequence budget in its state: with a target normalised cost ``budget`` per chunk, the credit before chunk t
is ``budget · (t + 1) − spent`` and is fed to the MLP as an extra input. Train end to end with
``continuous_gate_loss``: L = L_CE + β · L_TTT + γ · mean(cost(λ)), cost = the cost table's normalised,
piecewise-linear cost of λ (differentiable, increasing), so the γ term pushes λ down.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ponderttt.gating.actions import CostTable
from ponderttt.gating.base import GateInput, GateOutput, register_gate
from ponderttt.gating.mlp import MLP


@dataclasses.dataclass(frozen=True)
class ContinuousConfig:
    """num_features: F of the feature vector (the MLP sees F + 1 inputs: features and remaining budget).
    hidden: MLP hidden widths. scale_max: λ_max (λ = scale_max · sigmoid). cost_table: prices λ for the budget.
    Raises ValueError unless 0 < initial_scale < scale_max and budget >= 0."""

    num_features: int = 32
    hidden: tuple[int, ...] = (64,)
    scale_max: float = 4.0
    initial_scale: float = 1.0  # λ at initialisation (sets the output bias)
    budget: float = 0.25  # target normalised cost per chunk
    cost_table: CostTable = CostTable.published()

    def __post_init__(self):
        if self.scale_max <= 0 or not 0 < self.initial_scale < self.scale_max:
            raise ValueError(
                f"need scale_max > 0 and 0 < initial_scale < scale_max, got {self.initial_scale}, {self.scale_max}"
            )
        if self.budget < 0:
            raise ValueError(f"ContinuousConfig.budget must be >= 0, got {self.budget}")


class ContinuousState(NamedTuple):
    """Per-sequence budget bookkeeping of ``ContinuousGate`` (reset with ``init_state`` at a new document)."""

    spent: jax.Array  # [B] normalised cost spent so far in the document
    chunk: jax.Array  # [B] chunks decided so far


def budget_remaining(state: ContinuousState, budget: float) -> jax.Array:
    """[B] credit available for the next chunk: budget · (chunks + 1) − spent (negative when over budget)."""
    return budget * (state.chunk + 1.0) - state.spent


class ContinuousGate(nnx.Module):
    """Learned continuous gate: ``out.action`` is None and ``out.scale`` is [B] λ ∈ (0, scale_max), differentiable.
    ``aux["cost"]`` is the [B] normalised cost of λ, ``aux["budget_remaining"]`` the [B] credit it saw."""

    kind = "continuous"
    causal = True

    def __init__(self, cfg: ContinuousConfig = ContinuousConfig(), *, rngs: nnx.Rngs):
        self.cfg = cfg
        p = cfg.initial_scale / cfg.scale_max
        self.net = MLP(cfg.num_features + 1, cfg.hidden, 1, rngs=rngs, out_scale=0.1, out_bias=math.log(p / (1 - p)))

    def init_state(self, batch_size: int) -> ContinuousState:
        """Nothing spent, no chunk decided: two [B] float32 zero vectors."""
        zeros = jnp.zeros((batch_size,), jnp.float32)
        return ContinuousState(zeros, zeros)

    def __call__(
        self, inputs: GateInput, state: ContinuousState, key: jax.Array | None = None, *, train: bool = False
    ) -> GateOutput:
        """[B, F] features and the [B] remaining budget -> [B] λ; deterministic (``key`` and ``train`` unused).
        The spent cost in the new state is gradient-stopped."""
        cfg = self.cfg
        remaining = budget_remaining(state, cfg.budget)
        x = jnp.concatenate([inputs.features, remaining[:, None]], axis=-1)
        scale = cfg.scale_max * jax.nn.sigmoid(self.net(x)[:, 0])
        cost = cfg.cost_table.normalised_scale_cost(scale)
        new_state = ContinuousState(state.spent + jax.lax.stop_gradient(cost), state.chunk + 1.0)
        return GateOutput(None, scale, new_state, {"cost": cost, "budget_remaining": remaining})


@register_gate("continuous")
def _make_continuous(variant: str | None = None, *, rngs: nnx.Rngs, **cfg) -> ContinuousGate:
    if variant is not None:
        raise ValueError(f"the continuous gate has no variants, got 'continuous:{variant}'")
    return ContinuousGate(ContinuousConfig(**cfg), rngs=rngs)


def continuous_gate_loss(
    ce_loss: jax.Array, ttt_loss: jax.Array, cost: jax.Array, beta: float = 0.1, gamma: float = 0.1
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L = L_CE + β · L_TTT + γ · mean(cost). ``cost``: [B] (or any shape) from ``out.aux["cost"]``."""
    cost_term = jnp.mean(cost)
    total = jnp.mean(ce_loss) + beta * jnp.mean(ttt_loss) + gamma * cost_term
    return total, {"ce": jnp.mean(ce_loss), "ttt": jnp.mean(ttt_loss), "cost": cost_term, "total": total}
