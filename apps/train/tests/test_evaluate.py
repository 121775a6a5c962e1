"""The `evaluate` stage on a tiny GPT-2 with a head TTT adapter: benchmark files, scoring, gates during generation,
update rates, and the written evaluate.json / evaluate.md."""

import dataclasses
import json

import numpy as np
import pytest

from ponderttt.train.config import AdapterConfig, ConfigError, DataConfig, EvaluateCommand, EvaluateConfig, RunConfig

HUMANEVAL = [
    {"task_id": "toy/0", "prompt": 'def add(a, b):\n    """Return a plus b."""\n', "canonical_solution":
     "    return a + b\n", "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n", "entry_point": "add"},
    {"task_id": "toy/1", "prompt": 'def neg(x):\n    """Return minus x."""\n', "canonical_solution":
     "    return -x\n", "test": "def check(candidate):\n    assert candidate(4) == -4\n", "entry_point": "neg"},
    {"task_id": "toy/2", "prompt": 'def first(items):\n    """Return the first item of a list."""\n',
     "canonical_solution": "    return items[0]\n",
     "test": "def check(candidate):\n    assert candidate([7, 8]) == 7\n", "entry_point": "first"},
]
GSM8K = [
    {"question": "Tom has 2 apples and buys 3 more. How many apples does he have?",
     "answer": "He has 2 + 3 = 5 apples.\n#### 5"},
    {"question": "A box holds 10 pens and 4 are taken out. How many pens are left?",
     "answer": "10 - 4 = 6 pens are left.\n#### 6"},
]
DATA = DataConfig(vocab_size=300, seq_len=96, chunk_size=8, mini_batch_size=4, batch_size=2)
ADAPTER = AdapterConfig(num_heads=2, base_lr=30.0)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("benchmarks")
    write_jsonl(folder / "humaneval.jsonl", HUMANEVAL)
    write_jsonl(folder / "gsm8k.jsonl", GSM8K)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(tokenizer, model, mesh): a 300-token BPE, a 2-layer GPT-2 (32 wide) and a TTT-Linear head adapter whose
    output scale is 1 (a trained adapter's is non-zero; at 0 the adapter would not change the logits)."""
    import jax.numpy as jnp

    from ponderttt.data import BPEConfig, train_bpe
    from ponderttt.models import GPT2Config
    from ponderttt.train import adapter, distributed
    from ponderttt.train.backbone import build_gpt2
    from ponderttt.train.config import MeshConfig, PlatformConfig

    texts = [r["prompt"] + r["canonical_solution"] + r["test"] for r in HUMANEVAL]
    texts += [f"Question: {r['question']}\nAnswer: {r['answer']}\n" for r in GSM8K] * 3
    tok = train_bpe(texts, BPEConfig(vocab_size=DATA.vocab_size), cache_dir=tmp_path_factory.mktemp("cache"))
    mesh = distributed.make_mesh(MeshConfig())
    config = GPT2Config(vocab_size=tok.vocab_size, n_positions=DATA.seq_len, n_embd=32, n_layer=2, n_head=2)
    model = adapter.attach(build_gpt2(config, PlatformConfig(), mesh, seed=0), DATA, ADAPTER, mesh, seed=0)
    site = model.site("head")
    site.out_scale[...] = jnp.ones_like(site.out_scale[...])
    return tok, model, mesh


def command(tmp_path, bench_dir, **evaluate):
    ev = dict(benchmark_dir=str(bench_dir), benchmarks=("humaneval", "gsm8k"), gates=("skip", "update_1", "recon"),
              max_new_tokens=24, batch_size=2, budget=0.5)
    ev.update(evaluate)
    return EvaluateCommand(run=RunConfig(output_dir=str(tmp_path), name="run", progress=False), data=DATA,
                           adapter=ADAPTER, evaluate=EvaluateConfig(**ev))


# ------------------------------------------------------------------------------------------------- config, files


def test_bad_configuration_names_the_value(tmp_path, bench_dir):
    from ponderttt.train.evaluate import benchmark_file, load_task

    with pytest.raises(ConfigError, match="unknown benchmark 'humaneva'"):
        EvaluateConfig(benchmarks=("humaneva",))
    with pytest.raises(ConfigError, match="unknown gate name 'ppo'"):
        EvaluateConfig(gates=("skip", "ppo"))
    with pytest.raises(ConfigError, match=r"--evaluate.budget=1.5 is outside"):
        EvaluateConfig(budget=1.5)
    with pytest.raises(ConfigError, match="--evaluate.max-problems=0"):
        EvaluateConfig(max_problems=0)
    with pytest.raises(ConfigError, match=r"missing benchmark file .*mbpp\.jsonl"):
        benchmark_file(bench_dir, "mbpp")
    assert benchmark_file(bench_dir, "gsm8k") == bench_dir / "gsm8k.jsonl"
    with pytest.raises(ConfigError, match=r"--evaluate.shots=2: missing few-shot file .*gsm8k\.shots\.jsonl"):
        load_task("gsm8k", bench_dir, shots=2)


def test_load_task_prompts_shots_and_limit(tmp_path):
    from ponderttt.train.evaluate import load_task

    write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K)
    task = load_task("gsm8k", tmp_path, max_problems=1)
    assert task.shots == 0 and len(task.problems) == 1 and task.prompts[0].endswith("How many apples does he have?\n"
                                                                                    "Answer:")
    write_jsonl(tmp_path / "gsm8k.shots.jsonl", GSM8K[1:])
    task = load_task("gsm8k", tmp_path)  # the usual 8 shots, of which the file has one
    assert task.shots == 1 and len(task.problems) == 2
    assert task.prompts[0].startswith(f"Question: {GSM8K[1]['question']}\nAnswer: {GSM8K[1]['answer']}\n\n")


