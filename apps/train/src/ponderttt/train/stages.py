"""The commands: check what a command needs on disk, then run its stages."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

from ponderttt.train import distributed
from ponderttt.train.config import SCALE_DIRS, TRAINABLE_GATES, ConfigError, to_dict
from ponderttt.train.distributed import say
from ponderttt.train.rundir import RunDir, config_hash, require_backbone_dir, resolve_run_dir

LATER_STAGES = ("gate", "compare", "analyze", "evaluate")  # commands that work on an existing run


def _check_backbone(config: Any) -> None:
    path = getattr(getattr(config, "backbone", None), "path", None)
    if path is not None:
        require_backbone_dir(path)


def _existing_run(config: Any, command: str, preset: str) -> RunDir:
    """The run a later stage reads: --name is required, and the directory must exist."""
    if config.run.name is None:
        raise ConfigError(f"`{command}` works on an existing run: pass --name <run> of a run made by `ttt` or "
                          "`pipeline`")
    return resolve_run_dir(config.run, command, preset)


def check_prerequisites(command: str, preset: str, config: Any) -> None:
    """Raises ConfigError naming the missing directory when `command` cannot start."""
    if config.run.resume:
        resolve_run_dir(config.run, command, preset)  # the run to resume must exist
    if command == "reproduce":
        root = pathlib.Path(config.backbone_root)
        for scale in config.scales:
            require_backbone_dir(root / SCALE_DIRS[scale], flag=f"--scales {scale} (under --backbone-root)")
        return
    _check_backbone(config)
    if command == "pretrain" and config.backbone.path is not None:
        raise ConfigError(f"--backbone.path={config.backbone.path}: `pretrain` trains the in-house GPT-2; an HF "
                          "backbone needs no pretraining (use `ttt` or `pipeline` with it)")
    if command in ("gate", "compare", "analyze", "evaluate"):
        run = _existing_run(config, command, preset)
        run.require_checkpoint("ttt", produced_by="ttt")
        if command == "compare":
            for gate in config.compare.methods:
                if gate in TRAINABLE_GATES:
                    run.require_checkpoint(f"gate_{gate}", produced_by="gate")
    if command == "evaluate" and config.evaluate.benchmark_dir is None:
        raise ConfigError("`evaluate` needs --evaluate.benchmark-dir DIR holding <benchmark>.jsonl files "
                          "(benchmarks are read from local files)")
    if command in ("evaluate", "pipeline") and config.evaluate.benchmark_dir is not None:
        _check_benchmarks(config.evaluate)


def _check_benchmarks(evaluate: Any) -> None:
    """Every benchmark file is present and code execution is allowed, before anything is trained or generated."""
    from ponderttt.train.evaluate import benchmark_file, require_code_consent

    if not pathlib.Path(evaluate.benchmark_dir).is_dir():
        raise ConfigError(f"--evaluate.benchmark-dir={evaluate.benchmark_dir}: missing directory")
    for name in evaluate.benchmarks:
        benchmark_file(evaluate.benchmark_dir, name)
    require_code_consent(evaluate.benchmarks)


_JOINED: list[Any] = []  # the platform config this process joined with (reproduce starts several runs)


def start(command: str, preset: str, config: Any) -> tuple[RunDir, Any]:
    """Joins the distributed run, builds the mesh, and prepares the run directory; returns (run_dir, mesh)."""
    import jax

    if not _JOINED:
        distributed.initialize(config.platform)
        _JOINED.append(config.platform)
        if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # compiled programs persist: later runs start faster
            jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(config.run.output_dir) / "cache" / "jax"))
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    mesh = distributed.make_mesh(config.platform.mesh)
    run_dir = resolve_run_dir(config.run, command, preset)
    # the run keeps the config it was made with; a later command's config goes beside it
    record = run_dir.root / f"config-{command}.json" if command in LATER_STAGES else run_dir.config_file
    if config.run.resume and record.is_file():
        recorded = json.loads(record.read_text())
        if recorded.get("hash") not in (None, config_hash(config)):
            raise ConfigError(f"--resume: the flags differ from those `{command}` of run {run_dir.name!r} started "
                              f"with ({record}); pass the same preset and flags to resume bit-identically")
    elif jax.process_index() == 0:
        if command in LATER_STAGES:
            run_dir.root.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps(
                {"command": command, "preset": preset, "hash": config_hash(config), "config": to_dict(config)},
                indent=2, sort_keys=True) + "\n")
        else:
            run_dir.write_config(command, preset, config)
    return run_dir, mesh


def run_pretrain(command: str, preset: str, config: Any) -> tuple[RunDir, pathlib.Path]:
    run_dir, mesh = start(command, preset, config)
    say(f"run directory: {run_dir.root}")
    return run_dir, _pretrain(config, run_dir, mesh, _tokenizer(config))[0]


def _tokenizer(config: Any) -> Any:
    """The in-house BPE (trained on the corpus, cached) or, with --backbone.path, the backbone's own tokenizer."""
    from ponderttt.train import corpus

    if config.backbone.path is not None:
        from ponderttt.data import load_tokenizer

        tok = load_tokenizer(config.backbone.path)
    else:
        tok = corpus.tokenizer(config.data, config.run.output_dir)
    say(f"tokenizer: {tok.name} (vocabulary {tok.vocab_size})")
    return tok


