"""The benchmark registry: light to import, clear errors, load + prompt + score from local files, the report."""

import json
import subprocess
import sys

import pytest

from ponderttt.eval.benchmarks.tasks import (
    BENCHMARKS,
    BenchmarkError,
    benchmark_file,
    code_benchmarks,
    load_task,
    render_benchmark_report,
    score,
)

GSM8K = [
    {"question": "Tom has 2 apples and buys 3 more. How many apples does he have?",
     "answer": "He has 2 + 3 = 5 apples.\n#### 5"},
    {"question": "A box holds 10 pens and 4 are taken out. How many pens are left?",
     "answer": "10 - 4 = 6 pens are left.\n#### 6"},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_registry_is_light_to_import():
    code = "import sys, ponderttt.eval.benchmarks.tasks\nprint(sorted(m for m in ('numpy', 'jax', 'datasets') " \
           "if m in sys.modules))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert list(BENCHMARKS) == ["humaneval", "mbpp", "classeval", "gsm8k", "math500", "gpqa_diamond",
                                "livecodebench"]
    assert code_benchmarks(["gsm8k", "humaneval", "livecodebench", "math500"]) == ["humaneval", "livecodebench"]


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(BenchmarkError, match="unknown benchmark 'humaneva'; known: humaneval, mbpp"):
        load_task("humaneva", tmp_path)
    with pytest.raises(BenchmarkError, match=r"missing benchmark file .*gsm8k\.jsonl \(or gsm8k\.json\)"):
        benchmark_file(tmp_path, "gsm8k")
    (tmp_path / "gsm8k.jsonl").write_text("")
    with pytest.raises(BenchmarkError, match=r"gsm8k\.jsonl holds no gsm8k problem"):
        load_task("gsm8k", tmp_path)
    write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K)
    with pytest.raises(BenchmarkError, match=r"shots=2: missing few-shot file .*gsm8k\.shots\.jsonl"):
        load_task("gsm8k", tmp_path, shots=2)


def test_load_prompt_and_score_from_local_files(tmp_path):
    write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K)
    write_jsonl(tmp_path / "gsm8k.shots.jsonl", GSM8K[1:])
    task = load_task("gsm8k", tmp_path)  # the default 8 shots, of which the file holds one
    assert task.shots == 1 and len(task.problems) == 2 and task.source.endswith("gsm8k.jsonl")
    assert task.prompts[0].startswith(f"Question: {GSM8K[1]['question']}\nAnswer: {GSM8K[1]['answer']}\n\n")
    assert len(load_task("gsm8k", tmp_path, max_problems=1).problems) == 1
    answers = {"0": " He has 2 + 3 = 5 apples.\n#### 5\n\nQuestion: more text 9", "1": " 10 - 4 = 7\n#### 7"}
    result = score(task, answers)
    assert [p.num_correct for p in result.problems] == [1, 0]
    assert result.extra == {"flexible": 0.5, "strict": 0.5}  # the stop string cut the trailing "9"


def test_report_has_one_row_per_benchmark_and_gate():
    row = {"benchmark": "gsm8k", "gate": "recon", "metric": "accuracy", "value": 0.5, "ci": [0.0, 1.0],
           "n_passed": 1, "n_problems": 2, "update_rate": 0.25, "generated_tokens": 40, "tokens_per_s": None,
           "seconds": 1.25, "prompts_truncated": 1,
           "vs_skip": {"difference": 0.5, "ci": [0.0, 1.0], "ci_method": "bootstrap"}}
    summary = {"run": {"name": "r", "backbone": "gpt2", "adapter": "linear", "seed": 0},
               "config": {"max_new_tokens": 24, "budget": 0.5},
               "generation": {"decoding": "greedy", "chunk_size": 8, "max_prompt_tokens": 64},
               "calibration": {"initial_threshold": 1.5, "n_chunks": 12, "chunk_size": 8},
               "results": [row, dict(row, gate="skip", vs_skip=None, prompts_truncated=0, update_rate=None)]}
    text = render_benchmark_report(summary)
    assert "| gsm8k | recon | accuracy | 0.500 [0.000, 1.000] | +0.500 [+0.000, +1.000] | 1 / 2 | 0.250 | 40 | - " \
           "| 1.2 |" in text
    assert "| gsm8k | skip | accuracy | 0.500 [0.000, 1.000] | - | 1 / 2 | - |" in text
    assert "recon threshold: starts at 1.5000" in text and "gsm8k / recon 1." in text
