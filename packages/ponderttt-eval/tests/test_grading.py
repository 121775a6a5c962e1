"""Grading nobody can fake: cheating completions against HumanEval, MBPP, ClassEval and LiveCodeBench harnesses.

Every cheat below was graded "passed" by a harness that trusted the program's exit status (issue #18). Each runs in
the sandbox it attacks, with small limits; an honest completion of the same task passes in the same batch, so a
harness that failed everything would fail these tests too.
"""

import json

import pytest

from ponderttt.eval import execution
from ponderttt.eval._harness import NotPlainData, ProgramError, decode, encode, free_names
from ponderttt.eval.benchmarks import (
    ClassEvalProblem,
    HumanEvalProblem,
    LiveCodeBenchProblem,
    LiveCodeBenchTest,
    MBPPProblem,
    evaluate_code,
    evaluate_livecodebench,
)
from ponderttt.eval.grading import Harness, graded_status

SANDBOX = {"isolation": execution.sandbox_isolation()}


@pytest.fixture(autouse=True)
def _allow(monkeypatch):
    monkeypatch.setenv(execution.ALLOW_ENV_VAR, "1")


ADD = HumanEvalProblem(
    task_id="add",
    prompt='def add(a, b):\n    """Sum of a and b."""\n',
    test="def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    entry_point="add",
)

# A completion that returns the wrong value, then tries to get away with it.
HUMANEVAL_CHEATS = {
    "os._exit in the body": "    import os\n    os._exit(0)\n",
    "sys.exit in the body": "    import sys\n    sys.exit(0)\n",
    "raise SystemExit": "    raise SystemExit(0)\n",
    "exit at top level": "    return 0\nimport os\nos._exit(0)\n",
    "exit in an assignment": "    return 0\n_ = __import__('os')._exit(0)\n",
    "exit in a default argument": "    def g(x=__import__('sys').exit(0)):\n        pass\n    return 0\n",
    "exit in a class body": "    class C:\n        __import__('os')._exit(0)\n    return 0\n",
    "patched os._exit": "    return 0\nimport os\n_real = os._exit\nos._exit = lambda code: _real(0)\n",
    "patched sys.exit and excepthook": (
        "    return 0\nimport sys\nsys.exit = lambda *a: None\nsys.excepthook = lambda *a: None\n"
    ),
    "atexit forces status 0": "    return 0\nimport atexit, os\natexit.register(lambda: os._exit(0))\n",
    "always-equal object": (
        "    class Equal:\n        def __eq__(self, other):\n            return True\n"
        "        def __ne__(self, other):\n            return False\n    return Equal()\n"
    ),
    "always-equal int subclass": (
        "    class I(int):\n        def __eq__(self, other):\n            return True\n    return I(0)\n"
    ),
    "patched unittest": (
        "    return 0\nimport unittest\nunittest.TestResult.wasSuccessful = lambda self: True\n"
        "unittest.TestCase.assertEqual = lambda *a, **k: None\n"
    ),
    "kills the harness": (
        "    import ctypes, os\n    ctypes.CDLL(None).kill(os.getppid(), 9)\n    ctypes.CDLL(None).kill(1, 9)\n"
        "    return 0\n"
    ),
    "writes a verdict to the harness's descriptors": (
        "    import os\n"
        "    for base in ('/proc/%d/fd' % os.getppid(), '/proc/1/fd', '/proc/self/fd'):\n"
        "        try:\n"
        "            names = os.listdir(base)\n"
        "        except OSError:\n"
        "            continue\n"
        "        for name in names:\n"
        "            try:\n"
        "                fd = os.open(base + '/' + name, os.O_WRONLY)\n"
        "                os.write(fd, b'{\"passed\": true, \"reason\": \"forged\"}')\n"
        "            except OSError:\n"
        "                pass\n"
        "    return 0\n"
    ),
    "daemon thread exits later": (
        "    import threading, time, os\n"
        "    threading.Thread(target=lambda: (time.sleep(0.05), os._exit(0)), daemon=True).start()\n"
        "    time.sleep(1)\n    return 0\n"
    ),
}


