"""The real `ttt` command (pretrain + adapter) as processes: SIGKILL then `--resume` reproduces an uninterrupted
run bit-identically, and 2 processes on localhost (gloo) match 1 process with the same global batch.

The processes share a JAX persistent compilation cache (the same executables, compiled once) and the reference
run's tokenizer, so the later runs spend their time on what is tested rather than on compiling and BPE training.
"""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from ponderttt.train.metrics import without_clock

APP = pathlib.Path(__file__).resolve().parents[1] / "apps" / "train"
# `ttt --preset smoke`, shrunk: 10 pretrain and 12 adapter steps, checkpoints every 4 (keep 2), a metric line
# every step, a held-out evaluation at steps 6 and 12 (its first compilation is the window a test kills in).
FLAGS = ["--preset", "smoke", "--backbone.pretrain-steps", "10", "--adapter.train-steps", "12",
         "--checkpoint-every", "4", "--eval-every", "6", "--data.max-files", "20", "--log-every", "1", "--no-progress"]
TIMEOUT = 300


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("jax-cache")


def app(compile_cache: pathlib.Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, COLUMNS="250", JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(compile_cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    return subprocess.Popen([sys.executable, str(APP), "ttt", *FLAGS, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, out + err[-4000:]
    return out


def records(run: pathlib.Path) -> list[dict]:
    """metrics.jsonl without the wall-clock time."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [without_clock(json.loads(line)) for line in lines]


def steps(folder: pathlib.Path) -> list[int]:
    """Finished checkpoint steps (Orbax renames a step's temporary directory to its number when complete)."""
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def arrays(folder: pathlib.Path) -> dict[str, np.ndarray]:
    """The arrays of a saved state item as host numpy arrays (whatever processes wrote them), by tree path."""
    import jax
    import orbax.checkpoint as ocp

    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(folder.absolute())
    tree = getattr(tree, "item_metadata", tree)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), getattr(tree, "tree", tree))
    restored = checkpointer.restore(folder.absolute(), args=ocp.args.PyTreeRestore(restore_args=args))
    return {jax.tree_util.keystr(path): x for path, x in jax.tree_util.tree_flatten_with_path(restored)[0]}


def identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)


def backbone_cache(output_dir: pathlib.Path) -> pathlib.Path:
    (folder,) = (output_dir / "cache").glob("backbone-*")
    return folder


def with_tokenizer(output_dir: pathlib.Path, reference: pathlib.Path) -> pathlib.Path:
    """A fresh output directory that shares only the reference's cached tokenizer (the backbone is pretrained)."""
    shutil.copytree(reference.parent / "cache" / "tokenizers", output_dir / "cache" / "tokenizers")
    return output_dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory, compile_cache) -> pathlib.Path:
    """One uninterrupted single-process run, shared by the tests."""
    output_dir = tmp_path_factory.mktemp("reference")
    finish(app(compile_cache, "--output-dir", str(output_dir), "--name", "ref"))
    return output_dir / "ref"


def logged_steps(run: pathlib.Path, stage: str) -> list[int]:
    """Steps of `stage` in metrics.jsonl so far (a line being written is skipped)."""
    path = run / "metrics.jsonl"
    found = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("stage") == stage:
            found.append(record["step"])
    return found


def kill_after(proc: subprocess.Popen, run: pathlib.Path, stage: str, checkpoint: int, logged: int
               ) -> tuple[list[int], list[int]]:
    """Stops `proc` (SIGSTOP) once `stage` has finished checkpoint `checkpoint` and logged step `logged` after it,
    notes its finished checkpoints and logged steps, then SIGKILLs it; returns those two lists."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        assert time.monotonic() < deadline, f"{stage} never reached step {logged}"
        if checkpoint in steps(run / "checkpoints" / stage) and logged in logged_steps(run, stage):
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGSTOP)
    state = steps(run / "checkpoints" / stage), logged_steps(run, stage)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return state


@pytest.mark.slow
def test_sigkill_in_pretrain_and_in_the_adapter_stage_then_resume_matches_an_uninterrupted_run(tmp_path, reference,
                                                                                              compile_cache):
    output_dir = with_tokenizer(tmp_path, reference)
    run = output_dir / "killed"
    common = ("--output-dir", str(output_dir), "--name", "killed")

    # Killed between checkpoints: after step 4's and normally during the first evaluation (step 6), so the run
    # leaves metric lines past its last checkpoint that the resumed run must replace.
    saved, logged = kill_after(app(compile_cache, *common), run, "pretrain", checkpoint=4, logged=5)
    assert saved[-1] in (4, 8) and logged[-1] >= 5 and logged == list(range(1, logged[-1] + 1)), (saved, logged)
    assert not any(steps(folder) for folder in (output_dir / "cache").glob("backbone-*"))  # nothing half cached

    saved, logged = kill_after(app(compile_cache, *common, "--resume"), run, "ttt", checkpoint=4, logged=5)
    assert saved[-1] in (4, 8) and logged[-1] >= 5, (saved, logged)
    assert not (run / "adapter").exists()  # the export happens only when the stage is complete

    out = finish(app(compile_cache, *common, "--resume"))
    assert "backbone: reused the cached in-house GPT-2" in out  # pretrain finished (and was cached) by the 2nd run

    expected = records(reference)
    assert [(r["stage"], r["step"]) for r in expected] == [("pretrain", s) for s in range(1, 11)] + [
        ("ttt", s) for s in range(1, 13)]
    assert records(run) == expected  # every logged value, bit-identical, with no line missing or repeated
    assert identical(arrays(run / "adapter" / "12" / "state"), arrays(reference / "adapter" / "12" / "state"))
    assert identical(arrays(backbone_cache(output_dir) / "10" / "state"),
                     arrays(backbone_cache(reference.parent) / "10" / "state"))
    for stage in ("pretrain", "ttt"):
        assert steps(run / "checkpoints" / stage) == steps(reference / "checkpoints" / stage)


def test_resume_and_every_process_hash_like_the_run():
    """`--resume` checks the flags by config hash: what only says where to resume or which process this is
    must not count, what changes the computation must."""
    import dataclasses

    from ponderttt.train.config import preset
    from ponderttt.train.rundir import config_hash

    config = preset("ttt", "smoke")
    run, platform = config.run, config.platform
    resumed = dataclasses.replace(config, run=dataclasses.replace(run, resume=True, name="x", progress=False))
    assert config_hash(resumed) == config_hash(config)
    processes = [dataclasses.replace(config, platform=dataclasses.replace(
        platform, distributed="manual", num_processes=2, process_id=i, coordinator_address=f"localhost:{i + 1}"))
        for i in range(2)]
    assert config_hash(processes[0]) == config_hash(processes[1])
    assert config_hash(dataclasses.replace(config, run=dataclasses.replace(run, seed=1))) != config_hash(config)
    assert config_hash(processes[0]) != config_hash(config)  # a resumed run keeps its process count


def test_row_streams_give_every_process_count_the_same_global_batches_and_resume(tmp_path):
    import dataclasses

    from ponderttt.train import corpus
    from ponderttt.train.config import ConfigError, DataConfig
    from ponderttt.train.distributed import process_rows

    root = tmp_path / "corpus"  # 24 small distinct modules (the cleaning filters keep them)
    for i in range(24):
        body = "".join(f"def f{i}_{j}(x, y={j}):\n    return x * {i + j} + y - {j * i} // (y or 1)\n\n\n"
                       for j in range(6))
        (root / f"pkg{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"pkg{i % 3}" / f"module_{i}.py").write_text(f'"""Module {i}."""\n\n\n{body}')
    data = DataConfig(corpus=str(root), vocab_size=300, seq_len=64, chunk_size=16, mini_batch_size=8, batch_size=4,
                      val_fraction=0.1, test_fraction=0.1)
    tok = corpus.tokenizer(data, tmp_path)
    n_train = len(corpus.source(data, "train"))
    assert 4 <= n_train < 24
    whole = corpus.RowStreams(data, tok, "train", seed=3, rows=slice(0, 4))
    halves = [corpus.RowStreams(data, tok, "train", seed=3, rows=process_rows(4, i, 2)) for i in range(2)]
    for _ in range(6):
        batch, parts = next(whole), [next(half) for half in halves]
        assert batch["input_ids"].shape == (4, 64)
        for key, value in batch.items():
            np.testing.assert_array_equal(value, np.concatenate([part[key] for part in parts]), err_msg=key)
    state = json.loads(json.dumps(whole.get_state()))  # what a checkpoint's JSON item holds
    restored = corpus.RowStreams(data, tok, "train", seed=3, rows=slice(0, 4))
    restored.set_state(state)
    for _ in range(4):
        batch, again = next(whole), next(restored)
        assert all(np.array_equal(batch[key], again[key]) for key in batch)
    with pytest.raises(ConfigError, match="this process reads 2"):
        halves[0].set_state(state)
    with pytest.raises(ConfigError, match=f"--data.batch-size=24: .* has only {n_train}"):
        corpus.RowStreams(dataclasses.replace(data, batch_size=24), tok, "train", seed=3, rows=slice(0, 24))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_with_gloo_match_one_process(tmp_path, reference, compile_cache):
    output_dir = with_tokenizer(tmp_path, reference)
    run = output_dir / "two"
    distributed = ["--platform.distributed", "manual", "--platform.coordinator-address", f"localhost:{free_port()}",
                   "--platform.num-processes", "2"]
    procs = [app(compile_cache, "--output-dir", str(output_dir), "--name", "two", *distributed,
                 "--platform.process-id", str(i)) for i in range(2)]
    outs = [finish(proc) for proc in procs]
    assert "adapter: trained" in outs[0] and "adapter:" not in outs[1]  # process 0 alone reports

    single, two = records(reference), records(run)  # process 0 alone writes metrics.jsonl
    assert [(r["stage"], r["step"]) for r in two] == [(r["stage"], r["step"]) for r in single]
    for a, b in zip(two, single, strict=True):
        assert a.keys() == b.keys()
        for name in a:  # same global batch; only the order of the cross-process reductions differs
            if name not in ("stage", "step"):
                assert a[name] == pytest.approx(b[name], rel=1e-5), (a["stage"], a["step"], name)  # measured ~3e-7
    for stage in ("pretrain", "ttt"):
        assert steps(run / "checkpoints" / stage) == steps(reference / "checkpoints" / stage) == [8, {
            "pretrain": 10, "ttt": 12}[stage]]
    assert steps(run / "adapter") == [12] and steps(backbone_cache(output_dir)) == [10]
    # Adam turns the ~1e-7 differences of the gradients into ~1e-6 differences of the trained adapter
    # (measured; its parameters move by up to lr * steps = 0.036 in these 12 steps)
    two_adapter = arrays(run / "adapter" / "12" / "state")
    single_adapter = arrays(reference / "adapter" / "12" / "state")
    assert two_adapter.keys() == single_adapter.keys()
    for name, value in two_adapter.items():
        np.testing.assert_allclose(value, single_adapter[name], rtol=1e-4, atol=1e-5, err_msg=name)


GATHER = """
import json, sys
import numpy as np
from ponderttt.train import distributed
from ponderttt.train.config import MeshConfig, PlatformConfig

process, port = int(sys.argv[1]), sys.argv[2]
distributed.initialize(PlatformConfig(distributed="manual", coordinator_address=f"localhost:{port}",
                                      num_processes=2, process_id=process))
import jax

mesh = distributed.make_mesh(MeshConfig())
full = np.arange(12, dtype=np.float32).reshape(4, 3)
rows = distributed.process_rows(4, process, 2)
doubled = jax.jit(lambda a: 2 * a)(distributed.global_batch(full[rows], mesh, 4))  # rows split over the processes
out = distributed.to_host({"rows": doubled, "total": doubled.sum()})
spread = not doubled.is_fully_addressable
print(json.dumps({"rows": out["rows"].tolist(), "total": float(out["total"]), "spread": spread}))
"""


@pytest.mark.slow
def test_to_host_gathers_what_the_processes_hold(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", GATHER, str(i), port], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    outs = [json.loads(finish(proc).strip().splitlines()[-1]) for proc in procs]
    expected = (2 * np.arange(12, dtype=np.float32).reshape(4, 3)).tolist()
    assert outs[0] == outs[1] == {"rows": expected, "total": 132.0, "spread": True}
