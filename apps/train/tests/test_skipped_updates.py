"""The adapter's skipped (non-finite) inner updates: a step metric, and one log line per stage when there were any."""

from types import SimpleNamespace

import jax.numpy as jnp


def test_skipped_updates_are_a_step_metric_and_their_stage_total_is_logged_once(capsys):
    from ponderttt.train.adapter import SkippedUpdates, skipped_updates
    from ponderttt.train.loop import LoopResult

    out = SimpleNamespace(ttt_stats={"head": SimpleNamespace(skipped_updates=jnp.array([0, 3], jnp.int32)),
                                     "mid": SimpleNamespace(skipped_updates=jnp.array([1, 0], jnp.int32))})
    assert int(skipped_updates(out)) == 4  # every site and sequence of the batch

    per_step = iter([1, 0, 4])
    counter = SkippedUpdates()
    step = counter.counting(lambda state, batch: (state + 1, {"skipped_updates": jnp.int32(next(per_step))}))
    state = 0
    for batch in range(3):
        state, metrics = step(state, batch)
    assert state == 3 and int(metrics["skipped_updates"]) == 4  # the step's own count is left as it is
    counter.report("ttt", LoopResult(state=state, start_step=2, final_step=5, last_metrics={}))
    lines = [line for line in capsys.readouterr().out.splitlines() if "skipped" in line]
    assert len(lines) == 1 and lines[0].endswith("adapter: 5 inner updates were skipped as non-finite (stage ttt, "
                                                 "steps 3-5)")

    quiet = SkippedUpdates()
    quiet.counting(lambda state, batch: (state, {"loss": 0.5}))(0, None)  # a stage without the metric (PPO)
    quiet.report("gate_ppo", LoopResult(state=0, start_step=0, final_step=1, last_metrics={}))
    assert "skipped" not in capsys.readouterr().out
