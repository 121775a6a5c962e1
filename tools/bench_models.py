"""Benchmarks of ponderttt-models; prints one JSON object per line.

1. Forward tokens/s of a GPT-2 125M-shaped model (random weights, float32, CPU) at seq 1024 for each batch
   size, and HF transformers PyTorch GPT2LMHeadModel timed in the same run when torch imports, with the ratio.
2. Model-level latency with a head adapter: the backbone alone, then for TTT-Linear and LoRA-TTT the SKIP
   (adapter run with λ = 0) and UPDATE_1 (one inner step) forwards, relative to the backbone and to SKIP.
3. Greedy generation tokens/s (batch 1, prompt 128, 128 new tokens): backbone, head adapter, block + head.

    uv run python tools/bench_models.py                      # seq 1024, batches 1 and 8
    uv run python tools/bench_models.py --batches 1 --reps 2 # quicker
Timings are the best of --reps runs after one warm-up (compilation excluded); ours and HF's alternate run by
run (HF in a persistent worker process) so that both see the same load from other processes. Medians are
printed beside the bests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ponderttt.models import ADAPTER_KINDS, GPT2Config, TTTControl, adapt, build_model


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def best_seconds(fn, reps: int) -> float:
    """Best of `reps` timed runs after one warm-up (compilation excluded): the least disturbed by other load."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def our_forward(cfg: GPT2Config, batch: int, seq: int):
    """A jitted forward of a random GPT-2 of `cfg` on a fixed batch; returns a no-argument runner."""
    model = build_model(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (batch, seq)), jnp.int32)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids):
        return nnx.merge(graphdef, state)(ids).logits

    return lambda: forward(state, ids).block_until_ready()


# HF PyTorch worker: builds GPT2LMHeadModel (random weights, the 125M shape) and times one forward per line read
# from stdin, so that its runs interleave with ours and both see the same load. Runs in this interpreter when
# torch imports, else in `--torch-python` (an interpreter that has torch and transformers, e.g. a system Python).
TORCH_WORKER = """
import json, sys, time
import torch, transformers
batch, seq = (int(a) for a in sys.argv[1:3])
torch.manual_seed(0)
model = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
ids = torch.randint(0, 50257, (batch, seq))
print(json.dumps({"threads": torch.get_num_threads(), "attn": model.config._attn_implementation,
                  "versions": f"torch {torch.__version__}, transformers {transformers.__version__}"}), flush=True)
for _ in sys.stdin:
    start = time.perf_counter()
    with torch.inference_mode():
        model(input_ids=ids).logits.sum().item()
    print(time.perf_counter() - start, flush=True)
"""


