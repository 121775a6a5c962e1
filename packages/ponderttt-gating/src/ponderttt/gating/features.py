"""Per-sequence gate features for one chunk: 32-D default, 64-D extended, with per-group normalisation.

The extractor takes arrays the model already computes — logits (or their per-token entropy and confidence),
the TTT layer's reconstruction losses (initial and step 0), hidden states, optional attention entropy and a
gradient-variance estimate, the remaining budget and the previous action's cost — and returns ``[B, F]``.
EMAs, previous-chunk values and normalisation statistics are carried in ``FeatureState`` (a pytree passed in
and returned), never captured at trace time. Missing optional inputs give zeros (attention and gradient
variance also have an availability flag).

Normalisation is per group: every group in ``NORMALISED_GROUPS`` is standardised with running mean/variance
(EMA over chunks, shared across sequences, updated only when ``update_stats=True``) and clipped to ±``clip``;
flags and the budget group are passed through raw.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

DEFAULT_GROUPS: dict[str, tuple[str, ...]] = {
    "confidence": (
        "entropy_mean",
        "entropy_std",
        "entropy_max",
        "confidence_mean",
        "confidence_std",
        "confidence_min",
        "low_confidence_frac",
        "entropy_delta_ema",
    ),
    "reconstruction": (
        "recon_init",
        "recon_step0",
        "recon_change",
        "recon_log_ratio",
        "recon_step0_ema",
        "recon_delta_ema",
        "recon_delta_prev",
        "log_recon_step0",
    ),
    "hidden": (
        "hidden_mean",
        "hidden_std",
        "hidden_abs_mean",
        "hidden_max_abs",
        "token_norm_mean",
        "token_norm_std",
        "hidden_sparsity",
        "token_norm_delta_ema",
    ),
    "signals": ("attention_entropy", "log_grad_variance", "entropy_ema"),
    "flags": ("attention_available", "grad_available"),
    "budget": ("budget_remaining", "cost_ema", "prev_cost"),
}
EXTENDED_GROUPS: dict[str, tuple[str, ...]] = {
    "confidence_ext": (
        "entropy_p10",
        "entropy_p50",
        "entropy_p90",
        "confidence_p10",
        "confidence_p50",
        "confidence_p90",
        "entropy_trend",
        "confidence_trend",
    ),
    "reconstruction_ext": (
        "recon_init_ema",
        "recon_step0_ema_slow",
        "recon_std_ema",
        "recon_zscore",
        "recon_ratio",
        "recon_change_ema",
        "recon_min_seen",
        "recon_max_seen",
    ),
    "hidden_ext": (
        "token_norm_max",
        "token_norm_min",
        "token_norm_first",
        "token_norm_last",
        "token_norm_trend",
        "hidden_skew",
        "hidden_kurtosis",
        "hidden_std_delta_ema",
    ),
    "signals_ext": (
        "attention_entropy_std",
        "attention_entropy_min",
        "attention_entropy_max",
        "attention_delta_ema",
        "grad_variance_ema",
        "grad_variance_delta_ema",
        "log_chunk_index",
    ),
    "budget_ext": ("cost_ema_slow",),
}
NORMALISED_GROUPS = frozenset(
    {"confidence", "reconstruction", "hidden", "signals", "confidence_ext", "reconstruction_ext", "hidden_ext"}
    | {"signals_ext"}
)


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """extended: 64-D instead of 32-D. ema: per-sequence EMA decay over chunks (ema_slow for the slow EMAs).
    stats_decay: decay of the running normalisation statistics. low_confidence: threshold for
    ``low_confidence_frac``. clip: normalised features are clipped to ±clip."""

    extended: bool = False
    ema: float = 0.9
    ema_slow: float = 0.99
    stats_decay: float = 0.99
    low_confidence: float = 0.5
    clip: float = 5.0
    eps: float = 1e-6

    @classmethod
    def default32(cls) -> FeatureConfig:
        """The 32-D layout (``DEFAULT_GROUPS``)."""
        return cls(extended=False)

    @classmethod
    def extended64(cls) -> FeatureConfig:
        """The 64-D layout: ``DEFAULT_GROUPS`` followed by ``EXTENDED_GROUPS``."""
        return cls(extended=True)

    @property
    def groups(self) -> dict[str, tuple[str, ...]]:
        """Group name -> feature names, in column order (a fresh dict)."""
        return {**DEFAULT_GROUPS, **EXTENDED_GROUPS} if self.extended else dict(DEFAULT_GROUPS)

    @property
    def names(self) -> tuple[str, ...]:
        """Feature names in column order: ``names[i]`` labels column i of the [B, F] features."""
        return tuple(name for names in self.groups.values() for name in names)

    @property
    def num_features(self) -> int:
        """F: 32, or 64 when ``extended``."""
        return len(self.names)

    def index(self, name: str) -> int:
        """Column of a named feature (e.g. ``cfg.index("recon_step0")``)."""
        if name not in self.names:
            raise KeyError(f"no feature named {name!r} in the {self.num_features}-D layout; names: {self.names}")
        return self.names.index(name)

    def normalised_mask(self) -> tuple[bool, ...]:
        """[F] True where a column is standardised (its group is in ``NORMALISED_GROUPS``), False where raw."""
        return tuple(group in NORMALISED_GROUPS for group, names in self.groups.items() for _ in names)


def feature_index(name: str, extended: bool = False) -> int:
    """Column of feature ``name`` in the 32-D (or ``extended`` 64-D) layout; KeyError for an unknown name."""
    return FeatureConfig(extended=extended).index(name)


class FeatureInputs(NamedTuple):
    """What the model provides for one chunk (any may be None except that B must be inferable).

    token_entropy, token_confidence: [B, T] (or give ``logits`` [B, T, V] and they are computed);
    recon_init, recon_step0: [B] the TTT reconstruction loss with the initial fast weights and at step 0
    (before this chunk's update); hidden: [B, T, C]; attention_entropy: [B, H] per head (or [B]);
    grad_variance: [B] (see ``gradient_variance``); budget_remaining: [B]; prev_cost: [B] normalised cost of the
    previous chunk's action; token_mask: [B, T] (1 = real token; padding at the end,
    which ``token_norm_first/last`` assume).
    """

    token_entropy: jax.Array | None = None
    token_confidence: jax.Array | None = None
    logits: jax.Array | None = None
    recon_init: jax.Array | None = None
    recon_step0: jax.Array | None = None
    hidden: jax.Array | None = None
    attention_entropy: jax.Array | None = None
    grad_variance: jax.Array | None = None
    budget_remaining: jax.Array | None = None
    prev_cost: jax.Array | None = None
    token_mask: jax.Array | None = None


class FeatureState(NamedTuple):
    """What ``extract_features`` carries between chunks: per-sequence history and shared normalisation stats."""

    chunk: jax.Array  # [B] float32 chunks seen in the current document
    ema: dict[str, jax.Array]  # name -> [B] per-sequence EMAs and previous values
    stats_mean: jax.Array  # [F] running mean for normalisation
    stats_var: jax.Array  # [F] running variance
    stats_count: jax.Array  # [] number of statistics updates


_EMA_KEYS = (
    "entropy",
    "recon",
    "recon_slow",
    "recon_var",
    "recon_prev",
    "recon_init",
    "recon_change",
    "recon_min",
    "recon_max",
    "token_norm",
    "hidden_std",
    "attention",
    "grad_variance",
    "cost",
    "cost_slow",
)


def entropy_and_confidence(logits_btv: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[B, T, V] logits -> ([B, T] prediction entropy in nats, [B, T] max probability), in float32."""
    log_p = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1), jnp.exp(jnp.max(log_p, axis=-1))