def _pretrain(config: Any, run_dir: RunDir, mesh: Any, tok: Any) -> tuple[pathlib.Path, Any]:
    from ponderttt.train import backbone

    folder, metrics = backbone.pretrain(run=config.run, platform=config.platform, data=config.data,
                                        backbone=config.backbone, run_dir=run_dir, mesh=mesh, tok=tok)
    if metrics.get("cached"):
        say(f"backbone: reused the cached in-house GPT-2 in {folder}")
    else:
        say(f"backbone: pretrained the in-house GPT-2 ({_show(metrics)}); cached in {folder}")
    return folder, tok


def _show(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def _model_with_adapter(config: Any, run_dir: RunDir, mesh: Any, tok: Any) -> Any:
    """The frozen backbone (HF directory, or the in-house GPT-2 pretrained or reused) with the adapter attached."""
    from ponderttt.train import adapter, backbone

    folder = None if config.backbone.path is not None else _pretrain(config, run_dir, mesh, tok)[0]
    model = backbone.load_backbone(config.backbone, config.platform, mesh, folder)
    return adapter.attach(model, config.data, config.adapter, mesh, config.run.seed)


def run_ttt(command: str, preset: str, config: Any) -> tuple[RunDir, Any, Any, Any]:
    """Backbone, then the adapter trained with UPDATE_k; returns (run_dir, mesh, tokenizer, model)."""
    from ponderttt.train import adapter

    run_dir, mesh = start(command, preset, config)
    say(f"run directory: {run_dir.root}")
    tok = _tokenizer(config)
    model = _model_with_adapter(config, run_dir, mesh, tok)
    metrics = adapter.train_adapter(run=config.run, data=config.data, adapter=config.adapter, run_dir=run_dir,
                                    mesh=mesh, tok=tok, model=model)
    if metrics.get("cached"):
        say(f"adapter: reused the trained adapter in {adapter.export_dir(run_dir)}")
    else:
        say(f"adapter: trained {config.adapter.kind} with UPDATE_{config.adapter.update_steps} ({_show(metrics)}); "
            f"saved in {adapter.export_dir(run_dir)}")
    return run_dir, mesh, tok, model


def run_compare(config: Any, run_dir: RunDir, mesh: Any, tok: Any, model: Any, command: str,
                trained: dict[str, Any] | None = None) -> None:
    """Compares every configured method (learned gates: those in `trained`) under the configured protocols;
    writes results.json, report.md and plots into the run directory."""
    import numpy as np

    from ponderttt.eval import comparison_record, write_report
    from ponderttt.train import compare, corpus, heldout
    from ponderttt.train.backbone import EVAL_BATCHES

    data, cmp = config.data, config.compare
    language = corpus.language(data)
    n_batches = -(-cmp.eval_sequences // data.batch_size)
    test_batches = corpus.fixed_batches(data, tok, "test", n_batches)
    held, wall = heldout.evaluate_held_out(model, test_batches, data=data, mesh=mesh, language=language)
    # thresholds are calibrated on the validation split's SKIP-pass signals (never on the test chunks)
    val, _ = heldout.evaluate_held_out(model, corpus.fixed_batches(data, tok, "val", max(n_batches, EVAL_BATCHES)),
                                       data=data, mesh=mesh, language=language, skip_only=True)
    costs = heldout.cost_table(model.config, data, config.adapter, wall or None)
    trained = dict(trained or {})
    methods = list(cmp.methods)

    def loss_at_scale(scales: Any) -> Any:  # continuous gates: one pass at their λ
        return heldout.losses_at_scales(model, test_batches, scales, data=data, mesh=mesh)

    records = compare.compare_reset(held, methods, cmp.budgets, calibration_signal=val.signal, trained=trained,
                                    loss_at_scale=loss_at_scale, cost_table=costs, n_resamples=cmp.n_resamples,
                                    seed=config.run.seed)
    protocols = ["reset"]
    if "carry" in cmp.protocols:
        from ponderttt.train import carry

        try:
            records += carry.compare_carry(model, test_batches, held, methods, cmp.budgets, data=data, mesh=mesh,
                                           calibration_signal=val.signal, trained=trained, cost_table=costs,
                                           n_resamples=cmp.n_resamples, seed=config.run.seed)
            protocols.append("carry")
        except carry.CarryUnsupported as error:
            say(f"compare: the carry protocol did not run: {error}")
    comparisons = []
    if {"skip", "update_1"} <= set(methods):
        docs = held.documents.reshape(-1)
        weights = held.tokens.reshape(-1)

        def per_document(loss: Any) -> Any:
            order = np.unique(docs, return_inverse=True)[1]
            return np.bincount(order, loss.reshape(-1) * weights) / np.maximum(np.bincount(order, weights), 1)

        comparisons.append(comparison_record(("update_1", None, "reset"), ("skip", None, "reset"),
                                             per_document(held.loss[..., 1]), per_document(held.loss[..., 0]),
                                             n_resamples=cmp.n_resamples, seed=config.run.seed))
    run_info = {"run": run_dir.name, "command": command, "seed": config.run.seed,
                "backbone": config.backbone.path or "in-house GPT-2", "adapter": config.adapter.kind,
                "n_sequences": int(held.tokens.shape[0]), "chunks_per_sequence": int(held.tokens.shape[1]),
                "protocols_evaluated": protocols}
    by = {(r["method"], r["budget"]): r for r in records if r["protocol"] == "reset"}
    headline = None
    if ("skip", None) in by and ("update_1", None) in by:
        skip, update = by[("skip", None)]["loss"], by[("update_1", None)]["loss"]
        verdict = "beats" if update < skip else "does not beat"
        headline = f"UPDATE_1 {verdict} SKIP: loss {update:.4f} vs {skip:.4f} ({update - skip:+.4f} nats)"
        run_info["held_out_update_1_vs_skip"] = headline + " under the reset protocol"
    import jax

    signal_rows, columns = analyze_signals(config, held)
    if jax.process_index() == 0:
        written = write_report(run_dir.root, records, run=run_info, cost_table=costs, comparisons=comparisons,
                               signals=signal_rows, signal_samples=columns, signal_names=tuple(held.signals))
        say(f"compare: {len(records)} results ({' and '.join(protocols)} protocols); wrote "
            + ", ".join(str(p) for p in written.values()))
    if headline:
        say(f"held-out code: {headline}")


def run_analyze(config: Any, run_dir: RunDir, mesh: Any, tok: Any, model: Any) -> None:
    """Signal correlations on the held-out chunks: signals.json and signals.md in the run directory."""
    import jax

    from ponderttt.train import corpus, heldout

    data = config.data
    n_batches = -(-config.analyze.eval_sequences // data.batch_size)
    language = corpus.language(data)
    held, _ = heldout.evaluate_held_out(model, corpus.fixed_batches(data, tok, "test", n_batches), data=data,
                                        mesh=mesh, language=language)
    held = dataclasses.replace(held, signals={k: v for k, v in held.signals.items() if k in config.analyze.signals})
    if not held.signals:
        raise ConfigError(f"--analyze.signals={' '.join(config.analyze.signals)}: none of them is computed; "
                          "available: recon_loss, entropy, confidence, ttt_improvement")
    rows, _ = analyze_signals(config, held, n_resamples=1000)
    if jax.process_index() == 0:
        (run_dir.root / "signals.json").write_text(json.dumps(rows, indent=2, default=float) + "\n")
        lines = ["| Model | Language | Signal | n | Pearson r [95% CI] | Spearman rho |",
                 "| --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            ci = r.get("pearson_ci") or [float("nan")] * 2
            lines.append(f"| {r.get('model')} | {r.get('language')} | {r['signal']} | {r['n']} | "
                         f"{r['pearson_r']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}] | {r['spearman_rho']:+.3f} |")
        (run_dir.root / "signals.md").write_text("# Signals vs oracle advantage\n\n" + "\n".join(lines) + "\n")
        say(f"analyze: wrote {run_dir.root / 'signals.md'} and signals.json")


def analyze_signals(config: Any, held: Any, n_resamples: int | None = None) -> tuple[list[dict[str, Any]], dict]:
    """Pearson / Spearman r of every per-chunk signal with the oracle advantage (the published scaling table)."""
    from ponderttt.eval import signal_table

    model = config.backbone.path or f"in-house GPT-2 {config.backbone.n_layer}x{config.backbone.n_embd}"
    columns = {name: values.reshape(-1) for name, values in held.signals.items()}
    columns.update({"oracle_advantage": held.advantage.reshape(-1), "language": held.languages.reshape(-1),
                    "model": [model] * held.advantage.size})
    resamples = n_resamples if n_resamples is not None else config.compare.n_resamples
    rows = signal_table(columns, signals=tuple(held.signals), n_resamples=resamples, seed=config.run.seed)
    for row in rows:
        if row.get("signal") == "recon_loss" and row.get("language") in ("all", held.languages.flat[0]):
            say(f"analyze: r(recon_loss, oracle advantage) = {row['pearson_r']:+.3f} on {row['n']} chunks")
            break
    return rows, columns


def run_gates(config: Any, run_dir: RunDir, mesh: Any, tok: Any, model: Any) -> dict[str, Any]:
    """Trains every requested gate; returns {name: trained gate}."""
    from ponderttt.train import gates

    trained = {}
    for name in config.gate.gates:
        trained[name], metrics = gates.train_gate(name, run=config.run, data=config.data, gate=config.gate,
                                                  run_dir=run_dir, mesh=mesh, tok=tok, model=model,
                                                  beta=config.adapter.beta)
        where = gates.export_dir(run_dir, name)
        say(f"gate {name}: " + (f"reused {where}" if metrics.get("cached") else f"trained ({_show(metrics)}); "
                                f"saved in {where}"))
    return trained


def run_command(command: str, preset: str, config: Any) -> int:
    """Runs `command` with its parsed config; returns the exit status."""
    check_prerequisites(command, preset, config)
    if command == "pretrain":
        run_pretrain(command, preset, config)
        return 0
    if command == "ttt":
        run_ttt(command, preset, config)
        return 0
    if command == "pipeline":
        run_pipeline(command, preset, config)
        return 0
    if command == "reproduce":
        run_reproduce(preset, config)
        return 0
    from ponderttt.train.adapter import load_adapter

    run_dir, mesh = start(command, preset, config)
    tok = _tokenizer(config)
    model = load_adapter(_model_with_adapter(config, run_dir, mesh, tok), run_dir)
    if command == "gate":
        run_gates(config, run_dir, mesh, tok, model)
    elif command == "evaluate":
        from ponderttt.train.evaluate import run_evaluate

        run_evaluate(config, run_dir, mesh, tok, model)
    elif command == "analyze":
        run_analyze(config, run_dir, mesh, tok, model)
    else:
        from ponderttt.train import gates

        trained = {m: gates.load_gate(m, config.gate, run_dir, config.run.seed) for m in config.compare.methods
                   if m in TRAINABLE_GATES}
        run_compare(config, run_dir, mesh, tok, model, command, trained)
    return 0


def run_pipeline(command: str, preset: str, config: Any) -> RunDir:
    """Data and tokenizer, backbone, adapter, gates, comparison and signal analysis, report; returns the run."""
    run_dir, mesh, tok, model = run_ttt(command, preset, config)
    trained = run_gates(config, run_dir, mesh, tok, model)
    run_compare(config, run_dir, mesh, tok, model, command, trained)
    outputs = "results.json, report.md, plots, checkpoints/, metrics.jsonl, tensorboard/"
    if config.evaluate.benchmark_dir is not None:
        from ponderttt.train.evaluate import run_evaluate

        run_evaluate(config, run_dir, mesh, tok, model)
        outputs += ", evaluate.json, evaluate.md"
    else:
        say("evaluate: skipped (benchmarks are local files: pass --evaluate.benchmark-dir DIR to run them)")
    say(f"outputs: {run_dir.root} ({outputs})")
    return run_dir


def run_reproduce(preset: str, config: Any) -> pathlib.Path:
    """For each scale: the whole pipeline on backbone_root/<checkpoint>, in run <name>-<scale>; then the
    published tables across scales in run <name> (scaling.md, scaling.json). Returns scaling.md."""
    from ponderttt.train import aggregate
    from ponderttt.train.config import BackboneConfig, PipelineCommand
    from ponderttt.train.rundir import _stamp

    base = config.run.name or f"reproduce-{preset}-{_stamp()}"
    per_scale = {}
    for scale in config.scales:
        backbone = BackboneConfig(path=str(pathlib.Path(config.backbone_root) / SCALE_DIRS[scale]))
        sub = PipelineCommand(run=dataclasses.replace(config.run, name=f"{base}-{scale}"), platform=config.platform,
                              data=config.data, backbone=backbone, adapter=config.adapter, gate=config.gate,
                              compare=config.compare, analyze=config.analyze)
        say(f"reproduce: scale {scale} ({backbone.path}) -> run {sub.run.name}")
        run_dir = run_pipeline("pipeline", preset, sub)
        per_scale[scale] = json.loads(run_dir.results_file.read_text())
    out = pathlib.Path(config.run.output_dir) / base
    import jax

    if jax.process_index() == 0:
        budget = 0.5 if 0.5 in config.compare.budgets else config.compare.budgets[0]
        path = aggregate.write_scaling_report(out, per_scale, method="recon", budget=budget, protocol="reset")
        say(f"reproduce: wrote {path} and {out / 'scaling.json'}")
    return out / "scaling.md"
