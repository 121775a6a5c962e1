"""The `evaluate` stage: code and reasoning benchmarks, generated with TTT at the head and scored.

For each benchmark x gate the trained run (frozen backbone + trained head adapter) generates a completion per
problem with `ponderttt.models.generate.generate`: the prompt is the first chunk, then every `chunk_size`
generated tokens form a chunk; before the fast weights update on a chunk the gate sees the chunk's no-update
probe loss and returns λ per sequence (λ = 0: the fast weights stay as they are). Gates:

* `skip`: λ = 0 everywhere (the backbone + adapter at its learned initial fast weights, never updated);
* `update_1`: λ = 1 on every chunk;
* `recon`: update when the chunk's probe (step-0 reconstruction) loss exceeds a threshold τ. τ starts at the
  (1 − budget) quantile of the probe losses of the run's *validation split* (SKIP pass, chunks of
  --data.chunk-size, as `compare` calibrates) and then follows the stream with the gating package's online
  budget tracker. Causal: a decision reads only its chunk's probe loss and the past decisions; no benchmark
  text is used to calibrate;
* `random`: update with probability budget (seeded Bernoulli per sequence and chunk).

The realised update rate counts the decisions of sequences still generating: a sequence that has stopped
(a stop sequence, a stop string or end-of-text: generation ends the row there) and the filler rows of a short
last batch get λ = 0 and are not counted (`ponderttt.gating.generation.GenerationGate`).

Benchmarks come from local files in --evaluate.benchmark-dir: `<name>.jsonl` (or `<name>.json`) with the
hub data set's fields, and optionally `<name>.shots.jsonl` with few-shot examples (MBPP, GSM8K, MATH-500,
GPQA). Completions are cut at the benchmark's stop strings and graded by `ponderttt.eval.benchmarks`: code in
the sandbox of `ponderttt.eval.execution` (needs PONDER_TTT_ALLOW_UNSAFE_BENCHMARKS=1; its isolation is
--evaluate.isolation, full by default, refused at the start where the machine cannot give it), answers by
extraction.

Outputs in the run directory (process 0 only): evaluate.json (per benchmark x gate: metric, value, problems,
update rate, tokens, seconds; the run and the config), evaluate.md (a table) and evaluate_samples.jsonl (every
graded completion).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from ponderttt.eval.benchmarks import tasks
from ponderttt.eval.benchmarks.tasks import Task, score
from ponderttt.eval.execution import ALLOW_ENV_VAR, ISOLATIONS, SandboxUnavailable, require_isolation
from ponderttt.eval.stats import mean_ci, paired_difference_ci
from ponderttt.gating import GenerationGate, make_gate
from ponderttt.models.generate import GenerationConfig, generate
from ponderttt.train import corpus, heldout
from ponderttt.train.backbone import EVAL_BATCHES
from ponderttt.train.config import ConfigError, EvaluateConfig, to_dict
from ponderttt.train.distributed import say, shows_progress
from ponderttt.train.provenance import provenance
from ponderttt.train.rundir import RunDir

RESULTS_FILE = "evaluate.json"
REPORT_FILE = "evaluate.md"
SAMPLES_FILE = "evaluate_samples.jsonl"
SCHEMA_VERSION = 1
BUDGETED_GATES = ("recon", "random")


# ----------------------------------------------------------------------------------------------- benchmarks


def benchmark_file(directory: str | pathlib.Path, name: str) -> pathlib.Path:
    """DIR/<name>.jsonl or DIR/<name>.json (`ponderttt.eval.benchmarks.tasks`); a ConfigError naming the flag."""
    try:
        return tasks.benchmark_file(directory, name)
    except tasks.BenchmarkError as error:
        raise ConfigError(f"--evaluate.benchmarks {name}: {error} in --evaluate.benchmark-dir={directory}, or drop "
                          "the benchmark") from None


def load_task(name: str, directory: str | pathlib.Path, *, max_problems: int | None = None,
              shots: int | None = None, seed: int = 0) -> Task:
    """`ponderttt.eval.benchmarks.tasks.load_task`, its errors as ConfigErrors naming the flags."""
    benchmark_file(directory, name)
    try:
        return tasks.load_task(name, directory, max_problems=max_problems, shots=shots, seed=seed)
    except tasks.BenchmarkError as error:
        raise ConfigError(f"--evaluate.{error}" if str(error).startswith("shots=") else str(error)) from None


def check_benchmarks(ev: EvaluateConfig) -> None:
    """Every benchmark file is present and code execution is allowed: a ConfigError naming the flag before
    anything is trained or generated."""
    if ev.benchmark_dir is None:
        raise ConfigError("`evaluate` needs --evaluate.benchmark-dir DIR with <benchmark>.jsonl files (e.g. "
                          "DIR/humaneval.jsonl, DIR/gsm8k.jsonl)")
    if not pathlib.Path(ev.benchmark_dir).is_dir():
        raise ConfigError(f"--evaluate.benchmark-dir={ev.benchmark_dir}: missing directory")
    for name in ev.benchmarks:
        benchmark_file(ev.benchmark_dir, name)
    require_code_consent(ev.benchmarks, ev.isolation)


def require_code_consent(names: Sequence[str], isolation: str = "full") -> None:
    """A ConfigError before anything is generated when a benchmark would run code without the user's consent,
    or under an `isolation` this machine cannot give (probed once)."""
    running = tasks.code_benchmarks(names)
    if not running:
        return
    if os.environ.get(ALLOW_ENV_VAR) != "1":
        raise ConfigError(f"--evaluate.benchmarks {' '.join(running)} run model-written code in a sandbox (not a "
                          f"security boundary like a VM): set {ALLOW_ENV_VAR}=1 to accept that, preferably in a "
                          "disposable machine or container, or evaluate only answer-graded benchmarks (gsm8k "
                          "math500 gpqa_diamond)")
    try:
        require_isolation(isolation)
    except SandboxUnavailable as error:
        weaker = " or ".join(ISOLATIONS[ISOLATIONS.index(isolation) + 1:])
        raise ConfigError(f"--evaluate.isolation={isolation}: the sandbox of --evaluate.benchmarks "
                          f"{' '.join(running)} is not available on this machine ({error.missing}); pass "
                          f"--evaluate.isolation {weaker} to accept weaker isolation, or evaluate only "
                          "answer-graded benchmarks") from None


# ----------------------------------------------------------------------------------------------- gates


def gate_runner(method: str, *, budget: float, calibration_signal: np.ndarray | None = None,
                seed: int = 0) -> GenerationGate:
    """The gate of a `--evaluate.gates` method as generation's gate callback (`ponderttt.gating.generation`):
    skip (λ = 0), update_1 (λ = 1), recon (calibrated threshold at `budget`) or random (rate `budget`); a budget
    of 1 updates everywhere."""
    if method == "skip":
        gate = make_gate("fixed:skip")
    elif method == "update_1" or (method in BUDGETED_GATES and budget >= 1.0):
        gate = make_gate("fixed:update_1")
    elif method == "recon":
        if calibration_signal is None:
            raise ValueError("the recon gate needs calibration_signal (validation-split probe losses)")
        gate = make_gate("recon", target_rate=budget, calibration_signal=np.asarray(calibration_signal))
    elif method == "random":
        gate = make_gate("random", rate=budget)
    else:
        raise ValueError(f"unknown generation gate {method!r}")
    return GenerationGate(gate, seed=seed)


# ----------------------------------------------------------------------------------------------- generation


@dataclasses.dataclass(frozen=True)
class Completion:
    """One problem's generation: text (up to end-of-text; stop strings are cut when scoring), generated tokens
    (up to and including the stop, token- or text-level, where generation ended), prompt truncation, and the
    gate's decisions for it."""

    text: str
    tokens: int
    prompt_tokens: int
    truncated: bool
    decisions: int
    updates: int


