"""The `ttt` stage: a fast-weight adapter on the frozen backbone, trained with a fixed UPDATE_k.

Loss: L = L_CE + β · L_TTT, with L_CE the next-token cross-entropy of the adapted model and L_TTT the
adapter's step-0 reconstruction loss (the no-update probe, per chunk, averaged). Only the adapter's
parameters train (`ponderttt.models.adapter.TRAINABLE`); the backbone stays frozen.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ponderttt.models import AdaptedLM, AdapterSpec, TTTControl, shard_model
from ponderttt.models.adapter import TRAINABLE
from ponderttt.train import corpus, distributed
from ponderttt.train.backbone import EVAL_BATCHES, lm_loss
from ponderttt.train.checkpoint import Checkpointer, has_checkpoint
from ponderttt.train.config import AdapterConfig, DataConfig, RunConfig
from ponderttt.train.loop import LoopResult, train_loop
from ponderttt.train.optim import make_optimizer
from ponderttt.train.rundir import RunDir
from ponderttt.ttt import TTTConfig

ADAPTER_EXPORT = "adapter"  # outputs/<run>/adapter/: the trained adapter alone (no optimizer), for later stages
BATCH_KEYS = ("input_ids", "targets", "loss_mask", "doc_start")


def ttt_config(data: DataConfig, adapter: AdapterConfig, hidden_size: int) -> Any:
    """The adapter's `TTTConfig`: heads and base inner lr from --adapter.*, chunk and mini-batch sizes from --data.*,
    width `hidden_size` (the backbone's)."""
    return TTTConfig(hidden_size=hidden_size, num_heads=adapter.num_heads, mini_batch_size=data.mini_batch_size,
                     base_lr=adapter.base_lr, chunk_size=data.chunk_size)


def attach(model: Any, data: DataConfig, adapter: AdapterConfig, mesh: Any, seed: int) -> Any:
    """The backbone `model` with the configured adapter at its head (an `AdaptedLM`), placed on the mesh."""
    spec = AdapterSpec(ttt_config(data, adapter, model.config.hidden_size), kind=adapter.kind, seed=seed + 1)
    return shard_model(AdaptedLM(model, spec), mesh)


def chunk_losses(logits: Any, targets: Any, mask: Any, chunk_size: int) -> tuple[Any, Any]:
    """Per-chunk mean cross-entropy and unmasked token counts: ([B, N], [B, N]) from [B, T, V] logits."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    weights = mask.astype(jnp.float32)
    b, t = targets.shape
    sums = (ce * weights).reshape(b, t // chunk_size, chunk_size).sum(-1)
    tokens = weights.reshape(b, t // chunk_size, chunk_size).sum(-1)
    return sums / jnp.maximum(tokens, 1.0), tokens


def forward(model: Any, batch: dict[str, Any], *, chunk_size: int, num_steps: int, gating_scale: Any,
            protocol: str) -> Any:
    """The adapted model on a batch with the gate's λ (`gating_scale`), inner steps and protocol: documents
    restart the fast weights where they start (doc_start)."""
    control = TTTControl(scale=gating_scale, reset_mask=batch["doc_start"], num_steps=num_steps, protocol=protocol,
                         chunk_size=chunk_size)
    return model(batch["input_ids"], ttt=control)


def objective(model: Any, batch: dict[str, Any], *, data: DataConfig, adapter: AdapterConfig) -> tuple[Any, dict]:
    """L = L_CE + β · L_TTT for the training UPDATE_k; returns (L, metrics)."""
    out = forward(model, batch, chunk_size=data.chunk_size, num_steps=adapter.update_steps, gating_scale=None,
                  protocol=adapter.protocol)
    ce = lm_loss(out.logits, batch["targets"], batch["loss_mask"])
    recon = jnp.mean(out.ttt_stats["head"].chunk_loss_step0)
    return ce + adapter.beta * recon, {"ce": ce, "ttt_loss": recon, "skipped_updates": skipped_updates(out)}


def skipped_updates(out: Any) -> Any:
    """The inner updates of the batch that the adapter skipped as non-finite (int32 scalar; all sites, sequences and
    mini-batches): a step metric, `skipped_updates` in metrics.jsonl and TensorBoard."""
    return sum(jnp.sum(stats.skipped_updates) for stats in out.ttt_stats.values())


class SkippedUpdates:
    """Adds up the `skipped_updates` metric of a stage's steps on the devices (no wait per step) and logs the total
    once, only when it is not zero: "adapter: N inner updates were skipped as non-finite (stage S, steps a-b)"."""

    def __init__(self) -> None:
        self.total: Any = 0

    def counting(self, step_fn: Any) -> Any:
        """`step_fn` that also adds its metrics' `skipped_updates` (if any) to the total."""

        def step(state: Any, batch: Any) -> Any:
            state, metrics = step_fn(state, batch)
            self.total = self.total + metrics.get("skipped_updates", 0)
            return state, metrics

        return step

    def report(self, stage: str, result: LoopResult) -> None:
        """Logs the total of the steps this process ran (after a resume: from `result.start_step` on)."""
        total = int(jax.device_get(self.total))
        if total:
            distributed.say(f"adapter: {total} inner updates were skipped as non-finite (stage {stage}, steps "
                            f"{result.start_step + 1}-{result.final_step})")


def export_dir(run_dir: RunDir) -> pathlib.Path:
    """outputs/<run>/adapter/: where `train_adapter` exports the trained adapter and `load_adapter` reads it."""
    return run_dir.root / ADAPTER_EXPORT


def load_adapter(model: Any, run_dir: RunDir) -> Any:
    """Writes the run's trained adapter (from `ttt`) into `model`, which already has an untrained one."""
    folder = export_dir(run_dir)
    graphdef, trainable, rest = nnx.split(model, TRAINABLE, ...)
    with Checkpointer(folder, keep=1, async_save=False) as ckpt:
        state, _ = ckpt.restore({"adapter": trainable})
    nnx.update(model, state["adapter"])
    return model


def train_adapter(*, run: RunConfig, data: DataConfig, adapter: AdapterConfig, run_dir: RunDir, mesh: Any,
                  tok: Any, model: Any) -> dict[str, float]:
    """Trains the adapter of `model` (already attached) and exports it to outputs/<run>/adapter/."""
    if run.resume and has_checkpoint(export_dir(run_dir)):  # the stage already finished in this run
        load_adapter(model, run_dir)
        return {"cached": 1.0}
    graphdef, trainable, rest = nnx.split(model, TRAINABLE, ...)
    tx, lr_at = make_optimizer(adapter.optimizer, adapter.lr, adapter.train_steps)
    state = {"adapter": trainable, "opt": tx.init(trainable)}

    def loss_of(params: Any, batch: dict[str, Any]) -> tuple[Any, dict]:
        return objective(nnx.merge(graphdef, params, rest), batch, data=data, adapter=adapter)

    @jax.jit
    def train_step(state: dict[str, Any], batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        (loss, parts), grads = jax.value_and_grad(loss_of, has_aux=True)(state["adapter"], batch)
        updates, opt = tx.update(grads, state["opt"], state["adapter"])
        return ({"adapter": optax.apply_updates(state["adapter"], updates), "opt": opt},
                {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads)})

    @jax.jit
    def eval_step(params: Any, batch: dict[str, Any]) -> dict[str, Any]:
        m = nnx.merge(graphdef, params, rest)
        losses = {}
        for name, scale in (("skip", 0.0), ("update", 1.0)):
            out = forward(m, batch, chunk_size=data.chunk_size, num_steps=adapter.update_steps, gating_scale=scale,
                          protocol=adapter.protocol)
            losses[f"loss_{name}"] = lm_loss(out.logits, batch["targets"], batch["loss_mask"])
        return losses

    def to_global(batch: dict[str, Any]) -> dict[str, Any]:
        return {k: distributed.global_batch(np.asarray(batch[k]), mesh, data.batch_size) for k in BATCH_KEYS}

    val = [to_global(b) for b in corpus.fixed_batches(data, tok, "val", EVAL_BATCHES)]

    def evaluate(state: dict[str, Any]) -> dict[str, float]:
        parts = [jax.device_get(eval_step(state["adapter"], b)) for b in val]
        return {k: float(np.mean([p[k] for p in parts])) for k in parts[0]}

    stream = iter(corpus.batches(data, tok, "train", seed=run.seed + 1, forever=True))
    skipped = SkippedUpdates()
    with jax.set_mesh(mesh):
        result = train_loop(stage="ttt", run_dir=run_dir, run=run, state=state,
                            step_fn=skipped.counting(lambda s, b: train_step(s, to_global(b))), batches=stream,
                            total_steps=adapter.train_steps, tokens_per_step=data.batch_size * data.seq_len,
                            eval_fn=evaluate, learning_rate=lambda step: lr_at(step - 1))
    skipped.report("ttt", result)
    with Checkpointer(export_dir(run_dir), keep=1, async_save=False) as ckpt:
        ckpt.save(adapter.train_steps, {"adapter": result.state["adapter"]}, {"final_metrics": result.last_metrics})
    nnx.update(model, result.state["adapter"])
    return result.last_metrics
