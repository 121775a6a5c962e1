"""PID Lagrange multiplier for a cost constraint (Stooke, Achiam & Abbeel, 2020, "Responsive Safety in
Reinforcement Learning by PID Lagrangian Methods", Algorithm 2 with their EMA smoothing and derivative delay).

Per update, with measured cost ``J`` (normalised to [0, 1]) and limit ``d``::

    Δ      = J − d
    P      = EMA_p(Δ)                                   proportional term, smoothed
    I      = max(0, I + K_I · Δ)                         integral, anti-windup: never negative (optionally ≤ i_max)
    J̄      = EMA_d(J);  D = max(0, J̄_t − J̄_{t−delay})    derivative on the smoothed cost over a delay (ring buffer)
    λ      = max(0, K_P · P + I + K_D · D)

With ``K_P = K_D = 0`` this is exactly projected dual ascent, λ ← max(0, λ + K_I · (J − d)).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class PIDConfig:
    """cost_limit: d, the target normalised cost in [0, 1]. kp / ki / kd: the gains (>= 0).
    lambda_max: optional upper clamp of λ. Raises ValueError on negative gains, decays outside [0, 1), delay < 1."""

    cost_limit: float = 0.25
    kp: float = 1.0
    ki: float = 0.1
    kd: float = 0.5
    p_ema: float = 0.9  # EMA decay of the proportional error
    d_ema: float = 0.9  # EMA decay of the cost the derivative differences
    delay: int = 5  # derivative over this many updates (ring buffer length)
    i_max: float | None = None  # optional upper clamp of the integral (anti-windup from above)
    lambda_max: float | None = None

    def __post_init__(self):
        if min(self.kp, self.ki, self.kd) < 0:
            raise ValueError(f"PID gains must be >= 0, got kp={self.kp}, ki={self.ki}, kd={self.kd}")
        if not (0.0 <= self.p_ema < 1.0 and 0.0 <= self.d_ema < 1.0):
            raise ValueError(f"PID EMA decays must be in [0, 1), got p_ema={self.p_ema}, d_ema={self.d_ema}")
        if self.delay < 1:
            raise ValueError(f"PID derivative delay must be >= 1 update, got {self.delay}")


class PIDState(NamedTuple):
    """The controller's carried state (all float32 scalars except the ring buffer and the int32 counters)."""

    integral: jax.Array  # [] I (already multiplied by K_I)
    p_error: jax.Array  # [] EMA of Δ
    cost_ema: jax.Array  # [] EMA of J
    history: jax.Array  # [delay] past values of cost_ema (ring buffer)
    position: jax.Array  # [] int32 ring-buffer write position
    count: jax.Array  # [] int32 updates so far
    multiplier: jax.Array  # [] λ


class PIDTerms(NamedTuple):
    """One update's multiplier λ and its parts (scalars): K_P · P, the integral I, K_D · D, and the smoothed cost."""

    multiplier: jax.Array
    p_term: jax.Array
    i_term: jax.Array
    d_term: jax.Array
    cost_ema: jax.Array


def pid_init(cfg: PIDConfig) -> PIDState:
    """All zeros (λ = 0), a [cfg.delay] history buffer; the first update fills the buffer with its cost."""
    z = jnp.zeros((), jnp.float32)
    return PIDState(
        z, z, z, jnp.zeros((cfg.delay,), jnp.float32), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), z
    )


def pid_update(state: PIDState, cost: jax.Array, cfg: PIDConfig) -> tuple[PIDState, PIDTerms]:
    """One controller step on the measured (normalised) cost; pure, jit-able."""
    cost = jnp.asarray(cost, jnp.float32)
    first = state.count == 0
    delta = cost - cfg.cost_limit
    p_error = jnp.where(first, delta, cfg.p_ema * state.p_error + (1 - cfg.p_ema) * delta)
    integral = jnp.maximum(0.0, state.integral + cfg.ki * delta)
    if cfg.i_max is not None:
        integral = jnp.minimum(integral, cfg.i_max)
    cost_ema = jnp.where(first, cost, cfg.d_ema * state.cost_ema + (1 - cfg.d_ema) * cost)
    # before `delay` updates exist, difference against the first smoothed cost (the buffer starts filled with it)
    history = jnp.where(first, jnp.full_like(state.history, cost_ema), state.history)
    delayed = history[state.position]  # written `delay` updates ago (the oldest entry)
    d_error = jnp.maximum(0.0, cost_ema - delayed)
    history = history.at[state.position].set(cost_ema)
    p_term = cfg.kp * p_error
    d_term = cfg.kd * d_error
    multiplier = jnp.maximum(0.0, p_term + integral + d_term)
    if cfg.lambda_max is not None:
        multiplier = jnp.minimum(multiplier, cfg.lambda_max)
    new_state = PIDState(
        integral, p_error, cost_ema, history, (state.position + 1) % cfg.delay, state.count + 1, multiplier
    )
    return new_state, PIDTerms(multiplier, p_term, integral, d_term, cost_ema)