def gradient_variance(token_grads_btd: jax.Array, token_mask_bt: jax.Array | None = None) -> jax.Array:
    """Variance-of-gradients estimate: [B, T, D] per-token gradients -> [B] mean over D of the variance over T."""
    g = token_grads_btd.astype(jnp.float32)
    w = jnp.ones(g.shape[:2], jnp.float32) if token_mask_bt is None else token_mask_bt.astype(jnp.float32)
    n = jnp.maximum(w.sum(axis=1), 1.0)[:, None]
    mean = jnp.einsum("bt,btd->bd", w, g) / n
    var = jnp.einsum("bt,btd->bd", w, (g - mean[:, None]) ** 2) / n
    return var.mean(axis=-1)


def init_feature_state(batch_size: int, cfg: FeatureConfig = FeatureConfig()) -> FeatureState:
    """Fresh state for ``batch_size`` sequences: zero history, mean 0 / variance 1 statistics, no updates yet."""
    zeros = jnp.zeros((batch_size,), jnp.float32)
    f = cfg.num_features
    return FeatureState(
        zeros,
        {k: zeros for k in _EMA_KEYS},
        jnp.zeros((f,), jnp.float32),
        jnp.ones((f,), jnp.float32),
        jnp.zeros((), jnp.float32),
    )