def context_length(model: Any) -> int:
    """The model's context: most positions a prompt plus its completion may use."""
    return int(model.config.max_positions)


def prompt_limit(model: Any, max_new_tokens: int, mini_batch: int) -> int:
    """Most prompt tokens that fit with `max_new_tokens` in the context, a multiple of the TTT mini-batch."""
    context = context_length(model)
    limit = (context - max_new_tokens) // mini_batch * mini_batch
    if limit < mini_batch:
        raise ConfigError(f"--evaluate.max-new-tokens={max_new_tokens} leaves no room for a prompt in the model's "
                          f"context of {context} tokens; lower it below {context - mini_batch}")
    return limit


def padded_length(longest: int, chunk_size: int, limit: int) -> int:
    """Prompt length of every batch of a benchmark: chunk_size x a power of two covering `longest`, at most
    `limit` (a few shapes to compile for the whole evaluation; left padding does not change a completion)."""
    length = chunk_size
    while length < longest:
        length *= 2
    return max(min(length, limit), longest)


def stop_token_sequences(tok: Any, stops: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """Token ids of each stop string (early stopping only: completions are cut at the strings themselves)."""
    sequences = []
    for stop in stops:
        ids = tuple(int(t) for t in tok.encode(stop))
        if ids and ids not in sequences:
            sequences.append(ids)
    return tuple(sequences)


def generate_completions(model: Any, tok: Any, prompts: Sequence[str], runner: GenerationGate, *, chunk_size: int,
                         max_new_tokens: int, stops: Sequence[str] = (), batch_size: int = 8,
                         temperature: float = 0.0, seed: int = 0, progress: Any = None,
                         timings: list[tuple[float, int]] | None = None) -> list[Completion]:
    """One completion per prompt, generated in left-padded batches with TTT at the head gated by `runner`.

    Prompts longer than fits the context keep their last tokens. Every batch is left-padded to one length
    (`padded_length`: few compiled shapes; a multiple of the mini-batch, so a prompt's TTT mini-batches end
    where it ends whatever the padding), and a short last batch is filled with copies of its first prompt
    that are neither counted nor returned. `timings` receives (seconds, generated tokens) per batch."""
    mini_batch = model.ttt_config.mini_batch_size
    limit = prompt_limit(model, max_new_tokens, mini_batch)
    token_stops = stop_token_sequences(tok, stops)
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, stop_sequences=token_stops,
                              eos_token_id=tok.eod_id, pad_token_id=tok.pad_id, seed=seed, stop_strings=tuple(stops))
    encoded = tok.encode_batch(list(prompts))
    length = padded_length(max(min(len(e), limit) for e in encoded), chunk_size, limit)
    out: list[Completion] = []
    for start in range(0, len(prompts), batch_size):
        ids = [e[-limit:] for e in encoded[start:start + batch_size]]
        truncated = [len(e) > limit for e in encoded[start:start + batch_size]]
        real = len(ids)
        rows = batch_size if len(prompts) > batch_size else real
        ids = ids + [ids[0]] * (rows - real)
        batch = np.full((rows, length), tok.pad_id, np.int32)
        mask = np.zeros((rows, length), np.int32)
        for row, x in enumerate(ids):
            batch[row, length - len(x):] = x
            mask[row, length - len(x):] = 1
        runner.start_batch(np.arange(rows) < real)
        started = time.perf_counter()
        result = generate(model, batch, mask, dataclasses.replace(config, seed=seed + start), gate=runner,
                          ttt_chunk_size=chunk_size, decode=tok.decode)
        for row in range(real):
            generated = [int(t) for t in result.tokens[row, :result.lengths[row]]]
            if tok.eod_id in generated:
                generated = generated[:generated.index(tok.eod_id)]
            out.append(Completion(text=tok.decode(generated), tokens=int(result.lengths[row]),
                                  prompt_tokens=len(ids[row]), truncated=truncated[row],
                                  decisions=runner.rows[row]["decisions"], updates=runner.rows[row]["updates"]))
        if timings is not None:
            timings.append((time.perf_counter() - started, int(result.lengths[:real].sum())))
        if progress is not None:
            progress.update(real)
            progress.set_postfix(update_rate=f"{runner.update_rate or 0.0:.2f}")
    return out


