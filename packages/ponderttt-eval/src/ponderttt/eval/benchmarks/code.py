"""Code benchmarks graded by running tests in the sandbox: HumanEval, MBPP and ClassEval.

Each problem type has ``build_prompt`` (what the model sees), ``postprocess`` (generation -> code to test: stop
sequences for completion-style prompts, sanitised extraction for instruction-style ones), ``program`` (the code to
test: the untrusted program), ``harness`` (the task's tests as a :class:`ponderttt.eval.grading.Harness`: they run in a
process of the sandbox the program cannot reach and call into it, so only the right values pass, never an exit
status) and ``judge`` (sandbox result -> :class:`SampleResult`). :func:`evaluate_code` runs every generation of every
problem through :func:`ponderttt.eval.execution.run_programs` and returns per-problem results with the unbiased
pass@k.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ponderttt.eval.benchmarks.common import (
    BenchmarkResult,
    SampleResult,
    load_records,
    require_fields,
    sanitize_python,
    summarize,
    truncate_at_stops,
)
from ponderttt.eval.grading import Harness

if TYPE_CHECKING:
    from ponderttt.eval.execution import ExecutionResult

__all__ = [
    "HUMANEVAL_STOPS",
    "MBPP_STOPS",
    "ClassEvalProblem",
    "HumanEvalProblem",
    "MBPPProblem",
    "evaluate_code",
    "load_classeval",
    "load_humaneval",
    "load_mbpp",
]

# The Codex paper's stop sequences: a completion ends where top-level code starts again.
HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
MBPP_STOPS = ("[DONE]",)


def _judge(result: ExecutionResult, completion: str) -> SampleResult:
    return SampleResult(result.status == "passed", result.status, result.reason, completion)


def _trusted_preamble(prompt: str) -> str:
    """The task's prompt as harness code (its imports and helper functions, which some tests call), or ``""`` if it
    does not compile alone; the entry point it declares is replaced by the program's (``Harness.remote``)."""
    for candidate in (prompt, prompt.rstrip() + "\n    pass\n"):
        try:
            ast.parse(candidate)
        except SyntaxError:
            continue
        return candidate
    return ""


# ---------------------------------------------------------------------------------------------------------------
# HumanEval


@dataclasses.dataclass(frozen=True)
class HumanEvalProblem:
    """One HumanEval task (fields as in ``openai_humaneval``); the model continues ``prompt``."""

    task_id: str
    prompt: str
    test: str
    entry_point: str
    canonical_solution: str = ""

    def build_prompt(self) -> str:
        """The task's own ``prompt`` (signature and docstring), unchanged: zero-shot completion."""
        return self.prompt

    def postprocess(self, generation: str) -> str:
        """The continuation up to the first :data:`HUMANEVAL_STOPS` sequence (where top-level code resumes)."""
        return truncate_at_stops(generation, HUMANEVAL_STOPS)

    def program(self, completion: str) -> str:
        """Prompt + completion: the program under test."""
        return f"{self.prompt}{completion}\n"

    def harness(self) -> Harness:
        """The task's ``check`` function called on the program's ``entry_point``; the prompt's helpers are defined in
        the harness too (tests such as HumanEval/32 call them)."""
        return Harness(
            tests=f"{self.test}\n\ncheck({self.entry_point})\n",
            preamble=_trusted_preamble(self.prompt),
            remote=(self.entry_point,),
        )

    def judge(self, result: ExecutionResult, completion: str) -> SampleResult:
        """Passed iff the sandbox status is "passed" (the harness's verdict); status and reason are the sandbox's."""
        return _judge(result, completion)


def load_humaneval(source: str = "openai_humaneval", *, split: str = "test") -> list[HumanEvalProblem]:
    """HumanEval from the hub id or a local JSON/JSONL file with its fields."""
    problems = []
    for record in load_records(source, split=split):
        require_fields(record, ("task_id", "prompt", "test", "entry_point"), "HumanEval")
        problems.append(
            HumanEvalProblem(
                task_id=str(record["task_id"]),
                prompt=record["prompt"],
                test=record["test"],
                entry_point=record["entry_point"],
                canonical_solution=record.get("canonical_solution", ""),
            )
        )
    return problems


# ---------------------------------------------------------------------------------------------------------------
# MBPP

_CALLED = re.compile(r"assert\s+(?:not\s+)?\(?\s*(?:set\(|sorted\(|math\.isclose\()?\s*([A-Za-z_]\w*)\s*\(")


