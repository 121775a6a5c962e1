"""Wall-clock cost per chunk of each action, measured on the same work for every action.

Each action's row times the adapted model's forward with that action's λ and number of inner steps, followed by
the per-chunk loss, and nothing else (`action_pass`): the SKIP row runs no inner step and computes no gate input.
Work that only some gates do is timed on its own, as overhead rows of the cost table:

- ``recon_probe``: the step-0 reconstruction loss a threshold gate reads before it decides. It is computed inside
  the adapter, so it is timed as the SKIP forward that also returns it, minus the plain SKIP forward of the same
  round (a paired difference);
- ``gate_features``: the learned gates' features and the prediction entropy / confidence, computed from a SKIP
  pass's logits and adapter statistics (`heldout.gate_signals`).

Every pass is compiled and run once first (warm-up). Then each of `repeats` rounds runs every row once, in an
order rotated from round to round (the rows interleaved, so a drift of the machine's speed hits them alike), each
timed to completion (`jax.block_until_ready`). A row's timings are seconds per chunk (the batch's sequences ×
chunks); the cost table keeps their median and interquartile range (`ponderttt.eval.WallClock`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from ponderttt.eval.protocol import ACTION_NAMES
from ponderttt.train import distributed
from ponderttt.train.adapter import BATCH_KEYS, chunk_losses, forward
from ponderttt.train.config import MIN_TIMING_REPEATS, DataConfig
from ponderttt.train.heldout import ACTION_PASSES, gate_signals, skip_forward


@dataclasses.dataclass(frozen=True)
class Timings:
    """Seconds per chunk of every timed round: action name -> [repeats], overhead name -> [repeats]."""

    actions: dict[str, list[float]]
    overheads: dict[str, list[float]]


@functools.lru_cache(maxsize=32)
def action_pass(graphdef: Any, chunk_size: int, scale: float, steps: int) -> Callable[[Any, dict], Any]:
    """The timed work of one action, jitted: the forward at gating scale `scale` with `steps` inner steps under the
    reset protocol, then the per-chunk losses [B, N] (its only output)."""
    @jax.jit
    def run(state: Any, batch: dict[str, Any]) -> Any:
        out = forward(nnx.merge(graphdef, state), batch, chunk_size=chunk_size, num_steps=steps, gating_scale=scale,
                      protocol="reset")
        return chunk_losses(out.logits, batch["targets"], batch["loss_mask"], chunk_size)[0]

    return run


@functools.lru_cache(maxsize=16)
def skip_pass(graphdef: Any, chunk_size: int, returns: str) -> Callable[[Any, dict], Any]:
    """The SKIP forward, jitted, returning `returns`: "probe": (losses [B, N], step-0 reconstruction loss [B, N]), the
    probe row's timed work; "gate_inputs": (logits, adapter statistics), what the features row is timed on."""
    if returns not in ("probe", "gate_inputs"):
        raise ValueError(f"returns={returns!r}: 'probe' or 'gate_inputs'")

    @jax.jit
    def run(state: Any, batch: dict[str, Any]) -> Any:
        out = skip_forward(nnx.merge(graphdef, state), batch, chunk_size)
        stats = out.ttt_stats["head"]
        if returns == "gate_inputs":
            return out.logits, stats
        return chunk_losses(out.logits, batch["targets"], batch["loss_mask"], chunk_size)[0], stats.chunk_loss_step0

    return run


@functools.lru_cache(maxsize=16)
def features_pass(chunk_size: int) -> Callable[..., Any]:
    """The gates' inputs from a SKIP pass's logits and statistics (`heldout.gate_signals`), jitted."""
    return jax.jit(lambda logits, stats, mask, doc_start: gate_signals(logits, stats, mask, doc_start, chunk_size))


def interleaved_rounds(names: list[str], repeats: int) -> list[list[str]]:
    """The order of every timed round: each row once per round, the order rotated by one from round to round."""
    return [names[r % len(names):] + names[:r % len(names)] for r in range(repeats)]


def _seconds(fn: Callable[..., Any], *args: Any) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def measure_wall_clock(model: Any, raw_batch: dict[str, Any], *, data: DataConfig, mesh: Any,
                       repeats: int = MIN_TIMING_REPEATS) -> Timings:
    """Times every action and overhead row on one held-out batch (see the module docstring): `Timings` in seconds
    per chunk. `repeats` >= `config.MIN_TIMING_REPEATS`."""
    if repeats < MIN_TIMING_REPEATS:
        raise ValueError(f"repeats={repeats}: a wall-clock cost needs at least {MIN_TIMING_REPEATS} timed rounds")
    graphdef, state = nnx.split(model)
    with jax.set_mesh(mesh):
        batch = {k: distributed.global_batch(np.asarray(raw_batch[k]), mesh, data.batch_size) for k in BATCH_KEYS}
        logits, stats = skip_pass(graphdef, data.chunk_size, "gate_inputs")(state, batch)
        rows: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {
            name: (action_pass(graphdef, data.chunk_size, scale, steps), (state, batch))
            for name, (scale, steps) in zip(ACTION_NAMES, ACTION_PASSES, strict=True)}
        rows["skip+recon_probe"] = (skip_pass(graphdef, data.chunk_size, "probe"), (state, batch))
        rows["gate_features"] = (features_pass(data.chunk_size),
                                 (logits, stats, batch["loss_mask"], batch["doc_start"]))
        for fn, args in rows.values():  # warm-up: compile and run each once
            jax.block_until_ready(fn(*args))
        seconds: dict[str, list[float]] = {name: [] for name in rows}
        for order in interleaved_rounds(list(rows), repeats):
            for name in order:
                fn, args = rows[name]
                seconds[name].append(_seconds(fn, *args))
    chunks = data.batch_size * data.chunks_per_sequence
    per_chunk = {name: [s / chunks for s in values] for name, values in seconds.items()}
    probe = [a - b for a, b in zip(per_chunk.pop("skip+recon_probe"), per_chunk["skip"], strict=True)]
    return Timings(actions={name: per_chunk[name] for name in ACTION_NAMES},
                   overheads={"recon_probe": probe, "gate_features": per_chunk["gate_features"]})
