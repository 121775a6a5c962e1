"""The training loop every stage shares: resume, step, log, evaluate, checkpoint, progress.

A stage supplies its state (a dict of pytrees: adapter, gate, optimizer, step, RNG key data,
controller state, ...), a step function `(state, batch) -> (state, metrics)` (usually jitted), and a
Grain-style iterator with `get_state()` / `set_state()`. The loop saves both every
`--checkpoint-every` steps and at the end; with `--resume` it restores them and continues, so the
final state and the metrics equal those of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import jax

from ponderttt.train import distributed
from ponderttt.train.checkpoint import Checkpointer
from ponderttt.train.config import ConfigError, RunConfig, TrainingDiverged
from ponderttt.train.metrics import MetricsLogger, Progress, read_jsonl, without_clock
from ponderttt.train.rundir import RunDir

State = dict[str, Any]
StepFn = Callable[[State, Any], tuple[State, Mapping[str, Any]]]
EvalFn = Callable[[State], Mapping[str, Any]]


def _finite_state(state: State) -> bool:
    """Every floating-point leaf of `state` is finite (one reduction per leaf, on the devices)."""
    import jax.numpy as jnp

    checks = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(state)
              if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)]
    return all(jax.device_get(checks))


class StatefulIterator(Protocol):
    """What the loop needs of a data iterator (grain's DatasetIterator has it)."""

    def __iter__(self) -> Iterator[Any]: ...

    def __next__(self) -> Any: ...

    def get_state(self) -> dict[str, Any]:
        """The position in the stream, JSON-ready: saved as the checkpoint's meta["data"]."""

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from a `get_state` result, so the next batch is the one an uninterrupted run would see."""


@dataclasses.dataclass(frozen=True)
class LoopResult:
    """What `train_loop` returns: the stage's final state and the steps and metrics of the run."""

    state: State
    """The state after `final_step` (restored from the last checkpoint when the stage was already complete)."""
    start_step: int
    """The step the loop started from (0, or the restored checkpoint's)."""
    final_step: int
    last_metrics: dict[str, float]
    """The metrics of the last logged step, without the clock's (from metrics.jsonl when the stage was already
    complete)."""


def train_loop(*, stage: str, run_dir: RunDir, run: RunConfig, state: State, step_fn: StepFn,
               batches: StatefulIterator, total_steps: int, tokens_per_step: int,
               eval_fn: EvalFn | None = None, async_checkpoints: bool = True,
               learning_rate: Callable[[int], float] | None = None) -> LoopResult:
    """Runs `stage` to `total_steps`, resuming from its latest checkpoint when `run.resume` is set.

    Every logged record also holds `step_time_s` (mean wall-clock seconds per step since the previous record, the
    first after a start including compilation) and, given `learning_rate` (step -> the rate that step used), `lr`.

    Non-finite values are never trained on silently: a logged `loss` that is not finite, or a state with a
    non-finite floating-point leaf at a checkpoint step, raises `TrainingDiverged` naming the step and the last
    checkpoint (which stays the newest: the poisoned state is not saved)."""
    is_main = jax.process_index() == 0
    mesh = distributed.mesh_of(state)
    if mesh is not None:  # the step returns its state on the mesh: start from the same layout (one compilation)
        state = distributed.on_mesh(state, mesh)
    checkpointer = Checkpointer(run_dir.checkpoints(stage), keep=run.keep_checkpoints, async_save=async_checkpoints)
    start = 0
    latest = checkpointer.latest_step()
    if latest is not None:
        if not run.resume:
            checkpointer.close()
            raise ConfigError(f"{run_dir.checkpoints(stage)} already holds step {latest}: pass --resume to continue "
                              f"run {run_dir.name!r}, or choose another --name")
        state, meta, _ = checkpointer.restore_newest_readable(state)
        batches.set_state(meta["data"])
        start = int(meta["step"])
    logger = MetricsLogger(run_dir.metrics_file, run_dir.tensorboard(stage), stage, start_step=start, enabled=is_main)
    progress = Progress(stage, total_steps=total_steps, tokens_per_step=tokens_per_step, start_step=start,
                        enabled=distributed.shows_progress(run))
    last: dict[str, float] = {}
    if start == total_steps and run_dir.metrics_file.is_file():
        done = read_jsonl(run_dir.metrics_file, stage)
        if done:
            last = without_clock({k: v for k, v in done[-1].items() if k not in ("stage", "step")})
    try:
        since, since_step = time.perf_counter(), start
        for step in range(start + 1, total_steps + 1):
            state, metrics = step_fn(state, next(batches))
            at_end = step == total_steps
            record: dict[str, float] = {}
            if step % run.log_every == 0 or at_end:
                record.update({name: float(value) for name, value in jax.device_get(dict(metrics)).items()})
                now = time.perf_counter()  # device_get waited for the step: the interval holds its work
                record["step_time_s"] = (now - since) / (step - since_step)
                since, since_step = now, step
                if learning_rate is not None:
                    record["lr"] = learning_rate(step)
            if eval_fn is not None and (step % run.eval_every == 0 or at_end):
                record.update({f"eval_{k}": float(v) for k, v in jax.device_get(dict(eval_fn(state))).items()})
            if record:
                logger.log(step, record)
                last = without_clock(record)
            saving = step % run.checkpoint_every == 0 or at_end
            bad_loss = "loss" in record and not math.isfinite(record["loss"])
            if bad_loss or (saving and not _finite_state(state)):
                checkpointer.wait()
                kept = checkpointer.latest_step()
                what = f"loss {record['loss']}" if bad_loss else "non-finite parameters or optimiser state"
                raise TrainingDiverged(
                    f"stage {stage}: {what} at step {step}; stopped without saving it (last checkpoint: "
                    f"{'none' if kept is None else f'step {kept}'}). Lower the stage's learning rate (or the inner "
                    "--adapter.base-lr), then --resume or start again")
            progress.update(step, record)
            if saving:
                checkpointer.save(step, state, {"data": batches.get_state(), "step": step})
        checkpointer.wait()
    finally:
        progress.close()
        logger.close()
        checkpointer.close()
    return LoopResult(state=state, start_step=start, final_step=total_steps, last_metrics=last)
