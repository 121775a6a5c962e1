"""Shared pieces of the benchmarks: pass@k, loading records, stop sequences, code extraction, per-problem results."""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "BenchmarkResult",
    "ProblemResult",
    "SampleResult",
    "extract_code_block",
    "load_records",
    "require_fields",
    "pass_at_k",
    "sanitize_python",
    "summarize",
    "truncate_at_stops",
]


# ---------------------------------------------------------------------------------------------------------------
# pass@k


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k estimate for one problem: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k / i), which never forms the (huge) binomial coefficients.
    """
    n, c = int(num_samples), int(num_correct)
    if not (0 <= c <= n) or n < 1:
        raise ValueError(f"need 0 <= num_correct <= num_samples and num_samples >= 1, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, num_samples={n}], got {k}: draw at least k samples per problem")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


# ---------------------------------------------------------------------------------------------------------------
# loading


def _is_local(source: str) -> bool:
    return os.path.isfile(source) or source.endswith((".json", ".jsonl"))


def load_records(
    source: str, *, split: str = "test", name: str | None = None, data_files: Sequence[str] | None = None
) -> list[dict]:
    """Records of a data set: a local ``.json`` (a list, or ``{"data": [...]}``) / ``.jsonl`` file, or a hub id.

    Hub ids go through ``datasets.load_dataset(source, name, split=split, data_files=data_files)`` (``datasets`` is
    imported only then); local files are read directly and must have the hub data set's fields.
    """
    if _is_local(source):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"benchmark file {source!r} does not exist; give a .json/.jsonl file or a hub id")
        with open(source, encoding="utf-8") as f:
            if source.endswith(".jsonl"):
                records = [json.loads(line) for line in f if line.strip()]
            else:
                data = json.load(f)
                records = data["data"] if isinstance(data, dict) and "data" in data else data
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ValueError(f"{source!r} must hold a list of JSON objects (records), got {type(records).__name__}")
        return records
    import datasets  # heavy: only when a hub data set is asked for

    kwargs = {"data_files": list(data_files)} if data_files is not None else {}
    return [dict(row) for row in datasets.load_dataset(source, name, split=split, **kwargs)]


def require_fields(record: Mapping, fields: Iterable[str], benchmark: str) -> None:
    """Raise ``KeyError`` naming every one of ``fields`` that ``record`` lacks (and the fields it has)."""
    missing = [f for f in fields if f not in record]
    if missing:
        raise KeyError(f"{benchmark} record is missing fields {missing}; it has {sorted(record)}")


# ---------------------------------------------------------------------------------------------------------------
# post-processing generations


def truncate_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop sequence."""
    cut = len(text)
    for stop in stops:
        if stop:
            at = text.find(stop)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code_block(text: str, *, must_define: str | None = None, last: bool = False) -> str | None:
    """The content of a fenced (```) code block: the first (or ``last``) Python/unlabelled one, preferring a block
    that defines ``must_define``. ``None`` when ``text`` has no fence. An unterminated fence runs to the end."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    if not blocks:
        return None
    python = [body for lang, body in blocks if lang in ("", "python", "py", "python3")] or [b for _, b in blocks]
    if must_define is not None:
        defining = [b for b in python if re.search(rf"\b(?:def|class)\s+{re.escape(must_define)}\b", b)]
        python = defining or python
    return python[-1] if last else python[0]


def _longest_parsable_prefix(code: str) -> ast.Module | None:
    lines = code.splitlines()
    for end in range(len(lines), 0, -1):
        try:
            return ast.parse("\n".join(lines[:end]))
        except (SyntaxError, ValueError):
            continue
    return None


_KEPT = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)


def sanitize_python(text: str, *, entry_point: str | None = None) -> str:
    """Turn a model's answer into a clean module: take its code block (if fenced), drop what follows the longest
    parsable prefix, and keep only top-level imports, definitions and assignments (no example calls, prints,
    asserts or ``if __name__ == "__main__":`` blocks). Returns ``""`` when nothing parses."""
    code = extract_code_block(text, must_define=entry_point)
    if code is None:
        code = text
    code = code.replace("[BEGIN]", "").split("[DONE]")[0]
    module = _longest_parsable_prefix(code.strip("\n"))
    if module is None:
        return ""
    source = code.strip("\n")
    kept = [ast.get_source_segment(source, node, padded=False) for node in module.body if isinstance(node, _KEPT)]
    return "\n\n".join(segment for segment in kept if segment) + ("\n" if kept else "")


# ---------------------------------------------------------------------------------------------------------------
# results


@dataclasses.dataclass(frozen=True)
class SampleResult:
    """One generation's outcome: ``passed`` (correct), a ``status`` (sandbox status, or "correct"/"wrong"/"no answer"
    for answer-graded benchmarks), a short ``reason``, the ``extracted`` answer or code that was graded, and
    benchmark-specific ``details`` (ClassEval: each test class's outcome; GSM8K: strict and flexible matches)."""

    passed: bool
    status: str
    reason: str = ""
    extracted: str | None = None
    details: Mapping[str, bool] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ProblemResult:
    """One problem's samples and its unbiased pass@k (k -> estimate in [0, 1], for k <= number of samples)."""

    task_id: str
    samples: tuple[SampleResult, ...]
    pass_at_k: Mapping[int, float]

    @property
    def num_samples(self) -> int:
        """n, the generations graded for this problem."""
        return len(self.samples)

    @property
    def num_correct(self) -> int:
        """c, the generations that passed."""
        return sum(s.passed for s in self.samples)

    def to_dict(self) -> dict:
        """JSON-ready: counts, pass@k with string keys, and every sample (its ``details`` as a plain dict)."""
        return {
            "task_id": self.task_id,
            "num_samples": self.num_samples,
            "num_correct": self.num_correct,
            "pass_at_k": {str(k): v for k, v in self.pass_at_k.items()},
            "samples": [{**dataclasses.asdict(s), "details": dict(s.details)} for s in self.samples],
        }


@dataclasses.dataclass(frozen=True)
class BenchmarkResult:
    """Per-problem results and the mean pass@k over problems (``pass_at_k[1]`` is accuracy for one sample each)."""

    benchmark: str
    problems: tuple[ProblemResult, ...]
    pass_at_k: Mapping[int, float]
    extra: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready: name, problem count, mean pass@k with string keys, ``extra`` when non-empty, each problem."""
        return {
            "benchmark": self.benchmark,
            "num_problems": len(self.problems),
            "pass_at_k": {str(k): v for k, v in self.pass_at_k.items()},
            **({"extra": dict(self.extra)} if self.extra else {}),
            "problems": [p.to_dict() for p in self.problems],
        }


def summarize(
    benchmark: str,
    per_problem: Mapping[str, Sequence[SampleResult]],
    ks: Sequence[int] = (1,),
    extra: Mapping[str, float] | None = None,
) -> BenchmarkResult:
    """Pass@k per problem (for each k <= that problem's sample count) and its mean over problems."""
    if not per_problem:
        raise ValueError(f"{benchmark}: no problems to summarize (were the generations keyed by task_id?)")
    problems = []
    for task_id, samples in per_problem.items():
        n, c = len(samples), sum(s.passed for s in samples)
        if n == 0:
            raise ValueError(f"{benchmark}: problem {task_id!r} has no samples")
        problems.append(ProblemResult(task_id, tuple(samples), {k: pass_at_k(n, c, k) for k in ks if k <= n}))
    means = {}
    for k in ks:
        values = [p.pass_at_k[k] for p in problems if k in p.pass_at_k]
        if len(values) == len(problems):
            means[k] = math.fsum(values) / len(values)
    return BenchmarkResult(benchmark, tuple(problems), means, dict(extra or {}))
