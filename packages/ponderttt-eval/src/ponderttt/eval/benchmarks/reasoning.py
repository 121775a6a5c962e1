"""Reasoning benchmarks: GSM8K, MATH-500, GPQA-Diamond (graded from the answer text) and LiveCodeBench (graded by
running the program on its tests in the sandbox).

Each problem type has ``build_prompt`` (few-shot where the benchmark has a standard few-shot format) and a grader:
``grade(response) -> SampleResult`` for answer-graded benchmarks (see :func:`evaluate_answers`), or the program
builders used by :func:`evaluate_livecodebench`.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import pickle
import random
import re
import threading
import zlib
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from ponderttt.eval.benchmarks.common import (
    BenchmarkResult,
    SampleResult,
    extract_code_block,
    load_records,
    require_fields,
    summarize,
)
from ponderttt.eval.grading import Harness

if TYPE_CHECKING:
    from ponderttt.eval.execution import ExecutionResult

__all__ = [
    "GSM8K_STOPS",
    "GPQAProblem",
    "GSM8KProblem",
    "LiveCodeBenchProblem",
    "LiveCodeBenchTest",
    "Math500Problem",
    "evaluate_answers",
    "evaluate_livecodebench",
    "extract_choice",
    "gsm8k_flexible_answer",
    "gsm8k_strict_answer",
    "load_gpqa_diamond",
    "load_gsm8k",
    "load_livecodebench",
    "load_math500",
]


def _generations_for(generations: Mapping, task_id: str) -> Sequence[str]:
    if task_id in generations:
        return generations[task_id]
    raise KeyError(f"no responses for task {task_id!r}; responses has keys like {list(generations)[:3]}")


def evaluate_answers(
    benchmark: str, problems: Sequence, responses: Mapping[str, Sequence[str]], *, ks: Sequence[int] = (1,)
) -> BenchmarkResult:
    """Grade ``responses[task_id]`` (one or more model outputs per problem) with each problem's ``grade``.

    For GSM8K a sample passes on the strict match; ``extra`` has the mean of each ``details`` key over all samples
    (``strict`` and ``flexible`` accuracy)."""
    per_problem = {p.task_id: [p.grade(r) for r in _generations_for(responses, p.task_id)] for p in problems}
    samples = [s for group in per_problem.values() for s in group]
    keys = sorted({k for s in samples for k in s.details})
    extra = {k: sum(bool(s.details.get(k)) for s in samples) / len(samples) for k in keys} if samples else {}
    return summarize(benchmark, per_problem, ks, extra)


# ---------------------------------------------------------------------------------------------------------------
# GSM8K

GSM8K_STOPS = ("Question:", "</s>", "<|im_end|>")
_GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def _normalize_number(text: str) -> str:
    return text.replace(",", "").replace("$", "").strip().rstrip(".")


def _same_number(a: str | None, b: str) -> bool:
    if a is None:
        return False
    a, b = _normalize_number(a), _normalize_number(b)
    try:
        return Decimal(a) == Decimal(b)
    except InvalidOperation:
        return a == b


def gsm8k_strict_answer(response: str) -> str | None:
    """The number after the first ``#### `` (the format the data set's own answers, and so the few-shot prompt,
    teach)."""
    match = _GSM8K_STRICT.search(response)
    return _normalize_number(match.group(1)) if match else None


def gsm8k_flexible_answer(response: str) -> str | None:
    """The last number anywhere in the response."""
    matches = [m.group(1) or m.group(2) for m in _GSM8K_FLEXIBLE.finditer(response)]
    numbers = [n for n in (_normalize_number(m) for m in matches) if re.search(r"[0-9]", n)]
    return numbers[-1] if numbers else None


@dataclasses.dataclass(frozen=True)
class GSM8KProblem:
    """One grade-school maths word problem; graded by the number after ``####`` (strict) or the last number."""

    task_id: str
    question: str
    answer: str  # worked solution ending in "#### <number>"

    @property
    def gold(self) -> str:
        """The reference number (commas and ``$`` removed); ``ValueError`` if ``answer`` has no ``#### <number>``."""
        gold = gsm8k_strict_answer(self.answer)
        if gold is None:
            raise ValueError(f"GSM8K answer of {self.task_id!r} has no '#### <number>': {self.answer[-80:]!r}")
        return gold

    def build_prompt(self, shots: Sequence[GSM8KProblem] = ()) -> str:
        """``Question: ...\\nAnswer: <worked solution> #### N`` for each shot, then the question; stop at
        :data:`GSM8K_STOPS`."""
        parts = [f"Question: {s.question}\nAnswer: {s.answer}\n\n" for s in shots]
        return "".join(parts) + f"Question: {self.question}\nAnswer:"

    def grade(self, response: str) -> SampleResult:
        """Passed on the strict match (numeric equality after ``####``); ``details`` holds "strict" and "flexible"
        (last number) matches; status "correct", "wrong" or "no answer" (no ``####``)."""
        strict, flexible = gsm8k_strict_answer(response), gsm8k_flexible_answer(response)
        details = {"strict": _same_number(strict, self.gold), "flexible": _same_number(flexible, self.gold)}
        status = "correct" if details["strict"] else ("no answer" if strict is None else "wrong")
        return SampleResult(details["strict"], status, f"gold {self.gold}", strict, details)