def test_code_benchmarks_need_consent(monkeypatch):
    from ponderttt.train.evaluate import require_code_consent

    monkeypatch.delenv("PONDER_TTT_ALLOW_UNSAFE_BENCHMARKS", raising=False)
    require_code_consent(["gsm8k", "math500"])  # answer-graded: nothing runs
    with pytest.raises(ConfigError, match="humaneval run model-written code.*PONDER_TTT_ALLOW_UNSAFE_BENCHMARKS=1"):
        require_code_consent(["humaneval", "gsm8k"])


def test_code_benchmarks_refuse_a_sandbox_this_machine_cannot_give(monkeypatch):
    from ponderttt.eval import execution
    from ponderttt.train.config import EvaluateConfig
    from ponderttt.train.evaluate import require_code_consent

    monkeypatch.setenv("PONDER_TTT_ALLOW_UNSAFE_BENCHMARKS", "1")
    monkeypatch.setattr(execution, "_missing_for_full", lambda: "no usable cgroups: none mounted")
    monkeypatch.setattr(execution, "_missing_for_namespace", lambda: "")
    with pytest.raises(ConfigError, match=r"^--evaluate.isolation=full: .*humaneval .*\(no usable cgroups: none "
                                          r"mounted\); pass --evaluate.isolation namespace or process"):
        require_code_consent(["humaneval", "gsm8k"], EvaluateConfig().isolation)
    require_code_consent(["humaneval"], "namespace")  # a weaker mode named explicitly runs
    require_code_consent(["gsm8k"])  # answer-graded: nothing runs, nothing to refuse


# ------------------------------------------------------------------------------------------------- scoring


def test_scoring_canonical_solutions_pass_and_wrong_ones_fail(bench_dir, monkeypatch):
    from ponderttt.train.evaluate import load_task, score

    monkeypatch.setenv("PONDER_TTT_ALLOW_UNSAFE_BENCHMARKS", "1")
    from ponderttt.eval.execution import sandbox_isolation

    task = load_task("humaneval", bench_dir)
    canonical = {r["task_id"]: r["canonical_solution"] for r in HUMANEVAL}
    assert score(task, canonical, isolation=sandbox_isolation()).pass_at_k[1] == 1.0
    # text after a stop string ("\ndef") is cut before grading; a wrong body fails
    mixed = dict(canonical, **{"toy/0": "    return a + b\ndef broken(:\n", "toy/1": "    return x\n"})
    result = score(task, mixed, isolation=sandbox_isolation())
    assert [p.num_correct for p in result.problems] == [1, 0, 1]
    assert result.pass_at_k[1] == pytest.approx(2 / 3)

    task = load_task("gsm8k", bench_dir)
    answers = {"0": " He has 2 + 3 = 5 apples.\n#### 5\n\nQuestion: more text 9", "1": " 10 - 4 = 7\n#### 7"}
    result = score(task, answers)
    assert [p.num_correct for p in result.problems] == [1, 0]
    assert result.extra == {"flexible": 0.5, "strict": 0.5}  # the stop string cut the trailing "9"


