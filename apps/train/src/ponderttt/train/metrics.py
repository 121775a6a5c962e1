"""Metrics of a training stage: JSONL lines, TensorBoard scalars, and a progress bar with tokens/s and ETA.

Only process 0 writes (pass `enabled=jax.process_index() == 0`). On resume from step s, lines of the
stage with a step after s are dropped from metrics.jsonl and TensorBoard is told to purge them, so a
resumed run's metrics equal an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
import sys
import time
from collections.abc import Mapping
from typing import Any

from tensorboardX import SummaryWriter
from tqdm.auto import tqdm

from ponderttt.train.rundir import DiskFull, disk_errors

# fields of a metrics record that depend on the clock (a resumed run reproduces every other field bit-identically)
CLOCK_KEYS = ("time", "step_time_s")


def without_clock(record: Mapping[str, Any]) -> dict[str, Any]:
    """`record` without its `CLOCK_KEYS`: what a resumed run must reproduce exactly."""
    return {k: v for k, v in record.items() if k not in CLOCK_KEYS}


def _to_float(value: Any) -> float:
    return float(value.item() if hasattr(value, "item") else value)


def truncate_jsonl(path: pathlib.Path, stage: str, after_step: int) -> int:
    """Removes `stage`'s lines with step > `after_step` from `path` (written atomically); returns how many."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill mid-write
            dropped += 1
            continue
        if record.get("stage") == stage and record.get("step", 0) > after_step:
            dropped += 1
        else:
            kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    tmp.replace(path)
    return dropped


def read_jsonl(path: str | pathlib.Path, stage: str | None = None) -> list[dict[str, Any]]:
    """The records of `path` (of one stage when given)."""
    records = [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]
    return [r for r in records if stage is None or r.get("stage") == stage]


class MetricsLogger:
    """Appends `{"stage", "step", "time", **metrics}` to metrics.jsonl and the scalars to TensorBoard."""

    def __init__(self, jsonl_path: str | pathlib.Path, tensorboard_dir: str | pathlib.Path | None, stage: str, *,
                 start_step: int = 0, enabled: bool = True) -> None:
        self.stage = stage
        self.enabled = enabled
        self.jsonl_path = pathlib.Path(jsonl_path)
        self._writer = None
        if not enabled:
            return
        with disk_errors(self.jsonl_path):  # no space (or a read-only disk): one DiskFull naming the file
            self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
            truncate_jsonl(self.jsonl_path, stage, start_step)
            self._file = self.jsonl_path.open("a")
        if tensorboard_dir is not None:
            # purge_step makes TensorBoard drop events at or after it that a killed run left behind.
            with disk_errors(tensorboard_dir):
                self._writer = SummaryWriter(str(tensorboard_dir), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Writes one record; returns it. Non-finite values are written as null in JSON."""
        values = {name: _to_float(value) for name, value in metrics.items()}
        record = {"stage": self.stage, "step": int(step), "time": time.time()}
        record.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
        if not self.enabled:
            return record
        with disk_errors(self.jsonl_path):
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(f"{self.stage}/{name}", value, int(step))
        return record

    def close(self) -> None:
        """Closes metrics.jsonl and the TensorBoard writer (no-op when disabled). A full disk is not raised here (every
        line was flushed when logged, and a failure already on its way, e.g. a checkpoint's DiskFull, must stay the one
        reported); TensorBoard's events not yet flushed are then lost."""
        if not self.enabled:
            return
        with contextlib.suppress(DiskFull), disk_errors(self.jsonl_path):
            self._file.close()
        if self._writer is not None:
            with contextlib.suppress(DiskFull), disk_errors(self.jsonl_path.parent):
                self._writer.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(items: Any, description: str, *, enabled: bool, unit: str = "it") -> Any:
    """`items` with a tqdm bar on stderr (count, rate, ETA) when `enabled`; the phases that are not training steps
    (held-out passes, the records of a comparison) show their progress with it."""
    return tqdm(items, desc=description, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                leave=False)


class Progress:
    """A tqdm bar counted in tokens (so it shows tokens/s and the ETA), with the step and latest metrics."""

    def __init__(self, stage: str, *, total_steps: int, tokens_per_step: int, start_step: int = 0,
                 enabled: bool = True) -> None:
        self.tokens_per_step = tokens_per_step
        self.total_steps = total_steps
        self._bar = tqdm(total=total_steps * tokens_per_step, initial=start_step * tokens_per_step, unit="tok",
                         unit_scale=True, desc=stage, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                         smoothing=0.1)

    def update(self, step: int, metrics: Mapping[str, float] | None = None) -> None:
        """Advances the bar by one step's tokens and shows `step`/total and `metrics` (4 significant digits)."""
        self._bar.update(self.tokens_per_step)
        postfix = {"step": f"{step}/{self.total_steps}"}
        for name, value in (metrics or {}).items():
            postfix[name] = f"{value:.4g}"
        self._bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        """Closes the bar."""
        self._bar.close()