def load_gsm8k(source: str = "openai/gsm8k", *, name: str | None = "main", split: str = "test") -> list[GSM8KProblem]:
    """GSM8K from the hub id or a local JSON/JSONL file (``question``, ``answer``); task ids are ``task_id`` when
    present, else the record's position."""
    problems = []
    for index, record in enumerate(load_records(source, split=split, name=name)):
        require_fields(record, ("question", "answer"), "GSM8K")
        problems.append(GSM8KProblem(str(record.get("task_id", index)), record["question"], record["answer"]))
    return problems


# ---------------------------------------------------------------------------------------------------------------
# MATH-500

_MATH_INSTRUCTION = "Solve the problem. Reason step by step and put the final answer in \\boxed{}.\n\n"


@dataclasses.dataclass(frozen=True)
class Math500Problem:
    """One MATH-500 problem; graded by math-verify equivalence of the final answer with ``answer``."""

    task_id: str
    problem: str
    answer: str  # LaTeX, without $ or \boxed
    solution: str = ""
    subject: str = ""
    level: int = 0

    def build_prompt(self, shots: Sequence[Math500Problem] = ()) -> str:
        """An instruction to reason step by step and answer in ``\\boxed{}``, the ``shots`` as Problem/Solution pairs,
        then this problem; the model writes after the final ``Solution:``."""
        parts = [f"Problem:\n{s.problem}\n\nSolution:\n{s.solution.strip()}\n\n" for s in shots]
        return _MATH_INSTRUCTION + "".join(parts) + f"Problem:\n{self.problem}\n\nSolution:\n"

    def grade(self, response: str, *, timeout_s: int = 5) -> SampleResult:
        """Equivalence by math-verify: the gold answer and the response's final answer (``\\boxed{}`` first) are
        parsed to SymPy and compared (numerically, symbolically, as sets/intervals...). Its timeouts use
        ``signal.alarm``, so off the main thread they are disabled."""
        from math_verify import parse, verify

        timeout = timeout_s if threading.current_thread() is threading.main_thread() else None
        gold = parse(f"${self.answer}$", parsing_timeout=timeout) or parse(
            f"\\boxed{{{self.answer}}}", parsing_timeout=timeout
        )
        if not gold:
            raise ValueError(f"math-verify cannot parse the gold answer of {self.task_id!r}: {self.answer!r}")
        predicted = parse(response, parsing_timeout=timeout)
        if not predicted:
            return SampleResult(False, "no answer", f"gold {self.answer}", None)
        correct = verify(gold, predicted, timeout_seconds=timeout)
        extracted = str(predicted[-1])
        return SampleResult(correct, "correct" if correct else "wrong", f"gold {self.answer}", extracted)


def load_math500(source: str = "HuggingFaceH4/MATH-500", *, split: str = "test") -> list[Math500Problem]:
    """MATH-500 from the hub id or a local JSON/JSONL file (``problem``, ``answer``; optional ``solution``,
    ``subject``, ``level``); task ids are ``unique_id`` when present, else the record's position."""
    problems = []
    for index, record in enumerate(load_records(source, split=split)):
        require_fields(record, ("problem", "answer"), "MATH-500")
        problems.append(
            Math500Problem(
                task_id=str(record.get("unique_id", index)),
                problem=record["problem"],
                answer=str(record["answer"]),
                solution=record.get("solution", ""),
                subject=record.get("subject", ""),
                level=int(record.get("level", 0) or 0),
            )
        )
    return problems


# ---------------------------------------------------------------------------------------------------------------
# GPQA-Diamond