# ------------------------------------------------------------------------------------------------- generation


def context(index, tokens, probe, active=None):
    from ponderttt.models.generate import GateContext

    active = None if active is None else np.asarray(active, bool)
    return GateContext(index, np.asarray(tokens), None, np.asarray(probe, np.float32), None, active=active)


def test_gate_runner_counts_live_sequences_only():
    """Filler rows and rows that generation reports stopped (`active`) get λ = 0 and are not counted."""
    from ponderttt.train.evaluate import gate_runner

    runner = gate_runner("update_1", budget=1.0)
    runner.start_batch(np.array([True, True, False]))
    assert runner(context(-1, [[0], [0], [0]], [1, 1, 1])).tolist() == [1, 1, 0]  # the prompt chunk
    assert runner(context(0, [[0] * 4] * 3, [1, 1, 1], active=[True, False, True])).tolist() == [1, 0, 0]
    assert runner(context(1, [[0] * 4] * 3, [1, 1, 1], active=[False, False, True])).tolist() == [0, 0, 0]
    assert (runner.decisions, runner.updates, runner.update_rate) == (3, 3, 1.0)
    assert [r["decisions"] for r in runner.rows] == [2, 1, 0] and [r["updates"] for r in runner.rows] == [2, 1, 0]
    skip = gate_runner("skip", budget=0.5)
    skip.start_batch(np.array([True, True]))
    assert skip(context(-1, [[0], [0]], [9, 9])).tolist() == [0, 0] and skip.update_rate == 0.0
    with pytest.raises(ValueError, match="unknown generation gate 'ppo'"):
        gate_runner("ppo", budget=0.5)


def test_recon_runner_updates_above_the_calibrated_threshold():
    from ponderttt.train.evaluate import gate_runner

    runner = gate_runner("recon", budget=0.5, calibration_signal=np.array([0.0, 1.0, 2.0, 3.0]))
    runner.start_batch(np.array([True, True, True]))
    assert runner(context(-1, [[0]] * 3, [0.5, 2.5, 1.4])).tolist() == [0, 1, 0]  # τ starts at the median 1.5
    assert runner.update_rate == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="calibration_signal"):
        gate_runner("recon", budget=0.5)


class RecordingGate:
    """A gate that records the signals it is shown and defers to another."""

    def __init__(self, gate):
        self.gate, self.kind, self.causal, self.seen = gate, gate.kind, gate.causal, []

    def init_state(self, batch_size):
        return self.gate.init_state(batch_size)

    def __call__(self, inputs, state, key=None, *, train=False):
        self.seen.append(np.asarray(inputs.signal))
        return self.gate(inputs, state, key, train=train)