def reset_sequences(state: FeatureState, new_document_b: jax.Array) -> FeatureState:
    """Forget per-sequence history where a new document starts ([B] bool); normalisation statistics are kept."""
    keep = ~new_document_b.astype(bool)
    return state._replace(
        chunk=jnp.where(keep, state.chunk, 0.0), ema={k: jnp.where(keep, v, 0.0) for k, v in state.ema.items()}
    )


def _masked_stats(x_bt, w_bt):
    n = jnp.maximum(w_bt.sum(axis=1), 1.0)
    mean = jnp.sum(x_bt * w_bt, axis=1) / n
    std = jnp.sqrt(jnp.sum(w_bt * (x_bt - mean[:, None]) ** 2, axis=1) / n)
    big = jnp.finfo(jnp.float32).max
    return mean, std, jnp.max(jnp.where(w_bt > 0, x_bt, -big), axis=1), jnp.min(jnp.where(w_bt > 0, x_bt, big), axis=1)


def _masked_quantiles(x_bt, w_bt, qs):
    """Quantiles over real tokens: padding is pushed to +inf, and the index is scaled by the real count."""
    sorted_x = jnp.sort(jnp.where(w_bt > 0, x_bt, jnp.inf), axis=1)
    n = jnp.maximum(w_bt.sum(axis=1), 1.0)
    out = []
    for q in qs:
        idx = jnp.clip(jnp.floor(q * (n - 1)).astype(jnp.int32), 0, x_bt.shape[1] - 1)
        out.append(jnp.take_along_axis(sorted_x, idx[:, None], axis=1)[:, 0])
    return out


def _halves_trend(x_bt, w_bt):
    """Mean over the second half of the chunk minus the first half."""
    t = x_bt.shape[1]
    first = jnp.arange(t) < t // 2
    m1 = jnp.sum(x_bt * w_bt * first, 1) / jnp.maximum(jnp.sum(w_bt * first, 1), 1.0)
    m2 = jnp.sum(x_bt * w_bt * ~first, 1) / jnp.maximum(jnp.sum(w_bt * ~first, 1), 1.0)
    return m2 - m1