_LETTERS = "ABCD"
_CHOICE_PATTERNS = (
    re.compile(r"correct answer is[:\s]*\**\s*\(?([A-D])\)?(?![A-Za-z])", re.IGNORECASE),
    re.compile(r"answer[\s*]*(?:is)?[\s*]*[:\s]\s*\**\(?([A-D])\)?(?![A-Za-z])", re.IGNORECASE),
    re.compile(r"\(([A-D])\)"),
    re.compile(r"^\s*\(?([A-D])\)?[.:]?\s*$"),
)


# After a stated answer: "or (C)", ", C", "/ C", "and C" — a second letter in the same statement.
_HEDGE = re.compile(r"\)?\s*(?:,|/|\bor\b|\band\b)\s*\(?[A-D]\)?(?![A-Za-z])", re.IGNORECASE)


def extract_choice(response: str) -> str | None:
    """The chosen letter A-D: from "The correct answer is (X)", else "Answer: X", else the last "(X)", else a
    response that is only a letter. ``None`` if nothing matches, and ``None`` for a response that does not commit
    to one letter: explicit answer statements that name different letters ("The correct answer is (B). Answer: C"),
    or one statement naming several ("The correct answer is (B) or (C)")."""
    stated = [m for pattern in _CHOICE_PATTERNS[:2] for m in pattern.finditer(response)]
    if stated:
        letters = {m.group(1).upper() for m in stated}
        if len(letters) > 1 or any(_HEDGE.match(response, m.end(1)) for m in stated):
            return None
        return letters.pop()
    for pattern in _CHOICE_PATTERNS[2:]:
        matches = pattern.findall(response)
        if matches:
            return matches[-1].upper()
    return None


@dataclasses.dataclass(frozen=True)
class GPQAProblem:
    """One four-way multiple-choice question; ``choices`` in the (seeded) shuffled order, ``correct_index`` in 0-3."""

    task_id: str
    question: str
    choices: tuple[str, str, str, str]
    correct_index: int

    @property
    def correct_letter(self) -> str:
        """The gold letter, "A" to "D"."""
        return _LETTERS[self.correct_index]

    @classmethod
    def from_record(cls, record: Mapping, *, task_id: str, seed: int = 0) -> GPQAProblem:
        """Shuffle the correct and three incorrect answers with a generator seeded by (seed, task_id): the same
        order on every run and machine, a different one per question."""
        require_fields(
            record,
            ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"),
            "GPQA",
        )
        options = [record["Correct Answer"]] + [record[f"Incorrect Answer {i}"] for i in (1, 2, 3)]
        order = list(range(4))
        random.Random(f"{seed}:{task_id}").shuffle(order)
        choices = tuple(str(options[i]).strip() for i in order)
        return cls(task_id, str(record["Question"]).strip(), choices, order.index(0))

    def _question_block(self) -> str:
        listed = "\n".join(f"({letter}) {choice}" for letter, choice in zip(_LETTERS, self.choices, strict=True))
        return f"What is the correct answer to this question: {self.question}\n\nChoices:\n{listed}\n\n"

    def build_prompt(self, shots: Sequence[GPQAProblem] = ()) -> str:
        """The GPQA paper's zero-shot format; with ``shots``, each solved example ends "The correct answer is (X)"."""
        examples = "".join(f"{s._question_block()}The correct answer is ({s.correct_letter})\n\n" for s in shots)
        return (
            examples + self._question_block() + 'Format your response as follows: "The correct answer is (insert '
            'answer here)".'
        )

    def grade(self, response: str) -> SampleResult:
        """Correct iff :func:`extract_choice` finds the gold letter; status "correct", "wrong" or "no answer"."""
        letter = extract_choice(response)
        correct = letter == self.correct_letter
        status = "correct" if correct else ("no answer" if letter is None else "wrong")
        return SampleResult(correct, status, f"gold {self.correct_letter}", letter)


def load_gpqa_diamond(
    source: str = "Idavidrein/gpqa", *, name: str | None = "gpqa_diamond", split: str = "train", seed: int = 0
) -> list[GPQAProblem]:
    """GPQA-Diamond (a gated hub data set whose only split is ``train``) or a local file with its columns."""
    problems = []
    for index, record in enumerate(load_records(source, split=split, name=name)):
        task_id = str(record.get("Record ID") or index)
        problems.append(GPQAProblem.from_record(record, task_id=task_id, seed=seed))
    return problems


# ---------------------------------------------------------------------------------------------------------------
# LiveCodeBench

