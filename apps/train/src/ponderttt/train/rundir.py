"""The run directory `outputs/<run>/`, the shared cache `outputs/cache/`, and the file-system checks.

Layout of one run::

    outputs/<run>/
      config.json              the resolved command config, its preset and its hash
      metrics.jsonl            one JSON object per logged step: {"stage", "step", "time", ...metrics}
      tensorboard/<stage>/     TensorBoard event files
      checkpoints/<stage>/     Orbax checkpoints of each training stage (pretrain, ttt, gate_<name>)
      results.json, report.md, plots/*.png    written by the compare / analyze / report stages
    outputs/cache/<kind>-<hash>/              tokenizer and backbone, keyed by the hash of their config

A write that fails for want of space (`DISK_ERRNOS`: no space left, quota exceeded, read-only or not writable file
system) is raised as one `DiskFull` naming the file (`disk_errors`), which the command line prints as one line and
exits with status 4; what background threads report of it on their own is dropped (`BACKGROUND_REPORTS`).

Standard library only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import hashlib
import json
import logging
import os
import pathlib
import re
import sys
import threading
from collections.abc import Iterator
from typing import Any

from ponderttt.train.config import ConfigError, RunConfig, to_dict

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CACHE_DIR = "cache"
# Why a write can fail that the user fixes on the file system, not in the code: no space left, quota exceeded, a
# read-only file system, no permission to write.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)
# An errno inside an error's text: Python's "[Errno 28] ..." and TensorStore's "... [os_error_code='28']" (Orbax's
# array writer raises ValueError with TensorStore's message)
ERRNO_IN_TEXT = re.compile(r"\[Errno (\d+)\]|os_error_code='(\d+)'")


class DiskFull(OSError):
    """A write of the run failed for a reason in `DISK_ERRNOS`. Its message is one line: what happened, the file (and
    step) being written and, for a checkpoint, the last complete step, which stays readable. Exit status 4. Creating
    one marks the run as stopping (`BACKGROUND_REPORTS`), so later background error reports are dropped."""

    def __init__(self, code: int, path: str | os.PathLike, *, step: int | None = None,
                 checkpoints: pathlib.Path | None = None, last_step: int | None = None) -> None:
        message = f"{os.strerror(code).lower()} while writing {path}" + ("" if step is None else f" (step {step})")
        if checkpoints is None:
            message += "; free some space (or choose another --output-dir) and run the command again"
        elif last_step is None:
            message += f"; no checkpoint was completed in {checkpoints}"
        else:
            message += (f"; the last complete checkpoint is step {last_step} in {checkpoints} (free some space, then "
                        "--resume continues from it)")
        super().__init__(code, message)
        BACKGROUND_REPORTS.stopping = True

    def __str__(self) -> str:
        return self.strerror


def disk_errno(error: BaseException | None) -> int | None:
    """The `DISK_ERRNOS` code behind `error` (an OSError, or an errno named in its text), searching its causes and
    the errors it groups; None when it is another failure."""
    stack, seen = [error], set()
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_ERRNOS:
            return current.errno
        if (code := text_errno(str(current))) is not None:
            return code
        stack += [current.__cause__, current.__context__, *getattr(current, "exceptions", ())]
    return None


def text_errno(text: str) -> int | None:
    """The first `DISK_ERRNOS` code a message names (`ERRNO_IN_TEXT`), else None."""
    for match in ERRNO_IN_TEXT.finditer(text):
        code = int(match.group(1) or match.group(2))
        if code in DISK_ERRNOS:
            return code
    return None


class BackgroundReports(logging.Filter):
    """Background threads report a full disk on their own, each with a traceback (Orbax's save threads through the
    "absl" logger, asyncio's loops through "asyncio", TensorBoard's writer thread through `threading.excepthook` and
    its exit hook as an unraisable exception, TensorStore's callbacks into a stopped loop as "Event loop is closed");
    the run reports it once, as `DiskFull` (the next write of the main thread to the full disk raises it).
    Installed once (`install`): drops those reports of a disk failure and, once a DiskFull has been raised
    (`stopping`), every error record of those loggers. Any other report goes where it went before."""

    LOGGERS = ("absl", "asyncio")
    stopping = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.stopping and record.levelno >= logging.ERROR:
            return False
        error = record.exc_info[1] if record.exc_info else None
        return disk_errno(error) is None and text_errno(record.getMessage()) is None

    def install(self) -> None:
        """Adds the filter to `LOGGERS` and wraps the unraisable-exception and thread-exception hooks."""
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)
        unraisable, thread_hook = sys.unraisablehook, threading.excepthook

        def on_unraisable(report: Any) -> None:  # also the failures of exit hooks (TensorBoard's last flush)
            closed_loop = isinstance(report.exc_value, RuntimeError) and str(report.exc_value) == "Event loop is closed"
            if not closed_loop and disk_errno(report.exc_value) is None:
                unraisable(report)

        def on_thread_exception(args: Any) -> None:
            if disk_errno(args.exc_value) is None:
                thread_hook(args)

        sys.unraisablehook, threading.excepthook = on_unraisable, on_thread_exception


BACKGROUND_REPORTS = BackgroundReports()
BACKGROUND_REPORTS.install()


@contextlib.contextmanager
def disk_errors(path: str | os.PathLike) -> Iterator[None]:
    """Raises a failed write under the block as one `DiskFull` naming the file (the error's own, else `path`) when
    `disk_errno` finds a disk reason; other errors pass unchanged."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as error:
        code = disk_errno(error)
        if code is None:
            raise
        raise DiskFull(code, getattr(error, "filename", None) or path) from None


# Fields of a command config that do not change what a run computes: `config_hash` leaves them out, so the
# `--resume` of a run, every process of a multi-process run, and a run without progress bars or memory check hash alike.
NOT_HASHED = {"run": ("output_dir", "name", "resume", "progress", "preflight"),
              "platform": ("process_id", "coordinator_address")}


def _hashed(config: Any) -> Any:
    record = to_dict(config)
    for section, names in NOT_HASHED.items():
        if isinstance(record.get(section), dict):
            record[section] = {k: v for k, v in record[section].items() if k not in names}
    return record


def config_hash(*configs: Any) -> str:
    """A short stable hash of dataclass configs (or JSON-ready values), for cache keys and the `--resume` check;
    the `NOT_HASHED` fields of a command config's sections are left out."""
    payload = [_hashed(c) if dataclasses.is_dataclass(c) else c for c in configs]
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_dir(output_dir: str | pathlib.Path, kind: str, *configs: Any) -> pathlib.Path:
    """`outputs/cache/<kind>-<hash of configs>`: where a tokenizer or backbone built from `configs` lives."""
    return pathlib.Path(output_dir) / CACHE_DIR / f"{kind}-{config_hash(*configs)}"


@dataclasses.dataclass(frozen=True)
class RunDir:
    """Paths of one run directory."""

    root: pathlib.Path

    @property
    def name(self) -> str:
        """The run's name (`--name`): the directory's last component."""
        return self.root.name

    @property
    def config_file(self) -> pathlib.Path:
        """config.json: the resolved command config, its preset and hash (read by `--resume`)."""
        return self.root / CONFIG_FILE

    @property
    def metrics_file(self) -> pathlib.Path:
        """metrics.jsonl: the logged steps of every stage."""
        return self.root / METRICS_FILE

    @property
    def results_file(self) -> pathlib.Path:
        """results.json: one record per (method, budget, protocol) in the `ponderttt.eval` schema."""
        return self.root / "results.json"

    @property
    def report_file(self) -> pathlib.Path:
        """report.md: the readable tables of results.json."""
        return self.root / "report.md"

    @property
    def plots_dir(self) -> pathlib.Path:
        """plots/: the report's figures (*.png)."""
        return self.root / "plots"

    def checkpoints(self, stage: str) -> pathlib.Path:
        """checkpoints/<stage>/: the Orbax checkpoints of a training stage (pretrain, ttt, gate_<name>)."""
        return self.root / "checkpoints" / stage

    def tensorboard(self, stage: str) -> pathlib.Path:
        """tensorboard/<stage>/: the stage's TensorBoard event files."""
        return self.root / "tensorboard" / stage

    def has_checkpoint(self, stage: str) -> bool:
        """True when `stage` has at least one finished checkpoint step."""
        folder = self.checkpoints(stage)
        return folder.is_dir() and any(p.is_dir() and p.name.isdigit() for p in folder.iterdir())  # finished steps

    def require_checkpoint(self, stage: str, produced_by: str) -> pathlib.Path:
        """The checkpoint directory of `stage`; a ConfigError saying which command makes it when it is missing."""
        if not self.has_checkpoint(stage):
            raise ConfigError(f"missing checkpoint directory {self.checkpoints(stage)}: run "
                              f"`uv run apps/train {produced_by} --name {self.name}` first (or the whole pipeline)")
        return self.checkpoints(stage)

    def write_config(self, command: str, preset: str, config: Any, *, provenance: dict[str, Any] | None = None,
                     file: pathlib.Path | None = None) -> None:
        """Creates the directory and writes `file` (default config.json): {command, preset, hash (`config_hash`),
        config, provenance (code, library and device versions: `ponderttt.train.provenance`)}."""
        file = file or self.config_file
        record = {"command": command, "preset": preset, "hash": config_hash(config), "config": to_dict(config),
                  "provenance": provenance}
        with disk_errors(file):
            self.root.mkdir(parents=True, exist_ok=True)
            file.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def stamp(now: datetime.datetime | None = None) -> str:
    """`now` (default: the current UTC time) as YYYYmmdd-HHMMSS, the suffix of a run's default name."""
    now = now or datetime.datetime.now(datetime.UTC)
    return now.strftime("%Y%m%d-%H%M%S")


def resolve_run_dir(run: RunConfig, command: str, preset: str, now: datetime.datetime | None = None) -> RunDir:
    """The run directory a command uses.

    A fresh run gets `--name` or `<command>-<preset>-<UTC time>`. `--resume` continues `--name`, which must
    exist, or without `--name` the newest run under `--output-dir` that has a config.json.
    """
    root = pathlib.Path(run.output_dir)
    if run.resume:
        if run.name is not None:
            folder = root / run.name
            if not (folder / CONFIG_FILE).is_file():
                raise ConfigError(f"--resume --name {run.name}: missing run directory {folder} (no {CONFIG_FILE}); "
                                  f"runs under {root}: {', '.join(list_runs(root)) or 'none'}")
            return RunDir(folder)
        runs = list_runs(root)
        if not runs:
            raise ConfigError(f"--resume: no run directory under {root} to resume; start one without --resume")
        newest = max(runs, key=lambda name: (root / name / CONFIG_FILE).stat().st_mtime)
        return RunDir(root / newest)
    name = run.name or f"{command}-{preset}-{stamp(now)}"
    return RunDir(root / name)


def list_runs(output_dir: str | pathlib.Path) -> list[str]:
    """Names of run directories (those with a config.json) under `output_dir`, sorted."""
    root = pathlib.Path(output_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.name != CACHE_DIR and (p / CONFIG_FILE).is_file())


def require_writable_dir(path: str | pathlib.Path, flag: str = "--output-dir") -> pathlib.Path:
    """`path` as a directory this process can create files in (it may not exist yet); a ConfigError naming the
    flag when it is a file, lies under a file, or is not writable."""
    folder = pathlib.Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{flag}={folder} is a file, not a directory; give a directory (it is created if missing)")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{flag}={folder}: {existing} is a file, so the directory cannot be created under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag}={folder}: {existing} is not writable by this user; choose another directory")
    return folder


def require_backbone_dir(path: str | pathlib.Path, flag: str = "--backbone.path", seq_len: int | None = None
                         ) -> pathlib.Path:
    """An HF checkpoint directory (a readable config.json, *.safetensors, tokenizer.json; a GPT-2 with at least
    `seq_len` positions); a ConfigError naming the path and the problem otherwise."""
    folder = pathlib.Path(path)
    if not folder.is_dir():
        raise ConfigError(f"{flag}={folder}: missing backbone directory; give a directory with config.json and "
                          "*.safetensors (GPT-2 or Gemma 3), or leave it unset for the cached in-house GPT-2")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{flag}={folder}: no config.json in the backbone directory")
    if not any(folder.glob("*.safetensors")):
        raise ConfigError(f"{flag}={folder}: no *.safetensors file in the backbone directory")
    if not (folder / "tokenizer.json").is_file():
        raise ConfigError(f"{flag}={folder}: no tokenizer.json in the backbone directory (the run tokenizes with the "
                          "backbone's own fast tokenizer: save it with `tokenizer.save_pretrained(dir)`)")
    try:
        hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{flag}={folder}: config.json is not valid JSON ({error})") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{flag}={folder}: config.json holds a {type(hf).__name__}, not a mapping of settings")
    if seq_len is not None and hf.get("model_type", "gpt2") == "gpt2":  # learned positions: a hard limit
        positions = hf.get("n_positions", 1024)
        if isinstance(positions, int) and seq_len > positions:
            raise ConfigError(f"--data.seq-len={seq_len} exceeds the {positions} positions of the GPT-2 backbone "
                              f"{folder} (n_positions in config.json); use --data.seq-len {positions} or less")
    return folder