@dataclasses.dataclass(frozen=True)
class MBPPProblem:
    """One MBPP task (``mbpp`` full: ``text``/``test_setup_code``; sanitized: ``prompt``/``test_imports``)."""

    task_id: str
    text: str
    test_list: tuple[str, ...]
    code: str = ""
    test_setup_code: str = ""
    challenge_test_list: tuple[str, ...] = ()

    @property
    def entry_point(self) -> str | None:
        """The function the tests call (parsed from the first assert)."""
        match = _CALLED.search(self.test_list[0]) if self.test_list else None
        return match.group(1) if match else None

    def _block(self) -> str:
        tests = "\n".join(self.test_list)
        return (
            f"You are an expert Python programmer, and here is your task: {self.text} "
            f"Your code should pass these tests:\n\n{tests}\n"
        )

    def build_prompt(self, shots: Sequence[MBPPProblem] = ()) -> str:
        """The MBPP paper's prompt: task text and its test asserts, few-shot solutions between [BEGIN] and [DONE]
        (the paper uses tasks 2, 3 and 4 as the three shots); the model writes after the final ``[BEGIN]``."""
        parts = [f"{shot._block()}[BEGIN]\n{shot.code.strip()}\n[DONE]\n" for shot in shots]
        parts.append(f"{self._block()}[BEGIN]\n")
        return "\n".join(parts)

    def postprocess(self, generation: str) -> str:
        """The answer up to ``[DONE]``, sanitised to top-level imports and definitions (see ``sanitize_python``)."""
        return sanitize_python(truncate_at_stops(generation, MBPP_STOPS), entry_point=self.entry_point)

    def program(self, completion: str) -> str:
        """Setup code and the completion: the program under test."""
        return f"{self.test_setup_code}\n\n{completion}\n"

    def harness(self, *, challenge: bool = False) -> Harness:
        """The test asserts (plus ``challenge_test_list`` with ``challenge``) after the setup code."""
        tests = list(self.test_list) + (list(self.challenge_test_list) if challenge else [])
        remote = (self.entry_point,) if self.entry_point else ()
        return Harness(tests="\n".join(tests) + "\n", preamble=self.test_setup_code, remote=remote)

    def judge(self, result: ExecutionResult, completion: str) -> SampleResult:
        """Passed iff the sandbox status is "passed" (every assert held)."""
        return _judge(result, completion)


def load_mbpp(source: str = "mbpp", *, name: str | None = "full", split: str = "test") -> list[MBPPProblem]:
    """MBPP from the hub (``mbpp`` or ``google-research-datasets/mbpp``, config ``full`` or ``sanitized``) or a local
    file with either config's fields. The ``prompt`` split holds the few-shot tasks."""
    problems = []
    for record in load_records(source, split=split, name=name):
        require_fields(record, ("task_id", "test_list"), "MBPP")
        if "text" not in record and "prompt" not in record:
            raise KeyError(f"MBPP record {record['task_id']!r} has neither 'text' (full) nor 'prompt' (sanitized)")
        setup = record.get("test_setup_code") or "\n".join(record.get("test_imports") or [])
        problems.append(
            MBPPProblem(
                task_id=str(record["task_id"]),
                text=record.get("text") or record["prompt"],
                test_list=tuple(record["test_list"]),
                code=record.get("code", ""),
                test_setup_code=setup,
                challenge_test_list=tuple(record.get("challenge_test_list") or ()),
            )
        )
    return problems


# ---------------------------------------------------------------------------------------------------------------
# ClassEval

def _without_main_guard(code: str) -> str:
    """Drop top-level ``if __name__ == "__main__":`` blocks (a test file's ``unittest.main()`` would exit first)."""
    try:
        module = ast.parse(code)
    except SyntaxError:
        return code
    lines = code.splitlines(keepends=True)
    for node in reversed(module.body):
        if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test):
            del lines[node.lineno - 1 : node.end_lineno]
    return "".join(lines)


