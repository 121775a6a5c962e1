"""The inner (fast-weight) models and the two exact ways to run them over a sequence.

An inner model maps a key view k to z; the self-supervised loss compares z with a target built from
the value view v. Fast weights are a dict of arrays with leading [B, h] axes (per sequence, per head).
What the scans need of a model is the `InnerModel` protocol; a model that also has a fused scan body for
calls without resets satisfies `FusedInnerModel` (TTT-Linear and LoRA-TTT; TTT-MLP does not).

* `dual_scan`: mini-batch dual form, a `lax.scan` over mini-batches of `InnerInputs`. Within a mini-batch
  every token's gradient is taken at the weights of the mini-batch start, and token i sees the update of
  tokens j <= i weighted by η_ij (row i = target, column j = source):  W_i = W_0 - Σ_j η_ij ∇_W ℓ_j(W_0).
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

Non-finite updates: a (mini-batch, sequence) update is kept when the new weights and the losses after it (where
the scan computes them) are finite; otherwise the weights stay, the update is counted as skipped and reports the
loss before it, and the outputs are the no-update outputs (which they also are when only the outputs are not
finite). A skipped update is computed and then selected away, so its backward pass would multiply a zero
cotangent by non-finite intermediates (0·inf = NaN, summed into every shared parameter). `dual_scan` and
`primal_scan` therefore take their backward pass from a twin of the forward pass (`_finite_backward`): the
same values, with η zeroed wherever the forward pass discarded an update or its outputs (the double where,
with the mask that only the forward pass can know).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple, Protocol, TypeVar, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from ponderttt.ttt.ops import clip_by_norm

Fast = dict[str, jax.Array]
PackedT = TypeVar("PackedT")  # the carried weights in a fused step's layout
StepT = TypeVar("StepT")  # the per-mini-batch inputs a fused step reads
AuxT = TypeVar("AuxT")  # what a fused step emits per mini-batch for the work after the scan


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class InnerInputs:
    """The inputs of `dual_scan`, built once for the whole sequence by `layers.run_dual`.

    Every field has a leading axis M (mini-batches) that the scan slices: B sequences, h heads, K tokens per
    mini-batch, d the head width. η is already masked (j <= i, and the same document with resets), gated (× λ)
    and scaled (s_i · r_j). The last three fields are optional: `extra` exists for models that precompute
    something from k (LoRA-TTT); `seen` and `z_init` exist only when the call has a reset mask.
    """

    q: jax.Array  # [M, B, h, K, d] queries (RoPE applied)
    k: jax.Array  # [M, B, h, K, d] keys (RoPE applied)
    v: jax.Array  # [M, B, h, K, d] values
    eta: jax.Array  # [M, B, h, K, K] η_ij: row i = target token, column j = source token
    eta_last: jax.Array  # [M, B, h, K] the last real row of η: learning rates of the carried update
    a_qk: jax.Array  # [M, B, h, K, K] η ⊙ (q kᵀ + 1), or η ⊙ q kᵀ for a model without bias
    active: jax.Array  # [M, B] bool: λ != 0, η finite and the mini-batch has tokens (a skipped update is counted)
    valid: jax.Array  # [M, K] float: 1 for real tokens, 0 for the padding of a short last mini-batch
    extra: jax.Array | None = None  # [M, B, h, K, d] the model's precompute of k (LoRA-TTT: k P), or None
    seen: jax.Array | None = None  # [M, B, K] bool, resets only: a document started at or before this row
    z_init: jax.Array | None = None  # [M, B, h, K, d], resets only: f(k) at the initial fast weights


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MiniBatch:
    """The fields of `InnerInputs` that a full-batch gradient step on a mini-batch reads: its keys, values and the
    carried update's learning rates. The fused path scans them once, for the model's `fused_step` and for the
    k − 1 further steps of num_steps = k (shapes as in `InnerInputs`, without M inside the scan)."""

    k: jax.Array
    v: jax.Array
    eta_last: jax.Array
    valid: jax.Array
    extra: jax.Array | None


class InnerModel(Protocol):
    """What the scans need of an inner model. Arrays are per mini-batch: [B, h, K, d] (K tokens, d = head width),
    per-token losses [B, h, K]; `fast` holds [B, h, ...] leaves."""

    has_bias: ClassVar[bool]  # the first map has a bias: `InnerInputs.a_qk` is η ⊙ (q kᵀ + 1), else η ⊙ q kᵀ

    def forward(self, fast: Fast, x: jax.Array, extra: jax.Array | None) -> jax.Array:
        """z = f(x; fast); `extra` is the model's precompute of x (None for models without one)."""

    def loss_grad(self, z: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(per-token loss ℓ, dℓ/dz) of outputs z for keys k against the target built from v."""

    def loss(self, z: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """Per-token loss ℓ without the gradient."""

    def query(self, fast: Fast, q: jax.Array, extra: jax.Array | None) -> jax.Array:
        """The no-update z̄ of queries q at `fast` (what a skipped update or num_steps = 0 outputs)."""

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
        """z̄ of the dual form: row i at W_i = W_0 − Σ_j η_ij ∇ℓ_j(W_0), from dz = dℓ/dz at W_0 = `fast`,
        η [B, h, K, K] and a_qk as in `InnerInputs`, without building W_i."""

    def output(self, q: jax.Array, zbar: jax.Array) -> jax.Array:
        """The layer's per-head output from the queries and z̄ (TTT-Linear/MLP: q + LN(z̄))."""


@runtime_checkable
class FusedInnerModel(InnerModel, Protocol[PackedT, StepT, AuxT]):
    """An `InnerModel` with a fused scan body, which `dual_scan` runs for calls without resets and num_steps >= 1
    (calls with resets or num_steps = 0 take the generic body). The scan carries the weights packed (`PackedT`)
    and reads, per mini-batch, the `MiniBatch` and what `fused_inputs` built (`StepT`); what each step emits
    (`AuxT`) is turned into outputs and losses after the scan, for all mini-batches at once."""

    def pack(self, fast: Fast) -> PackedT:
        """The fast weights in the fused step's layout."""

    def unpack(self, packed: PackedT) -> Fast:
        """Inverse of `pack`."""

    def fused_inputs(self, xs: InnerInputs) -> StepT:
        """What `fused_step` reads per mini-batch, for all mini-batches (leading axis M)."""

    def fused_step(self, packed: PackedT, x: StepT, batch: MiniBatch, grad_clip: float | None) -> tuple[PackedT, AuxT]:
        """One mini-batch: (the packed weights after one step, what the outputs and losses need)."""

    def fused_loss_after(self, aux: AuxT) -> jax.Array | None:
        """The per-token loss after the step [B, h, K] when the step computes it (the update is kept only if it is
        finite), or None when it is computed after the scan."""

    def fused_outputs(self, xs: InnerInputs, aux: AuxT) -> tuple[jax.Array, jax.Array]:
        """(z̄, the no-update z̄) [M, B, h, K, d] for all mini-batches."""

    def fused_losses(self, xs: InnerInputs, aux: AuxT) -> tuple[jax.Array, jax.Array]:
        """Per-token losses [M, B, h, K] before and after the (first) step, for all mini-batches."""


class Keep(NamedTuple):
    """What a scan kept, per step and sequence ([M, B] bool for `dual_scan`, [T, B] for `primal_scan`; [B] inside
    a step): `update`, the new fast weights (False: the update was skipped); `output`, the outputs computed with
    the update (False: the no-update outputs). In `primal_scan`, `update` is True on the tokens that end no
    mini-batch."""

    update: jax.Array
    output: jax.Array


def _finite_b(x: jax.Array) -> jax.Array:
    """Per-sequence 'every entry is finite' with one reduction: x·0 is 0, or NaN for ±inf and NaN."""
    return jnp.isfinite(jnp.sum((x * 0.0).reshape(x.shape[0], -1), axis=1))


def _where_b(pred_b: jax.Array, a: jax.Array, b: jax.Array | float) -> jax.Array:
    """Per-sequence select between two arrays with leading batch axis (b may be a scalar)."""
    return jnp.where(pred_b.reshape(pred_b.shape + (1,) * (a.ndim - 1)), a, b)


def _tree_where_b(pred_b: jax.Array, a: Fast, b: Fast) -> Fast:
    return jax.tree.map(lambda x, y: _where_b(pred_b, x, y), a, b)


def _all_finite_b(tree: Any) -> jax.Array:
    """Per-sequence 'every entry of every leaf is finite' [B] (one isfinite of a sum of the leaves' x·0 sums)."""
    leaves = jax.tree.leaves(tree)
    return jnp.isfinite(sum(jnp.sum((x * 0.0).reshape(x.shape[0], -1), axis=1) for x in leaves))


def _masked_token_mean(err_sq_bhk: jax.Array, valid_k: jax.Array) -> jax.Array:
    """Mean over valid tokens of the per-token loss summed over heads: [B, h, K] -> [B]."""
    per_token = jnp.sum(err_sq_bhk, axis=1)
    return jnp.sum(per_token * valid_k, axis=-1) / jnp.maximum(jnp.sum(valid_k), 1.0)


def _gradient_step(
    model: InnerModel,
    fast: Fast,
    k: jax.Array,
    extra: jax.Array | None,
    v: jax.Array,
    eta_last: jax.Array,
    grad_clip: float | None,
) -> tuple[Fast, jax.Array]:
    """One full-batch step fast − Σ_j η_last,j ∇ℓ_j(fast); returns (new fast, per-token loss at `fast`)."""
    z, pullback = jax.vjp(lambda f: model.forward(f, k, extra), fast)
    err_sq, dz = model.loss_grad(z, k, v)
    dz = clip_by_norm(dz, grad_clip)
    grads = pullback(eta_last[..., None] * dz)[0]
    return jax.tree.map(lambda w, g: w - g, fast, grads), err_sq


def _token_loss(model: InnerModel, fast: Fast, k: jax.Array, extra: jax.Array | None, v: jax.Array) -> jax.Array:
    return model.loss(model.forward(fast, k, extra), k, v)


def _run_vjp(run: Callable, args: Any, kept: Keep | None) -> tuple[Any, Callable, tuple[Any, Keep]]:
    """jax.vjp of run(args, kept) -> (values, counts, kept), differentiating `values` only."""

    def values_and_rest(a):
        values, counts, kept_now = run(a, kept)
        return values, (counts, kept_now)

    return jax.vjp(values_and_rest, args, has_aux=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _finite_backward(run: Callable, args: Any) -> tuple[Any, Any]:
    """(values, counts) of run(args, None), with a backward pass that stays finite when updates were skipped.

    run(args, kept) -> (values, counts, kept_now): a scan that decides per step and sequence what it keeps
    (`Keep`) when `kept` is None, and that, given the decisions of such a run, zeroes the η of every discarded
    update or output before computing it and forces the same decisions: the same values, every intermediate
    finite. The backward pass is that of the plain run when nothing was discarded, else that of the forced
    run, recomputed (`lax.cond`: the common case costs nothing more)."""
    values, counts, _ = run(args, None)
    return values, counts


def _finite_backward_fwd(run: Callable, args: Any) -> tuple[tuple[Any, Any], tuple[Callable, Keep, Any]]:
    values, pullback, (counts, kept) = _run_vjp(run, args, None)
    return (values, counts), (pullback, kept, args)


def _finite_backward_bwd(run: Callable, res: tuple[Callable, Keep, Any], cotangents: tuple[Any, Any]) -> tuple[Any]:
    pullback, kept, args = res
    ct_values = cotangents[0]

    def forced():  # recomputed: η zeroed wherever the forward pass discarded an update or its outputs
        return _run_vjp(run, args, kept)[1](ct_values)

    nothing_discarded = jnp.all(kept.update) & jnp.all(kept.output)
    return jax.lax.cond(nothing_discarded, lambda: pullback(ct_values), forced)


_finite_backward.defvjp(_finite_backward_fwd, _finite_backward_bwd)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DualScanOutputs:
    """Per-mini-batch results of `dual_scan` (leading axis M)."""

    zbar: jax.Array  # [M, B, h, K, d] z̄, the input of `InnerModel.output`
    loss_step0: jax.Array  # [M, B] token-mean loss (summed over heads) at the weights before the update
    loss_after: jax.Array  # [M, B, num_steps] the same after each inner step (skipped update: loss_step0)


class _FusedYs(NamedTuple):
    aux: Any  # the model's AuxT
    loss_rest: jax.Array | None  # [B, num_steps − 1] losses after the further steps (None for one step)
    ok: jax.Array  # [B] the update is kept (else the weights stayed as they were)


def dual_scan(
    model: InnerModel,
    fast: Fast,
    fast_init: Fast,
    xs: InnerInputs,
    *,
    num_steps: int,
    grad_clip: float | None,
    remat_group: int | None,
) -> tuple[Fast, jax.Array, DualScanOutputs]:
    """Runs the dual form over the mini-batches of `xs` (see `InnerInputs` for the shapes).

    fast / fast_init: [B, h, ...] leaves (the weights to start from, the learned initial weights that resets
    return to). A `FusedInnerModel` runs its fused body when the call has no resets and num_steps >= 1; the
    generic body (any `InnerModel`) runs otherwise. `model` is a pytree (its arrays are differentiated).
    Returns (final fast, skipped updates [B] int32, outputs); the backward pass stays finite when updates
    were skipped (see `_finite_backward`)."""
    run = functools.partial(_dual_scan, num_steps=num_steps, grad_clip=grad_clip, remat_group=remat_group)
    (final, outputs), skipped = _finite_backward(run, (model, fast, fast_init, xs))
    return final, skipped, outputs


def _dual_scan(
    args: tuple[InnerModel, Fast, Fast, InnerInputs],
    kept: Keep | None,
    *,
    num_steps: int,
    grad_clip: float | None,
    remat_group: int | None,
) -> tuple[tuple[Fast, DualScanOutputs], jax.Array, Keep]:
    """`dual_scan`, as `_finite_backward` runs it: ((final fast, outputs), skipped [B], what it kept [M, B])."""
    model, fast, fast_init, xs = args
    with_reset = xs.seen is not None
    fused = isinstance(model, FusedInnerModel) and not with_reset and num_steps >= 1
    if kept is not None:  # no update or output that a previous run discarded is computed with a non-zero η
        zero = lambda keep_mb, a: jnp.where(keep_mb.reshape(keep_mb.shape + (1,) * (a.ndim - 2)), a, 0.0)
        xs = dataclasses.replace(
            xs, eta=zero(kept.output, xs.eta), a_qk=zero(kept.output, xs.a_qk), eta_last=zero(kept.update, xs.eta_last)
        )

    def fused_body(packed, x):
        step_x, batch, keep_update = x
        new_packed, aux = model.fused_step(packed, step_x, batch, grad_clip)
        new = model.unpack(new_packed)
        losses_rest = []
        for _ in range(num_steps - 1):
            new, _ = _gradient_step(model, new, batch.k, batch.extra, batch.v, batch.eta_last, grad_clip)
            losses_rest.append(_masked_token_mean(_token_loss(model, new, batch.k, batch.extra, batch.v), batch.valid))
        new_packed = model.pack(new)
        loss_rest = jnp.stack(losses_rest, -1) if losses_rest else None
        ok = _all_finite_b((new_packed, model.fused_loss_after(aux), loss_rest))  # None leaves are not checked
        if keep_update is not None:
            ok = ok & keep_update
        # Only skipped updates are selected away: with λ = 0 the update is an exact zero (W − 0 = W), and leaving
        # it in keeps d(weights)/dλ at λ = 0 for continuous gates.
        return jax.tree.map(lambda n, o: _where_b(ok, n, o), new_packed, packed), _FusedYs(aux, loss_rest, ok)

    def body(carry, inputs):
        (fast, skipped), (x, keep) = carry, inputs
        q, k, v, extra, valid = x.q, x.k, x.v, x.extra, x.valid
        z = model.forward(fast, k, extra)
        if with_reset:
            seen = x.seen
            base = _tree_where_b(seen[:, -1], fast_init, fast)
            z = jnp.where(seen[:, None, :, None], x.z_init, z)
        else:
            base = fast
        err_sq, dz = model.loss_grad(z, k, v)
        dz = clip_by_norm(dz, grad_clip)
        loss_step0 = _masked_token_mean(err_sq, valid)

        if num_steps == 0:
            zbar = model.query(fast, q, extra)
            if with_reset:
                zbar = jnp.where(seen[:, None, :, None], model.query(fast_init, q, extra), zbar)
            outputs = DualScanOutputs(zbar, loss_step0, loss_step0[:, None][:, :0])
            return (base, skipped), (outputs, Keep(jnp.ones_like(x.active), jnp.ones_like(x.active)))

        zbar = model.dual(fast, q, k, extra, dz, x.eta, x.a_qk)
        if with_reset:
            zbar_reset = model.dual(fast_init, q, k, extra, dz, x.eta, x.a_qk)
            zbar = jnp.where(seen[:, None, :, None], zbar_reset, zbar)
        # Carry: base − Σ_j η_last,j ∇ℓ_j(base); dz above was taken at each token's own base weights.
        _, pullback = jax.vjp(lambda f: model.forward(f, k, extra), base)
        grads = pullback(x.eta_last[..., None] * dz)[0]
        new = jax.tree.map(lambda w, g: w - g, base, grads)
        losses_after = []
        for _ in range(num_steps - 1):
            new, err_sq = _gradient_step(model, new, k, extra, v, x.eta_last, grad_clip)
            losses_after.append(_masked_token_mean(err_sq, valid))
        losses_after.append(_masked_token_mean(_token_loss(model, new, k, extra, v), valid))
        losses_after = jnp.stack(losses_after, -1)  # [B, num_steps]

        ok = _all_finite_b((new, losses_after))
        use = _finite_b(zbar)  # a skipped update or non-finite outputs: the no-update outputs
        if keep is not None:
            ok, use = ok & keep.update, use & keep.output
        use = use & ok
        new = _tree_where_b(ok, new, base)  # λ = 0 gives an exact zero update (see fused_body)
        losses_after = _where_b(ok, losses_after, loss_step0[:, None])

        def fallback():
            plain = model.query(fast, q, extra)
            if with_reset:
                plain = jnp.where(seen[:, None, :, None], model.query(fast_init, q, extra), plain)
            return _where_b(use, zbar, plain)

        zbar = jax.lax.cond(jnp.all(use), lambda: zbar, fallback)
        skipped = skipped + (x.active & ~ok).astype(jnp.int32)
        return (new, skipped), (DualScanOutputs(zbar, loss_step0, losses_after), Keep(ok, use))

    keep_update = None if kept is None else kept.update
    if fused:
        # Each array is scanned once (keys read by the model's step and by the further steps are one input, so that
        # their cotangents add up inside the body); what no step reads is dropped by XLA.
        scan_xs = (model.fused_inputs(xs), MiniBatch(xs.k, xs.v, xs.eta_last, xs.valid, xs.extra), keep_update)
        final, ys = _scan(fused_body, model.pack(fast), scan_xs, remat_group, unroll=FUSED_UNROLL)
        skipped, outputs, kept_now = _fused_finish(model, xs, ys, None if kept is None else kept.output)
        return (model.unpack(final), outputs), skipped, kept_now

    batch = xs.q.shape[1]
    (final, skipped), (outputs, kept_now) = _scan(body, (fast, jnp.zeros((batch,), jnp.int32)), (xs, kept), remat_group)
    return (final, outputs), skipped, kept_now


# Mini-batches per iteration of the fused scan's loop (lax.scan `unroll`; the arithmetic is the same).
# Measured on XLA:CPU at the benchmark shape: unroll 2, 4 and 8 were all slower than 1 (the scan alone
# took about 1.3-2x as long with 4), so the loop stays rolled.
FUSED_UNROLL = 1


def _scan(step_fn: Callable, carry0: Any, xs: Any, remat_group: int | None, unroll: int = 1) -> tuple[Any, Any]:
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


def _fused_finish(
    model: FusedInnerModel, xs: InnerInputs, ys: _FusedYs, keep_output: jax.Array | None
) -> tuple[jax.Array, DualScanOutputs, Keep]:
    """Skip counts, outputs and what was kept on the fused path, batched over all mini-batches after the scan."""
    ok = ys.ok  # [M, B]: the update was kept (else the weights stayed as they were)
    zbar, zbar_no_update = model.fused_outputs(xs, ys.aux)
    # A mini-batch whose update was skipped, or whose outputs are not finite, gets the no-update outputs.
    use = ok & jax.vmap(_finite_b)(zbar)
    if keep_output is not None:
        use = use & keep_output
    zbar = jnp.where(use[:, :, None, None, None], zbar, zbar_no_update)
    skipped = jnp.sum((xs.active & ~ok).astype(jnp.int32), axis=0)
    err_sq0, err_sq1 = model.fused_losses(xs, ys.aux)
    valid = xs.valid[:, None, :]  # [M, 1, K]
    token_mean = lambda e: jnp.sum(jnp.sum(e, axis=2) * valid, -1) / jnp.maximum(jnp.sum(valid, -1), 1.0)
    loss_step0 = token_mean(err_sq0)  # [M, B]
    loss_after = [token_mean(err_sq1)]
    if ys.loss_rest is not None:
        loss_after += list(jnp.moveaxis(ys.loss_rest, -1, 0))
    loss_after = [jnp.where(ok, loss, loss_step0) for loss in loss_after]  # a skipped update: the loss before it
    return skipped, DualScanOutputs(zbar, loss_step0, jnp.stack(loss_after, -1)), Keep(ok, use)


# ----------------------------------------------------------------------------------------------------
# Primal form: token by token, explicit per-token weights. Used for decoding and to test the dual form.


def primal_state(
    fast: Fast,
    batch: int,
    heads: int,
    dim: int,
    mini_batch_size: int,
    with_extra: bool,
    dtype: DTypeLike = jnp.float32,
) -> dict[str, Any]:
    """Decode state at the start of a mini-batch, in `dtype`: "fast" (the weights at the mini-batch start), "acc"
    (the accumulated r_j-weighted gradients, like fast), the mini-batch so far for the extra inner steps ("k", "v"
    [and "extra"] [B, h, K, d], "lr" [B, h, K]), "pos" (the position in the mini-batch, int32 scalar), "eta_bad"
    ([B] bool: a token of the mini-batch so far had a non-finite η, so its update will be skipped) and "skipped"
    ([B] int32 count of dropped non-finite updates)."""
    buf = lambda: jnp.zeros((batch, heads, mini_batch_size, dim), dtype)
    fast = jax.tree.map(lambda a: a.astype(dtype), fast)
    state = {
        "fast": fast,
        "acc": jax.tree.map(jnp.zeros_like, fast),
        "k": buf(),
        "v": buf(),
        "lr": jnp.zeros((batch, heads, mini_batch_size), dtype),
        "pos": jnp.zeros((), jnp.int32),
        "eta_bad": jnp.zeros((batch,), bool),
        "skipped": jnp.zeros((batch,), jnp.int32),
    }
    if with_extra:
        state["extra"] = buf()
    return state


def primal_step(
    model: InnerModel,
    st: dict[str, Any],
    fast_init: Fast,
    tok: dict[str, Any],
    *,
    token_scale: jax.Array,
    num_steps: int,
    grad_clip: float | None,
    end: jax.Array | bool = False,
) -> tuple[dict[str, Any], jax.Array]:
    """Processes one token from `st` (a `primal_state`). tok: q, k, v [B, h, 1, d]; extra (or absent); lr [B, h]
    (already × λ, 0 where that product is not finite); lr_bad [B] bool (the product was not finite for a non-zero
    λ: the mini-batch's update is skipped and counted); reset [B] bool. token_scale: s_i [K]. Ends the
    mini-batch after this token when its position is K − 1 or `end` is set. Returns (new state, zbar [B, h, 1, d]).

    A mini-batch's update is kept when its η was finite and the new weights and the loss after the update on the
    mini-batch's last token are finite (`dual_scan` checks the loss on every token); a token's output falls back
    to the no-update output when the weights it sees or the output itself are not finite."""
    new, zbar, _ = _primal_step(
        model, st, fast_init, tok, None, token_scale=token_scale, num_steps=num_steps, grad_clip=grad_clip, end=end
    )
    return new, zbar


def _primal_step(
    model: InnerModel,
    st: dict[str, Any],
    fast_init: Fast,
    tok: dict[str, Any],
    kept: Keep | None,
    *,
    token_scale: jax.Array,
    num_steps: int,
    grad_clip: float | None,
    end: jax.Array | bool,
) -> tuple[dict[str, Any], jax.Array, Keep]:
    """`primal_step`, and what it kept ([B]; `update` is True unless this token ends a mini-batch). Given the
    decisions `kept` of a previous run, it zeroes the accumulated update wherever that run discarded it."""
    mbs = token_scale.shape[0]
    pos = st["pos"]
    reset = tok["reset"]
    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
    fast0 = _tree_where_b(reset, fast_init, st["fast"])
    acc = _tree_where_b(reset, zeros(st["acc"]), st["acc"])
    lr_buf = _where_b(reset, jnp.zeros_like(st["lr"]), st["lr"])
    eta_bad = st["eta_bad"] | tok["lr_bad"]

    extra = tok.get("extra")
    z, pullback = jax.vjp(lambda f: model.forward(f, tok["k"], extra), fast0)
    _, dz = model.loss_grad(z, tok["k"], tok["v"])
    dz = clip_by_norm(dz, grad_clip)
    if num_steps > 0:
        grads = pullback(tok["lr"][..., None, None] * dz)[0]
        acc = jax.tree.map(lambda a, g: a + g, acc, grads)
    scale = token_scale[pos]
    weights_at = lambda acc_used: jax.tree.map(lambda w, a: w - scale * a, fast0, acc_used)
    acc_now = acc if kept is None else _tree_where_b(kept.output, acc, zeros(acc))
    weights_now = weights_at(acc_now)  # W_i = W_0 − s_i Σ_{j<=i} r_j ∇ℓ_j
    zbar = model.query(weights_now, tok["q"], None)
    use = _all_finite_b(weights_now) & _finite_b(zbar)
    if kept is not None:
        use = use & kept.output
    zbar = _where_b(use, zbar, model.query(fast0, tok["q"], None))

    put = lambda buf, val: jax.lax.dynamic_update_slice_in_dim(buf, val.astype(buf.dtype), pos, axis=2)
    new = dict(st)
    new["k"] = put(st["k"], tok["k"])
    new["v"] = put(st["v"], tok["v"])
    new["lr"] = put(lr_buf, tok["lr"][..., None])
    if extra is not None:
        new["extra"] = put(st["extra"], extra)

    def finish(_):
        eta_last = scale * new["lr"]
        fast = weights_now
        if kept is not None:
            eta_last = _where_b(kept.update, eta_last, 0.0)
            fast = weights_at(_tree_where_b(kept.update, acc, zeros(acc)))
        for _ in range(num_steps - 1):
            fast, _ = _gradient_step(model, fast, new["k"], new.get("extra"), new["v"], eta_last, grad_clip)
        # the loss after the update on this (last) token: one token's forward, where the dual form checks them all
        loss_after = _token_loss(model, fast, tok["k"], extra, tok["v"])
        ok = _all_finite_b((fast, loss_after)) & ~eta_bad
        if kept is not None:
            ok = ok & kept.update
        active = jnp.any(new["lr"] != 0, axis=(1, 2)) | eta_bad
        fast = _tree_where_b(active & ok, fast, fast0)
        skipped = st["skipped"] + (active & ~ok).astype(jnp.int32)
        return fast, zeros(acc), jnp.zeros_like(new["lr"]), jnp.zeros_like(eta_bad), skipped, ok

    def carry_on(_):
        return fast0, acc, new["lr"], eta_bad, st["skipped"], jnp.ones_like(eta_bad)

    is_end = jnp.logical_or(pos == mbs - 1, end)
    new["fast"], new["acc"], new["lr"], new["eta_bad"], new["skipped"], kept_update = jax.lax.cond(
        is_end, finish, carry_on, None
    )
    new["pos"] = jnp.where(is_end, 0, pos + 1).astype(jnp.int32)
    return new, zbar, Keep(kept_update, use)


def primal_scan(
    model: InnerModel,
    fast: Fast,
    fast_init: Fast,
    toks: dict[str, Any],
    *,
    token_scale: jax.Array,
    num_steps: int,
    grad_clip: float | None,
) -> tuple[Fast, jax.Array, jax.Array]:
    """Scans `primal_step` over tokens (leading axis T of every entry of toks); the last token ends its
    mini-batch. Returns (final fast weights, skipped [B], zbar [T, B, h, 1, d]); the backward pass stays finite
    when updates were skipped (see `_finite_backward`)."""
    run = functools.partial(_primal_scan, num_steps=num_steps, grad_clip=grad_clip)
    (final, zbar), skipped = _finite_backward(run, (model, fast, fast_init, toks, token_scale))
    return final, skipped, zbar


def _primal_scan(
    args: tuple[InnerModel, Fast, Fast, dict[str, Any], jax.Array],
    kept: Keep | None,
    *,
    num_steps: int,
    grad_clip: float | None,
) -> tuple[tuple[Fast, jax.Array], jax.Array, Keep]:
    """`primal_scan`, as `_finite_backward` runs it: ((final fast, zbar), skipped [B], what it kept [T, B])."""
    model, fast, fast_init, toks, token_scale = args
    t = toks["q"].shape[0]
    b, h, _, d = toks["q"].shape[1:]
    st = primal_state(fast, b, h, d, token_scale.shape[0], toks.get("extra") is not None, toks["q"].dtype)
    ends = jnp.asarray(np.arange(t) == t - 1)

    def body(st, x):
        tok, end, keep = x
        st, zbar, keep_now = _primal_step(
            model, st, fast_init, tok, keep, token_scale=token_scale, num_steps=num_steps, grad_clip=grad_clip, end=end
        )
        return st, (zbar, keep_now)

    st, (zbar, kept_now) = jax.lax.scan(body, st, (toks, ends, kept))
    return (st["fast"], zbar), st["skipped"], kept_now
