"""The memory pre-flight: parameter counts, the estimate against measured peaks, the machine's budget, the refusal."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from ponderttt.train import preflight
from ponderttt.train.config import ConfigError, preset


def configured(command="ttt", *, batch=8, seq=512, width=128, layers=2, heads=4, vocab=2048, kind="linear",
               adapter_heads=4, mini_batch=16, dtype="float32"):
    """The cpu preset's config of `command` with these sizes."""
    config = preset(command, "cpu")
    sections = {"data": dataclasses.replace(config.data, batch_size=batch, seq_len=seq, vocab_size=vocab,
                                            mini_batch_size=mini_batch, chunk_size=64),
                "backbone": dataclasses.replace(config.backbone, n_embd=width, n_layer=layers, n_head=heads),
                "platform": dataclasses.replace(config.platform, dtype=dtype)}
    if hasattr(config, "adapter"):
        sections["adapter"] = dataclasses.replace(config.adapter, kind=kind, num_heads=adapter_heads)
    return dataclasses.replace(config, **sections)


@pytest.mark.parametrize("arch", ["gpt2", "gpt2_untied", "gemma3"])
def test_backbone_parameters_are_counted_exactly(arch):
    import jax
    from flax import nnx

    from ponderttt.models import Gemma3Config, GPT2Config, build_model

    config = {"gpt2": GPT2Config(vocab_size=300, n_positions=40, n_embd=32, n_layer=3, n_head=4),
              "gpt2_untied": GPT2Config(vocab_size=300, n_positions=40, n_embd=32, n_layer=2, n_head=2, n_inner=48,
                                        tie_word_embeddings=False),
              "gemma3": Gemma3Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                                     num_kv_heads=2, head_dim=16, sliding_window=8, max_position_embeddings=64)}[arch]
    model = nnx.eval_shape(lambda: build_model(config))
    real = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert preflight.backbone_parameters(config) == real


def test_adapter_sizes_of_ttt_linear():
    from ponderttt.train.adapter import ttt_config

    config = configured(width=128, adapter_heads=4)
    layer = ttt_config(config.data, config.adapter, 128)
    params, fast = preflight.adapter_sizes("linear", layer)
    assert fast == 4 * (32 * 32 + 32)  # per head: W [d, d] and b [d]
    assert params > 3 * 128 * 128  # q, k, v and output projections at least


def real_step(stage, config):
    """(mesh, step, args) of one real step of `stage` at `config`'s sizes: the pretraining step, the adapter's training
    step (`adapter.objective`, the configured optimiser), or a held-out forward pass with its chunk losses."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from ponderttt.models.adapter import TRAINABLE
    from ponderttt.train import adapter, backbone, distributed
    from ponderttt.train.config import MeshConfig
    from ponderttt.train.optim import make_optimizer

    data = config.data
    mesh = distributed.make_mesh(MeshConfig())
    shape = (data.batch_size, data.seq_len)
    batch = {"input_ids": jnp.zeros(shape, jnp.int32), "targets": jnp.zeros(shape, jnp.int32),
             "loss_mask": jnp.ones(shape, bool), "doc_start": jnp.zeros(shape, bool)}
    model = backbone.build_gpt2(backbone.gpt2_config(data, config.backbone, data.vocab_size), config.platform, mesh, 0)
    if stage == "pretrain":
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tx, _ = make_optimizer(config.backbone.optimizer, 1e-3, 10)

        def step(state, batch):
            def loss_of(params):
                out = nnx.merge(graphdef, params, rest)(batch["input_ids"])
                return backbone.lm_loss(out.logits, batch["targets"], batch["loss_mask"])

            loss, grads = jax.value_and_grad(loss_of)(state["params"])
            updates, opt = tx.update(grads, state["opt"], state["params"])
            return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, loss

        return mesh, step, ({"params": params, "opt": tx.init(params)}, batch)
    graphdef, trainable, rest = nnx.split(adapter.attach(model, data, config.adapter, mesh, 0), TRAINABLE, ...)
    if stage == "ttt":
        tx, _ = make_optimizer(config.adapter.optimizer, 1e-3, 10)

        def step(state, batch):
            def loss_of(params):
                return adapter.objective(nnx.merge(graphdef, params, rest), batch, data=data, adapter=config.adapter)

            (loss, _), grads = jax.value_and_grad(loss_of, has_aux=True)(state["adapter"])
            updates, opt = tx.update(grads, state["opt"], state["adapter"])
            return {"adapter": optax.apply_updates(state["adapter"], updates), "opt": opt}, loss

        return mesh, step, ({"adapter": trainable, "opt": tx.init(trainable)}, batch)

    def forward(params, batch):
        out = adapter.forward(nnx.merge(graphdef, params, rest), batch, chunk_size=data.chunk_size, num_steps=1,
                              gating_scale=1.0, protocol="reset")
        return adapter.chunk_losses(out.logits, batch["targets"], batch["loss_mask"], data.chunk_size)

    return mesh, forward, (trainable, batch)


def xla_peak(stage, config):
    """Bytes of XLA's buffers for one real step of `stage` (`real_step`): arguments + outputs + temporaries."""
    import jax

    mesh, step, args = real_step(stage, config)
    with jax.set_mesh(mesh):
        memory = jax.jit(step).lower(*args).compile().memory_analysis()
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
            - memory.alias_size_in_bytes)


