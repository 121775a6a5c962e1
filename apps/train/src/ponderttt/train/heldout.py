"""Held-out evaluation passes: the adapted model on the test split → `compare.HeldOut` and the cost table.

Under the reset protocol one pass per discrete action (SKIP = no inner step; UPDATE_k = λ 1 with k inner steps)
gives every chunk's loss under every action. The SKIP pass also gives the causal signals: the step-0
reconstruction loss (the no-update probe) and the gate features (prediction entropy / confidence, the
reconstruction losses, their EMAs within a document), computed chunk by chunk with the gating package's
feature extractor. These passes are not timed: `ponderttt.train.timing` measures each action's forward alone.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ponderttt.eval import AdapterSpec, BackboneSpec, build_cost_table
from ponderttt.eval.protocol import ACTION_STEPS
from ponderttt.gating import FeatureExtractor, FeatureInputs, entropy_and_confidence
from ponderttt.gating.features import reset_sequences
from ponderttt.train import distributed
from ponderttt.train.adapter import BATCH_KEYS, chunk_losses, forward
from ponderttt.train.compare import HeldOut
from ponderttt.train.config import AdapterConfig, DataConfig
from ponderttt.train.metrics import progress_bar

# (λ, inner steps) of each action: SKIP runs no inner step (the outputs of the unchanged fast weights, the same as
# λ = 0), UPDATE_k λ = 1 with k steps
ACTION_PASSES = tuple((0.0, 0) if k == 0 else (1.0, k) for k in ACTION_STEPS)


def cost_table(model_config: Any, data: DataConfig, adapter: AdapterConfig, wall_clock: Any = None) -> Any:
    """The eval package's per-action cost table for this backbone and adapter (FLOPs, published) with the measured
    wall-clock of `timing.measure_wall_clock` (a `timing.Timings`) if given."""
    cfg = model_config  # a ponderttt.models.ModelConfig
    spec = BackboneSpec(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_heads=cfg.num_heads,
                        vocab_size=cfg.vocab_size, seq_len=data.seq_len, chunk_size=data.chunk_size,
                        mlp_hidden=cfg.mlp_size, mlp_gated=cfg.gated_mlp, num_kv_heads=cfg.num_kv_heads,
                        head_dim=cfg.head_dim)
    overrides = {} if adapter.kind == "lora" else {"num_heads": adapter.num_heads,
                                                   "inner_dim": cfg.hidden_size // adapter.num_heads}
    return build_cost_table(spec, AdapterSpec.for_backbone(spec, adapter.kind, probe=True, **overrides),
                            wall_clock_s=None if wall_clock is None else wall_clock.actions,
                            overheads=None if wall_clock is None else wall_clock.overheads)


def _features(entropy: Any, confidence: Any, stats: Any, mask: Any, doc_start: Any, chunk_size: int) -> Any:
    """[B, N, F] gate features from per-token entropy / confidence [B, T], chunk by chunk (EMAs carried within a
    document, reset where one starts)."""
    extractor = FeatureExtractor()
    b, t = mask.shape
    n = t // chunk_size

    def per_chunk(x: Any) -> Any:  # [B, T] -> [N, B, C]
        return jnp.swapaxes(x.reshape(b, n, chunk_size), 0, 1)

    def step(state: Any, xs: Any) -> Any:
        entropy_c, confidence_c, mask_c, start_c, init_c, step0_c = xs
        state = reset_sequences(state, start_c[:, 0])
        features, state = extractor(FeatureInputs(token_entropy=entropy_c, token_confidence=confidence_c,
                                                  recon_init=init_c, recon_step0=step0_c, token_mask=mask_c), state)
        return state, features

    xs = (per_chunk(entropy), per_chunk(confidence), per_chunk(mask), per_chunk(doc_start), stats.chunk_loss_init.T,
          stats.chunk_loss_step0.T)
    _, features = jax.lax.scan(step, extractor.init_state(b), xs)
    return jnp.swapaxes(features, 0, 1)


def gate_signals(logits: Any, stats: Any, mask: Any, doc_start: Any, chunk_size: int) -> dict[str, Any]:
    """What the gates read besides the probe, from a SKIP pass's logits [B, T, V] and adapter stats: gate features
    [B, N, F], prediction entropy and confidence [B, N] (timed on its own as the `gate_features` overhead)."""
    entropy, confidence = entropy_and_confidence(logits)  # per token, once: the features and the chunk means read it
    return {"features": _features(entropy, confidence, stats, mask, doc_start, chunk_size),
            **dict(zip(("entropy", "confidence"), _chunk_means((entropy, confidence), mask, chunk_size), strict=True))}


def skip_forward(model: Any, batch: dict[str, Any], chunk_size: int) -> Any:
    """The adapted model's SKIP forward of a batch: no inner step, under the reset protocol."""
    skip_scale, skip_steps = ACTION_PASSES[0]
    return forward(model, batch, chunk_size=chunk_size, num_steps=skip_steps, gating_scale=skip_scale,
                   protocol="reset")


