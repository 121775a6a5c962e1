"""The `gate` stage: learned gates trained on the frozen backbone + trained adapter, under the reset protocol.

Every gate reads, per chunk, the causal features of the chunk from a SKIP pass (prediction entropy /
confidence, the step-0 reconstruction loss and their in-document EMAs) and nothing after the update.
Budgets are in update-equivalents: λ = 1 (one UPDATE_1) costs 1, and under the published costs
(SKIP 1, UPDATE_k 1 + 2k, linear in λ) a scale λ or k inner steps cost λ or k.

- **gumbel** (hard skip): straight-through Gumbel-softmax SKIP / UPDATE_1 decisions are the adapted
  model's gating scale λ [B, N]; loss L_CE + μ · mean(λ).
- **continuous** (learned scale): λ ∈ [0, λ_max] per chunk from the gate's MLP (with its remaining
  budget credit as input); loss L_CE + β · L_TTT + μ · mean(λ) (the gating package's
  `continuous_gate_loss`, with γ · cost = μ · λ).
- **ppo** (PID-Lagrangian policy over SKIP / UPDATE_1 / UPDATE_2 / UPDATE_4): under the reset protocol a
  chunk's loss depends only on its own action, so each chunk is a one-step episode (a contextual bandit):
  reward = loss(SKIP) − loss(action) from one pass per action, cost = the action's normalised published
  cost; `PPOLearner` does the clipped update and the PID multiplier.

For gumbel and continuous the multiplier μ comes from a PID-Lagrangian controller on mean(λ) against the
budget; the controller state is checkpointed with the gate, the optimizer, the step and the RNG.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ponderttt.gating import (
    UPDATE_1,
    CostTable,
    FeatureExtractor,
    GateInput,
    PIDConfig,
    PPOLearner,
    build_ppo_batch,
    continuous_gate_loss,
    make_gate,
    pid_init,
    pid_update,
    roll_gate,
)
from ponderttt.train import corpus, distributed
from ponderttt.train.adapter import BATCH_KEYS, SkippedUpdates, forward, skipped_updates
from ponderttt.train.backbone import lm_loss
from ponderttt.train.checkpoint import Checkpointer, data_to_key, has_checkpoint, key_to_data
from ponderttt.train.config import TRAINABLE_GATES, DataConfig, GateConfig, RunConfig
from ponderttt.train.heldout import ACTION_PASSES, skip_outputs, update_outputs
from ponderttt.train.loop import train_loop
from ponderttt.train.optim import make_optimizer
from ponderttt.train.rundir import RunDir


def export_dir(run_dir: RunDir, name: str) -> pathlib.Path:
    """outputs/<run>/gate_<name>/: the trained gate's parameters alone (what `load_gate` reads)."""
    return run_dir.root / f"gate_{name}"


def unit_cost() -> float:
    """Normalised published cost of one UPDATE_1: the unit of the PPO budget in normalised costs."""
    return float(CostTable.published().normalised(UPDATE_1))


def build_gate(name: str, gate: GateConfig, seed: int) -> Any:
    """A fresh (untrained) gate `name` configured for `gate.budget`."""
    if name not in TRAINABLE_GATES:
        raise ValueError(f"gate {name!r} has no trainer; trainable gates: {', '.join(TRAINABLE_GATES)}")
    common = {"rngs": nnx.Rngs(seed + 2), "num_features": FeatureExtractor().num_features}
    if name == "gumbel":
        return make_gate("gumbel", anneal_steps=gate.train_steps, **common)
    if name == "continuous":
        return make_gate("continuous", scale_max=gate.scale_max, initial_scale=min(1.0, gate.scale_max / 2),
                         budget=gate.budget * unit_cost(), **common)
    return make_gate("ppo", learning_rate=gate.lr, epochs=gate.ppo_epochs, minibatches=gate.ppo_minibatches,
                     pid=PIDConfig(cost_limit=gate.budget * unit_cost()), **common)


def skip_pass(model: Any, batch: dict[str, Any], chunk_size: int) -> tuple[Any, Any, Any]:
    """(features [B, N, F], step-0 reconstruction loss [B, N], SKIP loss [B, N]) from one SKIP pass: what a
    causal gate may read, and the no-update loss."""
    out = skip_outputs(model, batch, chunk_size)
    return jax.lax.stop_gradient((out["features"], out["signal"], out["loss"]))


def skip_features(model: Any, batch: dict[str, Any], chunk_size: int) -> tuple[Any, Any]:
    """(features [B, N, F], step-0 reconstruction loss [B, N]) from a SKIP pass."""
    return skip_pass(model, batch, chunk_size)[:2]