def extract_features(
    inputs: FeatureInputs, state: FeatureState, cfg: FeatureConfig = FeatureConfig(), *, update_stats: bool = True
) -> tuple[jax.Array, FeatureState]:
    """One chunk -> ([B, F] features, new state). Pure and jit-able (``cfg`` and ``update_stats`` static)."""
    batch = state.chunk.shape[0]
    f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
    entropy, confidence = f32(inputs.token_entropy), f32(inputs.token_confidence)
    if inputs.logits is not None and (entropy is None or confidence is None):
        ent_l, conf_l = entropy_and_confidence(inputs.logits)
        entropy = ent_l if entropy is None else entropy
        confidence = conf_l if confidence is None else confidence
    hidden = f32(inputs.hidden)
    tokens = next((x.shape[1] for x in (entropy, confidence, hidden) if x is not None), 1)
    if inputs.token_mask is not None:
        w = f32(inputs.token_mask)
    else:
        w = jnp.ones((batch, tokens), jnp.float32)
    zeros = jnp.zeros((batch,), jnp.float32)
    entropy = jnp.zeros((batch, tokens)) if entropy is None else entropy
    confidence = jnp.zeros((batch, tokens)) if confidence is None else confidence
    for name, x in (("token_entropy", entropy), ("token_confidence", confidence), ("token_mask", w)):
        if x.shape != (batch, tokens):
            raise ValueError(f"FeatureInputs.{name} has shape {x.shape}; expected [B, T] = {(batch, tokens)}")
    ema, first = state.ema, state.chunk == 0
    a, a_slow = cfg.ema, cfg.ema_slow

    def update_ema(key, x, decay=a):
        return jnp.where(first, x, decay * ema[key] + (1 - decay) * x)

    v: dict[str, jax.Array] = {}
    new_ema: dict[str, jax.Array] = {}
    # confidence group
    ent_mean, ent_std, ent_max, _ = _masked_stats(entropy, w)
    conf_mean, conf_std, _, conf_min = _masked_stats(confidence, w)
    v |= {"entropy_mean": ent_mean, "entropy_std": ent_std, "entropy_max": ent_max}
    v |= {"confidence_mean": conf_mean, "confidence_std": conf_std, "confidence_min": conf_min}
    v["low_confidence_frac"] = jnp.sum(w * (confidence < cfg.low_confidence), 1) / jnp.maximum(w.sum(1), 1.0)
    v["entropy_delta_ema"] = jnp.where(first, 0.0, ent_mean - ema["entropy"])
    v["entropy_ema"] = jnp.where(first, ent_mean, ema["entropy"])
    new_ema["entropy"] = update_ema("entropy", ent_mean)
    # reconstruction group
    r0 = zeros if inputs.recon_step0 is None else f32(inputs.recon_step0)
    ri = r0 if inputs.recon_init is None else f32(inputs.recon_init)
    v |= {"recon_init": ri, "recon_step0": r0, "recon_change": r0 - ri}
    v["recon_log_ratio"] = jnp.log(jnp.maximum(r0, cfg.eps)) - jnp.log(jnp.maximum(ri, cfg.eps))
    v["recon_ratio"] = r0 / jnp.maximum(ri, cfg.eps)
    v["log_recon_step0"] = jnp.log(jnp.maximum(r0, cfg.eps))
    v["recon_step0_ema"] = jnp.where(first, r0, ema["recon"])
    v["recon_delta_ema"] = jnp.where(first, 0.0, r0 - ema["recon"])
    v["recon_delta_prev"] = jnp.where(first, 0.0, r0 - ema["recon_prev"])
    recon_std = jnp.sqrt(jnp.maximum(ema["recon_var"], 0.0))
    v["recon_std_ema"] = recon_std
    # z-score of the loss against its own history; zero until the variance EMA has seen 3 chunks, and bounded so
    # one early outlier cannot dominate the running normalisation statistics
    zscore = jnp.clip((r0 - ema["recon"]) / (recon_std + 1e-3), -cfg.clip, cfg.clip)
    v["recon_zscore"] = jnp.where(state.chunk < 3, 0.0, zscore)
    v["recon_init_ema"] = jnp.where(first, ri, ema["recon_init"])
    v["recon_step0_ema_slow"] = jnp.where(first, r0, ema["recon_slow"])
    v["recon_change_ema"] = jnp.where(first, r0 - ri, ema["recon_change"])
    v["recon_min_seen"] = jnp.where(first, r0, jnp.minimum(ema["recon_min"], r0))
    v["recon_max_seen"] = jnp.where(first, r0, jnp.maximum(ema["recon_max"], r0))
    new_ema["recon"] = update_ema("recon", r0)
    new_ema["recon_slow"] = update_ema("recon_slow", r0, a_slow)
    new_ema["recon_var"] = jnp.where(first, 0.0, a * ema["recon_var"] + (1 - a) * (r0 - ema["recon"]) ** 2)
    new_ema["recon_prev"] = r0
    new_ema["recon_init"] = update_ema("recon_init", ri)
    new_ema["recon_change"] = update_ema("recon_change", r0 - ri)
    new_ema["recon_min"], new_ema["recon_max"] = v["recon_min_seen"], v["recon_max_seen"]
    # hidden group
    if hidden is None:
        hidden = jnp.zeros((batch, tokens, 1), jnp.float32)
    if hidden.shape[:2] != (batch, tokens):
        raise ValueError(
            f"FeatureInputs.hidden has shape {hidden.shape}; expected [B, T, C] with B, T = {batch, tokens}"
        )
    wc = w[:, :, None]
    count = jnp.maximum(w.sum(1) * hidden.shape[2], 1.0)
    h_mean = jnp.sum(hidden * wc, (1, 2)) / count
    centred = (hidden - h_mean[:, None, None]) * wc
    h_var = jnp.sum(centred**2, (1, 2)) / count
    h_std = jnp.sqrt(h_var)
    v |= {"hidden_mean": h_mean, "hidden_std": h_std, "hidden_abs_mean": jnp.sum(jnp.abs(hidden) * wc, (1, 2)) / count}
    v["hidden_max_abs"] = jnp.max(jnp.abs(hidden) * wc, (1, 2))
    rms = jnp.sqrt(jnp.sum(hidden**2 * wc, (1, 2)) / count)
    v["hidden_sparsity"] = jnp.sum((jnp.abs(hidden) < 0.01 * rms[:, None, None]) * wc, (1, 2)) / count
    v["hidden_skew"] = jnp.sum(centred**3, (1, 2)) / count / (h_std**3 + cfg.eps)
    v["hidden_kurtosis"] = jnp.sum(centred**4, (1, 2)) / count / (h_var**2 + cfg.eps) - 3.0
    norms = jnp.sqrt(jnp.sum(hidden**2, axis=-1))  # [B, T]
    n_mean, n_std, n_max, n_min = _masked_stats(norms, w)
    v |= {"token_norm_mean": n_mean, "token_norm_std": n_std, "token_norm_max": n_max, "token_norm_min": n_min}
    last = jnp.maximum(w.sum(1).astype(jnp.int32) - 1, 0)
    v["token_norm_first"] = norms[:, 0]
    v["token_norm_last"] = jnp.take_along_axis(norms, last[:, None], axis=1)[:, 0]
    v["token_norm_trend"] = _halves_trend(norms, w)
    v["token_norm_delta_ema"] = jnp.where(first, 0.0, n_mean - ema["token_norm"])
    v["hidden_std_delta_ema"] = jnp.where(first, 0.0, h_std - ema["hidden_std"])
    new_ema["token_norm"] = update_ema("token_norm", n_mean)
    new_ema["hidden_std"] = update_ema("hidden_std", h_std)
    # attention / gradient signals
    if inputs.attention_entropy is None:
        att = jnp.zeros((batch, 1), jnp.float32)
        v["attention_available"] = zeros
    else:
        att = f32(inputs.attention_entropy)
        att = att[:, None] if att.ndim == 1 else att
        v["attention_available"] = jnp.ones((batch,), jnp.float32)
    att_mean = att.mean(1)
    v |= {"attention_entropy": att_mean, "attention_entropy_std": att.std(1)}
    v |= {"attention_entropy_min": att.min(1), "attention_entropy_max": att.max(1)}
    v["attention_delta_ema"] = jnp.where(first, 0.0, att_mean - ema["attention"])
    new_ema["attention"] = update_ema("attention", att_mean)
    gv = zeros if inputs.grad_variance is None else f32(inputs.grad_variance)
    v["grad_available"] = zeros if inputs.grad_variance is None else jnp.ones((batch,), jnp.float32)
    v["log_grad_variance"] = jnp.log1p(jnp.maximum(gv, 0.0))
    v["grad_variance_ema"] = jnp.where(first, gv, ema["grad_variance"])
    v["grad_variance_delta_ema"] = jnp.where(first, 0.0, gv - ema["grad_variance"])
    new_ema["grad_variance"] = update_ema("grad_variance", gv)
    # entropy / confidence distribution (extended)
    e10, e50, e90 = _masked_quantiles(entropy, w, (0.1, 0.5, 0.9))
    c10, c50, c90 = _masked_quantiles(confidence, w, (0.1, 0.5, 0.9))
    v |= {"entropy_p10": e10, "entropy_p50": e50, "entropy_p90": e90}
    v |= {"confidence_p10": c10, "confidence_p50": c50, "confidence_p90": c90}
    v["entropy_trend"], v["confidence_trend"] = _halves_trend(entropy, w), _halves_trend(confidence, w)
    # budget and history
    prev_cost = zeros if inputs.prev_cost is None else f32(inputs.prev_cost)
    v["budget_remaining"] = zeros if inputs.budget_remaining is None else f32(inputs.budget_remaining)
    v["prev_cost"] = prev_cost
    cost_seen = state.chunk > 0  # the first chunk has no previous action
    v["cost_ema"] = ema["cost"]
    v["cost_ema_slow"] = ema["cost_slow"]
    new_ema["cost"] = jnp.where(cost_seen, a * ema["cost"] + (1 - a) * prev_cost, 0.0)
    new_ema["cost_slow"] = jnp.where(cost_seen, a_slow * ema["cost_slow"] + (1 - a_slow) * prev_cost, 0.0)
    v["log_chunk_index"] = jnp.log1p(state.chunk)

    raw = jnp.stack([v[name] for name in cfg.names], axis=-1)  # [B, F]
    normalised = jnp.asarray(cfg.normalised_mask())
    mean, var, n = state.stats_mean, state.stats_var, state.stats_count
    if update_stats:
        d = cfg.stats_decay
        batch_mean, batch_var = raw.mean(0), raw.var(0)
        mean = jnp.where(n == 0, batch_mean, d * mean + (1 - d) * batch_mean)
        var = jnp.where(n == 0, batch_var, d * var + (1 - d) * (batch_var + (batch_mean - mean) ** 2))
        n = n + 1
    z = jnp.clip((raw - mean) / jnp.sqrt(var + cfg.eps), -cfg.clip, cfg.clip)
    features = jnp.where(normalised, z, raw)
    new_state = FeatureState(state.chunk + 1.0, new_ema, mean, var, n)
    return features, new_state


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
    """Convenience wrapper: ``state = fx.init_state(B)``; ``features_bf, state = fx(inputs, state)``."""

    cfg: FeatureConfig = FeatureConfig()

    @property
    def num_features(self) -> int:
        """F, the width of the features this extractor returns."""
        return self.cfg.num_features

    def init_state(self, batch_size: int) -> FeatureState:
        """``init_feature_state(batch_size, self.cfg)``."""
        return init_feature_state(batch_size, self.cfg)

    def __call__(
        self, inputs: FeatureInputs, state: FeatureState, *, update_stats: bool = True
    ) -> tuple[jax.Array, FeatureState]:
        """One chunk -> ([B, F] features, new state); see ``extract_features``."""
        return extract_features(inputs, state, self.cfg, update_stats=update_stats)
