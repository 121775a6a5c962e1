"""Benchmark the code sandbox: start-up latency per program and pool throughput, per isolation mode.

Usage: PONDER_TTT_ALLOW_UNSAFE_BENCHMARKS=1 uv run python tools/bench_sandbox.py [--programs 32] [--workers 2]
Prints one JSON object per line. Figures depend on machine load; say so when you quote them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from ponderttt.eval import execution


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=32, help="programs per pool measurement")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="pool size")
    parser.add_argument("--repeats", type=int, default=10, help="sequential runs for the latency figure")
    args = parser.parse_args()

    started = time.perf_counter()
    isolation = execution.sandbox_isolation()
    print(json.dumps({"bench": "sandbox_probe", "isolation": isolation, "seconds": time.perf_counter() - started}))
    modes = execution.ISOLATIONS[execution.ISOLATIONS.index(isolation) :]  # this machine's modes, strongest first
    for mode in modes:
        walls = [execution.run_program("print(1)", isolation=mode).wall_s for _ in range(args.repeats)]
        print(
            json.dumps(
                {
                    "bench": "sandbox_latency",
                    "isolation": mode,
                    "runs": args.repeats,
                    "median_s": statistics.median(walls),
                    "max_s": max(walls),
                }
            )
        )
        source = "print(sum(i * i for i in range(20000)))"
        started = time.perf_counter()
        results = execution.run_programs([source] * args.programs, max_workers=args.workers, isolation=mode)
        elapsed = time.perf_counter() - started
        assert all(r.status == "passed" for r in results), [r.reason for r in results if r.status != "passed"]
        print(
            json.dumps(
                {
                    "bench": "sandbox_pool",
                    "isolation": mode,
                    "programs": args.programs,
                    "workers": args.workers,
                    "seconds": elapsed,
                    "programs_per_s": args.programs / elapsed,
                }
            )
        )


if __name__ == "__main__":
    main()
