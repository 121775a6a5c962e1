"""The commands: check what a command needs on disk, then run its stages (`RUNNERS`, one per command); each
command's memory pre-flight (`preflight`) runs once the process has joined the run, before any model is built.

Imported only once the command line is parsed (`cli.main`), so `--help` stays free of jax.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import warnings
from collections.abc import Callable
from typing import Any

import jax

from ponderttt.data import load_tokenizer
from ponderttt.train import adapter, aggregate, backbone, corpus, distributed, evaluate, gates, preflight
from ponderttt.train.comparison import run_analyze, run_compare
from ponderttt.train.config import (
    LATER_STAGES,
    SCALE_DIRS,
    TRAINABLE_GATES,
    BackboneConfig,
    ConfigError,
    PipelineCommand,
)
from ponderttt.train.distributed import say
from ponderttt.train.logs import attach_run_log
from ponderttt.train.provenance import provenance
from ponderttt.train.rundir import (
    DISK_ERRNOS,
    RunDir,
    config_hash,
    disk_errors,
    require_backbone_dir,
    require_writable_dir,
    resolve_run_dir,
    stamp,
)


def _existing_run(config: Any, command: str, preset: str) -> RunDir:
    """The run a later stage reads: --name is required, and the directory must exist."""
    if config.run.name is None:
        raise ConfigError(f"`{command}` works on an existing run: pass --name <run> of a run made by `ttt` or "
                          "`pipeline`")
    return resolve_run_dir(config.run, command, preset)


def check_prerequisites(command: str, preset: str, config: Any) -> None:
    """Raises ConfigError naming the missing directory when `command` cannot start."""
    require_writable_dir(config.run.output_dir)
    if config.run.resume:
        resolve_run_dir(config.run, command, preset)  # the run to resume must exist
    if command == "reproduce":
        root = pathlib.Path(config.backbone_root)
        for scale in config.scales:
            require_backbone_dir(root / SCALE_DIRS[scale], flag=f"--scales {scale} (under --backbone-root)",
                                 seq_len=config.data.seq_len)
        return
    if config.backbone.path is not None:  # every command but reproduce has a backbone section
        require_backbone_dir(config.backbone.path, seq_len=config.data.seq_len)
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
        evaluate.check_benchmarks(config.evaluate)


_JOINED: list[Any] = []  # the platform config this process joined with (reproduce starts several runs)


def join(config: Any) -> None:
    """Joins the distributed run (once per process) and turns on the persistent compilation cache."""
    if not _JOINED:
        distributed.initialize(config.platform)
        _JOINED.append(config.platform)
        if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # compiled programs persist: later runs start faster
            jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(config.run.output_dir) / "cache" / "jax"))
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
        # on a full disk the cache only loses entries: jax's warning for each is dropped (the run's own next write
        # raises the one DiskFull)
        warnings.filterwarnings("ignore", message=r"Error writing persistent compilation cache entry .*\[Errno "
                                f"({'|'.join(str(code) for code in DISK_ERRNOS)})\\]")


def check_memory(command: str, config: Any) -> None:
    """The memory pre-flight of `command` (`preflight.check`: ConfigError when a stage cannot fit), unless
    --no-preflight; after `join`, before any model is built."""
    if config.run.preflight:
        preflight.check(command, config)


def start(command: str, preset: str, config: Any) -> tuple[RunDir, Any]:
    """Joins the distributed run, checks the memory the command needs, builds the mesh, and prepares the run
    directory; returns (run_dir, mesh)."""
    join(config)
    check_memory(command, config)
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
        run_dir.write_config(command, preset, config, provenance=provenance(), file=record)
    if jax.process_index() == 0:
        say(f"run directory: {run_dir.root} (log: {attach_run_log(run_dir.root).name})")
    return run_dir, mesh


def run_pretrain(command: str, preset: str, config: Any) -> tuple[RunDir, pathlib.Path]:
    """The in-house GPT-2 backbone, pretrained (or reused from the cache); returns (run_dir, its folder)."""
    run_dir, mesh = start(command, preset, config)
    return run_dir, _pretrain(config, run_dir, mesh, _tokenizer(config))[0]


def _tokenizer(config: Any) -> Any:
    """The in-house BPE (trained on the corpus, cached) or, with --backbone.path, the backbone's own tokenizer."""
    if config.backbone.path is not None:
        try:
            tok = load_tokenizer(config.backbone.path)
        except ValueError as err:  # a malformed tokenizer.json: one line, before any work
            raise ConfigError(f"--backbone.path: {err}") from err
    else:
        tok = corpus.tokenizer(config.data, config.run.output_dir)
    say(f"tokenizer: {tok.name} (vocabulary {tok.vocab_size})")
    return tok


def _pretrain(config: Any, run_dir: RunDir, mesh: Any, tok: Any) -> tuple[pathlib.Path, Any]:
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
    folder = None if config.backbone.path is not None else _pretrain(config, run_dir, mesh, tok)[0]
    model = backbone.load_backbone(config.backbone, config.platform, mesh, folder)
    return adapter.attach(model, config.data, config.adapter, mesh, config.run.seed)