def test_every_humaneval_cheat_fails_and_the_honest_completion_passes():
    names = list(HUMANEVAL_CHEATS)
    completions = ["    return a + b\n", *HUMANEVAL_CHEATS.values()]
    result = evaluate_code("humaneval", [ADD], {"add": completions}, postprocess=False, timeout_s=3.0, **SANDBOX)
    samples = result.problems[0].samples
    assert samples[0].status == "passed", samples[0].reason
    passed = {name: s.reason for name, s in zip(names, samples[1:], strict=True) if s.passed}
    assert passed == {}, f"cheats graded as passed: {passed}"
    assert all(s.status in ("failed", "error", "timeout") for s in samples[1:])


def test_secret_expected_values_are_not_in_the_programs_memory():
    """The tests (and so the expected values) reach the harness only after the fork: the program scans all of its
    own memory for them and finds nothing to return."""
    secret = HumanEvalProblem(
        task_id="secret",
        prompt="def answer():\n",
        test="def check(candidate):\n    assert candidate() == 'SECRET-' + '7f3a9c'\n",
        entry_point="answer",
    )
    scan = (
        "    import re\n"
        "    found = set()\n"
        "    with open('/proc/self/maps') as maps, open('/proc/self/mem', 'rb', 0) as mem:\n"
        "        for line in maps:\n"
        "            span, perms = line.split()[:2]\n"
        "            if not perms.startswith('r'):\n"
        "                continue\n"
        "            start, end = (int(x, 16) for x in span.split('-'))\n"
        "            for at in range(start, end, 1 << 20):\n"
        "                try:\n"
        "                    mem.seek(at)\n"
        "                    chunk = mem.read(min((1 << 20) + 64, end - at))\n"
        "                except (OSError, OverflowError, ValueError):\n"
        "                    break\n"
        "                found.update(re.findall(rb\"SECRET-' \\+ '([0-9a-f]{6})\", chunk))\n"
        "    return 'SECRET-' + found.pop().decode() if found else 'nothing'\n"
    )
    # Control: the same scan finds the secret once it is in the program's memory (built at run time here).
    hint = "    hint = (\"SECRET-' + \" + \"'7f3a9c\").encode()\n"
    control = scan.replace("    found = set()\n", hint + "    found = set()\n")
    generations = {"secret": ["    return 'SECRET-7f3a9c'\n", scan, control]}
    result = evaluate_code("humaneval", [secret], generations, postprocess=False, **SANDBOX)
    honest, cheat, found = result.problems[0].samples
    assert honest.passed and found.passed, (honest.reason, found.reason)
    assert not cheat.passed and cheat.status == "failed"


def test_prompt_helpers_run_in_the_harness_and_the_program_cannot_replace_them():
    """HumanEval/32-style: the check calls a helper of the prompt. The harness defines it from the (trusted) prompt,
    so a program that redefines the helper to always return 0 gains nothing."""
    problem = HumanEvalProblem(
        task_id="root",
        prompt=(
            "def poly(xs, x):\n    return sum(c * x**i for i, c in enumerate(xs))\n\n\n"
            'def find_zero(xs):\n    """A zero of the polynomial xs."""\n'
        ),
        test="def check(candidate):\n    assert abs(poly([-2.0, 1.0], candidate([-2.0, 1.0]))) < 1e-6\n",
        entry_point="find_zero",
    )
    honest = "    return -xs[0] / xs[1]\n"
    cheat = "    return 0.0\n\n\ndef poly(xs, x):\n    return 0.0\n"
    result = evaluate_code("humaneval", [problem], {"root": [honest, cheat]}, postprocess=False, **SANDBOX)
    assert [s.passed for s in result.problems[0].samples] == [True, False]


def test_mbpp_patched_standard_modules_do_not_reach_the_tests():
    problem = MBPPProblem(
        task_id="1",
        text="Area of a circle.",
        test_list=("assert math.isclose(area(1.0), 3.14159, rel_tol=1e-3)",),
    )
    honest = "import math\ndef area(r):\n    return math.pi * r * r\n"
    cheat = "import math\nmath.isclose = lambda *a, **k: True\ndef area(r):\n    return 0.0\n"
    result = evaluate_code("mbpp", [problem], {"1": [honest, cheat]}, postprocess=False, **SANDBOX)
    assert [s.passed for s in result.problems[0].samples] == [True, False]
    assert "AssertionError" in result.problems[0].samples[1].reason


