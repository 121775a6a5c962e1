"""Step time of the in-house GPT-2 pretraining step (apps/train) for a few sizes: JSON lines on stdout.

    uv run python tools/bench_train_pretrain.py [--steps 5] [--seq-len 512] [--batch 8] [--vocab 2048]

Used to size the cpu preset so that the default pipeline fits its time budget on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--sizes", default="4x256,4x128,2x128", help="comma list of <layers>x<width>")
    args = parser.parse_args()

    import jax
    import numpy as np
    import optax
    from flax import nnx

    from ponderttt.models import GPT2, GPT2Config
    from ponderttt.train.backbone import lm_loss

    rng = np.random.default_rng(0)
    ids = jax.numpy.asarray(rng.integers(0, args.vocab, (args.batch, args.seq_len + 1)), jax.numpy.int32)
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": jax.numpy.ones(ids[:, 1:].shape, bool)}
    for size in args.sizes.split(","):
        layers, width = (int(x) for x in size.split("x"))
        config = GPT2Config(vocab_size=args.vocab, n_positions=args.seq_len, n_embd=width, n_layer=layers,
                            n_head=max(1, width // 64))
        graphdef, params, rest = nnx.split(GPT2(config, rngs=nnx.Rngs(0)), nnx.Param, ...)
        tx = optax.adamw(1e-3)
        opt = tx.init(params)

        @jax.jit
        def step(params, opt, batch, graphdef=graphdef, rest=rest, tx=tx):
            def loss_of(p):
                return lm_loss(nnx.merge(graphdef, p, rest)(batch["input_ids"]).logits,
                               batch["targets"], batch["loss_mask"])

            loss, grads = jax.value_and_grad(loss_of)(params)
            updates, opt = tx.update(grads, opt, params)
            return optax.apply_updates(params, updates), opt, loss

        start = time.perf_counter()
        params, opt, loss = step(params, opt, batch)
        loss.block_until_ready()
        compile_s = time.perf_counter() - start
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            params, opt, loss = step(params, opt, batch)
            loss.block_until_ready()
            times.append(time.perf_counter() - start)
        step_s = statistics.median(times)
        n_params = sum(x.size for x in jax.tree.leaves(params))
        print(json.dumps({"bench": "pretrain_step", "layers": layers, "width": width, "params": n_params,
                          "batch": args.batch, "seq_len": args.seq_len, "compile_s": round(compile_s, 2),
                          "step_s": round(step_s, 4), "tokens_per_s": round(args.batch * args.seq_len / step_s),
                          "devices": jax.device_count(), "platform": jax.devices()[0].platform}), flush=True)


if __name__ == "__main__":
    main()
