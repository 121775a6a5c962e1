"""NNX modules: TTTLinear, TTTMLP, LoRATTT. Thin owners of parameters around the maths of `inner.py`."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike, DTypeLike

from ponderttt.ttt import ops
from ponderttt.ttt.config import TTTConfig
from ponderttt.ttt.inner import Fast, InnerInputs, InnerModel, dual_scan, primal_scan, primal_state, primal_step
from ponderttt.ttt.inner_models import LinearInner, LoRAInner, MLPInner


class FrozenWeight(nnx.Variable):
    """A weight the outer optimiser must not train (`nnx.Optimizer(..., wrt=nnx.Param)` skips it)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TTTStats:
    """What a TTT layer reports besides its output. Every loss is per sequence (never batch-averaged).

    Losses are the inner reconstruction loss of a token, summed over heads, averaged over the tokens of a
    mini-batch (`loss_*`, [B, M]) or of a chunk (`chunk_loss_*`, [B, N]; token-weighted).
    loss_init: at the layer's learned initial fast weights (what a `reset` would give);
    loss_step0: at the weights in use before the mini-batch's update (a causal no-update probe);
    loss_after: after each inner step s = 1..k ([B, M, k] / [B, N, k]; k = 0 for num_steps=0).
    """

    state: Fast  # final fast weights, leaves [B, ...], same structure as init_state(B)
    loss_init: jax.Array
    loss_step0: jax.Array
    loss_after: jax.Array
    chunk_loss_init: jax.Array
    chunk_loss_step0: jax.Array
    chunk_loss_after: jax.Array
    tokens_per_minibatch: jax.Array  # [M] int32 (the last one may be short)
    tokens_per_chunk: jax.Array  # [N] int32
    skipped_updates: jax.Array  # [B] int32: updates dropped because they were not finite


def expand_gating_scale(
    gating_scale: ArrayLike | None,
    batch: int,
    num_mb: int,
    num_chunks: int,
    mb_per_chunk: int,
    dtype: DTypeLike = jnp.float32,
) -> jax.Array:
    """None | scalar | [B] | [B, n_chunks] | [B, n_minibatches] -> λ [B, M] (float32 unless dtype says otherwise)."""
    if gating_scale is None:
        return jnp.ones((batch, num_mb), dtype)
    lam = jnp.asarray(gating_scale, dtype)
    if lam.ndim == 0:
        return jnp.full((batch, num_mb), lam)
    if lam.ndim == 1 and lam.shape[0] == batch:
        return jnp.broadcast_to(lam[:, None], (batch, num_mb))
    if lam.ndim == 2 and lam.shape[0] == batch:
        if lam.shape[1] == num_chunks:
            return jnp.repeat(lam, mb_per_chunk, axis=1)[:, :num_mb]
        if lam.shape[1] == num_mb:
            return lam
    raise ValueError(
        f"gating_scale has shape {tuple(lam.shape)}; expected a scalar, [B]={batch}, [B, n_chunks]=({batch}, "
        f"{num_chunks}) or [B, n_minibatches]=({batch}, {num_mb}) for this input."
    )


