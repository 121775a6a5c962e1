"""Gumbel-softmax hard gate: a small MLP over the normalised features picks one of a set of actions.

Training (``train=True``) draws ``y = one_hot(argmax((logits + g) / τ))`` with Gumbel noise ``g`` and passes the
gradient of the soft sample ``softmax((logits + g) / τ)`` straight through (the forward pass is exactly one-hot).
``τ`` anneals exponentially from ``temperature_start`` to ``temperature_end`` over ``anneal_steps`` global steps
(``GateInput.step``). Evaluation takes the argmax of the logits (no noise). ``out.scale`` = ``y · λ_options`` so
the trainer can backpropagate the task loss through the gating scale; ``aux["one_hot"]`` lets it weight costs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ponderttt.gating.actions import NUM_ACTIONS, NUM_STEPS, SKIP, UPDATE_1, UPDATE_2, UPDATE_4, action_from_name
from ponderttt.gating.base import GateInput, GateOutput, register_gate
from ponderttt.gating.mlp import MLP

BINARY_ACTIONS = (SKIP, UPDATE_1)
STEP_ACTIONS = (SKIP, UPDATE_1, UPDATE_2, UPDATE_4)


@dataclasses.dataclass(frozen=True)
class GumbelConfig:
    """num_features: F of the input features. actions: the action codes the gate chooses among (K of them).
    temperature_start / temperature_end / anneal_steps: the τ schedule (see ``gumbel_temperature``).
    Raises ValueError on fewer than 2 distinct or invalid actions, or an increasing / non-positive τ."""

    num_features: int = 32
    hidden: tuple[int, ...] = (64,)
    actions: tuple[int, ...] = BINARY_ACTIONS  # binary SKIP/UPDATE_1, or STEP_ACTIONS for k ∈ {0, 1, 2, 4}
    temperature_start: float = 1.0
    temperature_end: float = 0.1
    anneal_steps: int = 10_000

    def __post_init__(self):
        if len(self.actions) < 2 or len(set(self.actions)) != len(self.actions):
            raise ValueError(f"GumbelConfig.actions needs >= 2 distinct action codes, got {self.actions}")
        if any(not 0 <= a < NUM_ACTIONS for a in self.actions):
            raise ValueError(f"GumbelConfig.actions must be action codes in [0, {NUM_ACTIONS}), got {self.actions}")
        if not 0 < self.temperature_end <= self.temperature_start:
            raise ValueError(
                f"need 0 < temperature_end <= temperature_start, got {self.temperature_end}, {self.temperature_start}"
            )
        if self.anneal_steps < 0:
            raise ValueError(f"anneal_steps must be >= 0, got {self.anneal_steps}")


def gumbel_temperature(step: jax.Array, cfg: GumbelConfig) -> jax.Array:
    """Exponential annealing: τ(step) = start · (end/start)^(step/anneal_steps), held at ``end`` afterwards."""
    if cfg.anneal_steps == 0:
        return jnp.asarray(cfg.temperature_end, jnp.float32)
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / cfg.anneal_steps, 0.0, 1.0)
    return cfg.temperature_start * (cfg.temperature_end / cfg.temperature_start) ** frac


@jax.custom_vjp
def straight_through_one_hot(soft: jax.Array) -> jax.Array:
    """Forward: exact one-hot of ``argmax(soft)``; backward: the identity (gradient of ``soft``)."""
    return jax.nn.one_hot(jnp.argmax(soft, axis=-1), soft.shape[-1], dtype=soft.dtype)


def _st_fwd(soft):
    return straight_through_one_hot(soft), None


def _st_bwd(_, g):
    return (g,)


straight_through_one_hot.defvjp(_st_fwd, _st_bwd)


def gumbel_softmax(
    logits: jax.Array, key: jax.Array, temperature: jax.Array, hard: bool = True
) -> tuple[jax.Array, jax.Array]:
    """[..., K] logits -> (sample, soft sample). ``hard``: the sample is one-hot with straight-through gradients."""
    noise = jax.random.gumbel(key, logits.shape, jnp.float32)
    soft = jax.nn.softmax((logits.astype(jnp.float32) + noise) / temperature, axis=-1)
    return (straight_through_one_hot(soft) if hard else soft), soft


class GumbelGate(nnx.Module):
    """Learned hard gate over ``cfg.actions`` (see module doc)."""

    kind = "discrete"
    causal = True

    def __init__(self, cfg: GumbelConfig = GumbelConfig(), *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.net = MLP(cfg.num_features, cfg.hidden, len(cfg.actions), rngs=rngs, out_scale=0.1)

    def init_state(self, batch_size: int) -> tuple:
        """Stateless: ``()``."""
        return ()

    def __call__(
        self, inputs: GateInput, state: tuple, key: jax.Array | None = None, *, train: bool = False
    ) -> GateOutput:
        """[B] actions from ``cfg.actions``; ``scale`` = one-hot · steps ([B] float32, differentiable when training).
        ``train=True`` needs ``key`` and (when annealing) ``inputs.step``, else ValueError."""
        cfg = self.cfg
        logits = self.net(inputs.features)  # [B, K]
        aux = {"logits": logits, "probs": jax.nn.softmax(logits, axis=-1)}
        if train:
            if key is None:
                raise ValueError("GumbelGate(train=True) draws Gumbel noise: pass a PRNG key")
            if inputs.step is None and cfg.anneal_steps > 0:
                raise ValueError("GumbelGate(train=True) needs GateInput.step (global step) for temperature annealing")
            temperature = gumbel_temperature(0 if inputs.step is None else inputs.step, cfg)
            one_hot, _ = gumbel_softmax(logits, key, temperature)
            aux["temperature"] = temperature
        else:
            one_hot = jax.nn.one_hot(jnp.argmax(logits, axis=-1), len(cfg.actions), dtype=jnp.float32)
        choice = jnp.argmax(one_hot, axis=-1)
        action = jnp.asarray(cfg.actions, jnp.int32)[choice]
        option_scales = jnp.asarray([NUM_STEPS[a] for a in cfg.actions], jnp.float32)
        aux["one_hot"] = one_hot
        return GateOutput(action, one_hot @ option_scales, state, aux)


@register_gate("gumbel")
def _make_gumbel(variant: str | None = None, *, rngs: nnx.Rngs, **cfg) -> GumbelGate:
    """'gumbel' / 'gumbel:binary' (SKIP vs update_action, default UPDATE_1) or 'gumbel:steps' (k ∈ {0, 1, 2, 4})."""
    update_action = cfg.pop("update_action", UPDATE_1)
    if isinstance(update_action, str):
        update_action = action_from_name(update_action)
    if variant in (None, "binary"):
        cfg.setdefault("actions", (SKIP, update_action))
    elif variant == "steps":
        cfg.setdefault("actions", STEP_ACTIONS)
    else:
        raise ValueError(f"gumbel gate variants: 'gumbel:binary' or 'gumbel:steps', got 'gumbel:{variant}'")
    return GumbelGate(GumbelConfig(**cfg), rngs=rngs)
