"""A full disk is one clear error (`DiskFull`, exit status 4), never a cascade of tracebacks, and the last complete
checkpoint stays readable.

The failure is injected where the checkpoint's files are opened for writing (`builtins.open` raising ENOSPC for the
paths of one step), which runs through Orbax's background save threads exactly as a full disk does; a real size-capped
tmpfs is used as well where this process may mount one (root), the injected test runs everywhere.
"""

import builtins
import errno
import io
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ponderttt.train.checkpoint import Checkpointer
from ponderttt.train.config import RunConfig
from ponderttt.train.loop import train_loop
from ponderttt.train.rundir import DiskFull, RunDir, disk_errno

APP = pathlib.Path(__file__).resolve().parents[1]
SIZE = 70_000  # float32 values of the toy state: 280 KB per checkpoint step


class Counter:
    """A data iterator with the `get_state` / `set_state` the loop checkpoints."""

    def __init__(self) -> None:
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self):
        self.index += 1
        return self.index

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = state["index"]


def fail_writes_under(monkeypatch, marker: str, code: int = errno.ENOSPC) -> None:
    """Every `open` for writing of a path containing `marker` raises OSError(code), as a full disk would."""
    real_open = builtins.open

    def failing_open(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+") and marker in str(file):
            raise OSError(code, os.strerror(code), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", failing_open)
    monkeypatch.setattr(io, "open", failing_open)  # what pathlib opens files with


def run_toy_loop(run_dir: RunDir, steps: int, saved: dict, resume: bool = False) -> None:
    """`steps` steps of a small state, a checkpoint after each (keeping only one); `saved[step]` records the state."""

    def step_fn(state, batch):
        new = {"w": state["w"] * 1.5 + batch, "b": state["b"] - 1.0}
        saved[batch] = {k: np.asarray(v) for k, v in new.items()}
        return new, {"loss": jnp.sum(new["w"])}

    state = {"w": jax.random.normal(jax.random.key(0), (SIZE,)), "b": jnp.arange(7.0)}  # incompressible
    run = RunConfig(checkpoint_every=1, log_every=1, keep_checkpoints=1, progress=False, resume=resume)
    train_loop(stage="toy", run_dir=run_dir, run=run, state=state, step_fn=step_fn, batches=Counter(),
               total_steps=steps, tokens_per_step=1)


def assert_step_1_intact(folder: pathlib.Path, saved: dict) -> None:
    assert sorted(p.name for p in folder.iterdir() if p.name.isdigit()) == ["1"]  # step 2 never looks committed
    template = {"w": jnp.zeros(SIZE), "b": jnp.zeros(7)}
    with Checkpointer(folder, keep=1) as ckpt:
        assert ckpt.latest_step() == 1
        state, meta, step = ckpt.restore_newest_readable(template)
    assert step == 1 and meta == {"data": {"index": 1}, "step": 1}
    for name, value in saved[1].items():
        np.testing.assert_array_equal(np.asarray(state[name]), value, err_msg=name)  # bit-identical


def test_a_failed_checkpoint_save_is_one_error_and_the_previous_step_survives(tmp_path, monkeypatch, capfd):
    run_dir = RunDir(tmp_path / "run")
    folder = run_dir.checkpoints("toy")
    fail_writes_under(monkeypatch, f"{folder}/2.")  # every file of step 2 (an asynchronous save)
    saved: dict = {}
    with pytest.raises(DiskFull) as caught:
        run_toy_loop(run_dir, 2, saved)
    monkeypatch.undo()
    message = str(caught.value)
    assert caught.value.errno == errno.ENOSPC and "\n" not in message
    assert message == (f"no space left on device while writing {folder}/2 (step 2); the last complete checkpoint is "
                       f"step 1 in {folder} (free some space, then --resume continues from it)")
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err + captured.out and "Errno" not in captured.err  # Orbax's logs are dropped
    assert_step_1_intact(folder, saved)
    assert [json.loads(line)["step"] for line in run_dir.metrics_file.read_text().splitlines()] == [1, 2]
    # space freed: --resume continues from step 1 to the state an uninterrupted run reaches
    resumed, uninterrupted = {}, {}
    run_toy_loop(run_dir, 2, resumed, resume=True)
    run_toy_loop(RunDir(tmp_path / "clean"), 2, uninterrupted)
    assert list(resumed) == [2]  # only step 2 ran again
    for name, value in uninterrupted[2].items():
        np.testing.assert_array_equal(resumed[2][name], value, err_msg=name)
    with Checkpointer(folder, keep=1) as ckpt:
        assert ckpt.all_steps() == [2]


def test_a_save_that_fails_synchronously_names_its_step(tmp_path, monkeypatch):
    fail_writes_under(monkeypatch, f"{tmp_path / 'ck'}/3.", errno.EDQUOT)
    with Checkpointer(tmp_path / "ck", keep=2, async_save=False) as ckpt:
        ckpt.save(1, {"x": jnp.ones(3)}, {"step": 1})
        with pytest.raises(DiskFull, match=r"^disk quota exceeded while writing .*/ck/3 \(step 3\); the last complete "
                                           r"checkpoint is step 1 in "):
            ckpt.save(3, {"x": jnp.ones(3)}, {"step": 3})
    with Checkpointer(tmp_path / "ck", keep=2) as ckpt:
        assert ckpt.all_steps() == [1]


def test_run_directory_and_metrics_writes_name_their_file(tmp_path, monkeypatch):
    from ponderttt.train.config import DataConfig
    from ponderttt.train.metrics import MetricsLogger

    run_dir = RunDir(tmp_path / "run")
    fail_writes_under(monkeypatch, "config.json", errno.EROFS)
    with pytest.raises(DiskFull, match=r"^read-only file system while writing .*run/config.json; free some space"):
        run_dir.write_config("ttt", "smoke", DataConfig())
    fail_writes_under(monkeypatch, "metrics.jsonl")
    with pytest.raises(DiskFull, match=r"^no space left on device while writing .*run/metrics.jsonl;"):
        MetricsLogger(run_dir.metrics_file, None, "ttt")


def test_disk_reasons_are_found_in_causes_and_in_tensorstore_messages():
    tensorstore = ValueError('RESOURCE_EXHAUSTED: Error writing "w/0": Failed to write 113596 bytes to file 7: No '
                             "space left on device [os_error_code='28']")
    assert disk_errno(tensorstore) == errno.ENOSPC
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = OSError(errno.EROFS, "Read-only file system")
    assert disk_errno(wrapped) == errno.EROFS
    assert disk_errno(ExceptionGroup("two", [ValueError("x"), OSError(errno.EDQUOT, "quota")])) == errno.EDQUOT
    assert disk_errno(OSError(errno.EIO, "I/O error")) is None  # not a disk-space reason: raised unchanged
    assert disk_errno(ValueError("[Errno 2] No such file")) is None


CLI_WITH_FULL_DISK = """
import builtins, errno, io, os, sys
real_open = builtins.open
def failing_open(file, mode="r", *args, **kwargs):
    if any(flag in mode for flag in "wax+") and "/checkpoints/pretrain/2." in str(file):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
    return real_open(file, mode, *args, **kwargs)
builtins.open = io.open = failing_open
from ponderttt.train.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_the_command_line_exits_4_with_one_line(tmp_path):
    args = ["pretrain", "--preset", "smoke", "--output-dir", str(tmp_path), "--name", "full", "--no-progress",
            "--backbone.pretrain-steps", "2", "--checkpoint-every", "1", "--data.max-files", "8"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(CLI_WITH_FULL_DISK), *args], capture_output=True,
                          text=True, timeout=600, env=env, cwd=APP)
    folder = tmp_path / "full" / "checkpoints" / "pretrain"
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert proc.stderr == (f"error: no space left on device while writing {folder}/2 (step 2); the last complete "
                           f"checkpoint is step 1 in {folder} (free some space, then --resume continues from it)\n")
    assert "Traceback" not in proc.stdout
    assert sorted(p.name for p in folder.iterdir() if p.name.isdigit()) == ["1"]
    with Checkpointer(folder) as ckpt:
        assert ckpt.read_meta(1)["step"] == 1


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 512 KiB tmpfs mounted under tmp_path, or a skip where this process may not mount one (not root)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a size-capped tmpfs needs root; the injected-failure tests cover the same path")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); the injected-failure tests cover the path")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_file_system(small_tmpfs, capfd):
    run_dir = RunDir(small_tmpfs / "run")
    saved: dict = {}
    with pytest.raises(DiskFull) as caught:  # 280 KB per step: step 1 fits in 512 KiB, step 2 does not
        run_toy_loop(run_dir, 2, saved)
    folder = run_dir.checkpoints("toy")
    assert str(caught.value).startswith(f"no space left on device while writing {folder}/2 (step 2); the last "
                                        f"complete checkpoint is step 1 in {folder}")
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert_step_1_intact(folder, saved)
