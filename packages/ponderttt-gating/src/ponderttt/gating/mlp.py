"""The small MLP every learned gate uses (tanh hidden layers, a small-initialised output layer)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class MLP(nnx.Module):
    """``in_features -> hidden... -> out_features``; tanh between layers. ``out_scale`` scales the output layer's
    initial weights (0.01 for policy logits: a near-uniform initial policy); ``out_bias`` its initial bias."""

    def __init__(
        self,
        in_features: int,
        hidden: tuple[int, ...],
        out_features: int,
        *,
        rngs: nnx.Rngs,
        out_scale: float = 1.0,
        out_bias: float = 0.0,
    ):
        dims = (in_features, *hidden)
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:], strict=True)])
        init = jax.nn.initializers.variance_scaling(out_scale**2, "fan_in", "truncated_normal")
        bias_init = jax.nn.initializers.constant(out_bias)
        self.head = nnx.Linear(dims[-1], out_features, kernel_init=init, bias_init=bias_init, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., in_features] -> [..., out_features]."""
        for layer in self.layers:
            x = jnp.tanh(layer(x))
        return self.head(x)