@dataclasses.dataclass(frozen=True)
class ClassEvalProblem:
    """One ClassEval task: generate the whole class ``class_name`` from ``skeleton``; graded by its unittest classes
    (``test_classes``, one per method plus integration tests). Passes (class level) only if every test class does."""

    task_id: str
    class_name: str
    skeleton: str
    test: str
    test_classes: tuple[str, ...]
    import_statement: tuple[str, ...] = ()
    solution_code: str = ""
    class_description: str = ""

    def build_prompt(self) -> str:
        """Holistic generation (the ClassEval paper's class-level strategy), instruction style."""
        return (
            f"Please complete the class {self.class_name} in the following code. Implement every method, keep the "
            f"given signatures, and answer with the whole class in one Python code block.\n\n"
            f"```python\n{self.skeleton.strip()}\n```\n"
        )

    def postprocess(self, generation: str) -> str:
        """The code block that defines ``class_name``, sanitised to top-level imports and definitions."""
        return sanitize_python(generation, entry_point=self.class_name)

    def program(self, completion: str) -> str:
        """The imports and the completion: the program under test."""
        imports = "\n".join(self.import_statement)
        return f"{imports}\n\n{completion}\n"

    def harness(self) -> Harness:
        """The test module (its ``__main__`` block dropped), then a runner that runs each of ``test_classes`` with
        ``unittest`` in the harness process and gives their outcomes as the verdict (all must pass)."""
        runner = (
            "import sys as _pt_sys, unittest as _pt_unittest\n"
            "_pt_outcome = {}\n"
            f"for _pt_name in {list(self.test_classes)!r}:\n"
            "    _pt_suite = _pt_unittest.defaultTestLoader.loadTestsFromTestCase(globals()[_pt_name])\n"
            "    _pt_run = _pt_unittest.TextTestRunner(stream=_pt_sys.stderr, verbosity=0).run(_pt_suite)\n"
            "    _pt_outcome[_pt_name] = _pt_run.wasSuccessful() and _pt_run.testsRun > 0\n"
            "ponderttt_verdict(all(_pt_outcome.values()), _pt_outcome)\n"
        )
        return Harness(
            tests=f"{_without_main_guard(self.test)}\n\n{runner}",
            preamble="\n".join(self.import_statement),
            remote=(self.class_name,),
        )

    def judge(self, result: ExecutionResult, completion: str) -> SampleResult:
        """Class-level pass from the harness's verdict; ``details`` holds each test class's outcome (method level)."""
        outcome = (result.verdict or {}).get("details") or {}
        methods = {name: outcome.get(name) is True for name in self.test_classes}
        return SampleResult(result.status == "passed", result.status, result.reason, completion, methods)


def load_classeval(source: str = "FudanSELab/ClassEval", *, split: str = "test") -> list[ClassEvalProblem]:
    """ClassEval from the hub id or a local JSON/JSONL file with its fields."""
    problems = []
    for record in load_records(source, split=split):
        require_fields(record, ("task_id", "class_name", "skeleton", "test", "test_classes"), "ClassEval")
        problems.append(
            ClassEvalProblem(
                task_id=str(record["task_id"]),
                class_name=record["class_name"],
                skeleton=record["skeleton"],
                test=record["test"],
                test_classes=tuple(record["test_classes"]),
                import_statement=tuple(record.get("import_statement") or ()),
                solution_code=record.get("solution_code", ""),
                class_description=record.get("class_description", ""),
            )
        )
    return problems


# ---------------------------------------------------------------------------------------------------------------
# evaluation


def _generations_for(generations: Mapping, task_id: str) -> Sequence[str]:
    for key in (task_id, int(task_id) if task_id.isdigit() else None):
        if key is not None and key in generations:
            return generations[key]
    raise KeyError(f"no generations for task {task_id!r}; generations has keys like {list(generations)[:3]}")


def evaluate_code(
    benchmark: str,
    problems: Sequence[HumanEvalProblem | MBPPProblem | ClassEvalProblem],
    generations: Mapping[str, Sequence[str]],
    *,
    ks: Sequence[int] = (1,),
    postprocess: bool = True,
    timeout_s: float = 3.0,
    memory_mb: int = 1024,
    max_workers: int | None = None,
    **sandbox: Any,
) -> BenchmarkResult:
    """Grade ``generations[task_id]`` (raw model outputs, or code if ``postprocess=False``) for every problem.

    All programs run in parallel through :func:`ponderttt.eval.execution.run_programs` (which requires
    ``PONDER_TTT_ALLOW_UNSAFE_BENCHMARKS=1``); extra keyword arguments go to the sandbox (``reliability_guard``,
    ``isolation``, ...). ClassEval results carry the method-level pass rate in ``extra["method_level"]``.
    """
    from ponderttt.eval.execution import run_programs

    jobs = []
    for problem in problems:
        for generation in _generations_for(generations, problem.task_id):
            completion = problem.postprocess(generation) if postprocess else generation
            jobs.append((problem, completion))
    results = run_programs(
        [problem.program(completion) for problem, completion in jobs],
        harnesses=[problem.harness() for problem, _ in jobs],
        timeout_s=timeout_s,
        memory_mb=memory_mb,
        max_workers=max_workers,
        **sandbox,
    )
    per_problem: dict[str, list[SampleResult]] = {p.task_id: [] for p in problems}
    for (problem, completion), result in zip(jobs, results, strict=True):
        per_problem[problem.task_id].append(problem.judge(result, completion))
    extra = {}
    if problems and all(isinstance(p, ClassEvalProblem) for p in problems):
        rates = [
            sum(s.details.values()) / len(s.details) for samples in per_problem.values() for s in samples if s.details
        ]
        extra["method_level"] = sum(rates) / len(rates) if rates else 0.0
    return summarize(benchmark, per_problem, ks, extra)
