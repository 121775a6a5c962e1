"""The benchmark registry: how each benchmark is loaded from a local file, prompted, cut and graded.

``BENCHMARKS`` maps a name to its ``BenchmarkSpec``; ``load_task(name, directory)`` reads
``directory/<name>.jsonl`` (or ``.json``) with the hub data set's fields, and optionally few-shot examples from
``directory/<name>.shots.jsonl``; ``score(task, completions)`` cuts each raw completion at the benchmark's stop
strings and grades it (code in the sandbox of :mod:`ponderttt.eval.execution`, answers by extraction).
``render_benchmark_report`` writes the markdown table of a benchmark run's summary.

Light to import (no numpy, jax or datasets at import): configs and command-line parsers may use ``BENCHMARKS``.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ponderttt.eval.benchmarks import code, common, reasoning

FILE_SUFFIXES = (".jsonl", ".json")
SHOTS_SUFFIX = ".shots.jsonl"
GRADERS = ("code", "answers", "livecodebench")


class BenchmarkError(ValueError):
    """A benchmark file is missing, unreadable or empty, or a benchmark is not known."""


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
    """How one benchmark is loaded, prompted, cut and graded.

    load: (path, seed) -> problems (each with ``task_id`` and ``build_prompt``); grader: "code" (the sandbox),
    "answers" (extraction) or "livecodebench" (the sandbox, every test); stops: a completion ends at the first of
    these strings; metric: the reported name of the pass rate; default_shots: few-shot examples taken from
    ``<name>.shots.jsonl`` when it exists (0: the benchmark has no few-shot format).
    """

    name: str
    load: Callable[[str, int], list[Any]]
    grader: str
    stops: tuple[str, ...]
    metric: str
    default_shots: int = 0

    def __post_init__(self) -> None:
        if self.grader not in GRADERS:
            raise ValueError(f"BenchmarkSpec {self.name!r}: grader={self.grader!r}; choose one of {GRADERS}")

    @property
    def runs_code(self) -> bool:
        """True when grading runs model-written code (in the sandbox)."""
        return self.grader in ("code", "livecodebench")


FEW_SHOT = ("mbpp", "gsm8k", "math500", "gpqa_diamond")  # benchmarks whose prompt takes solved examples
BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec("humaneval", lambda p, s: code.load_humaneval(p), "code", code.HUMANEVAL_STOPS, "pass@1"),
        BenchmarkSpec("mbpp", lambda p, s: code.load_mbpp(p), "code", code.MBPP_STOPS, "pass@1", 3),
        BenchmarkSpec("classeval", lambda p, s: code.load_classeval(p), "code", (), "pass@1"),
        BenchmarkSpec("gsm8k", lambda p, s: reasoning.load_gsm8k(p), "answers", reasoning.GSM8K_STOPS, "accuracy", 8),
        # the few-shot format starts every example with "Problem:": a completion ends where the next would begin
        BenchmarkSpec("math500", lambda p, s: reasoning.load_math500(p), "answers", ("\nProblem:",), "accuracy", 4),
        BenchmarkSpec("gpqa_diamond", lambda p, s: reasoning.load_gpqa_diamond(p, seed=s), "answers",
                      ("\n\nWhat is the correct answer",), "accuracy"),
        BenchmarkSpec("livecodebench", lambda p, s: reasoning.load_livecodebench(p), "livecodebench", (), "pass@1"),
    )
}


def benchmark_spec(name: str) -> BenchmarkSpec:
    """The registered spec of benchmark `name`; a BenchmarkError naming the known ones otherwise."""
    if name not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def code_benchmarks(names: Sequence[str]) -> list[str]:
    """Those of `names` whose grading runs model-written code (in the sandbox)."""
    return [name for name in names if benchmark_spec(name).runs_code]


def benchmark_file(directory: str | pathlib.Path, name: str) -> pathlib.Path:
    """``directory/<name>.jsonl`` or ``directory/<name>.json``; a BenchmarkError naming the missing file."""
    folder = pathlib.Path(directory)
    for suffix in FILE_SUFFIXES:
        path = folder / f"{name}{suffix}"
        if path.is_file():
            return path
    raise BenchmarkError(f"missing benchmark file {folder / (name + '.jsonl')} (or {name}.json): put the data set "
                         "there as JSON lines with the hub data set's fields")


@dataclasses.dataclass(frozen=True)
class Task:
    """A benchmark ready to generate: its problems, their prompts (few-shot examples included), the number of
    shots used and the file it came from."""

    spec: BenchmarkSpec
    problems: tuple[Any, ...]
    prompts: tuple[str, ...]
    shots: int
    source: str

    @property
    def name(self) -> str:
        """The benchmark's name."""
        return self.spec.name


