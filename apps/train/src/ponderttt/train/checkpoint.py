"""Orbax checkpoints of a training stage: asynchronous, keep-N, atomic.

One checkpoint step holds two items:
  * `state`: a dict of pytrees of arrays — adapter, gate, optimizer, step, RNG key data, controller
    (PID / budget tracker) state, whatever the stage trains — saved with StandardSave, restored onto
    the shardings of a template (so a sharded run restores sharded);
  * `meta`: a JSON dict — the data iterator state (`get_state()` of a Grain-style iterator), the step,
    anything else small and not an array.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves no half checkpoint behind; `latest_step()` only sees finished steps.

A save that fails for want of space (or quota, or on a read-only file system; `rundir.DISK_ERRNOS`), whether
`save` or a later `wait` / `close` / `save` finds it (asynchronous saves fail in the background), raises one
`DiskFull` naming the step's directory and the last complete step, which stays readable (the failed step is
left as `<step>.orbax-checkpoint-tmp`, never seen as a step). What Orbax's background threads report of that
failure on their own (a traceback each) is dropped (`rundir.BACKGROUND_REPORTS`): the run stops with that one error.
"""

from __future__ import annotations

import contextlib
import pathlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from ponderttt.train.config import ConfigError
from ponderttt.train.logs import LOG
from ponderttt.train.rundir import DiskFull, disk_errno

STATE = "state"
META = "meta"
WIND_DOWN_S = 30.0  # after a failed save, the longest wait for its background threads to finish


def finished_steps(directory: str | pathlib.Path) -> list[int]:
    """The finished steps in `directory`, ascending, without starting a manager: Orbax renames a step's temporary
    directory to the step number only once every item of it is written."""
    folder = pathlib.Path(directory)
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def has_checkpoint(directory: str | pathlib.Path) -> bool:
    """True when `directory` holds a finished checkpoint step (without starting a manager)."""
    return bool(finished_steps(directory))


class Checkpointer:
    """`CheckpointManager` for one stage's directory with a dict-of-pytrees state and a JSON meta item."""

    def __init__(self, directory: str | pathlib.Path, *, keep: int = 3, async_save: bool = True) -> None:
        self._ocp = ocp
        self.directory = pathlib.Path(directory).absolute()
        self._saving: int | None = None  # the step of the last save started (an asynchronous one may still be running)
        self._failed = False  # a save failed for a disk reason: `close` then only releases the manager
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        with self._disk_errors(None):
            self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, META))

    @contextlib.contextmanager
    def _disk_errors(self, step: int | None) -> Iterator[None]:
        """A disk failure under the block (`rundir.disk_errno`) as one `DiskFull` for `step`; other errors pass."""
        try:
            yield
        except Exception as error:
            code = disk_errno(error)
            if code is None or isinstance(error, DiskFull):
                raise
            self._failed = True
            complete = finished_steps(self.directory)
            raise DiskFull(code, self.directory if step is None else self.directory / str(step), step=step,
                           checkpoints=self.directory, last_step=complete[-1] if complete else None) from None

    def latest_step(self) -> int | None:
        """The newest finished step, None when the directory holds none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The finished steps still kept (at most `keep`), ascending."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
        """Starts saving `step` (returns once arrays are copied off the device; the write continues) after the previous
        save has finished. `DiskFull` when this save or the previous one failed for a disk reason."""
        ocp = self._ocp
        self.wait()
        self._saving = step
        with self._disk_errors(step):
            self._manager.save(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                                                 META: ocp.args.JsonSave(meta)}), force=True)

    def restore(self, template: dict[str, Any], step: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """(state, meta) of `step` (default: the latest), with the structure, dtypes and shardings of `template`."""
        ocp = self._ocp
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        restored = self._manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract),
                                                                          META: ocp.args.JsonRestore()}))
        return restored[STATE], restored[META]

    def restore_newest_readable(self, template: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], int]:
        """(state, meta, step) of the newest step that reads back; an unreadable newer step (truncated, corrupted) is
        logged, renamed to `<step>.unreadable` (kept for inspection, ignored from then on) and the previous step is
        tried. ConfigError naming the directory when no step reads."""
        steps = sorted(self.all_steps(), reverse=True)
        for step in steps:
            try:
                state, meta = self.restore(template, step)
            except Exception as error:  # Orbax / TensorStore raise bare Exceptions for bad files
                first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
                LOG.warning("checkpoint step %d in %s is unreadable (%s); it is kept as %d.unreadable and the "
                            "previous step is tried", step, self.directory, first, step)
                self._set_aside(step)
                continue
            return state, meta, step
        raise ConfigError(f"no readable checkpoint in {self.directory} (steps {steps} could not be read); remove the "
                          "directory to start the stage again")

    def _set_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            folder = self.directory / str(step)
            if folder.is_dir():
                folder.rename(folder.with_name(f"{step}.unreadable"))
        self._manager.reload()

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON item of `step` (default: the latest) alone, without reading any array."""
        ocp = self._ocp
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return self._manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]

    def wait(self) -> None:
        """Blocks until every started save is on disk; `DiskFull` when one failed for a disk reason."""
        with self._disk_errors(self._saving):
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves, then releases the manager (also on leaving a `with` block). After a disk failure
        (already raised) it only releases the manager, so the failure is reported once."""
        try:
            if not self._failed:
                self.wait()
        finally:
            if self._failed:
                self._wind_down()
            else:
                with self._disk_errors(self._saving):
                    self._manager.close()

    def _wind_down(self) -> None:
        """After a disk failure: lets the failed save's background threads (Orbax's, and the asyncio workers they
        started, which keep writing and fail in turn) finish, for up to `WIND_DOWN_S`, so that none reports into an
        exiting interpreter; then releases the manager, quietly."""
        deadline = time.monotonic() + WIND_DOWN_S
        while time.monotonic() < deadline and (busy := [
                t for t in threading.enumerate() if t is not threading.current_thread()
                and (type(t).__module__.startswith("orbax.") or t.name.startswith("asyncio_"))]):
            with contextlib.suppress(Exception):  # Orbax's threads raise their failure again on join
                busy[0].join(max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(Exception):
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def key_to_data(key: Any) -> Any:
    """A jax PRNG key as a plain uint32 array (typed key arrays are not checkpointable as such)."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def data_to_key(data: Any) -> Any:
    """Inverse of `key_to_data` for the default PRNG implementation."""
    return jax.random.wrap_key_data(data)


def nnx_tree(node: Any) -> dict[str, Any]:
    """The arrays of an NNX module or optimizer as a pure nested dict, ready for `Checkpointer.save`."""
    return nnx.to_pure_dict(nnx.state(node))


def nnx_load(node: Any, tree: dict[str, Any]) -> None:
    """Writes a pure dict from `nnx_tree` (e.g. a restored checkpoint) back into the module or optimizer."""
    state = nnx.state(node)
    nnx.replace_by_pure_dict(state, tree)
    nnx.update(node, state)