COUNTER_TESTS = """import unittest


class CounterTest(unittest.TestCase):
    def test_increment(self):
        c = Counter()
        c.increment()
        self.assertEqual(c.value, 1)

    def test_error(self):
        with self.assertRaises(ValueError):
            Counter().add(-1)
"""


def test_classeval_cheats_fail_and_builtin_exceptions_cross():
    problem = ClassEvalProblem(
        task_id="c",
        class_name="Counter",
        skeleton="class Counter:\n    pass\n",
        test=COUNTER_TESTS,
        test_classes=("CounterTest",),
    )
    honest = (
        "class Counter:\n    def __init__(self):\n        self.value = 0\n\n    def increment(self):\n"
        "        self.value += 1\n\n    def add(self, n):\n        if n < 0:\n            raise ValueError(n)\n"
        "        self.value += n\n"
    )
    cheats = [
        # The old runner's result line, printed by the program, and a forced exit status 0.
        "import os\nprint('PONDERTTT_CLASSEVAL_RESULT ' + '{\"CounterTest\": true}', flush=True)\nos._exit(0)\n",
        "import unittest\nunittest.TestResult.wasSuccessful = lambda self: True\n"
        "unittest.TestCase.assertEqual = lambda *a, **k: None\nclass Counter:\n    value = 0\n"
        "    def increment(self):\n        pass\n    def add(self, n):\n        raise ValueError(n)\n",
        # Exits inside a method that an assertRaises(...) wraps: an exit is not an exception of the program.
        "class Counter:\n    def __init__(self):\n        self.value = 0\n    def increment(self):\n"
        "        self.value += 1\n    def add(self, n):\n        import os\n        os._exit(0)\n",
        # Attributes that compare equal to everything.
        "class Anything:\n    def __eq__(self, other):\n        return True\nclass Counter:\n"
        "    value = Anything()\n    def increment(self):\n        pass\n    def add(self, n):\n"
        "        raise ValueError(n)\n",
    ]
    result = evaluate_code("classeval", [problem], {"c": [honest, *cheats]}, postprocess=False, **SANDBOX)
    samples = result.problems[0].samples
    assert samples[0].passed and dict(samples[0].details) == {"CounterTest": True}
    assert [s.passed for s in samples[1:]] == [False] * len(cheats)
    assert all(dict(s.details) == {"CounterTest": False} for s in samples[1:])


def test_livecodebench_functional_cheat_fails():
    problem = LiveCodeBenchProblem(
        task_id="two",
        title="Double",
        content="Return twice n.",
        tests=(LiveCodeBenchTest("3", "6", "functional"),),
        starter_code="class Solution:\n    def double(self, n: int) -> int:\n        ",
        func_name="double",
    )
    honest = "```python\nclass Solution:\n    def double(self, n):\n        return 2 * n\n```"
    exit_early = "```python\nimport sys\nclass Solution:\n    def double(self, n):\n        sys.exit(0)\n```"
    equal = (
        "```python\nclass E:\n    def __eq__(self, o):\n        return True\nclass Solution:\n"
        "    def double(self, n):\n        return E()\n```"
    )
    result = evaluate_livecodebench([problem], {"two": [honest, exit_early, equal]}, **SANDBOX)
    assert [s.passed for s in result.problems[0].samples] == [True, False, False]


def test_memory_and_time_of_a_graded_program_are_reported_as_such():
    slow = "    while True:\n        pass\n"
    hog = "    x = bytearray(1 << 40)\n"
    result = evaluate_code("humaneval", [ADD], {"add": [slow, hog]}, postprocess=False, timeout_s=1.0, **SANDBOX)
    assert [s.status for s in result.problems[0].samples] == ["timeout", "memory"]


# ---------------------------------------------------------------------------------------------------------------
# the pieces


