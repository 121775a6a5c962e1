"""The inner models of the three layers: TTT-Linear and LoRA-TTT (each a `FusedInnerModel`, with a fused scan
body for calls without resets) and TTT-MLP (an `InnerModel`, generic body). The maths of the scans and of the
protocols is in `inner.py`. Each model is a registered pytree (its arrays are leaves), so that the scans can take
it as an argument of their custom backward pass."""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from ponderttt.ttt.inner import Fast, InnerInputs, MiniBatch
from ponderttt.ttt.ops import clip_by_norm, gelu_tanh, layer_norm


def _mm(x: jax.Array, w: jax.Array) -> jax.Array:
    """[B, h, K, a] @ [B, h, a, b] -> [B, h, K, b]."""
    return jnp.einsum("bhka,bhac->bhkc", x, w)


def _attn(eta_or_a: jax.Array, g: jax.Array) -> jax.Array:
    """[B, h, K, K] @ [B, h, K, d] -> [B, h, K, d] (row i gathers columns j)."""
    return jnp.einsum("bhij,bhjd->bhid", eta_or_a, g)


def _gram(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum("bhid,bhjd->bhij", a, b)


def ln_loss_grad(
    z: jax.Array, target: jax.Array, weight: jax.Array, bias: jax.Array, eps: float
) -> tuple[jax.Array, jax.Array]:
    """(½‖LN(z) − target‖² per token, its gradient dℓ/dz) over the last axis, the LayerNorm backward written out:
    with x̂ = (z − μ)/σ and g = (LN(z) − target) ⊙ weight, dℓ/dz = (g − mean(g) − x̂ · mean(g ⊙ x̂)) / σ.

    Used by the fused scan bodies (the generic body and the primal form take the gradient with `jax.vjp`).
    The means are products with a 1/d vector (XLA:CPU runs those faster than small reductions), the last two
    in one product."""
    mean_vec = jnp.full((z.shape[-1],), 1.0 / z.shape[-1], z.dtype)
    mean = lambda a: (a @ mean_vec)[..., None]
    centered = z - mean(z)
    inv_std = jax.lax.rsqrt(mean(centered * centered) + eps)
    x_hat = centered * inv_std
    err = x_hat * weight + bias - target
    g = err * weight
    means = jnp.stack([g, g * x_hat], axis=-2) @ mean_vec  # [..., 2]
    dz = inv_std * (g - means[..., :1] - x_hat * means[..., 1:])
    return 0.5 * jnp.sum(err * err, axis=-1), dz


@dataclasses.dataclass(frozen=True)
class _LayerNormInner(abc.ABC):
    """Shared by TTT-Linear and TTT-MLP: loss ½‖LN(z) − (v − k)‖² with a per-head LayerNorm, output q + LN(z̄)."""

    ln_weight: jax.Array  # [h, 1, d]
    ln_bias: jax.Array  # [h, 1, d]
    eps: float = dataclasses.field(metadata={"static": True})
    has_bias: ClassVar[bool] = True

    @abc.abstractmethod
    def forward(self, fast: Fast, x: jax.Array, extra: jax.Array | None = None) -> jax.Array:
        """z = f(x; fast), defined by each inner model."""

    def loss_grad(self, z: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(½‖err‖² per token [B, h, K], dℓ/dz [B, h, K, d]); the LN backward comes from jax.vjp."""
        ln_out, ln_vjp = jax.vjp(lambda z_: layer_norm(z_, self.ln_weight, self.ln_bias, self.eps), z)
        err = ln_out - (v - k)
        return 0.5 * jnp.sum(err * err, axis=-1), ln_vjp(err)[0]

    def loss(self, z: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """½‖LN(z) − (v − k)‖² per token, without the gradient."""
        err = layer_norm(z, self.ln_weight, self.ln_bias, self.eps) - (v - k)
        return 0.5 * jnp.einsum("...d,...d->...", err, err)  # a dot: faster than a reduction on CPU

    def query(self, fast: Fast, q: jax.Array, extra: jax.Array | None = None) -> jax.Array:
        """f(q; fast): the no-update z̄."""
        return self.forward(fast, q)

    def output(self, q: jax.Array, zbar: jax.Array) -> jax.Array:
        """q + LN(z̄): the inner model f(x) = x + LN(z) read at the queries."""
        return q + layer_norm(zbar, self.ln_weight, self.ln_bias, self.eps)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LinearStepInputs:
    """What TTT-Linear's fused step reads per mini-batch (leading axis M before the scan slices it)."""

    qk: jax.Array  # [B, h, 2K, d + 1] the queries then the keys, each with a column of ones appended
    k_aug: jax.Array  # [B, h, K, d + 1] [η_last ⊙ k | η_last]: the carried update's left factor
    target: jax.Array  # [B, h, K, d] v − k


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LinearAux:
    """What TTT-Linear's fused step emits per mini-batch for the outputs and losses computed after the scan."""

    zq: jax.Array  # [B, h, K, d] qW + b at the mini-batch start
    zk: jax.Array  # [B, h, K, d] kW + b at the mini-batch start (dropped by XLA when the losses are unused)
    dz: jax.Array  # [B, h, K, d] the (clipped) per-token gradients G = dℓ/dz


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LinearInner(_LayerNormInner):
    """TTT-Linear: z = kW + b, loss ½‖LN(z) − (v − k)‖², output q + LN(z̄). Fast weights W1 [B, h, d, d],
    b1 [B, h, d]. A `FusedInnerModel[jax.Array, LinearStepInputs, LinearAux]`."""

    def forward(self, fast: Fast, x: jax.Array, extra: jax.Array | None = None) -> jax.Array:
        """xW + b."""
        return _mm(x, fast["W1"]) + fast["b1"][:, :, None, :]

    def dual(
        self,
        fast: Fast,
        q: jax.Array,
        k: jax.Array,
        extra: jax.Array | None,
        dz: jax.Array,
        eta: jax.Array,
        a_qk: jax.Array,
    ) -> jax.Array:
        """z̄ = qW − (η ⊙ M ⊙ qkᵀ) G + b − (η ⊙ M) G, with a_qk = η ⊙ M ⊙ (qkᵀ + 1) precomputed."""
        del k, extra, eta
        return self.forward(fast, q) - _attn(a_qk, dz)

    # -- fused fast path (no resets) ---------------------------------------------------------------------
    # Only what carries the weights from one mini-batch to the next runs in the scan: the weights travel as
    # one augmented matrix [W; b] ([d + 1, d]) and the queries/keys as [q | 1], [k | 1], so that one product
    # gives [q; k] W + b, the LayerNorm gradient is written out (a few fused elementwise passes), and one
    # product gives the carry [W; b] − [η_last ⊙ k | η_last]ᵀ G. The outputs z̄ = qW + b − (η ⊙ M ⊙ (qkᵀ + 1)) G
    # and the losses need only the scanned [q; k]W + b and G, so they are computed after the scan for all
    # mini-batches at once (large batched products instead of many small ones).

    def pack(self, fast: Fast) -> jax.Array:
        """[W; b]: [B, h, d + 1, d]."""
        return jnp.concatenate([fast["W1"], fast["b1"][:, :, None, :]], axis=2)

    def unpack(self, packed: jax.Array) -> Fast:
        """{"W1", "b1"} from [W; b]."""
        return {"W1": packed[:, :, :-1], "b1": packed[:, :, -1]}

    def fused_inputs(self, xs: InnerInputs) -> LinearStepInputs:
        """[q | 1; k | 1], [η_last ⊙ k | η_last] and v − k for all mini-batches."""
        ones = jnp.ones(xs.k.shape[:-1] + (1,), xs.k.dtype)
        eta_last = xs.eta_last[..., None]
        return LinearStepInputs(
            qk=jnp.concatenate([jnp.concatenate([xs.q, ones], -1), jnp.concatenate([xs.k, ones], -1)], 3),
            k_aug=jnp.concatenate([eta_last * xs.k, eta_last], -1),
            target=xs.v - xs.k,
        )

    def fused_step(
        self, packed: jax.Array, x: LinearStepInputs, batch: MiniBatch, grad_clip: float | None
    ) -> tuple[jax.Array, LinearAux]:
        """One mini-batch: (new [W; b], what the outputs and losses need: qW + b, kW + b and G). Reads only x."""
        del batch
        zz = _mm(x.qk, packed)
        mbs = x.target.shape[2]
        zq, zk = zz[:, :, :mbs], zz[:, :, mbs:]
        _, dz = ln_loss_grad(zk, x.target, self.ln_weight, self.ln_bias, self.eps)
        dz = clip_by_norm(dz, grad_clip)
        new = packed - jnp.einsum("bhja,bhjd->bhad", x.k_aug, dz)
        return new, LinearAux(zq=zq, zk=zk, dz=dz)

    def fused_loss_after(self, aux: LinearAux) -> None:
        """None: the loss after the step is computed after the scan (its LayerNorm keeps it finite whenever the new
        weights are, barring an overflow of kW + b)."""
        return None

    def fused_outputs(self, xs: InnerInputs, aux: LinearAux) -> tuple[jax.Array, jax.Array]:
        """(z̄, the no-update output qW + b) for all mini-batches [M, B, h, K, d]."""
        return aux.zq - jnp.einsum("mbhij,mbhjd->mbhid", xs.a_qk, aux.dz), aux.zq

    def fused_losses(self, xs: InnerInputs, aux: LinearAux) -> tuple[jax.Array, jax.Array]:
        """Per-token losses before and after the (first) step, batched over all mini-batches."""
        zk = aux.zk
        # k W' + b' = k W + b − ((k kᵀ + 1) ⊙ η_last) G
        c_after = (jnp.einsum("mbhid,mbhjd->mbhij", xs.k, xs.k) + 1.0) * xs.eta_last[..., None, :]
        z_after = zk - jnp.einsum("mbhij,mbhjd->mbhid", c_after, aux.dz)
        return self.loss(zk, xs.k, xs.v), self.loss(z_after, xs.k, xs.v)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MLPInner(_LayerNormInner):
    """TTT-MLP: z = gelu_tanh(kW1 + b1) W2 + b2 (d -> 4d -> d), same loss and output as TTT-Linear. A plain
    `InnerModel`: its dual form is already a few products, so it runs the generic scan body."""

    def forward(self, fast: Fast, x: jax.Array, extra: jax.Array | None = None) -> jax.Array:
        """gelu_tanh(xW1 + b1) W2 + b2."""
        hidden = gelu_tanh(_mm(x, fast["W1"]) + fast["b1"][:, :, None, :])
        return _mm(hidden, fast["W2"]) + fast["b2"][:, :, None, :]

    def dual(
        self,
        fast: Fast,
        q: jax.Array,
        k: jax.Array,
        extra: jax.Array | None,
        dz: jax.Array,
        eta: jax.Array,
        a_qk: jax.Array,
    ) -> jax.Array:
        """Dual form through both layers: the first layer's z̄1 as in TTT-Linear (with dℓ/dz1 from the GELU's
        vjp), then the second layer's with η ⊙ (gelu(z̄1) gelu(z1)ᵀ + 1)."""
        del extra
        z1 = _mm(k, fast["W1"]) + fast["b1"][:, :, None, :]
        x2, gelu_vjp = jax.vjp(gelu_tanh, z1)
        g1 = gelu_vjp(jnp.einsum("bhkd,bhed->bhke", dz, fast["W2"]))[0]  # dℓ/dz1 at the mini-batch start
        z1_bar = _mm(q, fast["W1"]) + fast["b1"][:, :, None, :] - _attn(a_qk, g1)
        x2_bar = gelu_tanh(z1_bar)
        a2 = eta * (_gram(x2_bar, x2) + 1.0)
        return _mm(x2_bar, fast["W2"]) + fast["b2"][:, :, None, :] - _attn(a2, dz)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRAStepInputs:
    """What LoRA-TTT's fused step reads per mini-batch besides the `MiniBatch`: `InnerInputs` fields of the same
    names."""

    q: jax.Array
    eta: jax.Array
    a_qk: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRAAux:
    """What LoRA-TTT's fused step emits per mini-batch: its outputs and losses, computed inside the scan."""

    zbar: jax.Array  # [B, 1, K, C] the dual-form outputs
    no_update: jax.Array  # [B, 1, K, C] the outputs at the mini-batch start, (q A) B
    err_sq: jax.Array  # [B, 1, K] per-token loss at the mini-batch start
    err_sq_after: jax.Array  # [B, 1, K] per-token loss after the step


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRAInner:
    """LoRA-TTT: z = k P + (k A) B with P frozen; loss ½‖z − v‖²; output the delta (q A) B only.

    One head over the full width (h = 1). With B = 0 the output is exactly zero. Fast weights A [B, 1, C, r],
    B [B, 1, r, C]. A `FusedInnerModel[Fast, LoRAStepInputs, LoRAAux]`.
    """

    has_bias: ClassVar[bool] = False

    def forward(self, fast: Fast, x: jax.Array, extra: jax.Array | None) -> jax.Array:
        """extra + (x A) B, with extra = x P."""
        return extra + _mm(_mm(x, fast["A"]), fast["B"])

    def loss_grad(self, z: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(½‖z − v‖² per token, z − v)."""
        err = z - v
        return 0.5 * jnp.sum(err * err, axis=-1), err

    def loss(self, z: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """½‖z − v‖² per token."""
        err = z - v
        return 0.5 * jnp.sum(err * err, axis=-1)

    def query(self, fast: Fast, q: jax.Array, extra: jax.Array | None = None) -> jax.Array:
        """The delta (q A) B alone (no q P)."""
        return _mm(_mm(q, fast["A"]), fast["B"])

    def dual(
        self,
        fast: Fast,
        q: jax.Array,
        k: jax.Array,
        extra: jax.Array | None,
        dz: jax.Array,
        eta: jax.Array,
        a_qk: jax.Array,
    ) -> jax.Array:
        """Two chained linear maps without bias: A_i = A0 − Σ η_ij kⱼᵀ(G_j B0ᵀ), B_i = B0 − Σ η_ij (k_j A0)ᵀ G_j."""
        del extra
        g1 = jnp.einsum("bhkc,bhrc->bhkr", dz, fast["B"])
        h_q = _mm(q, fast["A"]) - _attn(a_qk, g1)
        h_k = _mm(k, fast["A"])
        return _mm(h_q, fast["B"]) - _attn(eta * _gram(h_q, h_k), dz)

    def output(self, q: jax.Array, zbar: jax.Array) -> jax.Array:
        """z̄ itself: the layer outputs the delta."""
        return zbar

    def pack(self, fast: Fast) -> Fast:
        """The weights as they are ({"A", "B"})."""
        return fast

    def unpack(self, packed: Fast) -> Fast:
        """The weights as they are."""
        return packed

    # Fused path (no resets): one scan step computes the mini-batch's dual-form outputs and losses together
    # with the carry, sharing [q; k] A and the per-token gradients (moving the outputs after the scan, as
    # TTT-Linear does, measured slower here: it must emit A and B for every mini-batch).

    def fused_inputs(self, xs: InnerInputs) -> LoRAStepInputs:
        """The fields of `xs` the step reads besides the `MiniBatch` (no new arrays)."""
        return LoRAStepInputs(q=xs.q, eta=xs.eta, a_qk=xs.a_qk)

    def fused_step(
        self, fast: Fast, x: LoRAStepInputs, batch: MiniBatch, grad_clip: float | None
    ) -> tuple[Fast, LoRAAux]:
        """One mini-batch: (new {"A", "B"}, its outputs and its losses before and after the step)."""
        a, b = fast["A"], fast["B"]
        k, v, extra = batch.k, batch.v, batch.extra
        h_q0, h_k = _mm(x.q, a), _mm(k, a)
        err_sq, dz = self.loss_grad(extra + _mm(h_k, b), k, v)
        dz = clip_by_norm(dz, grad_clip)
        g1 = jnp.einsum("bhkc,bhrc->bhkr", dz, b)
        h_q = h_q0 - _attn(x.a_qk, g1)
        zbar = _mm(h_q, b) - _attn(x.eta * _gram(h_q, h_k), dz)
        eta_last = batch.eta_last[..., None]
        new = {
            "A": a - jnp.einsum("bhjc,bhjr->bhcr", eta_last * k, g1),
            "B": b - jnp.einsum("bhjr,bhjc->bhrc", eta_last * h_k, dz),
        }
        err_sq_after = self.loss(extra + _mm(_mm(k, new["A"]), new["B"]), k, v)
        return new, LoRAAux(zbar=zbar, no_update=_mm(h_q0, b), err_sq=err_sq, err_sq_after=err_sq_after)

    def fused_loss_after(self, aux: LoRAAux) -> jax.Array:
        """The per-token loss after the step, computed in the scan: finite weights can still overflow (k A) B."""
        return aux.err_sq_after

    def fused_outputs(self, xs: InnerInputs, aux: LoRAAux) -> tuple[jax.Array, jax.Array]:
        """(z̄, the no-update output) as computed in the scan."""
        return aux.zbar, aux.no_update

    def fused_losses(self, xs: InnerInputs, aux: LoRAAux) -> tuple[jax.Array, jax.Array]:
        """Per-token losses before and after the step, as computed in the scan."""
        return aux.err_sq, aux.err_sq_after
