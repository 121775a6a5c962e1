"""The trainers' optimisers: an `OptimizerConfig` and a peak learning rate as an optax transformation.

Every trainer (pretraining, the adapter, the gumbel / continuous gates, PPO) builds its optimiser here, so the
optimiser, schedule, warm-up, clipping and weight decay are flags (`--<section>.optimizer.*`) with the values the
trainers always used as defaults.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import optax

from ponderttt.train.config import OptimizerConfig


def warmup_steps(config: OptimizerConfig, steps: int) -> int:
    """Warm-up steps of a `steps`-update run: warmup_fraction x steps, at least 1."""
    return max(1, math.floor(steps * config.warmup_fraction + 1e-9))


def learning_rate(config: OptimizerConfig, peak: float, steps: int) -> float | optax.Schedule:
    """The learning rate of update `count` (an optax schedule), or the constant `peak` itself."""
    if config.schedule == "constant":
        return peak
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps(config, steps), steps,
                                              end_value=peak * config.end_fraction)


def make_optimizer(config: OptimizerConfig, peak: float, steps: int
                   ) -> tuple[optax.GradientTransformation, Callable[[int], float]]:
    """(clipping, then the update rule at the scheduled rate; the learning rate of update `count` as a function)."""
    lr = learning_rate(config, peak, steps)
    if config.name == "adamw":
        rule = optax.adamw(lr, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay)
    elif config.name == "adam":
        rule = optax.adam(lr, b1=config.b1, b2=config.b2)
    else:
        rule = optax.chain(optax.add_decayed_weights(config.weight_decay),
                           optax.sgd(lr, momentum=config.b1 or None))
    parts = [] if config.clip_norm is None else [optax.clip_by_global_norm(config.clip_norm)]
    rate = lr if callable(lr) else (lambda count: peak)
    return optax.chain(*parts, rule), lambda count: float(rate(count))