def greedy_without_updates(model, ids, steps):
    """Greedy decoding by full forward passes with λ = 0 (the adapter keeps its initial fast weights)."""
    import jax.numpy as jnp
    from flax import nnx

    from ponderttt.models import TTTControl

    forward = nnx.jit(lambda m, x: m(x, ttt=TTTControl(scale=0.0, chunk_size=x.shape[1])).logits)
    buffer = np.zeros((1, -(-(len(ids) + steps) // DATA.chunk_size) * DATA.chunk_size), np.int32)
    buffer[0, :len(ids)] = ids
    out = []
    for step in range(steps):
        token = int(np.argmax(np.asarray(forward(model, jnp.asarray(buffer))[0, len(ids) + step - 1])))
        buffer[0, len(ids) + step] = token
        out.append(token)
    return out


@pytest.mark.slow
def test_gates_during_generation(tiny, bench_dir):
    from ponderttt.models.generate import GenerationConfig, generate
    from ponderttt.train.evaluate import gate_runner, generate_completions, load_task, padded_length

    tok, model, _ = tiny
    prompts = load_task("humaneval", bench_dir).prompts
    kwargs = dict(chunk_size=DATA.chunk_size, max_new_tokens=24, batch_size=2)
    runs = {}
    for method in ("skip", "update_1"):
        runner = gate_runner(method, budget=0.5)
        runs[method] = (runner, generate_completions(model, tok, prompts, runner, **kwargs))
    skip, update = runs["skip"], runs["update_1"]
    assert skip[0].update_rate == 0.0 and update[0].update_rate == 1.0
    for runner, completions in runs.values():
        # one decision per live sequence and chunk: the prompt, then each full generated chunk before its stop
        for c in completions:
            assert c.decisions == 1 + (c.tokens - 1) // DATA.chunk_size and 1 <= c.tokens <= 24
        assert runner.decisions == sum(c.decisions for c in completions)
    # λ = 0 keeps the fast weights: the same tokens as decoding (unpadded, alone) with an adapter that never updates
    reference = greedy_without_updates(model, tok.encode(prompts[0]), skip[1][0].tokens)
    assert tok.decode(reference) == skip[1][0].text
    # update_1 is generate's default (λ = 1 on every chunk); the other row of a batch does not change a completion
    encoded = [tok.encode(p) for p in prompts]
    length = padded_length(max(map(len, encoded)), DATA.chunk_size, 72)
    ids = np.full((2, length), tok.pad_id, np.int32)
    ids[:, length - len(encoded[1]):] = encoded[1]
    result = generate(model, ids, (ids != tok.pad_id) | (np.arange(length) >= length - len(encoded[1])),
                      GenerationConfig(max_new_tokens=24, eos_token_id=tok.eod_id, pad_token_id=tok.pad_id),
                      ttt_chunk_size=DATA.chunk_size)
    alone = result.tokens[0, :result.lengths[0]].tolist()
    alone = alone[:alone.index(tok.eod_id)] if tok.eod_id in alone else alone
    assert tok.decode(alone) == update[1][1].text


def test_recon_gate_tracks_its_budget(tiny, bench_dir):
    from ponderttt.gating import make_gate
    from ponderttt.gating.generation import GenerationGate
    from ponderttt.train.evaluate import gate_runner, generate_completions, load_task

    tok, model, _ = tiny
    prompts = load_task("humaneval", bench_dir).prompts * 4
    recording = RecordingGate(make_gate("fixed:update_1"))
    generate_completions(model, tok, prompts[:4], GenerationGate(recording), chunk_size=DATA.chunk_size,
                         max_new_tokens=24, batch_size=2)
    runner = gate_runner("recon", budget=0.5, calibration_signal=np.concatenate(recording.seen))
    completions = generate_completions(model, tok, prompts, runner, chunk_size=DATA.chunk_size, max_new_tokens=24,
                                       batch_size=2)
    assert runner.decisions >= 30
    # the online tracker holds the realised rate near the budget (tolerance: 0.15 on this many decisions)
    assert abs(runner.update_rate - 0.5) <= 0.15, runner.update_rate
    assert runner.updates == sum(c.updates for c in completions)
    # random: seeded Bernoulli(budget) per live sequence and chunk, within 3 standard deviations of the budget
    runner = gate_runner("random", budget=0.25, seed=0)
    generate_completions(model, tok, prompts, runner, chunk_size=DATA.chunk_size, max_new_tokens=24, batch_size=2)
    assert abs(runner.update_rate - 0.25) <= 3 * (0.25 * 0.75 / runner.decisions) ** 0.5, runner.update_rate


# ------------------------------------------------------------------------------------------------- the stage


@pytest.mark.slow
def test_run_evaluate_writes_json_and_markdown(tiny, bench_dir, tmp_path, monkeypatch, capsys):
    from ponderttt.train.evaluate import run_evaluate
    from ponderttt.train.rundir import RunDir

    monkeypatch.setenv("PONDER_TTT_ALLOW_UNSAFE_BENCHMARKS", "1")
    tok, model, mesh = tiny
    config = command(tmp_path, bench_dir)
    run_dir = RunDir(tmp_path / "run")
    calibration = np.linspace(0.5, 1.5, 64)
    summary = run_evaluate(config, run_dir, mesh, tok, model, calibration=calibration)
    written = json.loads((run_dir.root / "evaluate.json").read_text())
    assert written == json.loads(json.dumps(summary))
    results = written["results"]
    assert [(r["benchmark"], r["gate"]) for r in results] == [
        (b, g) for b in ("humaneval", "gsm8k") for g in ("skip", "update_1", "recon")]
    for r in results:
        assert r["n_problems"] == {"humaneval": 3, "gsm8k": 2}[r["benchmark"]]
        assert r["metric"] == {"humaneval": "pass@1", "gsm8k": "accuracy"}[r["benchmark"]]
        assert 0.0 <= r["value"] <= 1.0 and r["value"] == r["n_passed"] / r["n_problems"]
        assert 0 < r["generated_tokens"] <= 24 * r["n_problems"] and r["seconds"] > 0
        assert r["budget"] == (0.5 if r["gate"] == "recon" else None)
        assert r["update_rate"] == {"skip": 0.0, "update_1": 1.0}.get(r["gate"], r["update_rate"])
        assert 0.0 <= r["update_rate"] <= 1.0 and r["decisions"] >= r["n_problems"]
        assert r["ci"][0] <= r["value"] <= r["ci"][1]
    by = {(r["benchmark"], r["gate"]): r for r in results}
    for (benchmark, gate), r in by.items():  # every gate is paired with skip on the same problems
        if gate != "skip":
            skip = by[(benchmark, "skip")]["value"]
            assert r["vs_skip"]["difference"] == pytest.approx(r["value"] - skip)
    assert written["calibration"]["n_chunks"] == 64
    assert written["calibration"]["initial_threshold"] == pytest.approx(1.0)
    assert written["config"]["gates"] == ["skip", "update_1", "recon"]
    samples = [json.loads(line) for line in (run_dir.root / "evaluate_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * (3 + 2)
    table = (run_dir.root / "evaluate.md").read_text()
    assert table.count("| humaneval |") == 3 and table.count("| gsm8k |") == 3
    assert "evaluate.json" in capsys.readouterr().out


def test_run_evaluate_checks_files_before_generating(tiny, bench_dir, tmp_path):
    from ponderttt.train.evaluate import run_evaluate
    from ponderttt.train.rundir import RunDir

    tok, model, mesh = tiny
    config = command(tmp_path, bench_dir, benchmarks=("gsm8k", "math500"))
    with pytest.raises(ConfigError, match=r"missing benchmark file .*math500\.jsonl"):
        run_evaluate(config, RunDir(tmp_path / "run"), mesh, tok, model)
    config = dataclasses.replace(config, evaluate=dataclasses.replace(config.evaluate, benchmark_dir=None))
    with pytest.raises(ConfigError, match="--evaluate.benchmark-dir"):
        run_evaluate(config, RunDir(tmp_path / "run"), mesh, tok, model)
    assert not (tmp_path / "run" / "evaluate.json").exists()


@pytest.mark.slow
def test_recon_calibrates_on_the_validation_split(tiny, bench_dir, tmp_path):
    """Without a given calibration the recon gate starts from the probe losses of the run's validation chunks."""
    from ponderttt.train.backbone import EVAL_BATCHES
    from ponderttt.train.evaluate import run_evaluate
    from ponderttt.train.rundir import RunDir

    tok, model, mesh = tiny
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):  # distinct small modules; the split by file hash puts about a third in validation
        body = "".join(f"def f{i}_{j}(x):\n    return x * {i} + {j}\n\n" for j in range(12))
        (corpus / f"m{i}.py").write_text(body)
    data = dataclasses.replace(DATA, corpus=str(corpus), val_fraction=0.3, test_fraction=0.3)
    config = dataclasses.replace(command(tmp_path, bench_dir, benchmarks=("gsm8k",), gates=("recon",)), data=data)
    summary = run_evaluate(config, RunDir(tmp_path / "run"), mesh, tok, model)
    calibration = summary["calibration"]
    assert calibration["n_chunks"] == EVAL_BATCHES * DATA.batch_size * DATA.chunks_per_sequence
    assert np.isfinite(calibration["initial_threshold"]) and calibration["initial_threshold"] > 0
    (record,) = summary["results"]
    assert record["gate"] == "recon" and record["decisions"] >= 2 and 0 <= record["update_rate"] <= 1
