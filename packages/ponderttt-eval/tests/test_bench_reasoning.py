"""GSM8K, MATH-500, GPQA-Diamond and LiveCodeBench from tiny local files in their hub schemas."""

import base64
import json
import pickle
import sys
import types
import zlib

import pytest

from ponderttt.eval.benchmarks import (
    evaluate_answers,
    evaluate_livecodebench,
    extract_choice,
    gsm8k_flexible_answer,
    gsm8k_strict_answer,
    load_gpqa_diamond,
    load_gsm8k,
    load_livecodebench,
    load_math500,
)
from ponderttt.eval.benchmarks.reasoning import _decode_tests
from ponderttt.eval.execution import ALLOW_ENV_VAR, sandbox_isolation


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {"question": "A shirt costs $1,200 and is cut by $200. Price?", "answer": "1200 - 200 = 1000\n#### 1,000"},
]


def test_gsm8k_extraction():
    assert gsm8k_strict_answer("so 3+4=7.\n#### 7") == "7"
    assert gsm8k_strict_answer("The answer is 7.") is None
    assert gsm8k_flexible_answer("3 + 4 = 7 apples, so the answer is $1,000.") == "1000"
    assert gsm8k_flexible_answer("-5 degrees then 12.5") == "12.5"
    assert gsm8k_flexible_answer("no numbers here.") is None


def test_gsm8k_prompt_and_grading(tmp_path):
    shot, problem = load_gsm8k(_write_jsonl(tmp_path / "g.jsonl", GSM8K_ROWS))
    assert (shot.task_id, shot.gold, problem.gold) == ("0", "7", "1000")
    assert problem.build_prompt(shots=[shot]) == (
        f"Question: {GSM8K_ROWS[0]['question']}\nAnswer: {GSM8K_ROWS[0]['answer']}\n\n"
        f"Question: {GSM8K_ROWS[1]['question']}\nAnswer:"
    )
    responses = {
        "0": ["3 + 4 = 7\n#### 7", "Three plus four is 7.", "#### 8"],
        "1": ["1200 - 200 = 1000\n#### 1000.00", "It costs $1,000.", "#### 1,000 but maybe 900"],
    }
    result = evaluate_answers("gsm8k", [shot, problem], responses, ks=(1,))
    details = [dict(s.details) for p in result.problems for s in p.samples]
    assert [d["strict"] for d in details] == [True, False, False, True, False, True]
    assert [d["flexible"] for d in details] == [True, True, False, True, True, False]
    assert result.extra == {"flexible": pytest.approx(4 / 6), "strict": pytest.approx(3 / 6)}
    assert result.pass_at_k[1] == pytest.approx(0.5)
    assert [s.status for s in result.problems[0].samples] == ["correct", "no answer", "wrong"]


def test_math500_equivalence_with_math_verify(tmp_path):
    rows = [
        {
            "problem": "Compute $1/2 + 1/4$.",
            "solution": "$1/2+1/4=\\boxed{\\frac{3}{4}}$",
            "answer": "\\frac{3}{4}",
            "subject": "Prealgebra",
            "level": 1,
            "unique_id": "test/prealgebra/1.json",
        },
        {
            "problem": "Solve $x^2 = 4$ for $x > 0$.",
            "solution": "$x = \\boxed{2}$",
            "answer": "2",
            "subject": "Algebra",
            "level": 2,
            "unique_id": "test/algebra/2.json",
        },
    ]
    shot, problem = load_math500(_write_jsonl(tmp_path / "m.jsonl", rows))
    assert problem.level == 2 and problem.task_id == "test/algebra/2.json"
    prompt = problem.build_prompt(shots=[shot])
    assert "\\boxed{}" in prompt and rows[0]["solution"] in prompt and prompt.endswith("Solution:\n")
    responses = {
        "test/prealgebra/1.json": ["So we get \\boxed{0.75}.", "$\\frac{6}{8}$", "\\boxed{\\frac{3}{5}}", "unsure"],
        "test/algebra/2.json": ["x = \\boxed{2}", "\\boxed{-2}"],
    }
    result = evaluate_answers("math500", [shot, problem], responses, ks=(1,))
    assert [s.passed for s in result.problems[0].samples] == [True, True, False, False]
    assert [s.passed for s in result.problems[1].samples] == [True, False]
    assert result.problems[0].samples[3].status == "no answer"
    assert result.pass_at_k[1] == pytest.approx((0.5 + 0.5) / 2)


GPQA_ROW = {
    "Question": "Which particle carries the electromagnetic force?",
    "Correct Answer": "Photon",
    "Incorrect Answer 1": "Gluon",
    "Incorrect Answer 2": "W boson",
    "Incorrect Answer 3": "Graviton",
    "Record ID": "rec123",
    "Subdomain": "Physics",
}


def test_choice_extraction():
    assert extract_choice("Reasoning... The correct answer is (C).") == "C"
    assert extract_choice("I think (A) is tempting but the correct answer is B") == "B"
    assert extract_choice("Answer: d") == "D"
    assert extract_choice("Between (A) and (B), I pick (B)") == "B"
    assert extract_choice("  C  ") == "C"
    assert extract_choice("I do not know") is None


