"""GenerationGate: a gate of this package as generation's gate callback, counting live sequences only."""

from types import SimpleNamespace

import numpy as np
import pytest

from ponderttt.gating import make_gate
from ponderttt.gating.generation import GenerationGate


def context(probe, active=None):
    return SimpleNamespace(chunk_index=0, probe_loss=np.asarray(probe, np.float32),
                           active=None if active is None else np.asarray(active, bool))


def test_filler_and_stopped_rows_get_no_update_and_are_not_counted():
    runner = GenerationGate(make_gate("fixed:update_1"))
    runner.start_batch(np.array([True, True, False]))
    assert runner(context([1, 1, 1])).tolist() == [1, 1, 0]
    assert runner(context([1, 1, 1], active=[True, False, True])).tolist() == [1, 0, 0]
    assert runner(context([1, 1, 1], active=[False, False, True])).tolist() == [0, 0, 0]
    assert (runner.calls, runner.decisions, runner.updates, runner.update_rate) == (3, 3, 3, 1.0)
    assert [r["decisions"] for r in runner.rows] == [2, 1, 0]
    with pytest.raises(ValueError, match="the batch has 2 rows but start_batch was given 3"):
        runner(context([1, 1]))


def test_threshold_state_runs_on_across_batches_and_random_is_seeded():
    recon = GenerationGate(make_gate("recon", target_rate=0.5, calibration_signal=np.array([0.0, 1.0, 2.0, 3.0])))
    recon.start_batch(np.ones(3, bool))
    assert recon(context([0.5, 2.5, 1.4])).tolist() == [0, 1, 0]  # τ starts at the calibration median 1.5
    recon.start_batch(np.ones(2, bool))
    recon(context([5.0, 5.0]))
    assert recon.decisions == 5 and recon.rows == [{"decisions": 1, "updates": 1}] * 2

    def draws(seed):
        runner = GenerationGate(make_gate("random", rate=0.5), seed=seed)
        runner.start_batch(np.ones(64, bool))
        return np.concatenate([runner(context(np.zeros(64))) for _ in range(3)])

    first = draws(0)
    assert np.array_equal(first, draws(0)) and not np.array_equal(first, draws(1))
    assert set(first.tolist()) == {0.0, 1.0} and abs(first.mean() - 0.5) < 0.15
