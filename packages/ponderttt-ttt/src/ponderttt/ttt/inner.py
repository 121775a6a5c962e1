"""The inner (fast-weight) models and the two exact ways to run them over a sequence.

An inner model maps a key view k to z; the self-supervised loss compares z with a target built from
the value view v. Fast weights are a dict of arrays with leading [B, h] axes (per sequence, per head).

* `dual_scan`: mini-batch dual form, a `lax.scan` over mini-batches. Within a mini-batch every token's
  gradient is taken at the weights of the mini-batch start, and token i sees the update of tokens
  j <= i weighted by η_ij (row i = target, column j = source):  W_i = W_0 - Σ_j η_ij ∇_W ℓ_j(W_0).
  The dual form never builds W_i; each model writes it with matrix products (`InnerModel.dual`).
* `primal_step` / `primal_scan`: the same maths token by token, building W_i explicitly from per-token
  gradients taken by autodiff (`jax.vjp`). It serves decoding and, being derived independently of the
  hand-written dual form, it is what the tests compare the dual form against.

η factorises as η_ij = s_i · r_j with s_i = max(1/(i+1) + δ_i, 0) (position in the mini-batch) and
r_j = λ · base_lr · σ(x_j·w_h + c_h) / head_dim, which lets the primal form accumulate Σ_j r_j ∇ℓ_j.

Multi-step updates (num_steps = k): the mini-batch's outputs are the causal one-step dual form; the
carried weights then take k - 1 further full-batch gradient steps on the same mini-batch with the
last row's learning rates (η_last). Outputs of a mini-batch therefore never see its future tokens,
and later mini-batches see weights trained k steps on every earlier mini-batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ponderttt.ttt.ops import clip_by_norm, gelu_tanh, layer_norm

Fast = dict[str, jax.Array]


def _mm(x, w):
    """[B, h, K, a] @ [B, h, a, b] -> [B, h, K, b]."""
    return jnp.einsum("bhka,bhac->bhkc", x, w)


def _attn(eta_or_a, g):
    """[B, h, K, K] @ [B, h, K, d] -> [B, h, K, d] (row i gathers columns j)."""
    return jnp.einsum("bhij,bhjd->bhid", eta_or_a, g)


def _gram(a, b):
    return jnp.einsum("bhid,bhjd->bhij", a, b)


def ln_loss_grad(z, target, weight, bias, eps: float):
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
class LinearInner:
    """TTT-Linear: z = kW + b, loss ½‖LN(z) − (v − k)‖², output q + LN(z̄)."""

    ln_weight: jax.Array  # [h, 1, d]
    ln_bias: jax.Array  # [h, 1, d]
    eps: float
    has_bias = True

    def forward(self, fast: Fast, x, extra=None):
        return _mm(x, fast["W1"]) + fast["b1"][:, :, None, :]

    def loss_grad(self, z, k, v):
        """(½‖err‖² per token [B, h, K], dℓ/dz [B, h, K, d]); the LN backward comes from jax.vjp."""
        ln_out, ln_vjp = jax.vjp(lambda z_: layer_norm(z_, self.ln_weight, self.ln_bias, self.eps), z)
        err = ln_out - (v - k)
        return 0.5 * jnp.sum(err * err, axis=-1), ln_vjp(err)[0]

    def loss(self, z, k, v):
        """½‖LN(z) − (v − k)‖² per token, without the gradient."""
        err = layer_norm(z, self.ln_weight, self.ln_bias, self.eps) - (v - k)
        return 0.5 * jnp.einsum("...d,...d->...", err, err)  # a dot: faster than a reduction on CPU

    def query(self, fast: Fast, q, extra=None):
        return self.forward(fast, q)

    def dual(self, fast: Fast, q, k, extra, dz, eta, a_qk):
        del k, extra, eta
        # z̄ = qW − (η ⊙ M ⊙ qkᵀ) G + b − (η ⊙ M) G, with a_qk = η ⊙ M ⊙ (qkᵀ + 1) precomputed.
        return self.forward(fast, q) - _attn(a_qk, dz)

    def output(self, q, zbar):
        return q + layer_norm(zbar, self.ln_weight, self.ln_bias, self.eps)

    # -- fused fast path (no resets) ---------------------------------------------------------------------
    # Only what carries the weights from one mini-batch to the next runs in the scan: the weights travel as
    # one augmented matrix [W; b] ([d + 1, d]) and the queries/keys as [q | 1], [k | 1], so that one product
    # gives [q; k] W + b, the LayerNorm gradient is written out (a few fused elementwise passes), and one
    # product gives the carry [W; b] − [η_last ⊙ k | η_last]ᵀ G. The outputs z̄ = qW + b − (η ⊙ M ⊙ (qkᵀ + 1)) G
    # and the losses need only the scanned [q; k]W + b and G, so they are computed after the scan for all
    # mini-batches at once (large batched products instead of many small ones).

    def pack(self, fast: Fast):
        return jnp.concatenate([fast["W1"], fast["b1"][:, :, None, :]], axis=2)

    def unpack(self, packed) -> Fast:
        return {"W1": packed[:, :, :-1], "b1": packed[:, :, -1]}

    fused_scan_keys = ("qk", "k_aug", "target")

    def fused_inputs(self, xs):
        ones = jnp.ones(xs["k"].shape[:-1] + (1,), xs["k"].dtype)
        eta_last = xs["eta_last"][..., None]
        return {
            "qk": jnp.concatenate([jnp.concatenate([xs["q"], ones], -1), jnp.concatenate([xs["k"], ones], -1)], 3),
            "k_aug": jnp.concatenate([eta_last * xs["k"], eta_last], -1),
            "target": xs["v"] - xs["k"],
        }

    def fused_step(self, packed, x, grad_clip):
        """One mini-batch: (new [W; b], what the outputs and losses need: qW + b, kW + b and G)."""
        zz = _mm(x["qk"], packed)
        mbs = x["target"].shape[2]
        zq, zk = zz[:, :, :mbs], zz[:, :, mbs:]
        _, dz = ln_loss_grad(zk, x["target"], self.ln_weight, self.ln_bias, self.eps)
        dz = clip_by_norm(dz, grad_clip)
        new = packed - jnp.einsum("bhja,bhjd->bhad", x["k_aug"], dz)
        return new, {"zq": zq, "zk": zk, "dz": dz}  # zk is dropped by XLA when the losses are unused

    def fused_outputs(self, xs, aux):
        """(z̄, the no-update output qW + b) for all mini-batches [M, B, h, K, d]."""
        return aux["zq"] - jnp.einsum("mbhij,mbhjd->mbhid", xs["a_qk"], aux["dz"]), aux["zq"]

    def fused_losses(self, xs, aux):
        """Per-token losses before and after the (first) step, batched over all mini-batches."""
        zk = aux["zk"]
        # k W' + b' = k W + b − ((k kᵀ + 1) ⊙ η_last) G
        c_after = (jnp.einsum("mbhid,mbhjd->mbhij", xs["k"], xs["k"]) + 1.0) * xs["eta_last"][..., None, :]
        z_after = zk - jnp.einsum("mbhij,mbhjd->mbhid", c_after, aux["dz"])
        return self.loss(zk, xs["k"], xs["v"]), self.loss(z_after, xs["k"], xs["v"])


@dataclasses.dataclass(frozen=True)
class MLPInner(LinearInner):
    """TTT-MLP: z = gelu_tanh(kW1 + b1) W2 + b2 (d -> 4d -> d), same loss and output as TTT-Linear."""

    fused_step = None  # the generic scan body (TTT-MLP's dual form is already a few products)

    def forward(self, fast: Fast, x, extra=None):
        hidden = gelu_tanh(_mm(x, fast["W1"]) + fast["b1"][:, :, None, :])
        return _mm(hidden, fast["W2"]) + fast["b2"][:, :, None, :]

    def dual(self, fast: Fast, q, k, extra, dz, eta, a_qk):
        del extra
        z1 = _mm(k, fast["W1"]) + fast["b1"][:, :, None, :]
        x2, gelu_vjp = jax.vjp(gelu_tanh, z1)
        g1 = gelu_vjp(jnp.einsum("bhkd,bhed->bhke", dz, fast["W2"]))[0]  # dℓ/dz1 at the mini-batch start
        z1_bar = _mm(q, fast["W1"]) + fast["b1"][:, :, None, :] - _attn(a_qk, g1)
        x2_bar = gelu_tanh(z1_bar)
        a2 = eta * (_gram(x2_bar, x2) + 1.0)
        return _mm(x2_bar, fast["W2"]) + fast["b2"][:, :, None, :] - _attn(a2, dz)


@dataclasses.dataclass(frozen=True)
class LoRAInner:
    """LoRA-TTT: z = k P + (k A) B with P frozen; loss ½‖z − v‖²; output the delta (q A) B only.

    One head over the full width (h = 1). With B = 0 the output is exactly zero.
    """

    has_bias = False

    def forward(self, fast: Fast, x, extra):
        return extra + _mm(_mm(x, fast["A"]), fast["B"])

    def loss_grad(self, z, k, v):
        err = z - v
        return 0.5 * jnp.sum(err * err, axis=-1), err

    def loss(self, z, k, v):
        err = z - v
        return 0.5 * jnp.sum(err * err, axis=-1)

    def query(self, fast: Fast, q, extra=None):
        return _mm(_mm(q, fast["A"]), fast["B"])

    def dual(self, fast: Fast, q, k, extra, dz, eta, a_qk):
        del extra
        # Two chained linear maps without bias: A_i = A0 − Σ η_ij kⱼᵀ(G_j B0ᵀ), B_i = B0 − Σ η_ij (k_j A0)ᵀ G_j.
        g1 = jnp.einsum("bhkc,bhrc->bhkr", dz, fast["B"])
        h_q = _mm(q, fast["A"]) - _attn(a_qk, g1)
        h_k = _mm(k, fast["A"])
        return _mm(h_q, fast["B"]) - _attn(eta * _gram(h_q, h_k), dz)

    def output(self, q, zbar):
        return zbar

    def pack(self, fast: Fast):
        return fast

    def unpack(self, packed) -> Fast:
        return packed

    # Fused path (no resets): one scan step computes the mini-batch's dual-form outputs and losses together
    # with the carry, sharing [q; k] A and the per-token gradients (moving the outputs after the scan, as
    # TTT-Linear does, measured slower here: it must emit A and B for every mini-batch).
    fused_scan_keys = ("q", "k", "v", "extra", "eta", "a_qk", "eta_last")

    def fused_inputs(self, xs):
        return {}

    def fused_step(self, fast: Fast, x, grad_clip):
        a, b = fast["A"], fast["B"]
        h_q0, h_k = _mm(x["q"], a), _mm(x["k"], a)
        err_sq, dz = self.loss_grad(x["extra"] + _mm(h_k, b), x["k"], x["v"])
        dz = clip_by_norm(dz, grad_clip)
        g1 = jnp.einsum("bhkc,bhrc->bhkr", dz, b)
        h_q = h_q0 - _attn(x["a_qk"], g1)
        zbar = _mm(h_q, b) - _attn(x["eta"] * _gram(h_q, h_k), dz)
        eta_last = x["eta_last"][..., None]
        new = {
            "A": a - jnp.einsum("bhjc,bhjr->bhcr", eta_last * x["k"], g1),
            "B": b - jnp.einsum("bhjr,bhjc->bhrc", eta_last * h_k, dz),
        }
        err_sq_after = self.loss(x["extra"] + _mm(_mm(x["k"], new["A"]), new["B"]), x["k"], x["v"])
        aux = {"zbar": zbar, "no_update": _mm(h_q0, b), "err_sq": err_sq, "err_sq_after": err_sq_after}
        return new, aux

    def fused_outputs(self, xs, aux):
        return aux["zbar"], aux["no_update"]

    def fused_losses(self, xs, aux):
        return aux["err_sq"], aux["err_sq_after"]


def _finite_b(x) -> jax.Array:
    """Per-sequence 'every entry is finite' with one reduction: x·0 is 0, or NaN for ±inf and NaN."""
    return jnp.isfinite(jnp.sum((x * 0.0).reshape(x.shape[0], -1), axis=1))


def _where_b(pred_b, a, b):
    """Per-sequence select between two arrays with leading batch axis."""
    return jnp.where(pred_b.reshape(pred_b.shape + (1,) * (a.ndim - 1)), a, b)


def _tree_where_b(pred_b, a: Fast, b: Fast) -> Fast:
    return jax.tree.map(lambda x, y: _where_b(pred_b, x, y), a, b)


def _all_finite_b(tree) -> jax.Array:
    """Per-sequence 'every entry of every leaf is finite' [B] (one isfinite of a sum of the leaves' x·0 sums)."""
    leaves = jax.tree.leaves(tree)
    return jnp.isfinite(sum(jnp.sum((x * 0.0).reshape(x.shape[0], -1), axis=1) for x in leaves))


def _masked_token_mean(err_sq_bhk, valid_k):
    """Mean over valid tokens of the per-token loss summed over heads: [B, h, K] -> [B]."""
    per_token = jnp.sum(err_sq_bhk, axis=1)
    return jnp.sum(per_token * valid_k, axis=-1) / jnp.maximum(jnp.sum(valid_k), 1.0)


def _gradient_step(model, fast: Fast, k, extra, v, eta_last, grad_clip):
    """One full-batch step fast − Σ_j η_last,j ∇ℓ_j(fast); returns (new fast, per-token loss at `fast`)."""
    z, pullback = jax.vjp(lambda f: model.forward(f, k, extra), fast)
    err_sq, dz = model.loss_grad(z, k, v)
    dz = clip_by_norm(dz, grad_clip)
    grads = pullback(eta_last[..., None] * dz)[0]
    return jax.tree.map(lambda w, g: w - g, fast, grads), err_sq


def _token_loss(model, fast: Fast, k, extra, v):
    return model.loss(model.forward(fast, k, extra), k, v)


def dual_scan(
    model,
    fast: Fast,
    fast_init: Fast,
    xs: dict[str, Any],
    *,
    num_steps: int,
    grad_clip: float | None,
    remat_group: int | None,
):
    """Runs the dual form over mini-batches.

    xs (leading axis M = mini-batches): q, k, v [M, B, h, K, d]; extra (model-specific precompute of k,
    or None); eta [M, B, h, K, K] (masked, gated); a_qk [M, B, h, K, K]; eta_last [M, B, h, K];
    active [M, B] bool; valid [M, K] float; and, only with resets, seen [M, B, K] bool (a document
    started at or before this row in this mini-batch) and z_init [M, B, h, K, d].
    fast / fast_init: [B, h, ...] leaves. Returns (final fast, skipped [B] int32, ys) with ys holding
    zbar [M, B, h, K, d], loss_step0 [M, B], loss_after [M, B, num_steps].
    """
    with_reset = "seen" in xs
    fused = getattr(model, "fused_step", None) is not None and not with_reset and num_steps >= 1

    def fused_body(packed, x):
        new_packed, aux = model.fused_step(packed, x, grad_clip)
        new = model.unpack(new_packed)
        losses_rest = []
        for _ in range(num_steps - 1):
            new, _ = _gradient_step(model, new, x["k"], x.get("extra"), x["v"], x["eta_last"], grad_clip)
            losses_rest.append(_masked_token_mean(_token_loss(model, new, x["k"], x.get("extra"), x["v"]), x["valid"]))
        new_packed = model.pack(new)
        ys = {"aux": aux, "loss_rest": jnp.stack(losses_rest, -1) if losses_rest else None}
        ys["ok"] = _all_finite_b(new_packed)
        # Only non-finite updates are selected away: with λ = 0 the update is an exact zero (W − 0 = W), and
        # leaving it in keeps d(weights)/dλ at λ = 0 for continuous gates.
        return jax.tree.map(lambda n, o: _where_b(ys["ok"], n, o), new_packed, packed), ys

    def body(carry, x):
        fast, skipped = carry
        q, k, v, extra, valid = x["q"], x["k"], x["v"], x.get("extra"), x["valid"]
        z = model.forward(fast, k, extra)
        if with_reset:
            seen = x["seen"]
            base = _tree_where_b(seen[:, -1], fast_init, fast)
            z = jnp.where(seen[:, None, :, None], x["z_init"], z)
        else:
            base = fast
        err_sq, dz = model.loss_grad(z, k, v)
        dz = clip_by_norm(dz, grad_clip)
        loss_step0 = _masked_token_mean(err_sq, valid)

        if num_steps == 0:
            zbar = model.query(fast, q, extra)
            if with_reset:
                zbar = jnp.where(seen[:, None, :, None], model.query(fast_init, q, extra), zbar)
            return (base, skipped), {"zbar": zbar, "loss_step0": loss_step0, "loss_after": loss_step0[:, None][:, :0]}

        zbar = model.dual(fast, q, k, extra, dz, x["eta"], x["a_qk"])
        if with_reset:
            zbar_reset = model.dual(fast_init, q, k, extra, dz, x["eta"], x["a_qk"])
            zbar = jnp.where(seen[:, None, :, None], zbar_reset, zbar)
        # Carry: base − Σ_j η_last,j ∇ℓ_j(base); dz above was taken at each token's own base weights.
        _, pullback = jax.vjp(lambda f: model.forward(f, k, extra), base)
        grads = pullback(x["eta_last"][..., None] * dz)[0]
        new = jax.tree.map(lambda w, g: w - g, base, grads)
        losses_after = []
        for _ in range(num_steps - 1):
            new, err_sq = _gradient_step(model, new, k, extra, v, x["eta_last"], grad_clip)
            losses_after.append(_masked_token_mean(err_sq, valid))
        losses_after.append(_masked_token_mean(_token_loss(model, new, k, extra, v), valid))

        ok = _all_finite_b(new)
        new = _tree_where_b(ok, new, base)  # λ = 0 gives an exact zero update (see fused_body)
        use = ok & _finite_b(zbar)  # skipped update or non-finite outputs: the no-update outputs

        def fallback():
            plain = model.query(fast, q, extra)
            if with_reset:
                plain = jnp.where(seen[:, None, :, None], model.query(fast_init, q, extra), plain)
            return _where_b(use, zbar, plain)

        zbar = jax.lax.cond(jnp.all(use), lambda: zbar, fallback)
        skipped = skipped + (x["active"] & ~ok).astype(jnp.int32)
        return (new, skipped), {"zbar": zbar, "loss_step0": loss_step0, "loss_after": jnp.stack(losses_after, -1)}

    if fused:
        xs = {**xs, **model.fused_inputs(xs)}
        keys = model.fused_scan_keys + (("k", "v", "extra", "eta_last", "valid") if num_steps > 1 else ())
        scan_xs = {key: xs[key] for key in dict.fromkeys(keys) if key in xs}
        final, ys = _scan(fused_body, model.pack(fast), scan_xs, remat_group, unroll=FUSED_UNROLL)
        return (model.unpack(final), *_fused_finish(model, xs, ys))

    batch = xs["q"].shape[1]
    (final, skipped), ys = _scan(body, (fast, jnp.zeros((batch,), jnp.int32)), xs, remat_group)
    return final, skipped, ys


# Mini-batches per iteration of the fused scan's loop (lax.scan `unroll`; the arithmetic is the same).
# Measured on XLA:CPU at the benchmark shape: unroll 2, 4 and 8 were all slower than 1 (the scan alone
# took about 1.3-2x as long with 4), so the loop stays rolled.
FUSED_UNROLL = 1


def _scan(step_fn, carry0, xs, remat_group, unroll=1):
    """lax.scan of step_fn over the leading axis of xs; with remat_group = g, an outer scan over groups of g
    mini-batches whose inner scan is rematerialised (the backward pass stores the carry at group boundaries)."""
    num_mb = jax.tree.leaves(xs)[0].shape[0]
    if remat_group is None or remat_group >= num_mb:
        step = jax.checkpoint(step_fn) if remat_group is not None else step_fn
        return jax.lax.scan(step, carry0, xs, unroll=min(unroll, num_mb))
    groups = -(-num_mb // remat_group)
    pad = groups * remat_group - num_mb

    def pad_and_group(a):
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
        return a.reshape(groups, remat_group, *a.shape[1:])

    @jax.checkpoint
    def group_body(carry, group_xs):
        return jax.lax.scan(step_fn, carry, group_xs, unroll=min(unroll, remat_group))

    carry, ys = jax.lax.scan(group_body, carry0, jax.tree.map(pad_and_group, xs))
    return carry, jax.tree.map(lambda a: a.reshape(groups * remat_group, *a.shape[2:])[:num_mb], ys)


def _fused_finish(model, xs, ys):
    """Outputs, skip counts and losses of the fused path, batched over all mini-batches after the scan."""
    ok = ys["ok"]  # [M, B]: the update's new weights are finite (else the weights stayed as they were)
    zbar, zbar_no_update = model.fused_outputs(xs, ys["aux"])
    # A mini-batch whose update was skipped, or whose outputs are not finite, gets the no-update outputs.
    use = ok & jax.vmap(_finite_b)(zbar)
    zbar = jnp.where(use[:, :, None, None, None], zbar, zbar_no_update)
    skipped = jnp.sum((xs["active"] & ~ok).astype(jnp.int32), axis=0)
    err_sq0, err_sq1 = model.fused_losses(xs, ys["aux"])
    valid = xs["valid"][:, None, :]  # [M, 1, K]
    token_mean = lambda e: jnp.sum(jnp.sum(e, axis=2) * valid, -1) / jnp.maximum(jnp.sum(valid, -1), 1.0)
    loss_step0 = token_mean(err_sq0)  # [M, B]
    loss_after = [jnp.where(ok, token_mean(err_sq1), loss_step0)]  # skipped updates: weights unchanged
    if ys["loss_rest"] is not None:
        loss_after += list(jnp.moveaxis(ys["loss_rest"], -1, 0))
    return skipped, {"zbar": zbar, "loss_step0": loss_step0, "loss_after": jnp.stack(loss_after, -1)}


# ----------------------------------------------------------------------------------------------------
# Primal form: token by token, explicit per-token weights. Used for decoding and to test the dual form.


def primal_state(
    fast: Fast, batch: int, heads: int, dim: int, mini_batch_size: int, with_extra: bool, dtype=jnp.float32
):
    """Decode state at the start of a mini-batch: fast weights at the mini-batch start, the accumulated
    r_j-weighted gradients, and the mini-batch's keys/values/learning rates for extra inner steps."""
    buf = lambda: jnp.zeros((batch, heads, mini_batch_size, dim), dtype)
    fast = jax.tree.map(lambda a: a.astype(dtype), fast)
    state = {
        "fast": fast,
        "acc": jax.tree.map(jnp.zeros_like, fast),
        "k": buf(),
        "v": buf(),
        "lr": jnp.zeros((batch, heads, mini_batch_size), dtype),
        "pos": jnp.zeros((), jnp.int32),
        "skipped": jnp.zeros((batch,), jnp.int32),
    }
    if with_extra:
        state["extra"] = buf()
    return state


def primal_step(
    model,
    st: dict[str, Any],
    fast_init: Fast,
    tok: dict[str, Any],
    *,
    token_scale: jax.Array,
    num_steps: int,
    grad_clip: float | None,
    end: jax.Array | bool = False,
):
    """Processes one token. tok: q, k, v [B, h, 1, d]; extra (or absent); lr [B, h] (already × λ);
    reset [B] bool. Ends the mini-batch after this token when its position is K − 1 or `end` is set.
    Returns (new state, zbar [B, h, 1, d])."""
    mbs = token_scale.shape[0]
    pos = st["pos"]
    reset = tok["reset"]
    fast0 = _tree_where_b(reset, fast_init, st["fast"])
    acc = _tree_where_b(reset, jax.tree.map(jnp.zeros_like, st["acc"]), st["acc"])
    lr_buf = _where_b(reset, jnp.zeros_like(st["lr"]), st["lr"])

    extra = tok.get("extra")
    z, pullback = jax.vjp(lambda f: model.forward(f, tok["k"], extra), fast0)
    _, dz = model.loss_grad(z, tok["k"], tok["v"])
    dz = clip_by_norm(dz, grad_clip)
    if num_steps > 0:
        grads = pullback(tok["lr"][..., None, None] * dz)[0]
        acc = jax.tree.map(lambda a, g: a + g, acc, grads)
    scale = token_scale[pos]
    weights_now = jax.tree.map(lambda w, a: w - scale * a, fast0, acc)  # W_i = W_0 − s_i Σ_{j<=i} r_j ∇ℓ_j
    zbar = model.query(weights_now, tok["q"], None)
    finite_now = _all_finite_b(weights_now) & jnp.all(jnp.isfinite(zbar.reshape(zbar.shape[0], -1)), axis=1)
    zbar = _where_b(finite_now, zbar, model.query(fast0, tok["q"], None))

    put = lambda buf, val: jax.lax.dynamic_update_slice_in_dim(buf, val.astype(buf.dtype), pos, axis=2)
    new = dict(st)
    new["k"] = put(st["k"], tok["k"])
    new["v"] = put(st["v"], tok["v"])
    new["lr"] = put(lr_buf, tok["lr"][..., None])
    if extra is not None:
        new["extra"] = put(st["extra"], extra)

    def finish(_):
        fast = weights_now
        eta_last = scale * new["lr"]
        for _ in range(num_steps - 1):
            fast, _ = _gradient_step(model, fast, new["k"], new.get("extra"), new["v"], eta_last, grad_clip)
        active = jnp.any(new["lr"] != 0, axis=(1, 2))
        finite = _all_finite_b(fast)
        fast = _tree_where_b(active & finite, fast, fast0)
        skipped = st["skipped"] + (active & ~finite).astype(jnp.int32)
        return fast, jax.tree.map(jnp.zeros_like, acc), jnp.zeros_like(new["lr"]), skipped

    def carry_on(_):
        return fast0, acc, new["lr"], st["skipped"]

    is_end = jnp.logical_or(pos == mbs - 1, end)
    new["fast"], new["acc"], new["lr"], new["skipped"] = jax.lax.cond(is_end, finish, carry_on, None)
    new["pos"] = jnp.where(is_end, 0, pos + 1).astype(jnp.int32)
    return new, zbar


def primal_scan(model, fast: Fast, fast_init: Fast, toks: dict[str, Any], *, token_scale, num_steps, grad_clip):
    """Scans `primal_step` over tokens (leading axis T of every entry of toks); the last token ends its
    mini-batch. Returns (final fast weights, skipped [B], zbar [T, B, h, 1, d])."""
    t = toks["q"].shape[0]
    b, h, _, d = toks["q"].shape[1:]
    st = primal_state(fast, b, h, d, token_scale.shape[0], toks.get("extra") is not None, toks["q"].dtype)
    ends = jnp.asarray(np.arange(t) == t - 1)

    def body(st, x):
        tok, end = x
        return primal_step(
            model, st, fast_init, tok, token_scale=token_scale, num_steps=num_steps, grad_clip=grad_clip, end=end
        )

    st, zbar = jax.lax.scan(body, st, (toks, ends))
    return st["fast"], st["skipped"], zbar