def skip_outputs(model: Any, batch: dict[str, Any], chunk_size: int) -> dict[str, Any]:
    """The SKIP pass of a batch, per chunk [B, N]: loss, tokens, the step-0 reconstruction loss ("signal", the
    no-update probe), gate features [B, N, F], prediction entropy and confidence."""
    out = skip_forward(model, batch, chunk_size)
    loss, tokens = chunk_losses(out.logits, batch["targets"], batch["loss_mask"], chunk_size)
    stats = out.ttt_stats["head"]
    return {"loss": loss, "tokens": tokens, "signal": stats.chunk_loss_step0,
            **gate_signals(out.logits, stats, batch["loss_mask"], batch["doc_start"], chunk_size)}


def update_outputs(model: Any, batch: dict[str, Any], chunk_size: int, steps: int) -> tuple[Any, Any]:
    """The UPDATE_k pass (λ = 1, k inner steps), per chunk [B, N]: (loss, reconstruction-loss improvement)."""
    out = forward(model, batch, chunk_size=chunk_size, num_steps=steps, gating_scale=1.0, protocol="reset")
    loss = chunk_losses(out.logits, batch["targets"], batch["loss_mask"], chunk_size)[0]
    stats = out.ttt_stats["head"]  # how much the update lowered the inner reconstruction loss of the chunk
    return loss, stats.chunk_loss_step0 - stats.chunk_loss_after[..., -1]


@functools.lru_cache(maxsize=16)
def _skip_pass(graphdef: Any, chunk_size: int) -> Any:
    """`skip_outputs` jitted for a model structure (cached: every command and roll-out reuses one compilation)."""
    return jax.jit(lambda state, batch: skip_outputs(nnx.merge(graphdef, state), batch, chunk_size))


@functools.lru_cache(maxsize=16)
def _update_pass(graphdef: Any, chunk_size: int, steps: int) -> Any:
    """`update_outputs` jitted for a model structure (cached)."""
    return jax.jit(lambda state, batch: update_outputs(nnx.merge(graphdef, state), batch, chunk_size, steps))


@functools.lru_cache(maxsize=16)
def _scaled_pass(graphdef: Any, chunk_size: int) -> Any:
    """The jitted pass at a per-(sequence, chunk) gating scale λ [B, N] (one inner step): chunk losses."""
    @jax.jit
    def run(state: Any, batch: dict[str, Any], lam: Any) -> Any:
        m = nnx.merge(graphdef, state)
        out = forward(m, batch, chunk_size=chunk_size, num_steps=1, gating_scale=lam, protocol="reset")
        return chunk_losses(out.logits, batch["targets"], batch["loss_mask"], chunk_size)[0]

    return run


