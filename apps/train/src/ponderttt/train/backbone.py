"""The frozen backbone: an HF directory through `load_hf_causal_lm`, or the in-house GPT-2 pretrained on the
corpus and cached by the hash of its config (`outputs/cache/backbone-<hash>/`), so a second run reuses it.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ponderttt.models import GPT2, AssetError, GPT2Config, init_sharded, load_hf_causal_lm
from ponderttt.train import corpus, distributed
from ponderttt.train.checkpoint import Checkpointer, has_checkpoint
from ponderttt.train.config import BackboneConfig, ConfigError, DataConfig, PlatformConfig, RunConfig
from ponderttt.train.loop import train_loop
from ponderttt.train.optim import make_optimizer
from ponderttt.train.rundir import RunDir, cache_dir, require_backbone_dir

EVAL_BATCHES = 2


def lm_loss(logits: Any, targets: Any, mask: Any) -> Any:
    """Mean next-token cross-entropy over the positions where `mask` is true (float32)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    weights = mask.astype(jnp.float32)
    return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def gpt2_config(data: DataConfig, backbone: BackboneConfig, vocab_size: int) -> Any:
    """The in-house GPT-2's `GPT2Config`: width, depth and heads from --backbone.*, context --data.seq-len."""
    return GPT2Config(vocab_size=vocab_size, n_positions=data.seq_len, n_embd=backbone.n_embd,
                      n_layer=backbone.n_layer, n_head=backbone.n_head)


def backbone_key(data: DataConfig, backbone: BackboneConfig, seed: int, tokenizer_name: str) -> list[Any]:
    """What the in-house backbone depends on (its cache key): data, architecture, schedule, seed, tokenizer."""
    data_part = {k: v for k, v in dataclasses.asdict(data).items() if k != "mini_batch_size"}
    return [data_part, dataclasses.asdict(backbone), seed, pathlib.Path(tokenizer_name).name]


def cached_backbone_dir(run: RunConfig, data: DataConfig, backbone: BackboneConfig, tokenizer_name: str
                        ) -> pathlib.Path:
    """outputs/cache/backbone-<hash of `backbone_key`>/: where `pretrain` saves the in-house GPT-2 (not created)."""
    return cache_dir(run.output_dir, "backbone", *backbone_key(data, backbone, run.seed, tokenizer_name))


def remat_name(platform: PlatformConfig) -> str | None:
    """The model's remat policy for --platform.remat: "dots" (keep matmul outputs, recompute the rest) or None."""
    return "dots" if platform.remat else None


def build_gpt2(config: Any, platform: PlatformConfig, mesh: Any, seed: int) -> Any:
    """A randomly initialised in-house GPT-2, created directly in its shards."""
    dtype = jnp.dtype(platform.dtype)
    return init_sharded(lambda: GPT2(config, dtype=dtype, rngs=nnx.Rngs(seed), mesh=mesh,
                                     remat=remat_name(platform)), mesh)


def load_cached(folder: pathlib.Path, platform: PlatformConfig, mesh: Any) -> Any:
    """The in-house GPT-2 saved by `pretrain` in `folder`."""
    with Checkpointer(folder, keep=1, async_save=False) as ckpt:
        step = ckpt.latest_step()
        meta = ckpt.read_meta(step)
        model = build_gpt2(GPT2Config(**meta["gpt2_config"]), platform, mesh, seed=0)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        state, _ = ckpt.restore({"params": params}, step)
    return nnx.merge(graphdef, state["params"], rest)


def load_backbone(backbone: BackboneConfig, platform: PlatformConfig, mesh: Any, cached: pathlib.Path | None) -> Any:
    """The backbone of a run: `--backbone.path` (HF), else the cached in-house GPT-2 in `cached`.

    A file of the HF directory that cannot be used (malformed config.json or index, corrupt safetensors, missing,
    mis-shaped, integer or non-finite tensors) is a ConfigError, one line naming the file and the problem: the
    command stops with exit status 2 before any training.
    """
    if backbone.path is not None:
        folder = require_backbone_dir(backbone.path)
        try:
            return load_hf_causal_lm(folder, dtype=jnp.dtype(platform.dtype), mesh=mesh)
        except AssetError as error:
            raise ConfigError(f"--backbone.path: {error}") from error
    if cached is None or not has_checkpoint(cached):
        raise FileNotFoundError(f"no pretrained in-house backbone in {cached}: run `pretrain` first")
    return load_cached(cached, platform, mesh)


def pretrain(*, run: RunConfig, platform: PlatformConfig, data: DataConfig, backbone: BackboneConfig,
             run_dir: RunDir, mesh: Any, tok: Any) -> tuple[pathlib.Path, dict[str, float]]:
    """Pretrains the in-house GPT-2 (or finds it in the cache); returns (cache folder, final metrics)."""
    folder = cached_backbone_dir(run, data, backbone, tok.name)
    if has_checkpoint(folder):
        return folder, {"cached": 1.0}

    config = gpt2_config(data, backbone, tok.vocab_size)
    model = build_gpt2(config, platform, mesh, seed=run.seed)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx, lr_at = make_optimizer(backbone.optimizer, backbone.pretrain_lr, backbone.pretrain_steps)
    state = {"params": params, "opt": tx.init(params)}

    def loss_of(params: Any, batch: dict[str, Any]) -> Any:
        out = nnx.merge(graphdef, params, rest)(batch["input_ids"])
        return lm_loss(out.logits, batch["targets"], batch["loss_mask"])

    @jax.jit
    def train_step(state: dict[str, Any], batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        loss, grads = jax.value_and_grad(loss_of)(state["params"], batch)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return ({"params": optax.apply_updates(state["params"], updates), "opt": opt},
                {"loss": loss, "grad_norm": optax.tree.norm(grads)})

    eval_loss = jax.jit(loss_of)
    keys = ("input_ids", "targets", "loss_mask")

    def to_global(batch: dict[str, Any]) -> dict[str, Any]:
        return {k: distributed.global_batch(np.asarray(batch[k]), mesh, data.batch_size) for k in keys}

    val = [to_global(b) for b in corpus.fixed_batches(data, tok, "val", EVAL_BATCHES)]

    def evaluate(state: dict[str, Any]) -> dict[str, Any]:
        return {"loss": sum(float(eval_loss(state["params"], b)) for b in val) / len(val)}

    stream = iter(corpus.batches(data, tok, "train", seed=run.seed, forever=True))
    with jax.set_mesh(mesh):
        result = train_loop(stage="pretrain", run_dir=run_dir, run=run, state=state,
                            step_fn=lambda s, b: train_step(s, to_global(b)), batches=stream,
                            total_steps=backbone.pretrain_steps, tokens_per_step=data.batch_size * data.seq_len,
                            eval_fn=evaluate, learning_rate=lambda step: lr_at(step - 1))
    with Checkpointer(folder, keep=1, async_save=False) as ckpt:
        ckpt.save(backbone.pretrain_steps, {"params": result.state["params"]},
                  {"gpt2_config": dataclasses.asdict(config), "tokenizer": pathlib.Path(tok.name).name,
                   "final_metrics": result.last_metrics})
    return folder, result.last_metrics
