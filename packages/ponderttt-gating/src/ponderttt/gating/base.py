"""The one gate interface and the registry of gates by name.

A gate decides, per sequence and per chunk, how much the fast-weight layer updates on that chunk::

    out = gate(GateInput(features=f_bf), state, key, train=False)   # f_bf: [B, F] float32
    out.action   # [B] int32 in {SKIP, UPDATE_1, UPDATE_2, UPDATE_4}, or None for a continuous gate
    out.scale    # [B] float32 gating scale λ (for discrete gates λ = number of steps, see actions.py)
    out.state    # the gate's carried state for the next chunk (EMAs, thresholds, counters: a pytree)
    out.aux      # dict of [B] or scalar arrays for logging / training (log-probs, values, thresholds, ...)

``state = gate.init_state(batch_size)`` starts a stream. Every gate is jit-able (pure gates are frozen
dataclasses: pass them as static or close over them; learned gates are NNX modules: use ``nnx.jit`` or
``nnx.split``/``nnx.merge``) and vmap-able over a leading axis of independent streams. Randomness only comes
from the explicit ``key`` argument.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from ponderttt.gating.actions import CostTable


class GateInput(NamedTuple):
    """What a gate sees for one chunk of a batch of sequences.

    features:  [B, F] float32, per-sequence features of the current chunk (see ``features.py``).
    signal:    [B] float32 or None, a named raw scalar signal (e.g. the chunk's step-0 reconstruction loss)
               for threshold gates; when None they read a column of ``features``.
    advantage: [B] or [B, N] float32 or None, loss(SKIP) - loss(UPDATE) per chunk: **non-causal**, only the
               oracle reads it.
    step:      int32 scalar or None, the global training step (drives schedules such as Gumbel temperature).
    """

    features: jax.Array
    signal: jax.Array | None = None
    advantage: jax.Array | None = None
    step: jax.Array | None = None


class GateOutput(NamedTuple):
    """A gate's decision for one chunk (a pytree: safe to return from jit / scan / vmap)."""

    action: jax.Array | None
    scale: jax.Array
    state: Any
    aux: dict[str, jax.Array]


@runtime_checkable
class Gate(Protocol):
    """Protocol every gate follows. ``kind`` is "discrete" or "continuous"; ``causal`` is False only for oracles."""

    kind: str
    causal: bool

    def init_state(self, batch_size: int) -> Any:
        """The carried state at the start of a stream of ``batch_size`` sequences (a pytree; ``()`` if stateless)."""
        ...

    def __call__(
        self, inputs: GateInput, state: Any, key: jax.Array | None = None, *, train: bool = False
    ) -> GateOutput:
        """Decide one chunk for every sequence of the batch. ``key`` is required by gates that sample (random,
        Gumbel and PPO with ``train=True``); ``train`` switches learned gates from argmax to sampling."""
        ...


def decision_cost(out: GateOutput, table: CostTable, normalised: bool = True) -> jax.Array:
    """[B] cost of a gate's decision: the action's cost for discrete gates, the cost of λ for continuous ones.
    ``normalised``: in [0, 1] (SKIP 0, UPDATE_4 / λ = 4 -> 1), the unit budgets and PPO constraints use."""
    if out.action is not None:
        return table.normalised(out.action) if normalised else table.cost(out.action)
    return table.normalised_scale_cost(out.scale) if normalised else table.scale_cost(out.scale)


def roll_gate(
    gate: Gate,
    features: jax.Array,
    keys: jax.Array,
    *,
    signal: jax.Array | None = None,
    advantage: jax.Array | None = None,
    step: jax.Array | None = None,
    state: Any = None,
    train: bool = False,
) -> tuple[GateOutput, Any]:
    """The gate's decisions over the chunks of a batch of sequences, in order: one ``lax.scan`` whose carry is the
    gate's state (EMAs, thresholds, budget trackers), so decision j sees only chunks <= j.

    features [B, N, F]; keys [N] (one per chunk); signal [B, N] or None; advantage (oracles only) [B, N] or
    [B] or None, passed unchanged to every chunk; step: the training step; state: where the stream starts (None:
    ``gate.init_state(B)``). Returns (the stacked GateOutput: action [B, N] or None, scale [B, N], aux values
    [B, N] or [N]; the final state). Jit- and grad-able when the gate is (λ is differentiable for learned gates).
    """
    b = features.shape[0]
    carry = gate.init_state(b) if state is None else state
    xs = (jnp.swapaxes(features, 0, 1), None if signal is None else jnp.swapaxes(signal, 0, 1), keys)

    def decide(carry: Any, x: tuple[jax.Array, jax.Array | None, jax.Array]) -> tuple[Any, GateOutput]:
        f, s, key = x
        out = gate(GateInput(features=f, signal=s, advantage=advantage, step=step), carry, key, train=train)
        return out.state, out._replace(state=None)

    final, outs = jax.lax.scan(decide, carry, xs)
    moved = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1) if x.ndim >= 2 else x, (outs.action, outs.scale, outs.aux))
    return GateOutput(moved[0], moved[1], final, moved[2]), final


GateFactory = Callable[..., Gate]
_GATES: dict[str, GateFactory] = {}


def register_gate(name: str) -> Callable[[GateFactory], GateFactory]:
    """Decorator registering a gate factory (a class or function returning a gate) under ``name``.

    ``make_gate("name:variant", **cfg)`` calls the factory with ``variant="variant"`` plus ``cfg``.
    """
    if ":" in name or not name:
        raise ValueError(f"gate names must be non-empty and contain no ':', got {name!r}")

    def decorator(factory: GateFactory) -> GateFactory:
        if name in _GATES and _GATES[name] is not factory:
            raise ValueError(f"a gate named {name!r} is already registered ({_GATES[name]!r}); pick another name")
        _GATES[name] = factory
        return factory

    return decorator


def available_gates() -> tuple[str, ...]:
    """Names accepted by ``make_gate`` (sorted)."""
    return tuple(sorted(_GATES))


def make_gate(spec: str, **cfg: Any) -> Gate:
    """Build a gate from a config string: ``"recon"``, ``"fixed:update_1"``, ``"oracle:per_sequence"``, ...

    The part after ``:`` is passed to the factory as ``variant``; keyword arguments go through unchanged
    (learned gates need ``rngs=nnx.Rngs(seed)``).
    """
    name, sep, variant = spec.partition(":")
    if name not in _GATES:
        raise KeyError(f"no gate named {name!r} (from spec {spec!r}); registered gates: {available_gates()}")
    if sep:
        if "variant" in cfg:
            raise ValueError(f"gate spec {spec!r} gives a variant and cfg gives variant={cfg['variant']!r}; give one")
        cfg = {**cfg, "variant": variant}
    return _GATES[name](**cfg)
