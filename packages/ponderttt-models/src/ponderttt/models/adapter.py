"""Fast-weight adapters from ponderttt.ttt inserted into a backbone, and the frozen-backbone filters.

A site is "head" (after the final norm, before the readout: the default) or "block_<i>" (after block i,
fed through a fresh norm of the backbone's kind). Each site adds `h + out_scale * TTT(x)` with `out_scale`
initialised to zero, so a model with adapters equals its backbone exactly until `out_scale` is trained.

Only adapter parameters are trainable: `TRAINABLE` is the nnx filter to give `nnx.Optimizer(..., wrt=...)`,
`nnx.grad(..., argnums=nnx.DiffState(0, TRAINABLE))` and `nnx.state(model, TRAINABLE)`; `BACKBONE` is the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ponderttt.models.layers import LayerNorm, RMSNorm

ADAPTER_KINDS = {"linear": "TTTLinear", "mlp": "TTTMLP", "lora": "LoRATTT"}
PROTOCOLS = ("carry", "reset")

# Parameters under `adapters` (fast-weight layers, their norms and output scales) or under a `gate` attribute.
TRAINABLE = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("adapters"), nnx.PathContains("gate")))
BACKBONE = nnx.All(nnx.Param, nnx.Not(TRAINABLE))


class AdapterSite(nnx.Module):
    """[norm →] fast-weight layer → zero-initialised per-channel output scale, added to the residual stream."""

    def __init__(self, layer: nnx.Module, hidden_size: int, norm: nnx.Module | None):
        self.norm = norm
        self.layer = layer
        self.out_scale = nnx.Param(jnp.zeros((hidden_size,), jnp.float32), logical_axes=("norm",))

    def __call__(self, h, **ttt_kwargs):
        x = h if self.norm is None else self.norm(h)
        y, stats = self.layer(x, **ttt_kwargs)
        return self._residual(h, y), stats

    def decode(self, h_b1c, decode_state):
        """One token per row under the fast weights of `decode_state` (from `layer.init_decode_state`), without
        update: equals `__call__` with gating_scale 0 token by token. Returns (h, new decode state)."""
        x = h_b1c if self.norm is None else self.norm(h_b1c)
        y, decode_state = self.layer.decode_step(x, decode_state, gating_scale=0.0)
        return self._residual(h_b1c, y), decode_state

    def _residual(self, h, y):
        return h + (y.astype(jnp.float32) * self.out_scale[...]).astype(h.dtype)


def _layer_class(kind: str):
    if kind not in ADAPTER_KINDS:
        raise ValueError(f"adapter kind={kind!r} is not known; choose one of {sorted(ADAPTER_KINDS)}")
    import ponderttt.ttt as ttt

    name = ADAPTER_KINDS[kind]
    if not hasattr(ttt, name):
        raise ValueError(f"adapter kind={kind!r} needs ponderttt.ttt.{name}, which this ponderttt-ttt lacks")
    return getattr(ttt, name)


def _site_names(layers: Sequence[str | int], num_layers: int) -> tuple[str, ...]:
    names = []
    for site in layers:
        if site == "head":
            names.append("head")
            continue
        index = int(site.removeprefix("block_")) if isinstance(site, str) else int(site)
        if not 0 <= index < num_layers:
            raise ValueError(f"adapter site {site!r}: block index must be in [0, {num_layers})")
        names.append(f"block_{index}")
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"adapter sites {list(layers)} must be distinct and not empty")
    return tuple(names)


def add_ttt_adapter(
    model,
    ttt_config,
    *,
    kind: str = "linear",
    layers: Sequence[str | int] = ("head",),
    rngs: nnx.Rngs | None = None,
):
    """Adds fast-weight adapters to `model` in place and returns it.

    ttt_config: a `ponderttt.ttt.TTTConfig` whose hidden_size equals the model's.
    kind: "linear" (TTTLinear), "mlp" (TTTMLP) or "lora" (LoRATTT).
    layers: sites, "head" and/or block indices (ints or "block_<i>"); adapters run in model order.
    """
    hidden = model.config.hidden_size
    if ttt_config.hidden_size != hidden:
        raise ValueError(
            f"TTTConfig.hidden_size={ttt_config.hidden_size} but the model's hidden size is {hidden}; "
            f"build the config with hidden_size={hidden}"
        )
    if model.adapters is not None:
        raise ValueError("the model already has adapters; build a fresh model to change them")
    cls = _layer_class(kind)
    rngs = nnx.Rngs(0) if rngs is None else rngs
    names = _site_names(layers, model.config.num_layers)
    sites = []
    for name in names:
        norm = None if name == "head" else _fresh_norm(model, hidden)
        sites.append(AdapterSite(cls(ttt_config, rngs=rngs), hidden, norm))
    model.adapter_sites = names
    model.adapters = nnx.data(nnx.List(sites))
    model.ttt_config = ttt_config
    return model


def _fresh_norm(model, hidden: int):
    cfg = model.config
    if hasattr(cfg, "layer_norm_epsilon"):
        return LayerNorm(hidden, cfg.layer_norm_epsilon, dtype=model.dtype)
    return RMSNorm(hidden, cfg.rms_norm_eps, dtype=model.dtype)


def chunk_reset_mask(batch: int, seq: int, chunk_size: int, reset_mask=None):
    """The `reset` protocol: fresh initial fast weights at every chunk start (OR any given reset_mask)."""
    starts = jnp.asarray(np.arange(seq) % chunk_size == 0)
    mask = jnp.broadcast_to(starts, (batch, seq))
    return mask if reset_mask is None else mask | jnp.asarray(reset_mask, bool)


def init_ttt_state(model, batch_size: int) -> Any:
    """Fresh fast-weight state: the adapter's for one site, a {site: state} dict for several."""
    sites = zip(model.adapter_sites, model.adapters, strict=True)
    states = {name: site.layer.init_state(batch_size) for name, site in sites}
    return states[model.adapter_sites[0]] if len(states) == 1 else states


def trainable_state(model) -> nnx.State:
    return nnx.state(model, TRAINABLE)


def count_params(model, what=nnx.Param) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, what)))