def run_ttt(command: str, preset: str, config: Any) -> tuple[RunDir, Any, Any, Any]:
    """Backbone, then the adapter trained with UPDATE_k; returns (run_dir, mesh, tokenizer, model)."""
    run_dir, mesh = start(command, preset, config)
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


def run_gates(config: Any, run_dir: RunDir, mesh: Any, tok: Any, model: Any) -> dict[str, Any]:
    """Trains every requested gate; returns {name: trained gate}."""
    trained = {}
    for name in config.gate.gates:
        trained[name], metrics = gates.train_gate(name, run=config.run, data=config.data, gate=config.gate,
                                                  run_dir=run_dir, mesh=mesh, tok=tok, model=model,
                                                  beta=config.adapter.beta)
        where = gates.export_dir(run_dir, name)
        say(f"gate {name}: " + (f"reused {where}" if metrics.get("cached") else f"trained ({_show(metrics)}); "
                                f"saved in {where}"))
    return trained


def run_pipeline(command: str, preset: str, config: Any) -> RunDir:
    """Data and tokenizer, backbone, adapter, gates, comparison and signal analysis, report; returns the run."""
    run_dir, mesh, tok, model = run_ttt(command, preset, config)
    trained = run_gates(config, run_dir, mesh, tok, model)
    run_compare(config, run_dir, mesh, tok, model, command, trained)
    outputs = "results.json, report.md, plots, checkpoints/, metrics.jsonl, tensorboard/"
    if config.evaluate.benchmark_dir is not None:
        evaluate.run_evaluate(config, run_dir, mesh, tok, model)
        outputs += ", evaluate.json, evaluate.md"
    else:
        say("evaluate: skipped (benchmarks are local files: pass --evaluate.benchmark-dir DIR to run them)")
    say(f"outputs: {run_dir.root} ({outputs})")
    return run_dir


def run_reproduce(command: str, preset: str, config: Any) -> pathlib.Path:
    """For each scale: the whole pipeline on backbone_root/<checkpoint>, in run <name>-<scale>; then the
    published tables across scales in run <name> (scaling.md, scaling.json). Returns scaling.md."""
    base = config.run.name or f"reproduce-{preset}-{stamp()}"
    join(config)
    check_memory(command, config)  # every scale, before the first one trains
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
    if jax.process_index() == 0:
        budget = 0.5 if 0.5 in config.compare.budgets else config.compare.budgets[0]
        path = aggregate.write_scaling_report(out, per_scale, method="recon", budget=budget, protocol="reset")
        say(f"reproduce: wrote {path} and {out / 'scaling.json'}")
    return out / "scaling.md"


def _on_trained_run(stage: Callable[..., Any]) -> Callable[[str, str, Any], Any]:
    """A later command's runner: the run's backbone with its trained adapter, then `stage` on it."""

    def run(command: str, preset: str, config: Any) -> Any:
        run_dir, mesh = start(command, preset, config)
        tok = _tokenizer(config)
        model = adapter.load_adapter(_model_with_adapter(config, run_dir, mesh, tok), run_dir)
        return stage(config, run_dir, mesh, tok, model, command)

    return run


def _compare_trained(config: Any, run_dir: RunDir, mesh: Any, tok: Any, model: Any, command: str) -> None:
    trained = {m: gates.load_gate(m, config.gate, run_dir, config.run.seed) for m in config.compare.methods
               if m in TRAINABLE_GATES}
    run_compare(config, run_dir, mesh, tok, model, command, trained)


RUNNERS: dict[str, Callable[[str, str, Any], Any]] = {
    "pretrain": run_pretrain,
    "ttt": run_ttt,
    "pipeline": run_pipeline,
    "reproduce": run_reproduce,
    "gate": _on_trained_run(lambda config, run_dir, mesh, tok, model, command: run_gates(
        config, run_dir, mesh, tok, model)),
    "compare": _on_trained_run(_compare_trained),
    "analyze": _on_trained_run(lambda config, run_dir, mesh, tok, model, command: run_analyze(
        config, run_dir, mesh, tok, model)),
    "evaluate": _on_trained_run(lambda config, run_dir, mesh, tok, model, command: evaluate.run_evaluate(
        config, run_dir, mesh, tok, model)),
}
"""What each command runs once its prerequisites are checked (the commands of `config.COMMANDS`)."""


def run_command(command: str, preset: str, config: Any) -> int:
    """Runs `command` with its parsed config: checks what it needs on disk, then its runner; returns 0. A write that
    fails for want of space is one `DiskFull` (the writes that know their step and checkpoint raise their own; any
    other names the file the error names, else --output-dir)."""
    check_prerequisites(command, preset, config)
    with disk_errors(config.run.output_dir):
        RUNNERS[command](command, preset, config)
    return 0
