"""PPO over {SKIP, UPDATE_1, UPDATE_2, UPDATE_4} with a PID-Lagrangian compute budget.

- ``PPOGate``: an actor-critic NNX module (policy logits, a reward value and a cost value) that is also a gate:
  it samples actions with ``train=True`` (needs a key) and takes the argmax otherwise.
- ``compute_gae``: generalised advantage estimation over a [T, B] rollout (``lax.scan`` in reverse).
- ``ppo_loss``: clipped surrogate on the Lagrangian advantage ``(A_R − λ·A_C) / (1 + λ)`` (Stooke et al. 2020),
  value losses for both critics, entropy bonus; reports approximate KL and clip fraction.
- ``PPOLearner``: optax optimiser, epochs × minibatches in ``lax.scan``, KL early stop (a minibatch whose KL to the
  rollout policy exceeds ``kl_stop · target_kl`` is not applied, nor anything after it), and the PID multiplier
  updated from each rollout's mean normalised cost. Everything in ``update`` is one jit-able pure function.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ponderttt.gating.actions import NUM_ACTIONS, action_to_gating_scale
from ponderttt.gating.base import GateInput, GateOutput, register_gate
from ponderttt.gating.mlp import MLP
from ponderttt.gating.pid import PIDConfig, PIDState, pid_init, pid_update


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """Network (num_features, hidden), optimiser (learning_rate, max_grad_norm), PPO (clip_eps, vf_coef, ent_coef,
    epochs, minibatches, target_kl, kl_stop), GAE (gamma, gae_lambda) and the PID multiplier's ``pid`` settings.
    Raises ValueError when epochs or minibatches < 1, or clip_eps or target_kl <= 0."""

    num_features: int = 32
    hidden: tuple[int, ...] = (64, 64)
    learning_rate: float = 3e-4
    clip_eps: float = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.01
    gamma: float = 0.99
    gae_lambda: float = 0.95
    epochs: int = 4
    minibatches: int = 4
    target_kl: float = 0.02
    kl_stop: float = 1.5
    max_grad_norm: float = 0.5
    normalize_advantages: bool = True
    pid: PIDConfig = PIDConfig()

    def __post_init__(self):
        if self.epochs < 1 or self.minibatches < 1:
            raise ValueError(f"PPO needs epochs >= 1 and minibatches >= 1, got {self.epochs}, {self.minibatches}")
        if self.clip_eps <= 0 or self.target_kl <= 0:
            raise ValueError(f"PPO needs clip_eps > 0 and target_kl > 0, got {self.clip_eps}, {self.target_kl}")


class PPOGate(nnx.Module):
    """Actor-critic over the four actions; a discrete gate. ``aux`` carries what a rollout must store."""

    kind = "discrete"
    causal = True

    def __init__(self, cfg: PPOConfig = PPOConfig(), *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.policy = MLP(cfg.num_features, cfg.hidden, NUM_ACTIONS, rngs=rngs, out_scale=0.01)
        self.critic = MLP(cfg.num_features, cfg.hidden, 2, rngs=rngs, out_scale=1.0)  # [reward value, cost value]

    def evaluate(self, features_bf: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """[B, F] -> (logits [B, 4], reward value [B], cost value [B])."""
        values = self.critic(features_bf)
        return self.policy(features_bf), values[:, 0], values[:, 1]

    def init_state(self, batch_size: int) -> tuple:
        """Stateless: ``()``."""
        return ()

    def __call__(
        self, inputs: GateInput, state: tuple, key: jax.Array | None = None, *, train: bool = False
    ) -> GateOutput:
        """[B] actions: sampled from the policy with ``key`` when ``train`` (ValueError without a key), else argmax.
        ``aux`` holds [B] "log_prob", "value", "cost_value" and [B, 4] "logits"."""
        logits, value, cost_value = self.evaluate(inputs.features)
        if train:
            if key is None:
                raise ValueError("PPOGate(train=True) samples actions: pass a PRNG key")
            action = jax.random.categorical(key, logits)
        else:
            action = jnp.argmax(logits, axis=-1)
        action = action.astype(jnp.int32)
        log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), action[:, None], axis=-1)[:, 0]
        aux = {"log_prob": log_prob, "value": value, "cost_value": cost_value, "logits": logits}
        return GateOutput(action, action_to_gating_scale(action), state, aux)


@register_gate("ppo")
def _make_ppo(variant: str | None = None, *, rngs: nnx.Rngs, **cfg) -> PPOGate:
    if variant is not None:
        raise ValueError(f"the ppo gate has no variants, got 'ppo:{variant}'")
    return PPOGate(PPOConfig(**cfg), rngs=rngs)


def compute_gae(
    rewards_tb: jax.Array,
    values_tb: jax.Array,
    dones_tb: jax.Array,
    last_value_b: jax.Array,
    gamma: float,
    gae_lambda: float,
) -> tuple[jax.Array, jax.Array]:
    """GAE over a [T, B] rollout. ``dones[t] = 1`` when the episode ends after step t (no bootstrap through it).

    Returns (advantages [T, B], returns [T, B] = advantages + values).
    """

    def step(carry, x):
        gae_next, value_next = carry
        reward, value, done = x
        nonterminal = 1.0 - done
        delta = reward + gamma * value_next * nonterminal - value
        gae = delta + gamma * gae_lambda * nonterminal * gae_next
        return (gae, value), gae

    init = (jnp.zeros_like(last_value_b), last_value_b)
    _, adv = jax.lax.scan(step, init, (rewards_tb, values_tb, dones_tb.astype(rewards_tb.dtype)), reverse=True)
    return adv, adv + values_tb


class PPOBatch(NamedTuple):
    """A flattened rollout, N = T · B decisions."""

    features: jax.Array  # [N, F]
    actions: jax.Array  # [N] int32
    log_probs: jax.Array  # [N] behaviour log-probabilities
    reward_advantages: jax.Array  # [N]
    reward_returns: jax.Array  # [N]
    cost_advantages: jax.Array  # [N]
    cost_returns: jax.Array  # [N]


def build_ppo_batch(
    features_tbf: jax.Array,
    actions_tb: jax.Array,
    log_probs_tb: jax.Array,
    rewards_tb: jax.Array,
    costs_tb: jax.Array,
    values_tb: jax.Array,
    cost_values_tb: jax.Array,
    dones_tb: jax.Array,
    last_value_b: jax.Array,
    last_cost_value_b: jax.Array,
    cfg: PPOConfig,
) -> PPOBatch:
    """A [T, B] rollout (T chunks of B sequences) -> flattened ``PPOBatch`` with GAE for reward and cost.

    ``costs_tb`` should be normalised to [0, 1] (``CostTable.normalised``); ``values_tb`` / ``cost_values_tb`` are the
    gate's ``aux["value"]`` / ``aux["cost_value"]`` at each step; ``last_*`` bootstrap after the last chunk
    (zeros when every sequence ends there).
    """
    adv_r, ret_r = compute_gae(rewards_tb, values_tb, dones_tb, last_value_b, cfg.gamma, cfg.gae_lambda)
    adv_c, ret_c = compute_gae(costs_tb, cost_values_tb, dones_tb, last_cost_value_b, cfg.gamma, cfg.gae_lambda)
    t, b = actions_tb.shape
    flat = lambda x: x.reshape((t * b,) + x.shape[2:])
    return PPOBatch(
        flat(features_tbf),
        flat(actions_tb).astype(jnp.int32),
        flat(log_probs_tb),
        flat(adv_r),
        flat(ret_r),
        flat(adv_c),
        flat(ret_c),
    )


class PPOMetrics(NamedTuple):
    """Scalar diagnostics of one PPO minibatch loss (approx_kl: k3 estimate; clip_fraction: share of clipped ratios)."""

    loss: jax.Array
    policy_loss: jax.Array
    value_loss: jax.Array
    entropy: jax.Array
    approx_kl: jax.Array
    clip_fraction: jax.Array


def ppo_loss(model: PPOGate, batch: PPOBatch, multiplier: jax.Array, cfg: PPOConfig) -> tuple[jax.Array, PPOMetrics]:
    """Scalar PPO loss (clipped surrogate on ``(A_R − λ·A_C) / (1 + λ)`` + vf_coef · value losses − ent_coef ·
    entropy) and its metrics. ``multiplier``: the scalar λ, treated as a constant."""
    logits, value, cost_value = model.evaluate(batch.features)
    log_probs_all = jax.nn.log_softmax(logits)
    log_prob = jnp.take_along_axis(log_probs_all, batch.actions[:, None], axis=-1)[:, 0]
    log_ratio = log_prob - batch.log_probs
    ratio = jnp.exp(log_ratio)
    adv = (batch.reward_advantages - multiplier * batch.cost_advantages) / (1.0 + multiplier)
    if cfg.normalize_advantages:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps) * adv)
    policy_loss = -surrogate.mean()
    value_loss = 0.5 * jnp.mean((value - batch.reward_returns) ** 2) + 0.5 * jnp.mean(
        (cost_value - batch.cost_returns) ** 2
    )
    entropy = -jnp.mean(jnp.sum(jnp.exp(log_probs_all) * log_probs_all, axis=-1))
    loss = policy_loss + cfg.vf_coef * value_loss - cfg.ent_coef * entropy
    approx_kl = jnp.mean(ratio - 1.0 - log_ratio)  # k3 estimator of KL(behaviour || current), >= 0
    clip_fraction = jnp.mean((jnp.abs(ratio - 1.0) > cfg.clip_eps).astype(jnp.float32))
    return loss, PPOMetrics(loss, policy_loss, value_loss, entropy, approx_kl, clip_fraction)


class PPOTrainState(NamedTuple):
    """The learner's whole state: the gate's parameters, the optax state and the PID multiplier's state."""

    params: nnx.State
    opt_state: optax.OptState
    pid: PIDState


