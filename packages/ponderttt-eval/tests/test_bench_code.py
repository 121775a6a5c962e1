"""HumanEval, MBPP and ClassEval from tiny local files in their hub schemas, graded in the sandbox."""

import json

import pytest

from ponderttt.eval.benchmarks import (
    evaluate_code,
    load_classeval,
    load_humaneval,
    load_mbpp,
)
from ponderttt.eval.execution import ALLOW_ENV_VAR, sandbox_isolation

SANDBOX = {"isolation": sandbox_isolation()}  # the strongest this machine has ("full" where it can)


@pytest.fixture(autouse=True)
def _allow(monkeypatch):
    monkeypatch.setenv(ALLOW_ENV_VAR, "1")


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


HUMANEVAL_ROWS = [
    {
        "task_id": "HumanEval/0",
        "prompt": 'def add(a: int, b: int) -> int:\n    """Sum of a and b."""\n',
        "canonical_solution": "    return a + b\n",
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
        "entry_point": "add",
    },
    {
        "task_id": "HumanEval/1",
        "prompt": 'def double(x):\n    """Twice x."""\n',
        "canonical_solution": "    return 2 * x\n",
        "test": "def check(candidate):\n    assert candidate(4) == 8\n",
        "entry_point": "double",
    },
]


def test_humaneval_end_to_end(tmp_path):
    problems = load_humaneval(_write_jsonl(tmp_path / "he.jsonl", HUMANEVAL_ROWS))
    assert [p.task_id for p in problems] == ["HumanEval/0", "HumanEval/1"]
    assert problems[0].build_prompt() == HUMANEVAL_ROWS[0]["prompt"]
    generations = {
        # Correct, then junk after a stop sequence that must be cut off.
        "HumanEval/0": ["    return a + b\n\ndef extra():\n    raise SystemExit(1)\n", "    return a - b\n"],
        "HumanEval/1": ["    while True:\n        pass\n", "    return x * 2\nprint('bye')\n", "    return x +\n"],
    }
    result = evaluate_code("humaneval", problems, generations, ks=(1, 2), timeout_s=1.0, **SANDBOX)
    first, second = result.problems
    assert [s.status for s in first.samples] == ["passed", "failed"]
    assert [s.status for s in second.samples] == ["timeout", "passed", "error"]
    assert first.samples[0].extracted == "    return a + b\n"
    assert first.pass_at_k == {1: 0.5, 2: 1.0}
    assert second.pass_at_k[1] == pytest.approx(1 / 3) and second.pass_at_k[2] == pytest.approx(2 / 3)
    assert result.pass_at_k[1] == pytest.approx((0.5 + 1 / 3) / 2)
    canonical = {p.task_id: [p.canonical_solution] for p in problems}
    assert evaluate_code("humaneval", problems, canonical, **SANDBOX).pass_at_k == {1: 1.0}


MBPP_FULL = [
    {
        "task_id": 2,
        "text": "Write a function to find the shared elements from the given two lists.",
        "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))",
        "test_list": ["assert set(similar_elements((3, 4, 5, 6), (5, 7, 4, 10))) == set((4, 5))"],
        "test_setup_code": "",
        "challenge_test_list": [],
    },
    {
        "task_id": 11,
        "text": "Write a python function to square a number.",
        "code": "def square(n):\n    return n * n",
        "test_list": ["assert square(3) == 9", "assert square(-2) == 4"],
        "test_setup_code": "import math",
        "challenge_test_list": ["assert square(0) == 0"],
    },
]


def test_mbpp_prompt_extraction_and_grading(tmp_path):
    problems = load_mbpp(_write_jsonl(tmp_path / "mbpp.jsonl", MBPP_FULL))
    shot, target = problems
    assert target.entry_point == "square" and shot.entry_point == "similar_elements"
    prompt = target.build_prompt(shots=[shot])
    assert prompt == (
        "You are an expert Python programmer, and here is your task: Write a function to find the shared elements "
        "from the given two lists. Your code should pass these tests:\n\n"
        "assert set(similar_elements((3, 4, 5, 6), (5, 7, 4, 10))) == set((4, 5))\n[BEGIN]\n"
        f"{MBPP_FULL[0]['code']}\n[DONE]\n\n"
        "You are an expert Python programmer, and here is your task: Write a python function to square a number. "
        "Your code should pass these tests:\n\nassert square(3) == 9\nassert square(-2) == 4\n[BEGIN]\n"
    )
    generations = {
        "11": [
            "def square(n):\n    return n * n\n[DONE]\nYou are an expert Python programmer, and here is",
            "```python\ndef square(n):\n    return n ** 2\n\nprint(square(3))\nassert square(3) == 10\n```",
            "def square(n):\n    return abs(n) + 5\n",
        ]
    }
    result = evaluate_code("mbpp", [target], generations, timeout_s=2.0, **SANDBOX)
    assert [s.passed for s in result.problems[0].samples] == [True, True, False]
    # The example call and the wrong assert were stripped from the fenced answer.
    assert result.problems[0].samples[1].extracted == "def square(n):\n    return n ** 2\n"
    assert "assert square(0) == 0" in target.harness(challenge=True).tests
    assert "assert square(0) == 0" not in target.harness().tests and "assert" not in target.program("x")