def evaluate_held_out(model: Any, batches: list[dict[str, Any]], *, data: DataConfig, mesh: Any,
                      language: str, skip_only: bool = False, progress: bool = False) -> HeldOut:
    """`HeldOut` over every sequence of `batches` (the per-action losses, signals and features).

    `skip_only`: run only the SKIP pass (signals and features, e.g. to calibrate thresholds); the update
    columns of the loss table are then NaN. `progress`: a bar over the batches."""
    graphdef, state = nnx.split(model)
    skip_pass = _skip_pass(graphdef, data.chunk_size)
    passes = [skip_pass] + ([] if skip_only else [_update_pass(graphdef, data.chunk_size, k)
                                                  for _, k in ACTION_PASSES[1:]])
    losses: list[list[np.ndarray]] = [[] for _ in ACTION_PASSES]
    parts: dict[str, list[np.ndarray]] = {"tokens": [], "signal": [], "features": [], "documents": [], "entropy": [],
                                          "confidence": [], "ttt_improvement": []}
    with jax.set_mesh(mesh):
        label = "held-out SKIP pass" if skip_only else "held-out passes (every action)"
        for index, raw in enumerate(progress_bar(batches, label, enabled=progress, unit="batch")):
            batch = {k: distributed.global_batch(np.asarray(raw[k]), mesh, data.batch_size) for k in BATCH_KEYS}
            for a, run in enumerate(passes):
                result = distributed.to_host(run(state, batch))
                if a == 0:
                    losses[0].append(result["loss"])
                    for key in ("tokens", "signal", "features", "entropy", "confidence"):
                        parts[key].append(result[key])
                else:
                    losses[a].append(result[0])
                    if a == 1:
                        parts["ttt_improvement"].append(result[1])
            doc_ids = distributed.to_host(distributed.global_batch(np.asarray(raw["doc_ids"]), mesh, data.batch_size))
            parts["documents"].append(_document_ids(doc_ids, index, data.chunk_size))
    skip_loss = np.concatenate(losses[0])
    loss = np.stack([np.concatenate(per) if per else np.full_like(skip_loss, np.nan) for per in losses], -1)
    tokens = np.concatenate(parts["tokens"])
    signal = np.concatenate(parts["signal"])
    signals = {"recon_loss": signal, "entropy": np.concatenate(parts["entropy"]),
               "confidence": np.concatenate(parts["confidence"])}
    if parts["ttt_improvement"]:
        signals["ttt_improvement"] = np.concatenate(parts["ttt_improvement"])
    return HeldOut(loss=loss, tokens=tokens, signal=signal, features=np.concatenate(parts["features"]),
                   documents=np.concatenate(parts["documents"]), languages=np.full(tokens.shape, language),
                   signals=signals)


def _chunk_means(values: tuple[Any, ...], mask: Any, chunk_size: int) -> tuple[Any, ...]:
    """The token-mean over the unmasked tokens of each chunk of every [B, T] array in `values`: [B, N] each."""
    b, t = mask.shape
    w = mask.astype(jnp.float32).reshape(b, t // chunk_size, chunk_size)
    count = jnp.maximum(w.sum(-1), 1.0)
    return tuple((v.reshape(w.shape) * w).sum(-1) / count for v in values)


def _document_ids(doc_ids_bt: np.ndarray, batch_index: int, chunk_size: int) -> np.ndarray:
    """A document id per chunk: the stream's index of the document its first token belongs to, [B, N] int64.

    Document indices count along the whole stream, across rows and batches, so a document split over rows
    keeps one id. (`batch_index` is unused: kept so the signature reads like the loop that calls it.)"""
    del batch_index
    return doc_ids_bt[:, ::chunk_size].astype(np.int64)


def losses_at_scales(model: Any, batches: list[dict[str, Any]], scales: np.ndarray, *, data: DataConfig,
                     mesh: Any) -> np.ndarray:
    """[B, N] per-chunk loss of the adapted model with gating scale λ = scales[b, n] (one inner step), under the
    reset protocol, on the same sequences as `evaluate_held_out(model, batches)`: continuous gates' losses."""
    graphdef, state = nnx.split(model)
    run = _scaled_pass(graphdef, data.chunk_size)
    mine = distributed.process_rows(data.batch_size, jax.process_index(), jax.process_count())
    losses = []
    with jax.set_mesh(mesh):
        for index, raw in enumerate(batches):
            batch = {k: distributed.global_batch(np.asarray(raw[k]), mesh, data.batch_size) for k in BATCH_KEYS}
            rows = np.asarray(scales[index * data.batch_size:(index + 1) * data.batch_size], np.float32)
            lam = distributed.global_batch(rows[mine], mesh, data.batch_size)  # this process's rows, as the batch's
            losses.append(distributed.to_host(run(state, batch, lam)))
    return np.concatenate(losses)