class PPOUpdateInfo(NamedTuple):
    """What one ``PPOLearner.update`` reports; multiplier / p_term / i_term / d_term are the PID terms used for it,
    cost the rollout's mean normalised cost (all scalars)."""

    metrics: PPOMetrics  # mean over the applied minibatches
    applied_minibatches: jax.Array  # how many minibatch updates ran before the KL early stop
    multiplier: jax.Array
    p_term: jax.Array
    i_term: jax.Array
    d_term: jax.Array
    cost: jax.Array


@dataclasses.dataclass(frozen=True)
class PPOLearner:
    """Functional PPO-Lagrangian learner. ``graphdef, state = learner.init(model)``; then per rollout
    ``state, info = learner.update(graphdef, state, batch, mean_cost, key)`` (jit with ``graphdef`` static, or
    use ``learner.jit_update``); ``learner.model(graphdef, state)`` rebuilds the gate."""

    cfg: PPOConfig = PPOConfig()
    tx: optax.GradientTransformation | None = None
    """The optimiser; None: global-norm clipping at ``cfg.max_grad_norm``, then Adam at ``cfg.learning_rate``."""

    @property
    def optimizer(self) -> optax.GradientTransformation:
        """``tx``, or global-norm clipping at ``cfg.max_grad_norm`` then Adam at ``cfg.learning_rate``."""
        if self.tx is not None:
            return self.tx
        return optax.chain(optax.clip_by_global_norm(self.cfg.max_grad_norm), optax.adam(self.cfg.learning_rate))

    def init(self, model: PPOGate) -> tuple[nnx.GraphDef, PPOTrainState]:
        """Split ``model`` into (graphdef, train state with its ``nnx.Param`` state, fresh optimiser and PID)."""
        graphdef, params = nnx.split(model, nnx.Param)
        return graphdef, PPOTrainState(params, self.optimizer.init(params), pid_init(self.cfg.pid))

    def model(self, graphdef: nnx.GraphDef, state: PPOTrainState) -> PPOGate:
        """The gate with ``state``'s parameters (a copy: the train state is not aliased)."""
        return nnx.merge(graphdef, state.params, copy=True)

    def update(
        self, graphdef: nnx.GraphDef, state: PPOTrainState, batch: PPOBatch, mean_cost: jax.Array, key: jax.Array
    ) -> tuple[PPOTrainState, PPOUpdateInfo]:
        """One PPO-Lagrangian update on a flattened rollout of N decisions: the PID multiplier steps on the scalar
        ``mean_cost`` first, then ``cfg.epochs`` shuffled passes (``key``) of ``cfg.minibatches`` minibatches, with
        the KL early stop. Raises ValueError when N is not divisible by ``cfg.minibatches``."""
        cfg = self.cfg
        tx = self.optimizer
        pid_state, terms = pid_update(state.pid, mean_cost, cfg.pid)
        multiplier = jax.lax.stop_gradient(terms.multiplier)
        n = batch.actions.shape[0]
        if n % cfg.minibatches:
            raise ValueError(f"rollout size {n} is not divisible by minibatches={cfg.minibatches}")
        size = n // cfg.minibatches

        def loss_fn(params, minibatch):
            return ppo_loss(nnx.merge(graphdef, params), minibatch, multiplier, cfg)

        def minibatch_step(carry, index):
            params, opt_state, stopped = carry
            minibatch = jax.tree.map(lambda x: x[index], batch)
            (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, minibatch)
            stop = stopped | (metrics.approx_kl > cfg.kl_stop * cfg.target_kl)
            updates, new_opt_state = tx.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(stop, b, a), new, old)
            return (keep(new_params, params), keep(new_opt_state, opt_state), stop), (metrics, ~stop)

        def epoch(carry, epoch_key):
            order = jax.random.permutation(epoch_key, n).reshape(cfg.minibatches, size)
            return jax.lax.scan(minibatch_step, carry, order)

        init = (state.params, state.opt_state, jnp.zeros((), bool))
        (params, opt_state, _), (metrics, applied) = jax.lax.scan(epoch, init, jax.random.split(key, cfg.epochs))
        weights = applied.astype(jnp.float32)
        count = weights.sum()
        mean_metrics = jax.tree.map(lambda m: jnp.sum(m * weights) / jnp.maximum(count, 1.0), metrics)
        info = PPOUpdateInfo(
            mean_metrics,
            count.astype(jnp.int32),
            terms.multiplier,
            terms.p_term,
            terms.i_term,
            terms.d_term,
            jnp.asarray(mean_cost, jnp.float32),
        )
        return PPOTrainState(params, opt_state, pid_state), info

    @functools.cached_property
    def jit_update(self) -> Callable[..., tuple[PPOTrainState, PPOUpdateInfo]]:
        """``jax.jit(self.update)`` with ``graphdef`` static, built once per learner."""
        return jax.jit(self.update, static_argnums=0)