def test_gpqa_shuffle_prompt_and_grading(tmp_path):
    rows = [GPQA_ROW, {**GPQA_ROW, "Record ID": "rec456"}]
    first, second = load_gpqa_diamond(_write_jsonl(tmp_path / "q.jsonl", rows))
    again = load_gpqa_diamond(_write_jsonl(tmp_path / "q2.jsonl", rows))
    assert again[0] == first  # seeded: the same order every time
    assert sorted(first.choices) == sorted(["Photon", "Gluon", "W boson", "Graviton"])
    assert first.choices[first.correct_index] == "Photon"
    orders = {p.choices for p in load_gpqa_diamond(str(tmp_path / "q.jsonl"), seed=1) + [first, second]}
    assert len(orders) > 1  # the order depends on the question id and the seed
    prompt = first.build_prompt()
    assert f"({first.correct_letter}) Photon" in prompt
    assert prompt.endswith('"The correct answer is (insert answer here)".')
    few_shot = second.build_prompt(shots=[first])
    assert few_shot.startswith(f"What is the correct answer to this question: {first.question}")
    assert f"The correct answer is ({first.correct_letter})\n\nWhat is the correct answer" in few_shot
    wrong = "ABCD"[(first.correct_index + 1) % 4]
    responses = {
        "rec123": [f"The correct answer is ({first.correct_letter})", f"The correct answer is ({wrong})", "?"],
        "rec456": [f"Answer: {second.correct_letter}"],
    }
    result = evaluate_answers("gpqa_diamond", [first, second], responses)
    assert [s.status for s in result.problems[0].samples] == ["correct", "wrong", "no answer"]
    assert result.pass_at_k[1] == pytest.approx((1 / 3 + 1) / 2)


def _compress(tests):
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode()


LCB_ROWS = [
    {
        "question_title": "Add two numbers",
        "question_content": "Read a and b, print a + b.",
        "platform": "atcoder",
        "question_id": "abc001_a",
        "contest_id": "abc001",
        "contest_date": "2023-05-01T00:00:00",
        "starter_code": "",
        "difficulty": "easy",
        "public_test_cases": json.dumps([{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]),
        "private_test_cases": _compress([{"input": "10 -4\n", "output": "6\n", "testtype": "stdin"}]),
        "metadata": "{}",
    },
    {
        "question_title": "Two sum",
        "question_content": "Return the indices of two numbers adding up to target.",
        "platform": "leetcode",
        "question_id": "1",
        "contest_id": "weekly-1",
        "contest_date": "2023-05-02T00:00:00",
        "starter_code": "class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n        ",
        "difficulty": "easy",
        "public_test_cases": json.dumps([{"input": "[2, 7, 11, 15]\n9", "output": "[0, 1]", "testtype": "functional"}]),
        "private_test_cases": json.dumps([{"input": "[3, 3]\n6", "output": "[0, 1]", "testtype": "functional"}]),
        "metadata": json.dumps({"func_name": "twoSum"}),
    },
]

LCB_STDIN_OK = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
LCB_TWO_SUM = (
    "```python\nclass Solution:\n    def twoSum(self, nums, target):\n        seen = {}\n"
    "        for i, x in enumerate(nums):\n            if target - x in seen:\n"
    "                return (seen[target - x], i)\n"
    "            seen[x] = i\n```"
)


def test_livecodebench_tests_decoding_and_safety():
    tests = [{"input": "1", "output": "2", "testtype": "stdin"}]
    assert _decode_tests(_compress(tests)) == tests == _decode_tests(json.dumps(tests))
    hostile = base64.b64encode(zlib.compress(pickle.dumps(print))).decode()  # would import builtins.print
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        _decode_tests(hostile)


def test_livecodebench_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv(ALLOW_ENV_VAR, "1")
    stdin_problem, functional = load_livecodebench(_write_jsonl(tmp_path / "lcb.jsonl", LCB_ROWS))
    assert len(stdin_problem.tests) == 2 and functional.func_name == "twoSum"
    assert "read the inputs from stdin" in stdin_problem.build_prompt().lower()
    assert functional.starter_code.strip() in functional.build_prompt()
    public_only = load_livecodebench(str(tmp_path / "lcb.jsonl"), include_private=False)
    assert [len(p.tests) for p in public_only] == [1, 1]
    generations = {
        "abc001_a": [
            LCB_STDIN_OK,
            "```python\na, b = map(int, input().split())\nprint(a - b)\n```",  # passes no test
            "```python\nprint(3)\n```",  # passes the public test only
            "I would add them.",  # no code
            "```python\nwhile True:\n    pass\n```",
        ],
        "1": [LCB_TWO_SUM, LCB_TWO_SUM.replace("(seen[target - x], i)", "[i, seen[target - x]]")],
    }
    result = evaluate_livecodebench(
        [stdin_problem, functional], generations, ks=(1, 2), timeout_s=1.0, isolation=sandbox_isolation()
    )
    first, second = result.problems
    assert [s.passed for s in first.samples] == [True, False, False, False, False]
    assert [s.status for s in first.samples] == ["passed", "failed", "failed", "error", "timeout"]
    assert first.samples[2].reason == "test 1: wrong output"
    assert [s.passed for s in second.samples] == [True, False]
    assert result.pass_at_k[1] == pytest.approx((1 / 5 + 1 / 2) / 2)


def test_livecodebench_hub_reads_release_files(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, *, split, **kwargs):
        calls.append((path, split, kwargs))
        return LCB_ROWS[:1]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset))
    (problem,) = load_livecodebench(release="release_v2")
    assert problem.task_id == "abc001_a"
    files = ["hf://datasets/livecodebench/code_generation_lite/test.jsonl"]
    files.append("hf://datasets/livecodebench/code_generation_lite/test2.jsonl")
    assert calls == [("json", "train", {"data_files": files})]
    with pytest.raises(ValueError, match="release_v9"):
        load_livecodebench(release="release_v9")