def _gated_token_lr(lr_bht: jax.Array, lam_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The primal form's per-token learning rates r_j · λ [B, h, T], and [B, T] True where that product is not
    finite for a non-zero λ (the update is skipped). Such a product is 0, from factors zeroed before it: the
    backward pass of r · ∞ would give r the cotangent 0 · ∞ = NaN (the double where)."""
    finite = jnp.isfinite(jnp.max(jnp.abs(lr_bht), axis=1) * jnp.abs(lam_bt))  # [B, T]
    lr = jnp.where(jnp.isfinite(lr_bht), lr_bht, 0.0) * jnp.where(finite, lam_bt, 0.0)[:, None, :]
    return lr, ~finite & (lam_bt != 0)


def _per_chunk(loss_bm: jax.Array, tokens_m: jax.Array, mb_per_chunk: int, num_chunks: int) -> jax.Array:
    """Token-weighted mean of per-mini-batch losses [B, M, ...] over each chunk -> [B, N, ...]."""
    num_mb = loss_bm.shape[1]
    pad = num_chunks * mb_per_chunk - num_mb
    weights = jnp.pad(tokens_m.astype(jnp.float32), (0, pad)).reshape(num_chunks, mb_per_chunk)
    loss = jnp.pad(loss_bm, [(0, 0), (0, pad)] + [(0, 0)] * (loss_bm.ndim - 2))
    loss = loss.reshape(loss.shape[0], num_chunks, mb_per_chunk, *loss.shape[2:])
    w = weights.reshape(1, num_chunks, mb_per_chunk, *([1] * (loss.ndim - 3)))
    return jnp.sum(loss * w, axis=2) / jnp.sum(w, axis=2)


def run_dual(
    model: InnerModel,
    cfg: TTTConfig,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lr: jax.Array,
    fast: Fast,
    fast_init: Fast,
    token_scale: jax.Array,
    *,
    extra: jax.Array | None = None,
    rope: tuple[jax.Array, jax.Array] | None = None,
    gating_scale: ArrayLike | None = None,
    num_steps: int = 1,
    reset_mask: ArrayLike | None = None,
    chunk_size: int | None = None,
) -> tuple[jax.Array, TTTStats]:
    """Dual-form TTT over a sequence: lays it out in mini-batches (`InnerInputs`), runs `dual_scan`, reads out.

    q, k, v, extra: [B, T, h, d] in the inner dtype; lr: [B, h, T] the column factor r_j of η; fast: [B, ...]
    leaves to start from; fast_init: the learned initial weights (unbatched leaves); token_scale: s_i [K].
    rope: None, or the tables (cos, sin) [K, d / 2] to rotate q and k by their position in the mini-batch
    (t mod K); applied here, in the mini-batch layout, where that position is an axis (no gather).
    gating_scale, num_steps, reset_mask, chunk_size: as in the layers' `__call__`.

    Returns (per-head outputs [B, T, h, d], TTTStats)."""
    if not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps={num_steps!r} must be a non-negative int (0 = no update).")
    chunk_size = cfg.chunk_size if chunk_size is None else chunk_size
    mbs = cfg.mini_batch_size
    if chunk_size % mbs:
        raise ValueError(f"chunk_size={chunk_size} must be a multiple of mini_batch_size={mbs}.")
    batch, seq, heads, dim = q.shape
    num_mb = -(-seq // mbs)
    padded = num_mb * mbs
    mb_per_chunk = chunk_size // mbs
    num_chunks = -(-seq // chunk_size)
    lam = expand_gating_scale(gating_scale, batch, num_mb, num_chunks, mb_per_chunk, q.dtype)  # [B, M]

    def to_mb(a):  # [B, T, h, d] -> [M, B, h, K, d]
        a = jnp.pad(a, ((0, 0), (0, padded - seq), (0, 0), (0, 0)))
        return a.reshape(batch, num_mb, mbs, heads, a.shape[-1]).transpose(1, 0, 3, 2, 4)

    ftype = q.dtype
    q_mb, k_mb = to_mb(q), to_mb(k)
    if rope is not None:
        q_mb, k_mb = ops.apply_rope(q_mb, *rope), ops.apply_rope(k_mb, *rope)
    v_mb = to_mb(v)
    extra_mb = None if extra is None else to_mb(extra)
    valid_np = (np.arange(padded) < seq).reshape(num_mb, mbs)
    valid = jnp.asarray(valid_np, ftype)  # [M, K]
    tokens_m = valid_np.sum(axis=1).astype(np.int32)

    lr_mb = jnp.pad(lr, ((0, 0), (0, 0), (0, padded - seq))).reshape(batch, heads, num_mb, mbs).transpose(2, 0, 1, 3)
    tril = jnp.asarray(np.tril(np.ones((mbs, mbs))), ftype)
    # η[m, b, h, i, j] = s_i · r_j · λ[b, m] on j <= i (and, with resets, i and j in the same document). A mini-batch
    # whose η is not finite (λ or base_lr infinite, or the product overflowing: the bound below is) gets η = 0 and
    # its update is counted as skipped. The factors are zeroed before the product, not the product after it: the
    # backward pass of s · r · ∞ would give r and s the cotangent 0 · ∞ = NaN (the double where).
    eta_ok = jnp.isfinite(jnp.max(jnp.abs(token_scale)) * jnp.max(jnp.abs(lr_mb), axis=(2, 3)) * jnp.abs(lam.T))
    finite_or_0 = lambda a: jnp.where(jnp.isfinite(a), a, 0.0)
    lam_mb = jnp.where(eta_ok, lam.T, 0.0)  # [M, B]
    eta = finite_or_0(token_scale)[:, None] * finite_or_0(lr_mb)[..., None, :] * tril * lam_mb[:, :, None, None, None]
    asked = (lam.T != 0) & jnp.asarray(tokens_m > 0)[:, None]  # [M, B] an update is asked for
    skipped_eta = jnp.sum((asked & ~eta_ok).astype(jnp.int32), axis=0)  # [B]; the scan counts the others
    seen = None
    if reset_mask is not None:
        reset = jnp.pad(jnp.asarray(reset_mask, bool), ((0, 0), (0, padded - seq)))
        doc = jnp.cumsum(reset.astype(jnp.int32), axis=1).reshape(batch, num_mb, mbs).transpose(1, 0, 2)
        eta = eta * (doc[..., :, None] == doc[..., None, :])[:, :, None].astype(ftype)
        seen = jnp.cumsum(reset.reshape(batch, num_mb, mbs).transpose(1, 0, 2).astype(jnp.int32), -1) > 0
    last_row = jnp.asarray(np.eye(mbs)[tokens_m - 1], ftype)  # [M, K] one-hot of the last real row
    eta_last = jnp.einsum("mbhij,mi->mbhj", eta, last_row)
    gram = jnp.einsum("mbhid,mbhjd->mbhij", q_mb, k_mb)
    a_qk = eta * (gram + 1.0) if model.has_bias else eta * gram

    fast = jax.tree.map(lambda a: a.astype(ftype), fast)
    fast_init_b = jax.tree.map(lambda a: jnp.broadcast_to(a[None].astype(ftype), (batch, *a.shape)), fast_init)
    # Loss at the initial weights, for all mini-batches at once (no scan needed).
    z_init = jax.vmap(lambda k_m, e_m: model.forward(fast_init_b, k_m, e_m))(k_mb, extra_mb)  # [M, B, h, K, d]
    err_init = jnp.sum(model.loss(z_init, k_mb, v_mb), axis=2)  # [M, B, K]
    loss_init = (jnp.sum(err_init * valid[:, None], -1) / tokens_m[:, None]).T  # [B, M]

    xs = InnerInputs(
        q=q_mb,
        k=k_mb,
        v=v_mb,
        eta=eta,
        eta_last=eta_last,
        a_qk=a_qk,
        active=asked & eta_ok,
        valid=valid,
        extra=extra_mb,
        seen=seen,
        z_init=None if reset_mask is None else z_init,
    )
    final, skipped, ys = dual_scan(
        model,
        fast,
        fast_init_b,
        xs,
        num_steps=num_steps,
        grad_clip=cfg.inner_grad_clip,
        remat_group=cfg.remat_group,
    )
    skipped = skipped + skipped_eta
    out = model.output(q_mb, ys.zbar)  # [M, B, h, K, d]
    out = out.transpose(1, 0, 3, 2, 4).reshape(batch, padded, heads, dim)[:, :seq]

    loss_step0 = ys.loss_step0.T
    loss_after = ys.loss_after.transpose(1, 0, 2)
    tokens_m_j = jnp.asarray(tokens_m)
    stats = TTTStats(
        state=final,
        loss_init=loss_init,
        loss_step0=loss_step0,
        loss_after=loss_after,
        chunk_loss_init=_per_chunk(loss_init, tokens_m_j, mb_per_chunk, num_chunks),
        chunk_loss_step0=_per_chunk(loss_step0, tokens_m_j, mb_per_chunk, num_chunks),
        chunk_loss_after=_per_chunk(loss_after, tokens_m_j, mb_per_chunk, num_chunks),
        tokens_per_minibatch=tokens_m_j,
        tokens_per_chunk=jnp.asarray(
            [min(chunk_size, seq - c * chunk_size) for c in range(num_chunks)], dtype=jnp.int32
        ),
        skipped_updates=skipped,
    )
    return out, stats


def input_projections(cfg: TTTConfig) -> tuple[str, ...]:
    """Column blocks of `qkv_proj` in TTTLinear / TTTMLP, each [C, C]."""
    return ("q_proj",) + (() if cfg.qk_shared else ("k_proj",)) + ("v_proj",) + (("g_proj",) if cfg.gated else ())


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float) -> jax.Array:
    return std * jax.random.normal(rngs.params(), shape, jnp.float32)


class Views(NamedTuple):
    """What a layer's `_views` computes from its input x [B, T, C] (T = 1 when decoding).

    q, k, v and extra are [B, T, h, d] in the inner dtype (`ops.inner_dtype`; LoRA-TTT: h = 1, d = C).
    """

    q: jax.Array  # queries; RoPE applied only when `_views` was given positions (the dual form applies it later)
    k: jax.Array  # keys; as q
    v: jax.Array  # values
    extra: jax.Array | None  # the inner model's precompute of k (LoRA-TTT: k P), or None
    lr: jax.Array  # [B, h, T] the column factor r_j = base_lr · σ(x_j·w_h + c_h) / d of η (before λ)
    aux: jax.Array | None  # what `_finish` needs besides the outputs: the gate's input [B, T, C], or None
    conv_history: jax.Array | None  # [B, conv_kernel − 1, C] decoding with a shared-q convolution, else None


class _FastWeightLayer(nnx.Module):
    """The call / primal / decode protocol shared by every layer. Subclasses provide:
    `_views(x, positions, conv_history)` -> `Views` (positions None: q and k are returned without RoPE, which the
    dual form applies in its mini-batch layout with `_rope_tables()`); `_finish(out [B, T, h, d], aux, dtype)` -> y;
    `_model()` (the `InnerModel`); `_fast_init()`."""

    cfg: TTTConfig
    _has_extra: bool  # the inner model takes `Views.extra`

    def _views(self, x_btc: jax.Array, positions: Any, conv_history: jax.Array | None) -> Views:
        raise TypeError(f"{type(self).__name__} must define _views()")

    def _finish(self, out_bthd: jax.Array, aux: jax.Array | None, dtype: DTypeLike) -> jax.Array:
        raise TypeError(f"{type(self).__name__} must define _finish()")

    def _model(self) -> InnerModel:
        raise TypeError(f"{type(self).__name__} must define _model()")

    def _model_shape(self) -> tuple[int, int]:
        raise TypeError(f"{type(self).__name__} must define _model_shape()")

    def _fast_init(self) -> Fast:
        raise TypeError(f"{type(self).__name__} must define _fast_init()")

    def _token_scale(self, dtype: DTypeLike = jnp.float32) -> jax.Array:
        return ops.token_scale(self.cfg.mini_batch_size, self.token_idx_offset[...], dtype)

    def _rope_tables(self, dtype: DTypeLike = jnp.float32) -> tuple[jax.Array, jax.Array] | None:
        return None

    def _check_input(self, x_btc: jax.Array) -> None:
        if x_btc.ndim != 3 or x_btc.shape[-1] != self.cfg.hidden_size:
            raise ValueError(
                f"input has shape {tuple(x_btc.shape)}; expected [batch, time, {self.cfg.hidden_size}] (hidden_size)."
            )

    def init_state(self, batch_size: int) -> Fast:
        """Fresh fast weights for `batch_size` sequences (the layer's learned initial weights)."""
        return jax.tree.map(lambda a: jnp.broadcast_to(a[None], (batch_size, *a.shape)), self._fast_init())

    def __call__(
        self,
        x_btc: jax.Array,
        *,
        gating_scale: ArrayLike | None = None,
        num_steps: int = 1,
        state: Fast | None = None,
        reset_mask: ArrayLike | None = None,
        chunk_size: int | None = None,
    ) -> tuple[jax.Array, TTTStats]:
        """y [B, T, C] (dtype of x), TTTStats. gating_scale: λ, None | scalar | [B] | [B, n_chunks] |
        [B, n_minibatches]; num_steps: inner steps per mini-batch (0 = no update); state: fast weights to start
        from (None: the learned initial ones); reset_mask: [B, T] bool, True where a document starts;
        chunk_size: tokens per chunk for gating and stats (default cfg.chunk_size). See the package README."""
        self._check_input(x_btc)
        views = self._views(x_btc, None, None)
        fast = self.init_state(x_btc.shape[0]) if state is None else state
        out, stats = run_dual(
            self._model(),
            self.cfg,
            views.q,
            views.k,
            views.v,
            views.lr,
            fast,
            self._fast_init(),
            self._token_scale(views.q.dtype),
            extra=views.extra,
            rope=self._rope_tables(views.q.dtype),
            gating_scale=gating_scale,
            num_steps=num_steps,
            reset_mask=reset_mask,
            chunk_size=chunk_size,
        )
        return self._finish(out, views.aux, x_btc.dtype), stats

    def primal_forward(
        self,
        x_btc: jax.Array,
        *,
        gating_scale: ArrayLike | None = None,
        num_steps: int = 1,
        state: Fast | None = None,
        reset_mask: ArrayLike | None = None,
    ) -> tuple[jax.Array, Fast]:
        """Token-by-token primal form of `__call__` (slow; for tests and reference). Returns (y, final state)."""
        self._check_input(x_btc)
        cfg = self.cfg
        b, t, _ = x_btc.shape
        views = self._views(x_btc, np.arange(t) % cfg.mini_batch_size, None)
        q = views.q
        num_mb = -(-t // cfg.mini_batch_size)
        mb_per_chunk = cfg.chunk_size // cfg.mini_batch_size
        lam = expand_gating_scale(gating_scale, b, num_mb, -(-t // cfg.chunk_size), mb_per_chunk, q.dtype)
        lam_t = jnp.repeat(lam, cfg.mini_batch_size, axis=1)[:, :t]  # [B, T]
        lr, lr_bad = _gated_token_lr(views.lr, lam_t)
        tok = lambda a: a.transpose(1, 0, 2, 3)[:, :, :, None, :]  # [B, T, h, d] -> [T, B, h, 1, d]
        toks = {
            "q": tok(q),
            "k": tok(views.k),
            "v": tok(views.v),
            "lr": lr.transpose(2, 0, 1),
            "lr_bad": lr_bad.T,
            "reset": jnp.zeros((t, b), bool) if reset_mask is None else jnp.asarray(reset_mask, bool).T,
        }
        if views.extra is not None:
            toks["extra"] = tok(views.extra)
        final, _, zbar = primal_scan(
            self._model(),
            self.init_state(b) if state is None else state,
            self.init_state(b),
            toks,
            token_scale=self._token_scale(q.dtype),
            num_steps=num_steps,
            grad_clip=cfg.inner_grad_clip,
        )
        out = self._model().output(toks["q"], zbar)[:, :, :, 0, :].transpose(1, 0, 2, 3)
        return self._finish(out, views.aux, x_btc.dtype), final

    def _conv_history(self, batch_size: int) -> jax.Array | None:
        return None

    def init_decode_state(self, batch_size: int, state: Fast | None = None) -> dict[str, Any]:
        """State for `decode_step`, at a mini-batch boundary (position 0), from `state` or fresh weights."""
        fast = self.init_state(batch_size) if state is None else state
        heads, dim = self._model_shape()
        dtype = ops.inner_dtype(jax.tree.leaves(fast)[0].dtype)  # float32, or float64 for float64 weights
        st = primal_state(fast, batch_size, heads, dim, self.cfg.mini_batch_size, self._has_extra, dtype)
        history = self._conv_history(batch_size)
        if history is not None:
            st["conv"] = history
        return st

    def decode_step(
        self,
        x_b1c: jax.Array,
        dstate: dict[str, Any],
        *,
        gating_scale: ArrayLike | None = None,
        num_steps: int = 1,
        reset: ArrayLike | None = None,
    ) -> tuple[jax.Array, dict[str, Any]]:
        """One token with the primal form: (y [B, 1, C], new decode state). Matches `__call__` token by token
        for a sequence that starts at a mini-batch boundary. gating_scale: None | scalar | [B]; reset: [B] bool."""
        self._check_input(x_b1c)
        b = x_b1c.shape[0]
        pos = dstate["pos"]
        views = self._views(x_b1c, pos[None], dstate.get("conv"))
        q = views.q
        lam = expand_gating_scale(gating_scale, b, 1, 1, 1, q.dtype)  # [B, 1]
        lr, lr_bad = _gated_token_lr(views.lr, lam)
        per_token = lambda a: a.transpose(0, 2, 1, 3)  # [B, 1, h, d] -> [B, h, 1, d]
        tok = {
            "q": per_token(q),
            "k": per_token(views.k),
            "v": per_token(views.v),
            "lr": lr[:, :, 0],
            "lr_bad": lr_bad[:, 0],
            "reset": jnp.zeros((b,), bool) if reset is None else jnp.asarray(reset, bool),
        }
        if views.extra is not None:
            tok["extra"] = per_token(views.extra)
        core = {key: val for key, val in dstate.items() if key != "conv"}
        new, zbar = primal_step(
            self._model(),
            core,
            self.init_state(b),
            tok,
            token_scale=self._token_scale(q.dtype),
            num_steps=num_steps,
            grad_clip=self.cfg.inner_grad_clip,
        )
        if views.conv_history is not None:
            new["conv"] = views.conv_history
        out = self._model().output(tok["q"], zbar).transpose(0, 2, 1, 3)
        return self._finish(out, views.aux, x_b1c.dtype), new


class _TTTHeadsBase(_FastWeightLayer):
    """Shared by TTTLinear and TTTMLP: projections, conv (mamba), RoPE, η, post-norm, gate, output projection."""

    _has_extra = False

    def __init__(self, cfg: TTTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        c, h, d, std = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.init_std
        # The input projections live side by side in one [in, out] matrix (one product per call), columns
        # in the order of `input_projections(cfg)`: q | k | v | g (k absent with share_qk, g without the gate).
        names = input_projections(cfg)
        self.qkv_proj = nnx.Param(_normal(rngs, (c, len(names) * c), std))
        self.o_proj = nnx.Param(_normal(rngs, (c, c), std))
        if cfg.qk_shared:
            bound = 1.0 / math.sqrt(cfg.conv_kernel)  # torch Conv1d default init for groups=C, 1 channel each
            uniform = lambda shape: jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound)
            self.conv_q_weight = nnx.Param(uniform((cfg.conv_kernel, c)))  # [k, C]; [k-1] = current token
            self.conv_q_bias = nnx.Param(uniform((c,)))
            self.conv_k_weight = nnx.Param(uniform((cfg.conv_kernel, c)))
            self.conv_k_bias = nnx.Param(uniform((c,)))
        self.lr_weight = nnx.Param(_normal(rngs, (h, c), std))  # learnable_ttt_lr_weight [h, 1, C] squeezed
        self.lr_bias = nnx.Param(jnp.zeros((h,), jnp.float32))
        self.token_idx_offset = nnx.Param(jnp.zeros((cfg.mini_batch_size,), jnp.float32))  # learnable_token_idx δ
        self.ttt_norm_weight = nnx.Param(jnp.ones((h, d), jnp.float32))
        self.ttt_norm_bias = nnx.Param(jnp.zeros((h, d), jnp.float32))
        self.post_norm_weight = nnx.Param(jnp.ones((c,), jnp.float32))
        self.post_norm_bias = nnx.Param(jnp.zeros((c,), jnp.float32))

    def _model_shape(self) -> tuple[int, int]:
        return (self.cfg.num_heads, self.cfg.head_dim)

    def _conv_history(self, batch_size: int) -> jax.Array | None:
        if not self.cfg.qk_shared:
            return None
        return jnp.zeros((batch_size, self.cfg.conv_kernel - 1, self.cfg.hidden_size), jnp.float32)

    def _views(self, x_btc: jax.Array, positions: Any, conv_history: jax.Array | None) -> Views:
        cfg = self.cfg
        b, t, _ = x_btc.shape
        dt = x_btc.dtype
        names = input_projections(cfg)
        got = dict(zip(names, jnp.split(x_btc @ self.qkv_proj[...].astype(dt), len(names), axis=-1), strict=True))
        new_history = None
        if cfg.qk_shared:
            xq = got["q_proj"]
            if conv_history is not None:  # decoding: the previous k-1 shared-q projections
                xq = jnp.concatenate([conv_history.astype(dt), xq], axis=1)
                new_history = xq[:, -(cfg.conv_kernel - 1) :].astype(jnp.float32)
            q = ops.causal_depthwise_conv(xq, self.conv_q_weight[...], self.conv_q_bias[...])[:, -t:]
            k = ops.causal_depthwise_conv(xq, self.conv_k_weight[...], self.conv_k_bias[...])[:, -t:]
        else:
            q, k = got["q_proj"], got["k_proj"]
        ftype = ops.inner_dtype(dt)
        heads = lambda a: a.astype(ftype).reshape(b, t, cfg.num_heads, cfg.head_dim)
        q, k = heads(q), heads(k)
        if positions is not None:
            cos, sin = self._rope_tables(ftype)
            cos, sin = cos[positions][None, :, None], sin[positions][None, :, None]
            q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
        lr = ops.token_lr(x_btc, self.lr_weight[...], self.lr_bias[...], cfg.base_lr, cfg.head_dim, ftype)
        return Views(q, k, heads(got["v_proj"]), None, lr, aux=got.get("g_proj"), conv_history=new_history)

    def _rope_tables(self, dtype: DTypeLike = jnp.float32) -> tuple[jax.Array, jax.Array]:
        return ops.rope_tables(self.cfg.mini_batch_size, self.cfg.head_dim, self.cfg.rope_theta, dtype)

    def _finish(self, out_bthd: jax.Array, gate_in: jax.Array | None, dtype: DTypeLike) -> jax.Array:
        cfg = self.cfg
        b, t = out_bthd.shape[:2]
        y = ops.layer_norm(
            out_bthd.reshape(b, t, cfg.hidden_size),
            self.post_norm_weight[...],
            self.post_norm_bias[...],
            cfg.post_norm_eps,
        ).astype(dtype)
        if gate_in is not None:
            y = ops.gelu_tanh(gate_in) * y
        return y @ self.o_proj[...].astype(dtype)

    def _inner(self) -> type[LinearInner | MLPInner]:
        raise TypeError(f"{type(self).__name__} must define _inner()")

    def _model(self) -> LinearInner | MLPInner:
        return self._inner()(
            self.ttt_norm_weight[...][:, None, :], self.ttt_norm_bias[...][:, None, :], self.cfg.ttt_norm_eps
        )


class TTTLinear(_TTTHeadsBase):
    """TTT-Linear (official formulation): per-head fast weights W1 [h, d, d], b1 [h, d]."""

    def __init__(self, cfg: TTTConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        h, d = cfg.num_heads, cfg.head_dim
        self.W1 = nnx.Param(_normal(rngs, (h, d, d), cfg.init_std))
        self.b1 = nnx.Param(jnp.zeros((h, d), jnp.float32))

    def _inner(self) -> type[LinearInner]:
        return LinearInner

    def _fast_init(self) -> Fast:
        return {"W1": self.W1[...], "b1": self.b1[...]}


class TTTMLP(_TTTHeadsBase):
    """TTT-MLP: per-head inner MLP d -> 4d -> d with tanh GELU (W1, b1, W2, b2), dual form on both layers."""

    def __init__(self, cfg: TTTConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        h, d, e = cfg.num_heads, cfg.head_dim, cfg.mlp_expansion * cfg.head_dim
        self.W1 = nnx.Param(_normal(rngs, (h, d, e), cfg.init_std))
        self.b1 = nnx.Param(jnp.zeros((h, e), jnp.float32))
        self.W2 = nnx.Param(_normal(rngs, (h, e, d), cfg.init_std))
        self.b2 = nnx.Param(jnp.zeros((h, d), jnp.float32))

    def _inner(self) -> type[MLPInner]:
        return MLPInner

    def _fast_init(self) -> Fast:
        return {"W1": self.W1[...], "b1": self.b1[...], "W2": self.W2[...], "b2": self.b2[...]}


class LoRATTT(_FastWeightLayer):
    """LoRA-TTT: the fast weights are a low-rank delta A B (A [C, r], B [r, C]) on a frozen projection P.

    Inner loss ½‖k P + (k A) B − v‖² with views q = xθ_Q, k = xθ_K, v = xθ_V (one head, full width, no
    RoPE); η as in TTT-Linear with head_dim = C. The output is the delta alone, y_i = (q_i A_i) B_i, with the
    causal per-token weights of the dual form; B starts at zero, so at the initial weights (and whenever
    λ = 0) y is exactly 0: inserted on a residual stream, the layer starts as an exact no-op.
    P is a `FrozenWeight` (identity by default; set `layer.frozen_proj[...]` to a backbone projection).
    """

    _has_extra = True

    def __init__(self, cfg: TTTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        c, r, std = cfg.hidden_size, cfg.lora_rank, cfg.init_std
        self.qkv_proj = nnx.Param(_normal(rngs, (c, 3 * c), std))  # [in, q | k | v]
        self.frozen_proj = FrozenWeight(jnp.eye(c, dtype=jnp.float32))
        self.lora_a = nnx.Param(_normal(rngs, (c, r), 1.0 / math.sqrt(c)))
        self.lora_b = nnx.Param(jnp.zeros((r, c), jnp.float32))
        self.lr_weight = nnx.Param(_normal(rngs, (1, c), std))
        self.lr_bias = nnx.Param(jnp.zeros((1,), jnp.float32))
        self.token_idx_offset = nnx.Param(jnp.zeros((cfg.mini_batch_size,), jnp.float32))

    def _model_shape(self) -> tuple[int, int]:
        return (1, self.cfg.hidden_size)

    def _views(self, x_btc: jax.Array, positions: Any, conv_history: jax.Array | None) -> Views:
        del positions, conv_history
        b, t, c = x_btc.shape
        q, k, v = jnp.split(x_btc @ self.qkv_proj[...].astype(x_btc.dtype), 3, axis=-1)
        ftype = ops.inner_dtype(x_btc.dtype)
        one_head = lambda a: a.astype(ftype).reshape(b, t, 1, c)
        k = one_head(k)
        extra = k @ self.frozen_proj[...].astype(ftype)
        lr = ops.token_lr(x_btc, self.lr_weight[...], self.lr_bias[...], self.cfg.base_lr, c, ftype)
        return Views(one_head(q), k, one_head(v), extra, lr, aux=None, conv_history=None)

    def _finish(self, out_bthd: jax.Array, aux: jax.Array | None, dtype: DTypeLike) -> jax.Array:
        b, t = out_bthd.shape[:2]
        return out_bthd.reshape(b, t, self.cfg.hidden_size).astype(dtype)

    def _model(self) -> LoRAInner:
        return LoRAInner()

    def _fast_init(self) -> Fast:
        return {"A": self.lora_a[...][None], "B": self.lora_b[...][None]}  # one head: [1, C, r], [1, r, C]