# Names the official harness imports before a stdin program runs (solutions rely on them without importing).
_LCB_PRELUDE = (
    "import sys, math, re, string, bisect, heapq, itertools, functools, collections, random\n"
    "from collections import *\nfrom itertools import *\nfrom functools import *\nfrom heapq import *\n"
    "from bisect import *\nfrom math import *\nfrom typing import *\nsys.setrecursionlimit(50000)\n"
)
# release_vN = the files test.jsonl, test2.jsonl, ..., testN.jsonl of the hub repository.
_LCB_RELEASE_FILES = {
    f"release_v{v}": [f"test{i if i > 1 else ''}.jsonl" for i in range(1, v + 1)] for v in range(1, 7)
}


@dataclasses.dataclass(frozen=True)
class LiveCodeBenchTest:
    """One test case: ``input`` is stdin text, or one JSON argument per line for a functional test."""

    input: str
    output: str
    testtype: str  # "stdin" (whole program, compare stdout) or "functional" (call Solution().func_name)


class _StringsOnlyUnpickler(pickle.Unpickler):
    """The private tests are a pickled JSON *string*; refuse anything that would import or call code."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a LiveCodeBench test field")


def _decode_tests(value) -> list[dict]:
    if isinstance(value, list):
        return value
    if not value:
        return []
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        text = _StringsOnlyUnpickler(io.BytesIO(zlib.decompress(base64.b64decode(value)))).load()
        return json.loads(text)


def _same_output(got: str, want: str) -> bool:
    got_lines = [line.strip() for line in got.strip().splitlines()]
    want_lines = [line.strip() for line in want.strip().splitlines()]
    if got_lines == want_lines:
        return True
    got_tokens = " ".join(got_lines).split()
    want_tokens = " ".join(want_lines).split()
    if len(got_tokens) != len(want_tokens):
        return False
    for a, b in zip(got_tokens, want_tokens, strict=True):
        if a == b:
            continue
        try:
            x, y = float(a), float(b)
        except ValueError:
            return False
        if abs(x - y) > 1e-6 * max(1.0, abs(y)):
            return False
    return True


@dataclasses.dataclass(frozen=True)
class LiveCodeBenchProblem:
    """One LiveCodeBench code-generation problem with its public (and, if loaded, private) tests; ``func_name`` is
    the ``Solution`` method functional tests call (LeetCode), None for stdin problems."""

    task_id: str
    title: str
    content: str
    tests: tuple[LiveCodeBenchTest, ...]
    starter_code: str = ""
    func_name: str | None = None
    platform: str = ""
    difficulty: str = ""
    contest_date: str = ""

    def build_prompt(self) -> str:
        """The official code-generation instruction: complete the starter code (LeetCode) or read stdin / write
        stdout (AtCoder, Codeforces); the answer is a fenced Python block."""
        head = (
            "You are an expert Python programmer. You will be given a question (problem specification) and will "
            "generate a correct Python program that matches the specification and passes all tests.\n\n"
            f"### Question:\n{self.content.strip()}\n\n"
        )
        if self.starter_code:
            fmt = (
                "### Format: You will use the following starter code to write the solution to the problem and "
                f"enclose your code within delimiters.\n```python\n{self.starter_code.strip()}\n```\n\n"
            )
        else:
            fmt = (
                "### Format: Read the inputs from stdin, solve the problem and write the answer to stdout (do not "
                "directly test on the sample inputs). Enclose your code within delimiters as follows.\n"
                "```python\n# YOUR CODE HERE\n```\n\n"
            )
        return head + fmt + "### Answer: (use the provided format with backticks)\n\n"

    def postprocess(self, generation: str) -> str:
        """The last fenced code block (``""`` if there is none: an answer without code fails)."""
        return extract_code_block(generation, last=True) or ""

    def programs(self, code: str) -> list[tuple[str, str | None, Harness | None]]:
        """One (source, stdin, harness) per test: a stdin test feeds ``input`` and compares stdout (in the caller);
        a functional test calls ``Solution().func_name`` from the harness process and compares the JSON values."""
        out = []
        for test in self.tests:
            if test.testtype == "functional":
                if not self.func_name:
                    raise ValueError(f"LiveCodeBench {self.task_id!r} has functional tests but no func_name")
                tests = (
                    "import json as _pt_json\n"
                    f"_pt_args = [_pt_json.loads(l) for l in {test.input!r}.split('\\n') if l.strip()]\n"
                    f"_pt_got = _pt_json.loads(_pt_json.dumps(Solution().{self.func_name}(*_pt_args)))\n"
                    f"assert _pt_got == _pt_json.loads({test.output!r}), 'wrong answer'\n"
                )
                out.append((_LCB_PRELUDE + code + "\n", None, Harness(tests=tests, remote=("Solution",))))
            else:
                out.append((_LCB_PRELUDE + code + "\n", test.input, None))
        return out

    def judge(self, code: str, results: Sequence[ExecutionResult]) -> SampleResult:
        """Passes only if every test does (stdin tests compare stdout, whitespace- and float-tolerant)."""
        if not code.strip():
            return SampleResult(False, "error", "no code block in the response", code)
        for index, (test, result) in enumerate(zip(self.tests, results, strict=True)):
            if result.status != "passed":
                return SampleResult(False, result.status, f"test {index}: {result.reason}", code)
            if test.testtype != "functional" and not _same_output(result.stdout, test.output):
                return SampleResult(False, "failed", f"test {index}: wrong output", code)
        return SampleResult(True, "passed", f"{len(self.tests)} tests passed", code)


def load_livecodebench(
    source: str = "livecodebench/code_generation_lite",
    *,
    release: str = "release_v1",
    split: str = "test",
    include_private: bool = True,
) -> list[LiveCodeBenchProblem]:
    """LiveCodeBench code generation: from the hub (its JSONL files of ``release`` through ``datasets``' json
    builder and ``hf://`` paths, since ``datasets`` refuses repositories with a loading script) or a local JSON/JSONL
    file with the same fields. Private tests are
    decoded (JSON, or base64-zlib-pickled JSON with a loader that refuses anything but strings)."""
    if source.endswith((".json", ".jsonl")):
        records = load_records(source, split=split)
    else:
        if release not in _LCB_RELEASE_FILES:
            raise ValueError(f"unknown LiveCodeBench release {release!r}; known: {sorted(_LCB_RELEASE_FILES)}")
        files = [f"hf://datasets/{source}/{name}" for name in _LCB_RELEASE_FILES[release]]
        records = load_records("json", split="train", data_files=files)
    problems = []
    for record in records:
        require_fields(record, ("question_id", "question_content", "public_test_cases"), "LiveCodeBench")
        raw = _decode_tests(record["public_test_cases"])
        if include_private:
            raw += _decode_tests(record.get("private_test_cases"))
        tests = tuple(LiveCodeBenchTest(t["input"], t["output"], t.get("testtype", "stdin")) for t in raw)
        if not tests:
            raise ValueError(f"LiveCodeBench problem {record['question_id']!r} has no test cases to grade with")
        metadata = record.get("metadata") or {}
        if isinstance(metadata, str):
            metadata = json.loads(metadata) if metadata.strip() else {}
        problems.append(
            LiveCodeBenchProblem(
                task_id=str(record["question_id"]),
                title=record.get("question_title", ""),
                content=record["question_content"],
                tests=tests,
                starter_code=record.get("starter_code", "") or "",
                func_name=metadata.get("func_name"),
                platform=record.get("platform", ""),
                difficulty=record.get("difficulty", ""),
                contest_date=str(record.get("contest_date", "")),
            )
        )
    return problems


def evaluate_livecodebench(
    problems: Sequence[LiveCodeBenchProblem],
    generations: Mapping[str, Sequence[str]],
    *,
    ks: Sequence[int] = (1,),
    postprocess: bool = True,
    timeout_s: float = 6.0,
    memory_mb: int = 1024,
    max_workers: int | None = None,
    **sandbox: Any,
) -> BenchmarkResult:
    """Run every test of every generation in the sandbox (in parallel) and report pass@k per problem."""
    from ponderttt.eval.execution import run_programs

    jobs = []  # (problem, code, first program index, number of programs)
    sources: list[str] = []
    stdins: list[str | None] = []
    harnesses: list[Harness | None] = []
    for problem in problems:
        for generation in _generations_for(generations, problem.task_id):
            code = problem.postprocess(generation) if postprocess else generation
            programs = problem.programs(code) if code.strip() else []
            jobs.append((problem, code, len(sources), len(programs)))
            for source, stdin, harness in programs:
                sources.append(source)
                stdins.append(stdin)
                harnesses.append(harness)
    results = run_programs(
        sources,
        stdins=stdins,
        harnesses=harnesses,
        timeout_s=timeout_s,
        memory_mb=memory_mb,
        max_workers=max_workers,
        **sandbox,
    )
    per_problem: dict[str, list[SampleResult]] = {p.task_id: [] for p in problems}
    for problem, code, start, count in jobs:
        per_problem[problem.task_id].append(problem.judge(code, results[start : start + count]))
    return summarize("livecodebench", per_problem, ks)