def calibration_signal(config: Any, tok: Any, model: Any, mesh: Any) -> np.ndarray:
    """Probe (step-0 reconstruction) losses of the validation split's chunks under SKIP, as `compare` uses."""
    batches = corpus.fixed_batches(config.data, tok, "val", EVAL_BATCHES)
    held = heldout.evaluate_held_out(model, batches, data=config.data, mesh=mesh,
                                     language=corpus.language(config.data), skip_only=True)
    return np.asarray(held.signal, np.float64).reshape(-1)


# ----------------------------------------------------------------------------------------------- the stage


def evaluate_task(model: Any, tok: Any, task: Task, method: str, runner: GenerationGate, *,
                  evaluate: EvaluateConfig, chunk_size: int, seed: int = 0, progress: bool = False,
                  n_resamples: int = 1000) -> tuple[dict[str, Any], list[dict]]:
    """Generates and grades one benchmark under one gate (`method`, run by `runner`): (its record, one sample
    dict per problem).

    The record's `value` is the mean pass rate over problems (one greedy sample each: pass@1 / accuracy) with a
    95% bootstrap CI over problems; `tokens_per_s` leaves out the first batch (compilation)."""
    bar = tqdm(total=len(task.prompts), desc=f"evaluate {task.name} / {method}", unit="problem",
               disable=not progress, leave=False)
    started = time.perf_counter()
    timings: list[tuple[float, int]] = []
    try:
        completions = generate_completions(model, tok, task.prompts, runner, chunk_size=chunk_size,
                                           max_new_tokens=evaluate.max_new_tokens, stops=task.spec.stops,
                                           batch_size=evaluate.batch_size, temperature=evaluate.temperature,
                                           seed=seed, progress=bar, timings=timings)
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    later = timings[1:]  # the first batch of a benchmark may include compilation
    steady = sum(t for _, t in later) / sum(s for s, _ in later) if later and sum(s for s, _ in later) else None
    started = time.perf_counter()
    result = score(task, {p.task_id: c.text for p, c in zip(task.problems, completions, strict=True)},
                   timeout_s=evaluate.timeout_s, isolation=evaluate.isolation)
    score_seconds = time.perf_counter() - started
    tokens = sum(c.tokens for c in completions)
    passed = np.asarray([p.num_correct for p in result.problems], np.float64)  # one greedy sample per problem
    ci = mean_ci(passed, n_resamples=n_resamples, seed=seed)  # over problems
    record = {
        "benchmark": task.name, "gate": method, "metric": task.spec.metric,
        "budget": evaluate.budget if method in BUDGETED_GATES else None,
        "value": float(result.pass_at_k[1]), "ci": [ci.low, ci.high], "ci_method": ci.method,
        "n_problems": len(task.problems), "n_passed": int(passed.sum()),
        "update_rate": runner.update_rate, "decisions": runner.decisions, "updates": runner.updates,
        "generated_tokens": int(tokens), "seconds": seconds, "tokens_per_s": steady,
        "score_seconds": score_seconds, "shots": task.shots,
        "prompts_truncated": int(sum(c.truncated for c in completions)),
        "extra": {k: float(v) for k, v in result.extra.items()},
    }
    samples = []
    for problem, completion, graded in zip(task.problems, completions, result.problems, strict=True):
        sample = graded.samples[0]
        samples.append({"benchmark": task.name, "gate": method, "task_id": problem.task_id,
                        "completion": completion.text, "passed": bool(sample.passed), "status": sample.status,
                        "reason": sample.reason, "generated_tokens": completion.tokens,
                        "prompt_tokens": completion.prompt_tokens, "prompt_truncated": completion.truncated,
                        "decisions": completion.decisions, "updates": completion.updates})
    return record, samples


