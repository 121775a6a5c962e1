"""A gate of this package driving TTT during generation.

``ponderttt.models.generate.generate(model, ids, gate=callback)`` asks its gate callback for λ per sequence
before every chunk's fast-weight update, with a context holding (among others) ``chunk_index`` (-1 for the
prompt), ``probe_loss`` [B] (the no-update reconstruction loss of the chunk) and ``active`` [B] (rows still
generating). ``GenerationGate`` turns any gate of this package (the ``Gate`` protocol) into that callback:

    runner = GenerationGate(make_gate("recon", target_rate=0.3, calibration_signal=probe_losses), seed=0)
    runner.start_batch(real_rows)                       # per batch: False for filler rows
    generate(model, ids, mask, config, gate=runner)     # λ from the gate, 0 for filler and stopped rows
    runner.update_rate, runner.rows[i]["decisions"]     # counted over live sequences only

The gate sees ``GateInput(features=[n, 1] zeros, signal=probe_loss)`` for the n live rows (threshold, fixed and
random gates read the signal or nothing; learned gates need the features they were trained on and are not
supported here). Its state (thresholds, budget trackers) runs on across chunks and batches; the key of call i
is ``fold_in(key(seed), i)``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ponderttt.gating.base import Gate, GateInput


class GenerationGate:
    """The gate callback of ``generate`` for one gate; counts the decisions of live sequences (rows of the batch
    that are real and have not stopped), in total and per row of the current batch."""

    def __init__(self, gate: Gate, *, seed: int = 0) -> None:
        self.gate = gate
        self.state = gate.init_state(1)
        self.seed = seed
        self.calls = 0
        self.decisions = 0
        self.updates = 0
        self.real = np.zeros(0, bool)
        self.rows: list[dict[str, int]] = []

    @property
    def update_rate(self) -> float | None:
        """Updates per decision over every live sequence so far (None before the first decision)."""
        return self.updates / self.decisions if self.decisions else None

    def start_batch(self, real_rows: np.ndarray) -> None:
        """A new batch: `real_rows` [B] bool, False for filler rows (never updated, never counted)."""
        self.real = np.asarray(real_rows, bool).copy()
        self.rows = [{"decisions": 0, "updates": 0} for _ in range(len(self.real))]

    def __call__(self, context: Any) -> np.ndarray:
        """λ [B] float32 for the chunk of `context` (see the module docstring): the gate's scale for live rows, 0
        for the others."""
        probe = np.asarray(context.probe_loss, np.float32)
        batch = probe.shape[0]
        if len(self.real) != batch:
            raise ValueError(f"GenerationGate: the batch has {batch} rows but start_batch was given "
                             f"{len(self.real)}; call start_batch(real_rows) before each generate call")
        live = self.real if context.active is None else self.real & np.asarray(context.active, bool)
        rows = np.flatnonzero(live)
        lam = np.zeros(batch, np.float32)
        if rows.size:
            inputs = GateInput(features=jnp.zeros((rows.size, 1), jnp.float32), signal=jnp.asarray(probe[rows]))
            out = self.gate(inputs, self.state, jax.random.fold_in(jax.random.key(self.seed), self.calls))
            self.state = out.state
            lam[rows] = np.asarray(out.scale, np.float32).reshape(rows.size)
        self.calls += 1
        self.decisions += int(rows.size)
        self.updates += int((lam[rows] > 0).sum())
        for row in rows:
            self.rows[row]["decisions"] += 1
            self.rows[row]["updates"] += int(lam[row] > 0)
        return lam
