"""Metrics (JSONL, TensorBoard, truncation on resume) and the shared training loop, in process."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ponderttt.train.config import ConfigError, RunConfig
from ponderttt.train.loop import train_loop
from ponderttt.train.metrics import MetricsLogger, read_jsonl, truncate_jsonl, without_clock
from ponderttt.train.rundir import RunDir


def test_logger_writes_jsonl_and_tensorboard(tmp_path):
    with MetricsLogger(tmp_path / "m.jsonl", tmp_path / "tb", "ttt") as logger:
        logger.log(1, {"loss": jnp.asarray(2.5), "rate": 0.5})
        logger.log(2, {"loss": float("nan")})
    records = read_jsonl(tmp_path / "m.jsonl")
    assert [(r["stage"], r["step"], r["loss"]) for r in records] == [("ttt", 1, 2.5), ("ttt", 2, None)]
    assert records[0]["rate"] == 0.5
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_truncate_drops_only_later_steps_of_the_stage(tmp_path):
    path = tmp_path / "m.jsonl"
    lines = [{"stage": "a", "step": s} for s in (1, 2, 3)] + [{"stage": "b", "step": s} for s in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"stage": "a", "st')  # last line cut by a kill
    assert truncate_jsonl(path, "a", after_step=1) == 3
    assert [(r["stage"], r["step"]) for r in read_jsonl(path)] == [("a", 1), ("b", 1), ("b", 2), ("b", 3)]


class Counter:
    def __init__(self):
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self):
        self.index += 1
        return np.full((2,), self.index, np.float32)

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = state["index"]


@jax.jit
def step_fn(state, batch):
    w = state["w"] * 0.9 + jnp.mean(batch)
    return {"w": w, "n": state["n"] + 1}, {"loss": w}


def dying_after(calls):
    """A step function that dies (like a killed process) on call number `calls + 1`."""
    count = {"n": 0}

    def step(state, batch):
        count["n"] += 1
        if count["n"] > calls:
            raise KeyboardInterrupt("killed")
        return step_fn(state, batch)

    return step


def run(tmp_path, steps, resume=False, step=step_fn, **kwargs):
    config = RunConfig(output_dir=str(tmp_path), name="r", resume=resume, log_every=2, checkpoint_every=3,
                       eval_every=4, progress=False)
    state = {"w": jnp.zeros(()), "n": jnp.zeros((), jnp.int32)}
    return train_loop(stage="toy", run_dir=RunDir(tmp_path / "r"), run=config, state=state, step_fn=step,
                      batches=Counter(), total_steps=steps, tokens_per_step=2,
                      eval_fn=lambda s: {"w2": s["w"] * 2}, **kwargs)


def test_loop_resumes_where_the_checkpoint_left_off(tmp_path):
    reference = run(tmp_path / "ref", 10)
    assert int(reference.state["n"]) == 10
    logged = read_jsonl(tmp_path / "ref" / "r" / "metrics.jsonl")
    assert [r["step"] for r in logged] == [2, 4, 6, 8, 10]
    assert [("eval_w2" in r) for r in logged] == [False, True, False, True, True]

    with pytest.raises(KeyboardInterrupt):  # dies in step 9: checkpoints 3 and 6, metrics logged up to step 8
        run(tmp_path / "cut", 10, step=dying_after(8))
    assert [r["step"] for r in read_jsonl(tmp_path / "cut" / "r" / "metrics.jsonl")] == [2, 4, 6, 8]
    with pytest.raises(ConfigError, match="already holds step 6: pass --resume"):
        run(tmp_path / "cut", 10)
    resumed = run(tmp_path / "cut", 10, resume=True)
    assert resumed.start_step == 6
    assert float(resumed.state["w"]) == float(reference.state["w"])
    strip = lambda records: [without_clock(r) for r in records]
    assert strip(read_jsonl(tmp_path / "cut" / "r" / "metrics.jsonl")) == strip(logged)
    again = run(tmp_path / "cut", 10, resume=True)  # already complete: nothing runs
    assert again.start_step == 10 and again.last_metrics["loss"] == logged[-1]["loss"]


def test_loop_logs_learning_rate_and_step_time(tmp_path):
    result = run(tmp_path, 6, learning_rate=lambda step: 0.5 / step)
    logged = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert [r["lr"] for r in logged] == [0.25, 0.125, 0.5 / 6]  # the rate each logged step used
    assert all(r["step_time_s"] > 0 for r in logged)
    assert "step_time_s" not in result.last_metrics and result.last_metrics["lr"] == 0.5 / 6
    assert {"toy/lr", "toy/step_time_s", "toy/loss"} <= scalar_tags(tmp_path / "r" / "tensorboard" / "toy")


def scalar_tags(folder):
    """The scalar tags in a folder's TensorBoard event files (TFRecord framing: length, CRC, event, CRC)."""
    import struct

    from tensorboardX.proto import event_pb2

    tags = set()
    for path in folder.glob("events.*"):
        data, i = path.read_bytes(), 0
        while i + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
            tags |= {value.tag for value in event.summary.value}
            i += 12 + length + 4
    return tags


def test_a_non_finite_loss_stops_the_stage_without_saving_it(tmp_path):
    from ponderttt.train.config import TrainingDiverged

    def poisoned(state, batch):  # the loss turns NaN at step 7 (parameters too)
        state, metrics = step_fn(state, batch)
        bad = state["n"] >= 7
        state = {**state, "w": jnp.where(bad, jnp.nan, state["w"])}
        return state, {**metrics, "loss": jnp.where(bad, jnp.nan, metrics["loss"])}

    with pytest.raises(TrainingDiverged, match=r"stage toy: loss nan at step 8; stopped without saving it \(last "
                                               r"checkpoint: step 6\)"):
        run(tmp_path, 10, step=poisoned)
    assert [r["step"] for r in read_jsonl(tmp_path / "r" / "metrics.jsonl")] == [2, 4, 6, 8]
    steps = sorted(int(p.name) for p in (tmp_path / "r" / "checkpoints" / "toy").iterdir() if p.name.isdigit())
    assert steps == [3, 6]  # step 9's checkpoint (poisoned parameters) never written

    def poisoned_state(state, batch):  # parameters NaN from step 8, the logged loss still finite
        state, metrics = step_fn(state, batch)
        return {**state, "w": jnp.where(state["n"] >= 8, jnp.inf, state["w"])}, metrics

    with pytest.raises(TrainingDiverged, match="non-finite parameters or optimiser state at step 9"):
        run(tmp_path / "second", 10, step=poisoned_state)
