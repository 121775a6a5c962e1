"""Benchmark of the ponderttt.ttt layers; prints one JSON object per line.

Measures, at hidden 768, 12 heads, mini-batch 16, seq 2048, batch 1 by default:
  * TTT-Linear forward and forward+backward tokens/s (dual form), analytic FLOPs/token, achieved GFLOP/s;
  * the primal (token-by-token) form's forward and the dual / primal speed ratio;
  * LoRA-TTT forward with an update (num_steps=1) against its no-update probe forward (num_steps=0);
  * a same-process baseline: the layer's dense projections alone (x θ_QKV and the output projection, the
    floor of any TTT-Linear implementation), and the forward's cost over that floor — a ratio that moves far
    less with the machine's load than the absolute figures.
float32 on CPU, bfloat16 activations on a GPU (override with --dtype). Timings are the best and the median
of --repeats runs after one compile-and-warm-up run; on a shared machine the best is the fairer figure,
and the 1-minute load average is printed with every line so that figures taken under load say so. The two
sides of each same-process ratio (forward / projections, LoRA update / no-update) are timed alternately.

Usage: uv run python tools/bench_ttt.py [--seq 2048] [--repeats 5] [--skip-primal] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from ponderttt.ttt import LoRATTT, TTTConfig, TTTLinear


def ttt_linear_flops_per_token(cfg: TTTConfig, with_stats: bool = True) -> dict[str, float]:
    """Multiply-adds × 2 per token of a TTT-Linear forward (dual form, one inner step)."""
    c, h, d, k = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.mini_batch_size
    projections = 2 * c * c * (3 if not cfg.qk_shared else 2) + 2 * c * c  # q/k/v (or q/v) and o_proj
    projections += 2 * c * c if cfg.gated else 0
    eta = 2 * c * h
    # per head: kW and qW (2 × 2d²), the weight update (2d²), qkᵀ and (η ⊙ A) G (2 × 2Kd)
    inner = h * (6 * d * d + 4 * k * d)
    stats = h * (4 * d * d) if with_stats else 0  # losses at the initial weights and after the step
    total = projections + eta + inner + stats
    return {"projections": projections, "inner": inner + eta, "stats": stats, "total": total}


def timed(fn, *args, repeats: int) -> dict[str, float]:
    return timed_together([(fn, args)], repeats=repeats)[0]


def timed_together(calls, repeats: int) -> list[dict[str, float]]:
    """Times several (fn, args) calls, alternating them run by run, so that a ratio between them is measured
    under the same (shared-machine) load rather than under whatever load each had in its own time window."""
    for fn, args in calls:
        jax.block_until_ready(fn(*args))  # compile + warm up
    times = [[] for _ in calls]
    for _ in range(repeats):
        for (fn, args), out in zip(calls, times, strict=True):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            out.append(time.perf_counter() - start)
    return [{"best_s": min(t), "median_s": statistics.median(t)} for t in times]


def emit(record: dict) -> None:
    record["load_avg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(record), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--mini-batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    parser.add_argument("--skip-primal", action="store_true", help="skip the slow token-by-token primal form")
    parser.add_argument("--skip-backward", action="store_true")
    args = parser.parse_args()

    backend = jax.default_backend()
    dtype = jnp.dtype(args.dtype or ("float32" if backend == "cpu" else "bfloat16"))
    cfg = TTTConfig(hidden_size=args.hidden, num_heads=args.heads, mini_batch_size=args.mini_batch)
    tokens = args.seq * args.batch
    shape = {"hidden": args.hidden, "heads": args.heads, "mini_batch": args.mini_batch, "seq": args.seq}
    common = {**shape, "batch": args.batch, "dtype": dtype.name, "backend": backend, "devices": jax.device_count()}
    emit({"bench": "env", "jax": jax.__version__, "device": str(jax.devices()[0]), "cpu_count": os.cpu_count()})
    x = jax.random.normal(jax.random.key(0), (args.batch, args.seq, args.hidden), jnp.float32).astype(dtype)

    graphdef, params = nnx.split(TTTLinear(cfg, rngs=nnx.Rngs(0)))
    flops = ttt_linear_flops_per_token(cfg)

    @jax.jit
    def forward(params, x):
        y, stats = nnx.merge(graphdef, params)(x)
        return y, stats.state

    @jax.jit
    def projections(params, x):
        layer = nnx.merge(graphdef, params)
        return (x @ layer.qkv_proj[...].astype(x.dtype))[..., : args.hidden] @ layer.o_proj[...].astype(x.dtype)

    fwd, floor = timed_together([(forward, (params, x)), (projections, (params, x))], repeats=args.repeats)
    fwd_tps = tokens / fwd["best_s"]
    emit(
        {
            "bench": "ttt_linear_forward_dual",
            **common,
            "tokens_per_s": round(fwd_tps),
            "tokens_per_s_median": round(tokens / fwd["median_s"]),
            "flops_per_token": flops["total"],
            "flops_per_token_parts": flops,
            "gflops_per_s": round(fwd_tps * flops["total"] / 1e9, 1),
            "target_tokens_per_s": 20000,
            "projections_only_tokens_per_s": round(tokens / floor["best_s"]),
            "cost_over_projections": round(fwd["best_s"] / floor["best_s"], 3),
        }
    )

    if not args.skip_backward:

        @jax.jit
        def forward_backward(params, x):
            def loss(params):
                y, stats = nnx.merge(graphdef, params)(x)
                return jnp.mean(y.astype(jnp.float32) ** 2) + jnp.mean(stats.loss_after)

            return jax.value_and_grad(loss)(params)

        fb = timed(forward_backward, params, x, repeats=args.repeats)
        fb_tps = tokens / fb["best_s"]
        emit(
            {
                "bench": "ttt_linear_forward_backward_dual",
                **common,
                "tokens_per_s": round(fb_tps),
                "tokens_per_s_median": round(tokens / fb["median_s"]),
                "flops_per_token": 3 * flops["total"],
                "gflops_per_s": round(fb_tps * 3 * flops["total"] / 1e9, 1),
            }
        )

    if not args.skip_primal:

        @jax.jit
        def primal(params, x):
            return nnx.merge(graphdef, params).primal_forward(x)

        pr = timed(primal, params, x, repeats=max(1, args.repeats // 2))
        pr_tps = tokens / pr["best_s"]
        emit(
            {
                "bench": "ttt_linear_forward_primal",
                **common,
                "tokens_per_s": round(pr_tps),
                "dual_over_primal_speed": round(fwd_tps / pr_tps, 2),
            }
        )

    lora_cfg = cfg.replace(lora_rank=args.lora_rank)
    lora_graphdef, lora_params = nnx.split(LoRATTT(lora_cfg, rngs=nnx.Rngs(0)))

    def lora_forward(num_steps):
        @jax.jit
        def run(params, x):
            y, stats = nnx.merge(lora_graphdef, params)(x, num_steps=num_steps)
            return y, stats.state, stats.loss_step0

        return run

    upd, probe = timed_together(
        [(lora_forward(1), (lora_params, x)), (lora_forward(0), (lora_params, x))], repeats=args.repeats
    )
    emit(
        {
            "bench": "lora_ttt_forward",
            **common,
            "rank": args.lora_rank,
            "tokens_per_s_update": round(tokens / upd["best_s"]),
            "tokens_per_s_no_update": round(tokens / probe["best_s"]),
            "update_over_no_update_cost": round(upd["best_s"] / probe["best_s"], 3),
            "update_over_no_update_cost_median": round(upd["median_s"] / probe["median_s"], 3),
            "target_cost_ratio_max": 1.3,
        }
    )


if __name__ == "__main__":
    main()
