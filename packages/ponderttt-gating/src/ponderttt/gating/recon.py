"""Reconstruction gating (training-free) with an online budget tracker.

Signal ``s`` (default: the chunk's reconstruction loss before the update, "step 0") per sequence. Normal mode
updates when ``s > τ``; inverted mode (needed for 350M+ backbones in the published results) when ``s < τ``.
``τ`` starts from a validation-set quantile (``calibrate_threshold``) and, with ``track=True``, follows the
stream. The threshold is ``τ = c + o``: a centre ``c`` (EMA of the batch-mean signal, a feed-forward on the
signal's location) plus an offset ``o`` driven by quantile tracking::

    o ← o + sign · lr · spread · (realised_rate_t − target_rate)       (sign = +1 normal, −1 inverted)

i.e. an integral controller on the realised update rate: summed over T chunks, the rate error equals
``sign · (o_T − o_0) / (lr · spread · T)``, so the long-run realised rate converges to the target. The centre
makes the loop type-2: a drifting signal (a ramp) leaves the centre a constant lag behind, which the integral
absorbs, so the rate error vanishes on ramps as well as on step shifts (``center_decay=None`` turns the centre
off: pure quantile tracking). ``spread`` is an EMA of ``mean |s − τ|``, which makes ``lr`` unit-free. All of
it lives in ``ReconState``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ponderttt.gating.actions import NUM_ACTIONS, SKIP, UPDATE_1, action_from_name, action_to_gating_scale
from ponderttt.gating.base import GateInput, GateOutput, register_gate
from ponderttt.gating.features import FeatureConfig


def calibrate_threshold(signal: jax.Array, target_rate: float, invert: bool = False) -> tuple[float, float]:
    """τ such that a fraction ``target_rate`` of ``signal`` (any shape, validation values) would be updated.

    Returns (τ, spread): τ = quantile(1 − rate) in normal mode, quantile(rate) when inverted; spread = mean |s − τ|
    (the tracker's initial scale). Host-side (numpy), called once before a run. ``ReconGate.calibrated`` also
    starts the tracker's centre at the validation mean.
    """
    if not 0.0 < target_rate < 1.0:
        raise ValueError(f"target_rate must be in (0, 1) to calibrate a threshold, got {target_rate}")
    values = np.asarray(signal, np.float64).reshape(-1)
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise ValueError(f"calibration signal must be non-empty and finite; got {values.size} values")
    tau = float(np.quantile(values, target_rate if invert else 1.0 - target_rate))
    spread = float(np.mean(np.abs(values - tau)))
    return tau, max(spread, 1e-6)


@dataclasses.dataclass(frozen=True)
class ReconConfig:
    """signal_index: column of ``GateInput.features`` read when ``GateInput.signal`` is None.
    tau / spread: initial threshold and scale (from ``calibrate_threshold``); center: initial centre (default τ).
    track: adapt τ online to hold ``target_rate``; lr: tracker gain (fraction of ``spread`` per unit rate error);
    spread_decay: EMA decay of the spread estimate; center_decay: EMA decay of the centre (None: no centre)."""

    target_rate: float = 0.5
    invert: bool = False
    tau: float = 0.0
    spread: float = 1.0
    track: bool = True
    lr: float = 0.1
    spread_decay: float = 0.99
    center_decay: float | None = 0.9
    center: float | None = None
    signal_index: int | None = None
    update_action: int = UPDATE_1

    def __post_init__(self):
        if not 0.0 <= self.target_rate <= 1.0:
            raise ValueError(f"ReconConfig.target_rate must be in [0, 1], got {self.target_rate}")
        if self.spread <= 0 or self.lr < 0 or not 0.0 <= self.spread_decay < 1.0:
            raise ValueError(f"ReconConfig needs spread > 0, lr >= 0, spread_decay in [0, 1); got {self}")
        if self.center_decay is not None and not 0.0 <= self.center_decay < 1.0:
            raise ValueError(f"ReconConfig.center_decay must be None or in [0, 1), got {self.center_decay}")
        if not 0 <= self.update_action < NUM_ACTIONS:
            raise ValueError(f"ReconConfig.update_action must be an action code, got {self.update_action}")


class ReconState(NamedTuple):
    """The threshold tracker's carried state (float32 scalars shared by the batch)."""

    tau: jax.Array  # [] threshold, in signal units
    spread: jax.Array  # [] EMA of mean |s - tau|
    center: jax.Array  # [] EMA of the batch-mean signal (tau - center is the integral term)
    updates: jax.Array  # [] float32, number of updates so far (for the realised rate)
    decisions: jax.Array  # [] float32, number of (sequence, chunk) decisions so far


def recon_decide(signal: jax.Array, state: ReconState, cfg: ReconConfig) -> tuple[jax.Array, ReconState]:
    """[B] signal -> ([B] bool update, new state). The pure math of the gate (τ update included)."""
    signal = signal.astype(jnp.float32)
    update = signal < state.tau if cfg.invert else signal > state.tau
    rate = jnp.mean(update.astype(jnp.float32))
    sign = -1.0 if cfg.invert else 1.0
    tau, spread, center = state.tau, state.spread, state.center
    if cfg.track:
        offset = tau - center + sign * cfg.lr * spread * (rate - cfg.target_rate)
        if cfg.center_decay is not None:
            center = cfg.center_decay * center + (1.0 - cfg.center_decay) * jnp.mean(signal)
        tau = center + offset
        spread = cfg.spread_decay * spread + (1.0 - cfg.spread_decay) * jnp.mean(jnp.abs(signal - state.tau))
        spread = jnp.maximum(spread, 1e-6)
    new_state = ReconState(
        tau,
        spread,
        center,
        state.updates + jnp.sum(update.astype(jnp.float32)),
        state.decisions + jnp.asarray(signal.shape[0], jnp.float32),
    )
    return update, new_state


@dataclasses.dataclass(frozen=True)
class ReconGate:
    """Training-free gate on a reconstruction-loss signal with an online budget tracker (see module doc)."""

    cfg: ReconConfig = ReconConfig()
    kind = "discrete"
    causal = True

    @classmethod
    def calibrated(
        cls, validation_signal: jax.Array, target_rate: float, invert: bool = False, **cfg: Any
    ) -> ReconGate:
        """A gate whose τ and spread come from ``calibrate_threshold`` on ``validation_signal`` and whose centre
        starts at its mean (unless ``center`` is given); other ``cfg`` keys go to ``ReconConfig``."""
        tau, spread = calibrate_threshold(validation_signal, target_rate, invert)
        center = float(np.mean(np.asarray(validation_signal, np.float64)))
        cfg.setdefault("center", center)
        return cls(ReconConfig(target_rate=target_rate, invert=invert, tau=tau, spread=spread, **cfg))

    def init_state(self, batch_size: int) -> ReconState:
        """τ, spread and centre from the config (centre defaults to τ), zero counts; independent of the batch size."""
        z = jnp.zeros((), jnp.float32)
        center = self.cfg.tau if self.cfg.center is None else self.cfg.center
        f32 = lambda x: jnp.asarray(x, jnp.float32)
        return ReconState(f32(self.cfg.tau), f32(self.cfg.spread), f32(center), z, z)

    def __call__(
        self, inputs: GateInput, state: ReconState, key: jax.Array | None = None, *, train: bool = False
    ) -> GateOutput:
        """[B] ``update_action`` where the signal crosses τ, else SKIP. Reads ``inputs.signal`` or, when None, column
        ``cfg.signal_index`` of the features (ValueError if neither). ``aux``: "tau" used, "realised_rate" so far."""
        signal = inputs.signal
        if signal is None:
            if self.cfg.signal_index is None:
                raise ValueError(
                    "ReconGate needs GateInput.signal ([B] reconstruction loss) or ReconConfig.signal_index "
                    "(the feature column to read, e.g. features.feature_index('recon_step0'))"
                )
            signal = inputs.features[:, self.cfg.signal_index]
        update, new_state = recon_decide(signal, state, self.cfg)
        action = jnp.where(update, self.cfg.update_action, SKIP).astype(jnp.int32)
        aux = {"tau": state.tau, "realised_rate": new_state.updates / jnp.maximum(new_state.decisions, 1.0)}
        return GateOutput(action, action_to_gating_scale(action), new_state, aux)


@register_gate("recon")
def _make_recon(
    variant: str | None = None, calibration_signal=None, signal: str | None = None, extended: bool = False, **cfg
) -> ReconGate:
    """'recon' or 'recon:inverted'; pass calibration_signal=<validation values> to calibrate τ and spread.

    ``signal="recon_step0"`` (or any feature name of the 32-D / ``extended`` 64-D layout) reads that feature
    column when ``GateInput.signal`` is not given; the default is to require ``GateInput.signal``.
    """
    if signal is not None:
        if "signal_index" in cfg:
            raise ValueError(f"recon gate: give signal={signal!r} or signal_index={cfg['signal_index']}, not both")
        cfg["signal_index"] = FeatureConfig(extended=extended).index(signal)
    if variant is not None:
        if variant not in ("inverted", "normal"):
            raise ValueError(f"recon gate variants: 'recon:normal' or 'recon:inverted', got 'recon:{variant}'")
        cfg["invert"] = variant == "inverted"
    if isinstance(cfg.get("update_action"), str):
        cfg["update_action"] = action_from_name(cfg["update_action"])
    if calibration_signal is not None:
        if "target_rate" not in cfg:
            raise ValueError("recon gate: calibration_signal needs target_rate=<fraction of chunks to update>")
        for fixed in ("tau", "spread"):
            if fixed in cfg:
                raise ValueError(f"recon gate: {fixed}= is set by calibration_signal; give one or the other")
        return ReconGate.calibrated(calibration_signal, **cfg)
    return ReconGate(ReconConfig(**cfg))