class TorchWorker:
    """The HF PyTorch forward in a subprocess; `run()` times one forward there."""

    def __init__(self, interpreter: str, batch: int, seq: int):
        self.proc = subprocess.Popen(
            [interpreter, "-c", TORCH_WORKER, str(batch), str(seq)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(self.proc.stderr.read()[-500:])
        self.info = json.loads(line)
        self.info["interpreter"] = "in-process" if interpreter == sys.executable else interpreter

    def run(self) -> float:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def torch_interpreter(torch_python: str | None) -> str | None:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401

        return sys.executable
    except ImportError:
        return torch_python


def bench_forward(cfg: GPT2Config, batch: int, seq: int, reps: int, interpreter: str | None) -> dict:
    """Our forward and (when an interpreter is given) HF PyTorch's, alternating run by run; best of `reps` each."""
    ours = our_forward(cfg, batch, seq)
    ours()  # compile
    worker = None
    if interpreter is not None:
        try:
            worker = TorchWorker(interpreter, batch, seq)
            worker.run()  # warm-up
        except (RuntimeError, OSError, ValueError) as err:
            emit(bench="gpt2_125m_forward", hf_torch_error=str(err))
            worker = None
    mine, theirs = [], []
    for _ in range(reps):
        start = time.perf_counter()
        ours()
        mine.append(time.perf_counter() - start)
        if worker is not None:
            theirs.append(worker.run())
    record = {"bench": "gpt2_125m_forward", "batch": batch, "seq": seq, "dtype": "float32", "reps": reps}
    record["ours_tokens_per_s"] = round(batch * seq / min(mine), 1)
    record["ours_median_tokens_per_s"] = round(batch * seq / statistics.median(mine), 1)
    if worker is not None:
        worker.close()
        record["hf_torch_tokens_per_s"] = round(batch * seq / min(theirs), 1)
        record["hf_torch_median_tokens_per_s"] = round(batch * seq / statistics.median(theirs), 1)
        record["ratio_ours_to_hf"] = round(min(theirs) / min(mine), 3)
        record["hf_torch"] = (
            f"{worker.info['versions']}, {worker.info['threads']} threads, attention {worker.info['attn']} "
            f"({worker.info['interpreter']})"
        )
    record["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    return record


def bench_adapter(cfg: GPT2Config, batch: int, seq: int, reps: int, chunk: int) -> None:
    """Latency of the backbone alone, and per adapter kind of SKIP (λ = 0) and UPDATE_1 (λ = 1, one step)."""
    from ponderttt.ttt import TTTConfig

    ttt_cfg = TTTConfig(hidden_size=cfg.n_embd, num_heads=cfg.n_head, chunk_size=chunk)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (batch, seq)), jnp.int32)
    kinds = [kind for kind in ("linear", "lora") if kind in ADAPTER_KINDS]
    backbone = None
    for kind in kinds:
        model = adapt(build_model(cfg, rngs=nnx.Rngs(0)), ttt_cfg, kind=kind)
        graphdef, state = nnx.split(model)

        def make(use_ttt: bool, lam: float, graphdef=graphdef, state=state):
            @jax.jit
            def f(state, ids):
                return nnx.merge(graphdef, state)(ids, use_ttt=use_ttt, ttt=TTTControl(scale=lam)).logits

            return lambda: f(state, ids).block_until_ready()

        if backbone is None:
            backbone = best_seconds(make(False, 0.0), reps)
            emit(bench="adapter_latency", action="BACKBONE", batch=batch, seq=seq, seconds=round(backbone, 4))
        skip = best_seconds(make(True, 0.0), reps)
        update = best_seconds(make(True, 1.0), reps)
        for action, seconds in (("SKIP", skip), ("UPDATE_1", update)):
            emit(
                bench="adapter_latency",
                adapter=kind,
                action=action,
                batch=batch,
                seq=seq,
                chunk_size=chunk,
                seconds=round(seconds, 4),
                ratio_to_backbone=round(seconds / backbone, 3),
                ratio_to_skip=round(seconds / skip, 3),
            )


def bench_generate(cfg: GPT2Config, prompt: int, new: int, chunk: int) -> None:
    """Greedy KV-cache decoding tokens/s at batch 1: the backbone alone, a TTT-Linear adapter at the head, and
    one after block 5 plus the head (every `chunk` generated tokens the adapters update with λ = 1)."""
    from ponderttt.models.generate import GenerationConfig, generate
    from ponderttt.ttt import TTTConfig

    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (1, prompt)).astype(np.int32)
    config = GenerationConfig(max_new_tokens=new)
    for sites in (None, ("head",), (5, "head")):
        model = build_model(cfg, rngs=nnx.Rngs(0))
        if sites is not None:
            model = adapt(model, TTTConfig(hidden_size=cfg.n_embd, num_heads=cfg.n_head, chunk_size=chunk),
                          sites=sites)
        seconds = best_seconds(lambda model=model: generate(model, ids, config=config), 1)
        emit(
            bench="generate",
            adapter_sites=list(sites or ()),
            batch=1,
            prompt=prompt,
            new_tokens=new,
            chunk_size=chunk,
            seconds=round(seconds, 3),
            tokens_per_s=round(new / seconds, 1),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--adapter-batch", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--no-torch", action="store_true", help="do not time HF PyTorch")
    parser.add_argument("--torch-python", help="interpreter with torch + transformers, when this one has none")
    parser.add_argument("--no-adapter", action="store_true", help="skip the adapter latency part")
    parser.add_argument("--no-generate", action="store_true", help="skip the generation part")
    args = parser.parse_args()
    cfg = GPT2Config.gpt2_125m()
    emit(
        bench="env",
        backend=jax.default_backend(),
        devices=len(jax.devices()),
        cpus=os.cpu_count(),
        machine=platform.machine(),
        load_avg=[round(x, 2) for x in os.getloadavg()],
        jax=jax.__version__,
    )
    interpreter = None if args.no_torch else torch_interpreter(args.torch_python)
    for batch in args.batches:
        emit(**bench_forward(cfg, batch, args.seq, args.reps, interpreter))
    if not args.no_adapter:
        bench_adapter(cfg, args.adapter_batch, args.seq, args.reps, args.chunk)
    if not args.no_generate:
        bench_generate(cfg, prompt=128, new=128, chunk=64)


if __name__ == "__main__":
    main()