def run_evaluate(config: Any, run_dir: RunDir, mesh: Any, tok: Any, model: Any, *,
                 calibration: np.ndarray | None = None) -> dict[str, Any]:
    """Evaluates the run's model (adapter loaded) on every configured benchmark x gate; writes evaluate.json,
    evaluate.md and evaluate_samples.jsonl into the run directory (process 0) and returns the summary.

    `calibration`: the recon gate's calibration signal; default: the validation split's probe losses."""
    ev: EvaluateConfig = config.evaluate
    check_benchmarks(ev)
    loaded = [load_task(name, ev.benchmark_dir, max_problems=ev.max_problems, shots=ev.shots, seed=config.run.seed)
             for name in ev.benchmarks]
    chunk_size = config.data.chunk_size
    if "recon" in ev.gates and ev.budget < 1.0 and calibration is None:
        calibration = calibration_signal(config, tok, model, mesh)
    progress = shows_progress(config.run)
    records, samples = [], []
    for task in loaded:  # the model's parameters carry their shardings; `generate` needs no mesh context
        passed: dict[str, np.ndarray] = {}
        for method in sorted(ev.gates, key=lambda g: g != "skip"):  # skip first: the others are paired with it
            runner = gate_runner(method, budget=ev.budget, calibration_signal=calibration, seed=config.run.seed)
            record, task_samples = evaluate_task(model, tok, task, method, runner, evaluate=ev, chunk_size=chunk_size,
                                                 seed=config.run.seed, progress=progress,
                                                 n_resamples=config.compare.n_resamples)
            passed[method] = np.asarray([sample["passed"] for sample in task_samples], np.float64)
            if method != "skip" and "skip" in passed:
                d = paired_difference_ci(passed[method], passed["skip"], n_resamples=config.compare.n_resamples,
                                         seed=config.run.seed)  # the same problems under two gates
                record["vs_skip"] = {"difference": d.value, "ci": [d.low, d.high], "ci_method": d.method}
            records.append(record)
            samples.extend(task_samples)
            say(f"evaluate {task.name} / {method}: {record['metric']} {record['value']:.3f} on "
                 f"{record['n_problems']} problems, update rate {_rate(record['update_rate'])}, "
                 f"{record['generated_tokens']} tokens in {record['seconds']:.1f} s")
    summary = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "run": {"name": run_dir.name,
                "backbone": config.backbone.path or "in-house GPT-2",
                "adapter": config.adapter.kind, "seed": config.run.seed, "provenance": provenance()},
        "config": to_dict(ev),
        "generation": {"chunk_size": chunk_size, "mini_batch_size": model.ttt_config.mini_batch_size,
                       "context": context_length(model),
                       "max_prompt_tokens": prompt_limit(model, ev.max_new_tokens, model.ttt_config.mini_batch_size),
                       "decoding": "greedy" if ev.temperature == 0 else f"temperature {ev.temperature}",
                       "prompt_chunk": "the whole prompt is the first chunk"},
        "calibration": None if calibration is None else {
            "source": "validation split: probe losses of the SKIP pass", "chunk_size": chunk_size,
            "n_chunks": int(np.size(calibration)), "budget": ev.budget,
            "initial_threshold": float(np.quantile(np.asarray(calibration, np.float64), 1.0 - ev.budget))},
        "benchmarks": {t.name: {"file": t.source, "n_problems": len(t.problems), "shots": t.shots} for t in loaded},
        "results": records,
    }
    if jax.process_index() == 0:
        write_outputs(run_dir.root, summary, samples)
        say(f"evaluate: wrote {run_dir.root / RESULTS_FILE}, {run_dir.root / REPORT_FILE} and "
             f"{run_dir.root / SAMPLES_FILE}")
    return summary


def _rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.3f}"


def write_outputs(root: pathlib.Path, summary: dict[str, Any], samples: list[dict]) -> dict[str, pathlib.Path]:
    """Writes evaluate.json (`summary`), evaluate.md (its table) and evaluate_samples.jsonl (one graded completion
    a line) into `root`, creating it; returns their paths under the keys results, report and samples."""
    root.mkdir(parents=True, exist_ok=True)
    paths = {"results": root / RESULTS_FILE, "report": root / REPORT_FILE, "samples": root / SAMPLES_FILE}
    paths["results"].write_text(json.dumps(summary, indent=2) + "\n")
    paths["report"].write_text(tasks.render_benchmark_report(summary))
    paths["samples"].write_text("".join(json.dumps(s) + "\n" for s in samples))
    return paths
