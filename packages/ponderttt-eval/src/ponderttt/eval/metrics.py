"""Language-model metrics and gate behaviour: cross-entropy and perplexity (masked, per chunk, per document,
per language), the budget-matched oracle and oracle recovery, realised update rate, budget adherence, and
action / λ distributions.

Everything here is a pure NumPy function of arrays the runner already has (token losses or logits, masks,
per-chunk actions), so it runs on any host after ``jax.device_get``. A loss over several tokens is always the
token-weighted mean (total NLL / number of unmasked tokens), never a mean of per-chunk means.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.special import log_softmax

from ponderttt.eval.cost import action_steps


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """[..., vocab] logits and [...] int targets -> [...] negative log-likelihood (nats) in float64."""
    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets)
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {logits.shape} and targets {targets.shape} disagree; logits must be [..., vocab]")
    if not np.issubdtype(targets.dtype, np.integer):
        raise TypeError(f"targets must be integer token ids, got dtype {targets.dtype}")
    vocab = logits.shape[-1]
    if targets.size and (targets.min() < 0 or targets.max() >= vocab):
        raise ValueError(f"target ids must lie in [0, {vocab}), got range [{targets.min()}, {targets.max()}]")
    logp = log_softmax(logits, axis=-1)
    return -np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def _mask_like(nll: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    if mask is None:
        return np.ones(nll.shape, dtype=np.float64)
    mask = np.asarray(mask)
    if mask.shape != nll.shape:
        raise ValueError(f"mask {mask.shape} must have the token losses' shape {nll.shape}")
    return mask.astype(np.float64)


def chunk_nll(nll_bt: np.ndarray, mask_bt: np.ndarray | None, chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, T] token NLL and mask -> ([B, T // chunk_size] summed NLL, [B, T // chunk_size] token counts)."""
    nll_bt = np.asarray(nll_bt, dtype=np.float64)
    if nll_bt.ndim != 2:
        raise ValueError(f"token losses must be [batch, time], got shape {nll_bt.shape}")
    b, t = nll_bt.shape
    if chunk_size <= 0 or t % chunk_size:
        raise ValueError(f"sequence length {t} is not a positive multiple of chunk_size={chunk_size}")
    mask = _mask_like(nll_bt, mask_bt)
    sums = (nll_bt * mask).reshape(b, t // chunk_size, chunk_size).sum(-1)
    counts = mask.reshape(b, t // chunk_size, chunk_size).sum(-1)
    return sums, counts


def mean_loss(nll_sums: np.ndarray, token_counts: np.ndarray) -> float:
    """Token-weighted mean loss: Σ NLL / Σ tokens. Raises when there is no token."""
    total = float(np.sum(token_counts))
    if total <= 0:
        raise ValueError("no unmasked token: a mean loss needs at least one token")
    return float(np.sum(nll_sums)) / total


def chunk_cross_entropy(nll_bt: np.ndarray, mask_bt: np.ndarray | None, chunk_size: int) -> np.ndarray:
    """[B, T] -> [B, n_chunks] mean cross-entropy per chunk; NaN for a chunk with no unmasked token."""
    sums, counts = chunk_nll(nll_bt, mask_bt, chunk_size)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def perplexity(loss: float | np.ndarray) -> float | np.ndarray:
    """exp(mean cross-entropy in nats)."""
    return np.exp(loss) if isinstance(loss, np.ndarray) else float(np.exp(loss))


def group_losses(
    nll_sums: np.ndarray, token_counts: np.ndarray, groups: Sequence | np.ndarray
) -> dict[str, dict[str, float]]:
    """Token-weighted loss and perplexity per group (documents, languages...): {group: {loss, perplexity, tokens}}.

    ``nll_sums``, ``token_counts`` and ``groups`` are aligned 1-D (or same-shape) arrays, e.g. one entry per chunk.
    Groups without a token are left out.
    """
    sums = np.asarray(nll_sums, dtype=np.float64).ravel()
    counts = np.asarray(token_counts, dtype=np.float64).ravel()
    keys = np.asarray(groups).ravel()
    if not (sums.shape == counts.shape == keys.shape):
        raise ValueError(f"nll_sums {sums.shape}, token_counts {counts.shape} and groups {keys.shape} must align")
    out = {}
    for key in sorted(set(keys.tolist()), key=str):
        sel = keys == key
        tokens = counts[sel].sum()
        if tokens > 0:
            loss = sums[sel].sum() / tokens
            out[str(key)] = {"loss": float(loss), "perplexity": float(np.exp(loss)), "tokens": float(tokens)}
    return out


def document_losses(
    chunk_loss: np.ndarray, chunk_tokens: np.ndarray, documents: Sequence | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-chunk mean losses, token counts and document ids -> (sorted document ids, token-weighted loss per document).

    The paired unit for comparing two methods on the same documents (``stats.compare_paired``).
    Documents without a token are left out.
    """
    loss = np.asarray(chunk_loss, dtype=np.float64).ravel()
    tokens = np.asarray(chunk_tokens, dtype=np.float64).ravel()
    ids = np.asarray(documents).ravel()
    if not (loss.shape == tokens.shape == ids.shape):
        raise ValueError(f"chunk_loss {loss.shape}, chunk_tokens {tokens.shape} and documents {ids.shape} must align")
    keys, inverse = np.unique(ids, return_inverse=True)
    sums = np.bincount(inverse, weights=np.where(tokens > 0, loss * tokens, 0.0), minlength=keys.size)
    counts = np.bincount(inverse, weights=tokens, minlength=keys.size)
    keep = counts > 0
    return keys[keep], sums[keep] / counts[keep]


# ---------------------------------------------------------------- oracle and recovery


def oracle_advantage(loss_skip: np.ndarray, loss_update: np.ndarray) -> np.ndarray:
    """Per-chunk advantage of updating: loss(SKIP) − loss(UPDATE) (positive = the update helps)."""
    loss_skip = np.asarray(loss_skip, dtype=np.float64)
    loss_update = np.asarray(loss_update, dtype=np.float64)
    if loss_skip.shape != loss_update.shape:
        raise ValueError(f"loss_skip {loss_skip.shape} and loss_update {loss_update.shape} must have one shape")
    return loss_skip - loss_update


def budget_matched_oracle(loss_skip: np.ndarray, loss_update: np.ndarray, num_updates: int) -> np.ndarray:
    """[N] bool: the oracle updates exactly the ``num_updates`` chunks with the largest advantage.

    Ties are broken by chunk order (stable sort), so the selection is deterministic.
    """
    advantage = oracle_advantage(loss_skip, loss_update).ravel()
    n = advantage.size
    if not 0 <= num_updates <= n:
        raise ValueError(f"num_updates={num_updates} must lie in [0, {n}] (the number of chunks)")
    order = np.argsort(-advantage, kind="stable")
    chosen = np.zeros(n, dtype=bool)
    chosen[order[:num_updates]] = True
    return chosen.reshape(np.shape(loss_skip))


def oracle_recovery(
    loss_skip: float | np.ndarray, loss_method: float | np.ndarray, loss_oracle: float | np.ndarray
) -> float | np.ndarray:
    """Oracle capture (L_skip − L_method) / (L_skip − L_oracle); NaN where the oracle does not beat SKIP.

    Broadcasts its arguments; a float for scalar inputs, else a float64 array of the broadcast shape."""
    skip = np.asarray(loss_skip, dtype=np.float64)
    gap = skip - np.asarray(loss_oracle, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(
            gap > 0, (skip - np.asarray(loss_method, dtype=np.float64)) / np.where(gap > 0, gap, 1.0), np.nan
        )
    return float(out) if out.ndim == 0 else out


# ---------------------------------------------------------------- gate behaviour


def steps_of(actions: Sequence | np.ndarray) -> np.ndarray:
    """Action names ('skip', 'update_2', ...) or step counts -> int array of inner-step counts."""
    arr = np.asarray(actions)
    if np.issubdtype(arr.dtype, np.integer):
        if arr.size and arr.min() < 0:
            raise ValueError(f"step counts must be >= 0, got minimum {arr.min()}")
        return arr.astype(np.int64)
    return np.asarray([action_steps(a) for a in arr.ravel().tolist()], dtype=np.int64).reshape(arr.shape)


def update_rate(*, actions: Sequence | np.ndarray | None = None, lambdas: Sequence | np.ndarray | None = None) -> float:
    """Realised fraction of chunks that update: action != skip, or λ > 0."""
    if (actions is None) == (lambdas is None):
        raise ValueError("pass exactly one of actions= or lambdas=")
    updates = steps_of(actions) > 0 if actions is not None else np.asarray(lambdas, dtype=np.float64) > 0
    if updates.size == 0:
        raise ValueError("no chunk: the update rate needs at least one decision")
    return float(np.mean(updates))


def budget_adherence(costs: np.ndarray, budget: float, *, tolerance: float = 0.0) -> dict[str, float | bool | None]:
    """How a run kept its budget (the mean cost per chunk it was allowed), in the budget's own unit.

    ``costs``: per-chunk costs, [N] or [B, n_chunks] (then also the fraction of sequences over budget).
    Returns realised (mean cost), budget, ratio = realised / budget, excess = max(0, realised − budget),
    within = realised <= budget·(1 + tolerance), and sequences_over_budget (the fraction of sequences whose own
    mean cost is over budget; None for [N] costs, which carry no sequence structure).
    """
    costs = np.asarray(costs, dtype=np.float64)
    if costs.size == 0:
        raise ValueError("no chunk cost: budget adherence needs at least one chunk")
    if not (np.isfinite(budget) and budget > 0):
        raise ValueError(f"budget must be a positive finite number, got {budget}")
    realised = float(costs.mean())
    limit = budget * (1.0 + tolerance) + 1e-12
    over = float(np.mean(costs.mean(axis=-1) > limit)) if costs.ndim == 2 else None
    return {
        "realised": realised,
        "budget": float(budget),
        "ratio": realised / budget,
        "excess": max(0.0, realised - budget),
        "within": bool(realised <= limit),
        "sequences_over_budget": over,
    }


def action_distribution(actions: Sequence | np.ndarray, names: Sequence[str] | None = None) -> dict[str, float]:
    """Fraction of chunks per action name (every name in ``names`` appears, with 0 when unused)."""
    steps = steps_of(actions).ravel()
    if steps.size == 0:
        raise ValueError("no action: the distribution needs at least one decision")
    present = sorted(set(steps.tolist()))
    keys = list(names) if names is not None else ["skip" if s == 0 else f"update_{s}" for s in present]
    key_steps = [action_steps(k) for k in keys]
    unknown = sorted(set(present) - set(key_steps))
    if unknown:
        raise ValueError(f"actions with steps {unknown} are not among names {keys}")
    return {k: float(np.mean(steps == s)) for k, s in zip(keys, key_steps, strict=True)}


def lambda_summary(
    lambdas: Sequence | np.ndarray, *, bins: int | Sequence[float] = 20, lambda_max: float | None = None
) -> dict[str, Any]:
    """Summary of continuous scales λ: mean, std, quantiles, fraction exactly zero and a histogram.

    The histogram spans [0, lambda_max] (default: the largest λ, at least 1) so runs with one λ_max compare.
    Returns floats "mean", "std", "fraction_zero", "quantiles" {p05, p25, p50, p75, p95} and "histogram"
    {edges, counts} as lists; raises ValueError on no or non-finite λ.
    """
    lam = np.asarray(lambdas, dtype=np.float64).ravel()
    if lam.size == 0:
        raise ValueError("no λ value to summarise")
    if not np.all(np.isfinite(lam)):
        raise ValueError("λ values must be finite")
    top = float(lambda_max) if lambda_max is not None else max(1.0, float(lam.max()))
    counts, edges = np.histogram(lam, bins=bins, range=(0.0, top) if isinstance(bins, int) else None)
    q = np.quantile(lam, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {
        "mean": float(lam.mean()),
        "std": float(lam.std()),
        "quantiles": {k: float(v) for k, v in zip(("p05", "p25", "p50", "p75", "p95"), q, strict=True)},
        "fraction_zero": float(np.mean(lam == 0)),
        "histogram": {"edges": edges.tolist(), "counts": counts.astype(int).tolist()},
    }


def per_group_update_rate(actions: Sequence | np.ndarray, groups: Sequence | np.ndarray) -> Mapping[str, float]:
    """Update rate per group (language, document...)."""
    steps = steps_of(actions).ravel()
    keys = np.asarray(groups).ravel()
    if steps.shape != keys.shape:
        raise ValueError(f"actions {steps.shape} and groups {keys.shape} must align")
    return {str(k): float(np.mean(steps[keys == k] > 0)) for k in sorted(set(keys.tolist()), key=str)}
