"""Sharded HF loading in two real processes (jax.distributed, gloo CPU collectives on localhost).

Each process has 2 CPU devices; the (fsdp=2, tensor=2) mesh spans both processes. The checkpoint is a
tiny Gemma 3 written as several safetensors files with an index. Every tensor read is recorded: a process
must read exactly the distinct slices its own devices hold (nothing twice, nothing of the other process's
rows), and the logits must equal single-process loading. Both processes then save the sharded model
together (save_hf_causal_lm gathers; process 0 writes) and the result equals the single-process parameters.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from ponderttt.models import load_hf_causal_lm, save_hf_causal_lm

PROCESS_SOURCE = r"""
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
folder, port, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid)
jax.config.update("jax_default_matmul_precision", "highest")
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
import ponderttt.models.hf as hf
from ponderttt.models import load_hf_causal_lm, make_mesh, save_hf_causal_lm

class CountingSlice:  # a safetensors slice whose reads are recorded with their size in bytes
    def __init__(self, key, inner):
        self.key, self.inner = key, inner
    def __getitem__(self, index):
        out = self.inner[index]
        byte_reads.append([self.key, int(out.nbytes)])
        return out

byte_reads, slice_reads = [], []
original_array, original_read = hf.SafetensorsFile.array, hf._read
hf.SafetensorsFile.array = lambda self, key: CountingSlice(key, original_array(self, key))
def recording_read(ckpt, a, shape, index, dtype):
    bounds = [[s.start or 0, shape[i] if s.stop is None else s.stop] for i, s in enumerate(index)]
    slice_reads.append([a.target, bounds])
    return original_read(ckpt, a, shape, index, dtype)
hf._read = recording_read

assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
mesh = make_mesh(data=1, fsdp=2, tensor=2)
model = load_hf_causal_lm(folder, mesh=mesh)
held = {}
for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    arr = var.get_value()
    shards = {tuple((s.start or 0, d if s.stop is None else s.stop) for s, d in zip(sh.index, arr.shape))
              for sh in arr.addressable_shards}
    held[".".join(map(str, path))] = {"slices": sorted(list(map(list, t)) for t in shards),
                                      "itemsize": arr.dtype.itemsize, "spec": str(arr.sharding.spec)}

ids = np.load(folder + "/ids.npy")
global_ids = jax.make_array_from_callback(ids.shape, NamedSharding(mesh, P()), lambda idx: ids[idx])
logits = nnx.jit(lambda m, i: m(i).logits)(model, global_ids)
full = multihost_utils.process_allgather(logits, tiled=True)
save_hf_causal_lm(model, folder + "_saved")  # every process gathers its shards; process 0 writes
print("RESULT" + json.dumps({"pid": jax.process_index(), "held": held, "slice_reads": slice_reads,
                             "byte_reads": byte_reads, "logits": np.asarray(full).tolist()}), flush=True)
jax.distributed.shutdown()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


@pytest.mark.multidevice
@pytest.mark.slow
def test_two_processes_read_only_their_shards_and_match_one_process(tmp_path, hf_data):
    single = load_hf_causal_lm(hf_data.dir("gemma3_tiny"))
    folder = save_hf_causal_lm(single, tmp_path / "ckpt", max_shard_bytes=6000)  # several files + index
    assert (folder / "model.safetensors.index.json").exists()
    ids = hf_data.golden("gemma3_tiny")["input_ids"]
    np.save(folder / "ids.npy", ids)
    expected = np.asarray(nnx.jit(lambda m, i: m(i).logits)(single, ids))

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
    port = str(free_port())
    logs = [(open(tmp_path / f"out{i}.txt", "w+"), open(tmp_path / f"err{i}.txt", "w+")) for i in range(2)]
    procs = [  # output to files, not pipes: a full pipe of one process would stall both at the shutdown barrier
        subprocess.Popen(
            [sys.executable, "-c", PROCESS_SOURCE, str(folder), port, str(i)], env=env, stdout=out, stderr=err
        )
        for i, (out, err) in enumerate(logs)
    ]
    results = []
    for proc, (out, err) in zip(procs, logs, strict=True):
        proc.wait(timeout=300)
        out.seek(0)
        err.seek(0)
        assert proc.returncode == 0, err.read()[-4000:]
        results.append(json.loads(out.read().split("RESULT", 1)[1]))
        out.close()
        err.close()
    assert [r["pid"] for r in results] == [0, 1]

    total_bytes = sum(np.prod(s) * 4 for s in _checkpoint_shapes(folder).values())
    for r in results:
        np.testing.assert_allclose(np.asarray(r["logits"]), expected, atol=1e-5, rtol=0)
        # Slices read = the distinct slices this process's two devices hold, each once.
        reads: dict[str, list] = {}
        for target, index in r["slice_reads"]:
            reads.setdefault(target, []).append(index)
        assert set(reads) == set(r["held"])
        for target, info in r["held"].items():
            assert sorted(reads[target]) == info["slices"], target
        # Bytes read from the files = the bytes of those slices: nothing else is touched.
        held_bytes = sum(
            int(np.prod([b - a for a, b in sl])) * info["itemsize"]
            for info in r["held"].values()
            for sl in info["slices"]
        )
        read_bytes = sum(n for _, n in r["byte_reads"])
        assert read_bytes == held_bytes < total_bytes

    # Saving the model sharded over both processes gives back exactly the single-process parameters.
    saved = load_hf_causal_lm(str(folder) + "_saved")
    for (path, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(single)), nnx.to_flat_state(nnx.state(saved)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(b.get_value()), np.asarray(a.get_value()), err_msg=str(path))

    # q_proj [36, 40] is P('fsdp', 'tensor'): process 0 reads rows 0:18, process 1 rows 18:36, both column halves.
    q = "blocks.0.self_attn.q_proj.kernel"
    assert results[0]["held"][q]["spec"] == "P('fsdp', 'tensor')"
    assert results[0]["held"][q]["slices"] == [[[0, 18], [0, 20]], [[0, 18], [20, 40]]]
    assert results[1]["held"][q]["slices"] == [[[18, 36], [0, 20]], [[18, 36], [20, 40]]]


def _checkpoint_shapes(folder) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="numpy") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return shapes