def test_mbpp_sanitized_schema(tmp_path):
    row = {
        "task_id": 11,
        "prompt": "Square a number.",
        "code": "def square(n):\n    return n * n",
        "test_list": ["assert square(3) == 9"],
        "test_imports": ["import math"],
        "source_file": "x",
    }
    (problem,) = load_mbpp(_write_jsonl(tmp_path / "s.jsonl", [row]), name="sanitized")
    assert problem.text == "Square a number." and problem.test_setup_code == "import math"
    with pytest.raises(KeyError, match="neither 'text'"):
        load_mbpp(_write_jsonl(tmp_path / "bad.jsonl", [{"task_id": 1, "test_list": []}]))


CLASSEVAL_TEST = '''import unittest


class CounterTestIncrement(unittest.TestCase):
    def test_increment(self):
        c = Counter()
        c.increment()
        self.assertEqual(c.value, 1)


class CounterTestReset(unittest.TestCase):
    def test_reset(self):
        c = Counter()
        c.increment()
        c.reset()
        self.assertEqual(c.value, 0)


if __name__ == "__main__":
    unittest.main()
'''

CLASSEVAL_ROW = {
    "task_id": "ClassEval_0",
    "class_name": "Counter",
    "skeleton": 'class Counter:\n    """A counter."""\n\n    def __init__(self):\n        self.value = 0\n\n'
    '    def increment(self):\n        """Add one."""\n\n    def reset(self):\n        """Back to zero."""\n',
    "test": CLASSEVAL_TEST,
    "test_classes": ["CounterTestIncrement", "CounterTestReset"],
    "import_statement": ["import math"],
    "solution_code": "class Counter:\n    def __init__(self):\n        self.value = 0\n\n    def increment(self):\n"
    "        self.value += 1\n\n    def reset(self):\n        self.value = 0\n",
    "class_description": "A counter.",
    "methods_info": [],
    "class_constructor": "",
    "fields": ["self.value"],
}


def test_classeval_class_and_method_level(tmp_path):
    (problem,) = load_classeval(_write_jsonl(tmp_path / "ce.jsonl", [CLASSEVAL_ROW]))
    assert "Please complete the class Counter" in problem.build_prompt()
    assert CLASSEVAL_ROW["skeleton"].strip() in problem.build_prompt()
    half = CLASSEVAL_ROW["solution_code"].replace("self.value = 0\n", "pass\n").replace(
        "def __init__(self):\n        pass", "def __init__(self):\n        self.value = 0"
    )
    generations = {
        "ClassEval_0": [
            f"Here you go:\n```python\n{CLASSEVAL_ROW['solution_code']}```",
            f"```python\n{half}```",
            "I cannot do that.",
        ]
    }
    result = evaluate_code("classeval", [problem], generations, timeout_s=2.0, **SANDBOX)
    samples = result.problems[0].samples
    assert [s.passed for s in samples] == [True, False, False]
    assert dict(samples[0].details) == {"CounterTestIncrement": True, "CounterTestReset": True}
    assert dict(samples[1].details) == {"CounterTestIncrement": True, "CounterTestReset": False}
    assert dict(samples[2].details) == {"CounterTestIncrement": False, "CounterTestReset": False}
    assert result.extra["method_level"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)


def test_missing_generations_is_an_error(tmp_path):
    problems = load_humaneval(_write_jsonl(tmp_path / "he.jsonl", HUMANEVAL_ROWS))
    with pytest.raises(KeyError, match="HumanEval/1"):
        evaluate_code("humaneval", problems, {"HumanEval/0": ["    return a + b\n"]})