@pytest.mark.slow
@pytest.mark.parametrize("stage, sizes", [
    ("pretrain", dict(batch=8, seq=512, width=128, layers=2, vocab=4096)),
    ("pretrain", dict(batch=4, seq=256, width=256, layers=4, heads=8, vocab=2048, dtype="bfloat16")),
    ("ttt", dict(batch=8, seq=512, width=256, layers=1, vocab=512)),
    ("ttt", dict(batch=8, seq=512, width=128, layers=1, vocab=512, kind="mlp")),
    ("ttt", dict(batch=8, seq=512, width=256, layers=1, vocab=512, kind="lora")),
    ("compare", dict(batch=8, seq=512, width=256, layers=2, vocab=2048)),
])
def test_the_estimate_is_within_the_stated_factor_of_xla_buffers(stage, sizes):
    config = configured("pipeline", **sizes)
    estimate = preflight.stage_estimate(stage, config, preflight.architecture(config, None)).total
    measured = xla_peak(stage, config)
    assert 1 / preflight.MEASURED_FACTOR <= estimate / measured <= preflight.MEASURED_FACTOR, (estimate, measured)


RESIDENT_PEAK = """
import json, resource
import jax
from test_preflight import configured, real_step
from ponderttt.train import preflight

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

config = configured("pretrain", batch=8, seq=1024, width=128, layers=2, vocab=4096)
mesh, step, args = real_step("pretrain", config)
with jax.set_mesh(mesh):
    compiled = jax.jit(step).lower(*args).compile()
    resident = compiled.memory_analysis().argument_size_in_bytes  # the state and batch: already in memory
    before, high_before = rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    jax.block_until_ready(compiled(*args))
    high = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
estimate = preflight.stage_estimate("pretrain", config, preflight.architecture(config, None)).total
print(json.dumps({"estimate": estimate, "measured": high - before + resident, "new_high": high > high_before}))
"""