def load_gate(name: str, gate: GateConfig, run_dir: RunDir, seed: int) -> Any:
    """The trained gate `name` of the run (exported by `train_gate`)."""
    module = build_gate(name, gate, seed)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    with Checkpointer(export_dir(run_dir, name), keep=1, async_save=False) as ckpt:
        state, _ = ckpt.restore({"gate": params})
    return nnx.merge(graphdef, state["gate"], rest)


def train_gate(name: str, *, run: RunConfig, data: DataConfig, gate: GateConfig, run_dir: RunDir, mesh: Any,
               tok: Any, model: Any, beta: float = 0.0) -> tuple[Any, dict[str, float]]:
    """Trains gate `name` against `gate.budget`; returns (the trained gate, final metrics). `beta` weighs L_TTT
    in the continuous gate's loss."""
    if run.resume and has_checkpoint(export_dir(run_dir, name)):
        return load_gate(name, gate, run_dir, run.seed), {"cached": 1.0}
    module = build_gate(name, gate, run.seed)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    if name == "ppo":  # one optimiser update per PPO minibatch: epochs x minibatches per step
        updates_per_step = gate.ppo_epochs * gate.ppo_minibatches
        tx, lr_at = make_optimizer(gate.ppo_optimizer, gate.lr, gate.train_steps * updates_per_step)
        state, step_fn = _ppo_trainer(module, data=data, model=model, seed=run.seed, tx=tx)
    else:
        tx, lr_at = make_optimizer(gate.optimizer, gate.lr, gate.train_steps)
        updates_per_step = 1
        state, step_fn = _differentiable_trainer(name, graphdef, params, rest, data=data, gate=gate, model=model,
                                                 seed=run.seed, beta=beta, tx=tx)

    def to_global(batch: dict[str, Any]) -> dict[str, Any]:
        return {k: distributed.global_batch(np.asarray(batch[k]), mesh, data.batch_size) for k in BATCH_KEYS}

    stream = iter(corpus.batches(data, tok, "train", seed=run.seed + 2, forever=True))
    skipped = SkippedUpdates()
    with jax.set_mesh(mesh):
        result = train_loop(stage=f"gate_{name}", run_dir=run_dir, run=run, state=state,
                            step_fn=skipped.counting(lambda s, b: step_fn(s, to_global(b))), batches=stream,
                            total_steps=gate.train_steps, tokens_per_step=data.batch_size * data.seq_len,
                            learning_rate=lambda step: lr_at((step - 1) * updates_per_step))
    skipped.report(f"gate_{name}", result)
    trained = result.state["ppo"].params if name == "ppo" else result.state["gate"]
    with Checkpointer(export_dir(run_dir, name), keep=1, async_save=False) as ckpt:
        ckpt.save(gate.train_steps, {"gate": trained}, {"budget": gate.budget, "final_metrics": result.last_metrics})
    return nnx.merge(graphdef, trained, rest), result.last_metrics