def load_task(name: str, directory: str | pathlib.Path, *, max_problems: int | None = None,
              shots: int | None = None, seed: int = 0) -> Task:
    """The first `max_problems` problems of benchmark `name` from `directory`, with their prompts.

    shots: few-shot examples from ``<name>.shots.jsonl`` (None: the benchmark's default when the file exists;
    an explicit number needs the file). seed: what a seeded loader uses (GPQA's choice order). Raises
    BenchmarkError for an unknown benchmark, a missing, unreadable or empty file, or missing asked-for shots.
    """
    spec = benchmark_spec(name)
    path = benchmark_file(directory, name)
    try:
        problems = spec.load(str(path), seed)
    except (KeyError, ValueError) as error:
        raise BenchmarkError(f"benchmark file {path} cannot be read as {name}: {error}") from error
    if not problems:
        raise BenchmarkError(f"benchmark file {path} holds no {name} problem")
    problems = problems[:max_problems] if max_problems is not None else problems
    examples: list[Any] = []
    shots_path = pathlib.Path(directory) / f"{name}{SHOTS_SUFFIX}"
    wanted = spec.default_shots if shots is None else shots
    if name in FEW_SHOT and wanted > 0:
        if shots_path.is_file():
            examples = spec.load(str(shots_path), seed)[:wanted]
        elif shots is not None:  # asked for explicitly
            raise BenchmarkError(f"shots={shots}: missing few-shot file {shots_path} for {name}")
    prompts = tuple(p.build_prompt(examples) if name in FEW_SHOT else p.build_prompt() for p in problems)
    return Task(spec, tuple(problems), prompts, len(examples), str(path))


def score(task: Task, completions: Mapping[str, str], *, timeout_s: float = 3.0, **sandbox: Any) -> Any:
    """Grades one completion per problem (`completions`: task_id -> raw generated text, cut at the benchmark's
    stop strings here) -> ``BenchmarkResult`` (pass@1 / accuracy, per-problem results). ``sandbox``: keyword
    arguments of ``ponderttt.eval.execution.run_program`` (``isolation``, ...) for the code benchmarks."""
    cut = {p.task_id: [common.truncate_at_stops(completions[p.task_id], task.spec.stops)] for p in task.problems}
    if task.spec.grader == "code":
        return code.evaluate_code(task.name, task.problems, cut, ks=(1,), timeout_s=timeout_s, **sandbox)
    if task.spec.grader == "livecodebench":
        return reasoning.evaluate_livecodebench(task.problems, cut, ks=(1,), timeout_s=timeout_s, **sandbox)
    return reasoning.evaluate_answers(task.name, task.problems, cut, ks=(1,))


def _rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.3f}"


def render_benchmark_report(summary: Mapping[str, Any]) -> str:
    """Markdown of a benchmark run's summary (the app's evaluate.json): its setting, the recon gate's calibration
    and one row per benchmark x gate (value with CI, paired Δ vs skip, update rate, tokens, speed)."""
    run, ev = summary["run"], summary["config"]
    lines = [f"# Benchmarks with TTT during generation: {run['name']}", "",
             f"Backbone {run['backbone']}, adapter {run['adapter']}, seed {run['seed']}; "
             f"{summary['generation']['decoding']} decoding, at most {ev['max_new_tokens']} new tokens, "
             f"chunks of {summary['generation']['chunk_size']} tokens (the prompt is the first chunk); "
             f"budget {ev['budget']} for recon / random.", ""]
    if summary.get("calibration"):
        cal = summary["calibration"]
        lines += [f"recon threshold: starts at {cal['initial_threshold']:.4f}, the (1 - budget) quantile of the probe "
                  f"losses of {cal['n_chunks']} validation chunks (SKIP pass, {cal['chunk_size']} tokens each); "
                  "then an online tracker holds the realised rate near the budget.", ""]
    lines += ["Value: pass@1 (code) or accuracy (answers), one greedy sample per problem, with a 95% bootstrap CI "
              "over problems; Δ vs skip: the paired difference on the same problems. Tokens/s leaves out each "
              "benchmark's first batch (compilation); seconds include it.", "",
              "| Benchmark | Gate | Metric | Value [95% CI] | Δ vs skip [95% CI] | Passed / n | Update rate | Tokens "
              "| Tokens/s | Seconds |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in summary["results"]:
        speed = "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.1f}"
        delta = "-"
        if r.get("vs_skip"):
            d = r["vs_skip"]
            delta = f"{d['difference']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"
        lines.append(f"| {r['benchmark']} | {r['gate']} | {r['metric']} | {r['value']:.3f} [{r['ci'][0]:.3f}, "
                     f"{r['ci'][1]:.3f}] | {delta} | {r['n_passed']} / {r['n_problems']} | "
                     f"{_rate(r['update_rate'])} | {r['generated_tokens']} | {speed} | {r['seconds']:.1f} |")
    truncated = [r for r in summary["results"] if r["prompts_truncated"]]
    if truncated:
        lines += ["", "Prompts cut to their last "
                  f"{summary['generation']['max_prompt_tokens']} tokens to fit the context: "
                  + ", ".join(f"{r['benchmark']} / {r['gate']} {r['prompts_truncated']}" for r in truncated) + "."]
    return "\n".join(lines) + "\n"