@pytest.mark.slow
def test_the_estimate_is_within_the_stated_factor_of_a_real_steps_resident_peak():
    """One real pretraining step in a fresh process (compiled first, so the compiler's memory is not counted): the
    growth of its peak resident memory (getrusage maxrss) plus the arguments already in memory."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(pathlib.Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(RESIDENT_PEAK)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["new_high"], result  # the step set the process's peak (else the measure says nothing)
    ratio = result["estimate"] / result["measured"]
    assert 1 / preflight.MEASURED_FACTOR <= ratio <= preflight.MEASURED_FACTOR, result
    assert result["measured"] > 500 * 2**20  # a peak well above the runtime's noise


def test_a_configuration_needing_terabytes_is_refused_before_anything_is_built(tmp_path, capsys):
    from ponderttt.train.cli import main

    status = main(["ttt", "--preset", "smoke", "--data.seq-len", "1048576", "--data.batch-size", "4096",
                   "--output-dir", str(tmp_path), "--name", "huge"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert err.startswith("error: pretrain needs about ") and " GiB (parameters " in err
    assert "lower --data.batch-size (4096) or --data.seq-len (1048576)" in err and "--no-preflight" in err
    needed = float(err.split("needs about ")[1].split(" GiB")[0])
    assert needed > 1024**2  # terabytes of attention scores, in GiB: more than a PiB
    assert not (tmp_path / "huge").exists()  # refused before the run directory (or any model) was made


def test_no_preflight_skips_the_check():
    from ponderttt.train import stages
    from ponderttt.train.cli import parse

    args = ["ttt", "--preset", "smoke", "--data.seq-len", "1048576", "--data.batch-size", "4096"]
    _, _, checked = parse(args)
    _, _, skipped = parse([*args, "--no-preflight"])
    assert checked.run.preflight and not skipped.run.preflight
    stages.check_memory("ttt", skipped)  # no error: the check is not run
    with pytest.raises(ConfigError, match="needs about"):
        stages.check_memory("ttt", checked)


def test_the_presets_fit_this_machine():
    """The smoke and cpu presets pass the check here; their estimates are small (tens to hundreds of MiB)."""
    for name in ("smoke", "cpu"):
        estimates = preflight.check("pipeline", preset("pipeline", name))
        assert [e.stage for e in estimates] == ["pretrain", "ttt", "gate", "compare"]
        assert all(0 < e.needed < 2 * preflight.GiB for e in estimates)


def test_remat_lowers_the_estimate_only_where_it_is_credited():
    config = configured("pretrain", batch=8, seq=1024, width=256, layers=4)
    remat = dataclasses.replace(config, platform=dataclasses.replace(config.platform, remat=True))
    arch = preflight.architecture(config, None)
    plain = preflight.stage_estimate("pretrain", config, arch).parts["activations"]
    assert preflight.stage_estimate("pretrain", remat, arch, remat_saves=False).parts["activations"] == plain
    assert preflight.stage_estimate("pretrain", remat, arch).parts["activations"] < plain / 2  # one block's scores


def test_per_device_splits_parameters_and_batch_over_the_mesh():
    estimate = preflight.Estimate("ttt", {"parameters": 800, "optimizer": 400, "activations": 1600, "logits": 800})
    assert preflight.per_device(estimate, (1, 1, 1)) == 3600 * preflight.SAFETY
    # data 2 x fsdp 2: parameter parts / 2 (fsdp), batch-sized parts / 4 (data x fsdp)
    assert preflight.per_device(estimate, (2, 2, 1)) == (600 + 600) * preflight.SAFETY


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_budget_is_memavailable_or_the_cgroup_allowance(tmp_path):
    proc, sys_fs = tmp_path / "proc", tmp_path / "sys"
    write(proc / "meminfo", "MemTotal:       16000000 kB\nMemAvailable:    8000000 kB\n")
    write(proc / "self" / "cgroup", "0::/jobs/run\n")
    assert preflight.mem_available(proc) == 8000000 * 1024
    assert preflight.host_available(proc, sys_fs) == (8000000 * 1024, "MemAvailable in /proc/meminfo")  # no limit
    # cgroup v2: limit 4 GiB, 3 GiB used of which 1 GiB is reclaimable page cache -> 2 GiB left
    write(sys_fs / "jobs" / "run" / "memory.max", f"{4 * 2**30}\n")
    write(sys_fs / "jobs" / "run" / "memory.current", f"{3 * 2**30}\n")
    write(sys_fs / "jobs" / "run" / "memory.stat", f"anon 123\ninactive_file {2**30}\n")
    write(sys_fs / "jobs" / "memory.max", "max\n")
    assert preflight.cgroup_available(proc, sys_fs) == 2 * 2**30
    assert preflight.host_available(proc, sys_fs) == (2 * 2**30, "the memory limit of this process's cgroup")
    write(sys_fs / "jobs" / "memory.max", f"{2**30}\n")  # a tighter limit on the parent applies too
    write(sys_fs / "jobs" / "memory.current", f"{2**29}\n")
    assert preflight.cgroup_available(proc, sys_fs) == 2**29
    # cgroup v1: unlimited (9223372036854771712) is no limit; a set limit is used like v2's
    write(proc / "self" / "cgroup", "4:memory:/docker/abc\n1:cpu:/docker/abc\n")
    write(sys_fs / "memory" / "docker" / "abc" / "memory.limit_in_bytes", "9223372036854771712\n")
    assert preflight.cgroup_available(proc, sys_fs) is None
    write(sys_fs / "memory" / "docker" / "abc" / "memory.limit_in_bytes", f"{6 * 2**30}\n")
    write(sys_fs / "memory" / "docker" / "abc" / "memory.usage_in_bytes", f"{2 * 2**30}\n")
    write(sys_fs / "memory" / "docker" / "abc" / "memory.stat", f"total_inactive_file {2**30}\n")
    assert preflight.cgroup_available(proc, sys_fs) == 5 * 2**30


def test_an_hf_backbone_is_read_from_its_config_json(tmp_path):
    from ponderttt.models import GPT2Config
    from ponderttt.models.hf import hf_config_dict

    gpt2 = GPT2Config(vocab_size=500, n_positions=256, n_embd=64, n_layer=2, n_head=4)
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(gpt2)))
    assert preflight.architecture(configured(), str(tmp_path)) == gpt2
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"^backbone architecture: .*config.json"):
        preflight.architecture(configured(), str(tmp_path))