def _differentiable_trainer(name: str, graphdef: Any, params: Any, rest: Any, *, data: DataConfig, gate: GateConfig,
                            model: Any, seed: int, beta: float, tx: Any) -> tuple[dict[str, Any], Any]:
    """Gumbel and continuous: the task loss backpropagates through λ into the gate; PID multiplier on mean(λ)."""
    m_graphdef, m_state = nnx.split(model)
    pid_cfg = PIDConfig(cost_limit=gate.budget)
    state = {"gate": params, "opt": tx.init(params), "controller": pid_init(pid_cfg),
             "step": jnp.zeros((), jnp.int32), "rng": key_to_data(jax.random.key(seed + 3))}
    n_chunks = data.chunks_per_sequence

    def loss_of(params: Any, step: Any, key: Any, multiplier: Any, batch: dict[str, Any]) -> tuple[Any, dict]:
        m = nnx.merge(m_graphdef, m_state)
        features, signal = skip_features(m, batch, data.chunk_size)
        g = nnx.merge(graphdef, params, rest)
        decisions, _ = roll_gate(g, features, jax.random.split(key, n_chunks), signal=signal, step=step, train=True)
        lam = decisions.scale  # [B, N]: gumbel hard 0/1 (straight-through), continuous in [0, λ_max]
        gated = forward(m, batch, chunk_size=data.chunk_size, num_steps=1, gating_scale=lam, protocol="reset")
        ce = lm_loss(gated.logits, batch["targets"], batch["loss_mask"])
        spend = jnp.mean(lam)  # update-equivalents (published costs are linear in λ)
        skips = skipped_updates(gated)
        if name == "continuous":
            ttt = gated.ttt_stats["head"].chunk_loss_after[..., -1]
            loss, parts = continuous_gate_loss(ce, ttt, lam, beta=beta, gamma=multiplier)
            return loss, {"ce": ce, "ttt_loss": parts["ttt"], "mean_scale": spend,
                          "update_rate": jnp.mean((lam > 0).astype(jnp.float32)), "skipped_updates": skips}
        return ce + multiplier * spend, {"ce": ce, "update_rate": spend, "skipped_updates": skips}

    @jax.jit
    def train_step(state: dict[str, Any], batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        key, sub = jax.random.split(data_to_key(state["rng"]))
        multiplier = state["controller"].multiplier
        (loss, parts), grads = jax.value_and_grad(loss_of, has_aux=True)(state["gate"], state["step"], sub,
                                                                         multiplier, batch)
        updates, opt = tx.update(grads, state["opt"], state["gate"])
        spent = parts["mean_scale"] if name == "continuous" else parts["update_rate"]
        controller, terms = pid_update(state["controller"], jax.lax.stop_gradient(spent), pid_cfg)
        new = {"gate": optax.apply_updates(state["gate"], updates), "opt": opt, "controller": controller,
               "step": state["step"] + 1, "rng": key_to_data(key)}
        return new, {"loss": loss, **parts, "multiplier": terms.multiplier}

    return state, train_step


def action_losses(model: Any, batch: dict[str, Any], chunk_size: int) -> tuple[Any, Any]:
    """(features [B, N, F], loss [B, N, 4] under SKIP, UPDATE_1, UPDATE_2, UPDATE_4): one pass per action."""
    features, _, skip_loss = skip_pass(model, batch, chunk_size)
    losses = [skip_loss] + [update_outputs(model, batch, chunk_size, k)[0] for _, k in ACTION_PASSES[1:]]
    return features, jax.lax.stop_gradient(jnp.stack(losses, axis=-1))


def _ppo_trainer(module: Any, *, data: DataConfig, model: Any, seed: int, tx: Any) -> tuple[dict[str, Any], Any]:
    """PPO-Lagrangian on one-chunk episodes (reset protocol): reward loss(SKIP) − loss(action), normalised cost."""
    learner = PPOLearner(module.cfg, tx=tx)
    graphdef, train_state = learner.init(module)
    m_graphdef, m_state = nnx.split(model)
    costs_table = CostTable.published()
    state = {"ppo": train_state, "step": jnp.zeros((), jnp.int32), "rng": key_to_data(jax.random.key(seed + 3))}

    @jax.jit
    def train_step(state: dict[str, Any], batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        key, act_key, update_key = jax.random.split(data_to_key(state["rng"]), 3)
        features, table = action_losses(nnx.merge(m_graphdef, m_state), batch, data.chunk_size)
        features_tb = jnp.swapaxes(features, 0, 1)  # [N, B, F]: chunks are the time axis
        table_tb = jnp.swapaxes(table, 0, 1)
        n, b, f = features_tb.shape
        gate = learner.model(graphdef, state["ppo"])
        out = gate(GateInput(features=features_tb.reshape(n * b, f)), (), act_key, train=True)
        actions = out.action.reshape(n, b)
        chosen = jnp.take_along_axis(table_tb, actions[..., None], axis=-1)[..., 0]
        rewards = table_tb[..., 0] - chosen
        costs = costs_table.normalised(actions)
        shaped = lambda x: x.reshape(n, b)
        ones, zeros = jnp.ones((n, b)), jnp.zeros((b,))
        ppo_batch = build_ppo_batch(features_tb, actions, shaped(out.aux["log_prob"]), rewards, costs,
                                    shaped(out.aux["value"]), shaped(out.aux["cost_value"]), ones, zeros, zeros,
                                    learner.cfg)
        ppo_state, info = learner.update(graphdef, state["ppo"], ppo_batch, costs.mean(), update_key)
        new = {"ppo": ppo_state, "step": state["step"] + 1, "rng": key_to_data(key)}
        return new, {"reward": rewards.mean(), "cost": costs.mean(), "update_rate": jnp.mean(actions > 0),
                     "multiplier": info.multiplier, "policy_loss": info.metrics.policy_loss,
                     "value_loss": info.metrics.value_loss, "entropy": info.metrics.entropy,
                     "approx_kl": info.metrics.approx_kl, "minibatches": info.applied_minibatches}

    return state, train_step
