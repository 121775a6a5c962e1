"""The `compare` and `analyze` stages: the held-out passes, every method under the configured protocols, the
paired UPDATE_1-vs-SKIP comparison and the signal analysis, written as results.json / report.md / plots and
signals.json / signals.md. results.json's `data` section and report.md's "Data" table give the corpus read: files
and skipped entries per split (`corpus.summary`).

Thresholds are calibrated on the validation split's SKIP-pass signals, never on the test chunks; the carry
protocol runs where the model's adapter sites allow it (`carry.CarryUnsupported` otherwise, reported).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import jax

from ponderttt.eval import render_signals_markdown, signal_table, verdict, write_report
from ponderttt.train import carry, compare, corpus, distributed, heldout, timing
from ponderttt.train.backbone import EVAL_BATCHES
from ponderttt.train.compare import HeldOut
from ponderttt.train.config import ConfigError
from ponderttt.train.distributed import say
from ponderttt.train.provenance import provenance
from ponderttt.train.rundir import RunDir, disk_errors


def run_compare(config: Any, run_dir: RunDir, mesh: Any, tok: Any, model: Any, command: str,
                trained: Mapping[str, Any] | None = None) -> None:
    """Compares every configured method (learned gates: those in `trained`) under the configured protocols;
    writes results.json, report.md and plots into the run directory (process 0)."""
    data, cmp = config.data, config.compare
    language = corpus.language(data)
    shown = distributed.shows_progress(config.run)
    n_batches = -(-cmp.eval_sequences // data.batch_size)
    test_batches = corpus.fixed_batches(data, tok, "test", n_batches)
    say(f"compare: held-out passes over {len(test_batches)} test batches ({data.batch_size} sequences each)")
    held = heldout.evaluate_held_out(model, test_batches, data=data, mesh=mesh, language=language, progress=shown)
    val = heldout.evaluate_held_out(model, corpus.fixed_batches(data, tok, "val", max(n_batches, EVAL_BATCHES)),
                                    data=data, mesh=mesh, language=language, skip_only=True, progress=shown)
    say(f"compare: timing every action on one held-out batch ({cmp.timing_repeats} interleaved rounds)")
    wall = timing.measure_wall_clock(model, test_batches[0], data=data, mesh=mesh, repeats=cmp.timing_repeats)
    costs = heldout.cost_table(model.config, data, config.adapter, wall)
    trained = dict(trained or {})
    methods = list(cmp.methods)

    def loss_at_scale(scales: Any) -> Any:  # continuous gates: one pass at their λ
        return heldout.losses_at_scales(model, test_batches, scales, data=data, mesh=mesh)

    say(f"compare: reset protocol, {len(compare.method_budgets(methods, cmp.budgets))} records "
        f"({cmp.n_resamples} bootstrap resamples per CI)")
    records, losses = compare.run_reset(held, methods, cmp.budgets, calibration_signal=val.signal,
                                        trained=trained, loss_at_scale=loss_at_scale, cost_table=costs,
                                        n_resamples=cmp.n_resamples, seed=config.run.seed, progress=shown)
    protocols = ["reset"]
    if "carry" in cmp.protocols:
        try:
            say("compare: carry protocol, one roll-out per record")
            records += carry.compare_carry(model, test_batches, held, methods, cmp.budgets, data=data, mesh=mesh,
                                           calibration_signal=val.signal, trained=trained, cost_table=costs,
                                           n_resamples=cmp.n_resamples, seed=config.run.seed, progress=shown)
            protocols.append("carry")
        except carry.CarryUnsupported as error:
            say(f"compare: the carry protocol did not run: {error}")
    comparisons = compare.paired_comparisons(held, losses, n_resamples=cmp.n_resamples, seed=config.run.seed)
    run_info = {"run": run_dir.name, "command": command, "seed": config.run.seed,
                "backbone": config.backbone.path or "in-house GPT-2", "adapter": config.adapter.kind,
                "n_sequences": int(held.tokens.shape[0]), "chunks_per_sequence": int(held.tokens.shape[1]),
                "protocols_evaluated": protocols, "provenance": provenance()}
    headline = None
    for comparison in comparisons:  # verdicts follow the paired CI over documents, never the means alone
        decided = verdict(comparison, unit="nats")
        if comparison["b"]["method"] == "skip":
            headline = decided["text"]
            run_info["held_out_update_1_vs_skip"] = headline + " (reset protocol, per-document losses)"
        else:
            say(f"compare: {decided['text']}")
    if comparisons and (warning := verdict(comparisons[0])["warning"]):
        say(f"compare: warning: {warning}")
    signal_rows, columns = analyze_signals(config, held)
    if jax.process_index() == 0:
        say("compare: writing results.json, report.md and the plots")
        with disk_errors(run_dir.root):
            written = write_report(run_dir.root, records, run=run_info, cost_table=costs, comparisons=comparisons,
                                   signals=signal_rows, signal_samples=columns, signal_names=tuple(held.signals),
                                   data=corpus.summary(data))
        say(f"compare: {len(records)} results ({' and '.join(protocols)} protocols); wrote "
            + ", ".join(str(p) for p in written.values()))
    if headline:
        say(f"held-out code: {headline}")


def run_analyze(config: Any, run_dir: RunDir, mesh: Any, tok: Any, model: Any) -> None:
    """Signal correlations on the held-out chunks: signals.json and signals.md in the run directory."""
    data = config.data
    n_batches = -(-config.analyze.eval_sequences // data.batch_size)
    held = heldout.evaluate_held_out(model, corpus.fixed_batches(data, tok, "test", n_batches), data=data,
                                     mesh=mesh, language=corpus.language(data),
                                     progress=distributed.shows_progress(config.run))
    held = dataclasses.replace(held, signals={k: v for k, v in held.signals.items() if k in config.analyze.signals})
    if not held.signals:
        raise ConfigError(f"--analyze.signals={' '.join(config.analyze.signals)}: none of them is computed; "
                          "available: recon_loss, entropy, confidence, ttt_improvement")
    rows, _ = analyze_signals(config, held)
    if jax.process_index() == 0:
        with disk_errors(run_dir.root):
            (run_dir.root / "signals.json").write_text(json.dumps(rows, indent=2, default=float) + "\n")
            (run_dir.root / "signals.md").write_text(render_signals_markdown(rows))
        say(f"analyze: wrote {run_dir.root / 'signals.md'} and signals.json")


def analyze_signals(config: Any, held: HeldOut) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Pearson / Spearman r of every per-chunk signal with the oracle advantage (the published scaling table):
    (rows of `ponderttt.eval.signal_table`, the columns they were computed from)."""
    model = config.backbone.path or f"in-house GPT-2 {config.backbone.n_layer}x{config.backbone.n_embd}"
    columns: dict[str, Any] = {name: values.reshape(-1) for name, values in held.signals.items()}
    columns.update({"oracle_advantage": held.advantage.reshape(-1), "language": held.languages.reshape(-1),
                    "model": [model] * held.advantage.size})
    say(f"analyze: correlating {len(held.signals)} signals with the oracle advantage on {held.advantage.size} "
        f"chunks ({config.compare.n_resamples} bootstrap resamples per CI)")
    rows = signal_table(columns, signals=tuple(held.signals), n_resamples=config.compare.n_resamples,
                        seed=config.run.seed)
    for row in rows:
        if row.get("signal") == "recon_loss" and row.get("language") in ("all", held.languages.flat[0]):
            say(f"analyze: r(recon_loss, oracle advantage) = {row['pearson_r']:+.3f} on {row['n']} chunks")
            break
    return rows, columns
