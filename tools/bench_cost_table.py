"""The wall-clock cost table the app measures (`ponderttt.train.timing`), at the default run's shape and at GPT-2
125M's: one JSON line per shape on stdout.

    uv run python tools/bench_cost_table.py [--shapes default,gpt2-125m] [--repeats 7] [--adapter linear]

Each line gives every action's median and interquartile range (ms per chunk), the overhead rows (the recon
gate's probe, the learned gates' features), the analytic FLOPs ratio to SKIP, `ordered`: whether the medians
rise SKIP <= UPDATE_1 <= UPDATE_2 <= UPDATE_4, and `paired_steps_ms`: the median (and IQR) over the rounds of each
step's difference within a round (update_1 − skip, update_2 − update_1, update_4 − update_2), which cancels the
machine's drift between rounds; `resolved` says whether each step's median exceeds its IQR. Run it on an idle
machine; weights are random (timings do not depend on them), so nothing is downloaded. GPT-2 125M runs a
1024-token sequence in two 512-token chunks.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

# name -> (layers, width, heads, vocab, seq_len, chunk_size, batch)
SHAPES = {
    "default": (4, 128, 4, 2048, 256, 64, 8),
    "gpt2-125m": (12, 768, 12, 50257, 1024, 512, 1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (>= 5)")
    parser.add_argument("--adapter", default="linear", choices=("linear", "mlp", "lora"))
    args = parser.parse_args()

    import jax
    import numpy as np

    from ponderttt.models import GPT2Config
    from ponderttt.train import adapter, distributed, heldout, timing
    from ponderttt.train.backbone import build_gpt2
    from ponderttt.train.config import AdapterConfig, DataConfig, MeshConfig, PlatformConfig

    mesh = distributed.make_mesh(MeshConfig())
    for shape in args.shapes.split(","):
        layers, width, heads, vocab, seq_len, chunk, batch_size = SHAPES[shape]
        data = DataConfig(vocab_size=vocab, seq_len=seq_len, chunk_size=chunk, batch_size=batch_size)
        adapter_config = AdapterConfig(kind=args.adapter, num_heads=1 if args.adapter == "lora" else heads)
        config = GPT2Config(vocab_size=vocab, n_positions=seq_len, n_embd=width, n_layer=layers, n_head=heads)
        model = adapter.attach(build_gpt2(config, PlatformConfig(), mesh, seed=0), data, adapter_config, mesh, seed=0)
        rng = np.random.default_rng(0)
        ids = rng.integers(0, vocab, (batch_size, seq_len + 1))
        doc_start = np.zeros((batch_size, seq_len), bool)
        doc_start[:, 0] = True
        batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((batch_size, seq_len), bool),
                 "doc_start": doc_start}
        start = time.perf_counter()
        timings = timing.measure_wall_clock(model, batch, data=data, mesh=mesh, repeats=args.repeats)
        table = heldout.cost_table(model.config, data, adapter_config, timings)
        actions = list(table.actions.values())
        medians = [a.wall_clock_s for a in actions]
        steps = {}
        for low, high in zip(actions, actions[1:], strict=False):
            diff = np.subtract(timings.actions[high.action], timings.actions[low.action])
            q25, q50, q75 = np.percentile(diff, [25, 50, 75])
            steps[f"{high.action}-{low.action}"] = {"median": round(1e3 * q50, 4),
                                                    "spread": round(1e3 * (q75 - q25), 4)}
        print(json.dumps({
            "bench": "cost_table", "shape": shape, "adapter": args.adapter, "layers": layers, "width": width,
            "vocab": vocab, "seq_len": seq_len, "chunk_size": chunk, "batch": batch_size, "repeats": args.repeats,
            "median_ms": {a.action: round(1e3 * a.wall_clock_s, 4) for a in actions},
            "spread_ms": {a.action: round(1e3 * a.wall_clock_spread_s, 4) for a in actions},
            "overheads_ms": {name: {"median": round(1e3 * w.median_s, 4), "spread": round(1e3 * w.spread_s, 4)}
                             for name, w in table.overheads.items()},
            "flops_vs_skip": {a.action: round(a.relative_flops, 4) for a in actions},
            "ordered": all(b >= a for a, b in zip(medians, medians[1:], strict=False)),
            "paired_steps_ms": steps,
            "resolved": {name: bool(step["median"] > step["spread"]) for name, step in steps.items()},
            "seconds": round(time.perf_counter() - start, 1),
            "device": jax.devices()[0].device_kind, "cpu": platform.processor() or platform.machine(),
        }), flush=True)


if __name__ == "__main__":
    main()