def test_plain_data_round_trip_is_exact():
    value = [1, True, 2.5, float("inf"), -0.0, "é\ud800", b"\x00\xff", 3 + 4j, (1, (2,)), {1: {"a": None}}, {1, 2}]
    value.append(frozenset({(1, 2)}))
    back = decode(json.loads(json.dumps(encode(value))), object_of=None)
    assert back == value
    assert [type(x) for x in back] == [type(x) for x in value]
    assert type(back[4]) is float and str(back[4]) == "-0.0"


def test_non_plain_data_is_a_handle_or_refused():
    class Sub(int):
        pass

    handles = []

    def handle_of(obj):
        handles.append(obj)
        return {"h": len(handles), "type": type(obj).__name__}

    assert encode([Sub(1), 2], handle_of) == {"l": [{"h": 1, "type": "Sub"}, 2]}
    with pytest.raises(NotPlainData, match="lambda|function"):
        encode(lambda: 0)
    for bad in ({"x": 1}, {"l": 1}, {"d": [[1]]}, {"c": ["a", 1]}, {"l": [], "t": []}):
        with pytest.raises(ProgramError, match="malformed"):
            decode(bad, object_of=None)


def test_free_names_are_what_the_tests_need_from_elsewhere():
    import ast

    tree = ast.parse(
        "import json\nfrom os import path as p\ndef check(candidate):\n    assert candidate(x) == helper(1)\n"
        "for i in range(3):\n    y = [j for j in Thing(i)]\nmath.sqrt(2)\n"
    )
    assert free_names(tree) == {"x", "helper", "Thing", "math"}


def test_graded_status_needs_a_verdict_to_pass():
    def exit_zero():
        return "passed", "exit status 0"

    def program_exit(code):
        return ("memory", "MemoryError") if code == 113 else ("failed", f"exit status {code}")

    assert graded_status(b"", exit_zero, program_exit)[:2] == ("failed", "no verdict from the test harness (the "
                                                               "tests did not finish)")
    assert graded_status(b'{"passed": "yes"}', exit_zero, program_exit)[0] == "failed"
    assert graded_status(b'{"passed": true, "reason": "ok"}', exit_zero, program_exit)[0] == "passed"
    assert graded_status(b'{"passed": false, "program_exit": 113}', exit_zero, program_exit)[0] == "memory"
    assert graded_status(b'{"passed": false, "harness_error": true}', exit_zero, program_exit)[0] == "error"
    assert graded_status(b"", lambda: ("timeout", "wall clock"), program_exit)[0] == "timeout"


def test_harness_spec_keeps_tests_out_of_the_command_line():
    spec = Harness(tests="assert f() == 'SECRET'", preamble="import math", remote=("f",)).spec()
    assert "SECRET" not in json.dumps(spec) and spec == {"preamble": "import math", "remote": ["f"]}


def test_hedged_answers_to_reasoning_questions_are_wrong():
    """An answer checker takes one answer per response: listing every option, several boxed values or several
    "####" lines never counts as the right one."""
    from ponderttt.eval.benchmarks.reasoning import GPQAProblem, GSM8KProblem, Math500Problem

    gpqa = GPQAProblem("q", "Which?", ("w", "x", "y", "z"), correct_index=1)
    assert gpqa.grade("The correct answer is (B)").passed
    hedges = ("The correct answer is (B) or (C)", "Answer: B, C", "(A) (B) (C) (D)")
    hedges += ("The correct answer is (B). Answer: C",)
    for hedge in hedges:
        assert not gpqa.grade(hedge).passed, hedge
    gsm = GSM8KProblem("g", "How many?", "2 + 3 = 5\n#### 5")
    assert gsm.grade("so 5.\n#### 5").passed
    assert not gsm.grade("#### 4\n#### 5").passed
    math500 = Math500Problem("m", "x?", "2")
    assert math500.grade("\\boxed{2}").passed
    for hedge in ("\\boxed{1} \\boxed{2}", "\\boxed{1, 2, 3}", "\\boxed{2 \\text{ or } 3}", "$2$ or $3$"):
        assert not math500.grade(hedge).passed, hedge
