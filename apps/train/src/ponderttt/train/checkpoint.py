"""Orbax checkpoints of a training stage: asynchronous, keep-N, atomic.

One checkpoint step holds two items:
  * `state`: a dict of pytrees of arrays — adapter, gate, optimizer, step, RNG key data, controller
    (PID / budget tracker) state, whatever the stage trains — saved with StandardSave, restored onto
    the shardings of a template (so a sharded run restores sharded);
  * `meta`: a JSON dict — the data iterator state (`get_state()` of a Grain-style iterator), the step,
    anything else small and not an array.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves no half checkpoint behind; `latest_step()` only sees finished steps.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

STATE = "state"
META = "meta"


def has_checkpoint(directory: str | pathlib.Path) -> bool:
    """True when `directory` holds a finished checkpoint step (without starting a manager)."""
    folder = pathlib.Path(directory)
    return folder.is_dir() and any(p.is_dir() and p.name.isdigit() for p in folder.iterdir())


class Checkpointer:
    """`CheckpointManager` for one stage's directory with a dict-of-pytrees state and a JSON meta item."""

    def __init__(self, directory: str | pathlib.Path, *, keep: int = 3, async_save: bool = True) -> None:
        self._ocp = ocp
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, META))

    def latest_step(self) -> int | None:
        """The newest finished step, None when the directory holds none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The finished steps still kept (at most `keep`), ascending."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
        """Starts saving `step` (returns once arrays are copied off the device; the write continues)."""
        ocp = self._ocp
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

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON item of `step` (default: the latest) alone, without reading any array."""
        ocp = self._ocp
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return self._manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]

    def wait(self) -> None:
        """Blocks until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves, then releases the manager (also on leaving a `with` block)."""
        self._manager.wait_until_finished()
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
