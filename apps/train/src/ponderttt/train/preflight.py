"""Memory pre-flight: the peak memory a command's stages need, checked against the machine before any model is built.

Per stage, the estimate adds (bytes, `Estimate.parts`):
  * parameters — the backbone's (platform dtype; counted from its architecture, `backbone_parameters`) and the
    adapter's (float32; counted on its abstract layer, no array allocated);
  * gradients, optimizer state and updates — of what the stage trains (the whole backbone in `pretrain`, the
    adapter in `ttt`): Adam / AdamW keep 2 moments per parameter, SGD 1; a step returns new parameters and
    optimizer state beside its inputs (they are not donated), the `updates`;
  * activations — a transformer block's values over [batch, seq] in the platform dtype (`BLOCK_WIDTHS` x its width
    plus its MLP's hidden values when training the backbone, `FORWARD_WIDTHS` when it is frozen) and its attention
    scores [batch, heads, seq, seq] in float32 (`SCORE_COPIES` copies: no flash attention). Training the backbone
    keeps every block's for the backward pass; a frozen backbone holds one block's at a time. With
    --platform.remat on an accelerator a trained block keeps only its matmul outputs and the scores of one block
    are live at a time (XLA:CPU showed the same peak with and without remat, so the CPU check does not credit it);
  * logits — [batch, seq, vocab] in float32: `LOGIT_COPIES` copies when training (logits, log-softmax, gradient),
    one otherwise;
  * TTT state — the adapter's per-token values (`TTT_WIDTHS` x the width, and its [mini-batch] step sizes per
    head) in float32; where a gradient flows through the inner loop (`ttt`, `gate`), the backward pass of the scan
    keeps per mini-batch `FAST_COPIES` copies of the fast weights per inner step and, for TTT-MLP, `HIDDEN_COPIES`
    copies of its hidden values [mini-batch, heads x 4 head_dim] (both fitted to XLA's buffers on CPU).
The total is multiplied by `SAFETY` (allocator slack, buffers XLA does not reuse). Batch-sized parts are divided
over the mesh's data x fsdp devices and parameter parts over its fsdp x tensor devices; on the CPU, where every
device shares the host's memory, the per-device need is multiplied by the local device count. `evaluate` is
estimated as a held-out pass of --data.batch-size sequences of --data.seq-len tokens (its generation batches are not
estimated apart).

The budget (`available_memory`): an accelerator's `memory_stats()["bytes_limit"]` (the smallest of the local
devices); on the CPU the host's MemAvailable (/proc/meminfo) or, when lower, what this process's cgroup memory
limit leaves (v2 memory.max, v1 memory.limit_in_bytes, less the usage that is not reclaimable page cache).

Measured on CPU (apps/train/tests/test_preflight.py, XLA's buffer assignment of real training steps and the
resident memory of a real step): the estimate before `SAFETY` lies within a factor `MEASURED_FACTOR` of the peak.
A stage that does not fit raises ConfigError (exit 2) naming the sizes and the flags that lower them, before any
model is built; --no-preflight skips the check.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Mapping
from typing import Any

from ponderttt.train.config import SCALE_DIRS, ConfigError, OptimizerConfig

SAFETY = 1.25
"""The estimate is multiplied by this before it is compared with the machine's memory."""
MEASURED_FACTOR = 2.0
"""The estimate (before SAFETY) lies within [1 / MEASURED_FACTOR, MEASURED_FACTOR] x the measured peak (tested)."""
BLOCK_WIDTHS = 8
"""Values of width C per token that a trained block keeps (norm inputs and outputs, residuals, q, k, v, attention
output); its MLP's hidden values (2 x the MLP width, 3 x for a gated MLP) come on top."""
FORWARD_WIDTHS = 4
"""Values of width C per token live in a frozen block (q, k, v, output), plus 2 x the MLP width."""
SCORE_COPIES = 2
"""Float32 copies of a block's attention scores [batch, heads, seq, seq] (logits and their exponentials)."""
LOGIT_COPIES = 3
"""Float32 copies of the logits [batch, seq, vocab] when training (logits, log-softmax, gradient); 1 otherwise."""
TTT_WIDTHS = 12
"""Float32 values of the adapter's width per token (input, q, k, v, their mini-batch layouts, the dual form's
outputs, the reconstruction loss terms)."""
FAST_COPIES = 4
"""Copies of the fast weights per mini-batch and inner step that the differentiated scan keeps."""
HIDDEN_COPIES = 95
"""Copies of TTT-MLP's hidden values [mini-batch, heads x mlp_expansion x head_dim] per mini-batch that the
differentiated scan keeps (fitted to XLA's buffer assignment on CPU: about 80 to 110 over widths 128-256 and 4-8
heads; tests/test_preflight.py checks one configuration against XLA's buffers)."""
GiB = 1024**3
STAGES = {  # what each command runs, in order (pretrain only for the in-house backbone)
    "pretrain": ("pretrain",),
    "ttt": ("pretrain", "ttt"),
    "gate": ("gate",),
    "compare": ("compare",),
    "analyze": ("analyze",),
    "evaluate": ("evaluate",),
    "pipeline": ("pretrain", "ttt", "gate", "compare"),
    "reproduce": ("ttt", "gate", "compare"),
}
TRAINING_STAGES = ("pretrain", "ttt", "gate")
PART_NAMES = {"parameters": "parameters", "gradients": "gradients", "optimizer": "optimizer state",
              "updates": "updated parameters and optimizer state", "activations": "activations", "logits": "logits",
              "ttt_state": "TTT state"}
PARAMETER_PARTS = ("parameters", "gradients", "optimizer", "updates")  # sharded over fsdp x tensor, not the batch


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Peak memory of one stage: bytes per part (`PART_NAMES`), for the whole process."""

    stage: str
    parts: Mapping[str, int]

    @property
    def total(self) -> int:
        """The sum of the parts, before `SAFETY`."""
        return sum(self.parts.values())

    @property
    def needed(self) -> int:
        """What the stage is checked against: the total times `SAFETY`."""
        return math.ceil(self.total * SAFETY)

    def describe(self) -> str:
        """'parameters 1.2 GiB, gradients ..., ...' (every part, in GiB)."""
        return ", ".join(f"{PART_NAMES[name]} {gib(size)}" for name, size in self.parts.items())


def gib(size: float) -> str:
    """`size` bytes in GiB with 3 significant digits: '0.0123 GiB', '1.5e+03 GiB'."""
    return f"{size / GiB:.3g} GiB"


def _dtype_bytes(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2}[dtype]


def optimizer_copies(optimizer: OptimizerConfig) -> int:
    """Values the optimiser keeps per trained parameter: 2 for Adam / AdamW (two moments), 1 for SGD (momentum)."""
    return 2 if optimizer.name in ("adam", "adamw") else 1


def backbone_parameters(arch: Any) -> int:
    """Parameters of a GPT-2 or Gemma 3 backbone (`ponderttt.models` configs), counted from its architecture."""
    c, f, layers = arch.hidden_size, arch.mlp_size, arch.num_layers
    q_width, kv_width = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    head = 0 if arch.tie_word_embeddings else c * arch.vocab_size
    if arch.norm == "layernorm":  # GPT-2: biases everywhere, learned positions, scale-and-bias norms
        attention = c * (q_width + 2 * kv_width) + (q_width + 2 * kv_width) + q_width * c + c
        block = attention + (c * f + f) + (f * c + c) + 2 * 2 * c
        return arch.vocab_size * c + arch.max_positions * c + layers * block + 2 * c + head
    attention = c * (q_width + 2 * kv_width) + q_width * c + 2 * arch.head_dim  # Gemma 3: no bias, q / k norms
    block = attention + (3 if arch.gated_mlp else 2) * c * f + 4 * c
    return arch.vocab_size * c + layers * block + c + head


def adapter_sizes(kind: str, ttt_config: Any) -> tuple[int, int]:
    """(trainable parameters, fast-weight values per sequence) of one adapter layer, from its abstract shapes."""
    import jax
    from flax import nnx

    from ponderttt.models import ADAPTER_KINDS

    def build() -> tuple[Any, Any]:
        layer = ADAPTER_KINDS[kind](ttt_config, rngs=nnx.Rngs(0))
        return nnx.state(layer, nnx.Param), layer.init_state(1)

    params, fast = jax.eval_shape(build)
    return (sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
            sum(math.prod(x.shape) for x in jax.tree.leaves(fast)))


def architecture(config: Any, backbone_path: str | None) -> Any:
    """The backbone's architecture config: the HF directory's config.json (`load_hf_config`), else the in-house GPT-2
    of the flags. ConfigError naming the file when config.json cannot be used."""
    from ponderttt.models import AssetError, GPT2Config, load_hf_config

    if backbone_path is None:
        b = config.backbone
        return GPT2Config(vocab_size=config.data.vocab_size, n_positions=config.data.seq_len, n_embd=b.n_embd,
                          n_layer=b.n_layer, n_head=b.n_head)
    try:
        return load_hf_config(backbone_path)
    except (OSError, AssetError) as error:
        raise ConfigError(f"backbone architecture: {error}") from None


def _block_activations(arch: Any, data: Any, dtype_bytes: int, *, trained: bool, remat: bool
                       ) -> tuple[int, int]:
    """(bytes of one block's [batch, seq] values, bytes of its attention scores): those a trained block keeps for
    the backward pass (`remat`: only its matmul outputs), or those live in a frozen block."""
    c, f = arch.hidden_size, arch.mlp_size
    if not trained:
        widths = FORWARD_WIDTHS * c + 2 * f
    elif remat:  # the block's input and its matmul outputs: q, k, v, attention output, MLP input and output
        mlp_in = (2 if arch.gated_mlp else 1) * f
        widths = 3 * c + arch.num_heads * arch.head_dim + 2 * arch.num_kv_heads * arch.head_dim + mlp_in
    else:
        widths = BLOCK_WIDTHS * c + (3 if arch.gated_mlp else 2) * f
    scores = SCORE_COPIES * 4 * data.batch_size * arch.num_heads * data.seq_len * data.seq_len
    return data.batch_size * data.seq_len * widths * dtype_bytes, scores


def stage_estimate(stage: str, config: Any, arch: Any, *, remat_saves: bool = True) -> Estimate:
    """Peak bytes of `stage` (`STAGES`) over the whole global batch. `remat_saves`: whether --platform.remat lowers
    the backbone's kept activations (on accelerators; XLA:CPU showed no saving)."""
    from ponderttt.train.adapter import ttt_config

    data, platform = config.data, config.platform
    p = _dtype_bytes(platform.dtype)
    tokens = data.batch_size * data.seq_len
    training = stage in TRAINING_STAGES
    logits = (LOGIT_COPIES if training else 1) * 4 * tokens * arch.vocab_size
    embeddings = tokens * arch.hidden_size * p
    backbone = backbone_parameters(arch)
    if stage == "pretrain":
        remat = platform.remat and remat_saves
        block, scores = _block_activations(arch, data, p, trained=True, remat=remat)
        kept = arch.num_layers * (block + (0 if remat else scores)) + (scores if remat else 0)
        opt = optimizer_copies(config.backbone.optimizer) * backbone * p
        return Estimate(stage, {"parameters": backbone * p, "gradients": backbone * p, "optimizer": opt,
                                "updates": backbone * p + opt, "activations": kept + embeddings, "logits": logits})
    adapter = config.adapter  # every command but pretrain has one
    layer = ttt_config(data, adapter, arch.hidden_size)
    adapter_params, fast = adapter_sizes(adapter.kind, layer)
    ttt_state = 4 * tokens * (TTT_WIDTHS * arch.hidden_size + 3 * layer.num_heads * data.mini_batch_size)
    if training:  # the inner loop is differentiated: the scan keeps its per-mini-batch values for the backward pass
        steps = adapter.update_steps if stage == "ttt" else 1
        ttt_state += 4 * data.batch_size * (data.seq_len // data.mini_batch_size) * FAST_COPIES * fast * steps
        if adapter.kind == "mlp":
            ttt_state += 4 * tokens * HIDDEN_COPIES * layer.mlp_expansion * arch.hidden_size
    block, scores = _block_activations(arch, data, p, trained=False, remat=False)
    parts = {"parameters": backbone * p + 4 * adapter_params}
    if stage == "ttt":
        opt = optimizer_copies(adapter.optimizer) * 4 * adapter_params
        parts |= {"gradients": 4 * adapter_params, "optimizer": opt, "updates": 4 * adapter_params + opt}
    return Estimate(stage, parts | {"activations": block + scores + embeddings, "logits": logits,
                                    "ttt_state": ttt_state})


def estimates(command: str, config: Any, *, remat_saves: bool = True) -> list[Estimate]:
    """The estimate of every stage `command` runs (`STAGES`; `reproduce`: each scale's, named '<stage> (<scale>)')."""
    if command == "reproduce":
        out = []
        for scale in config.scales:
            arch = architecture(config, str(pathlib.Path(config.backbone_root) / SCALE_DIRS[scale]))
            out += [dataclasses.replace(stage_estimate(s, config, arch, remat_saves=remat_saves),
                                        stage=f"{s} ({scale})") for s in STAGES[command]]
        return out
    arch = architecture(config, config.backbone.path)
    stages = [s for s in STAGES[command] if s != "pretrain" or config.backbone.path is None]
    return [stage_estimate(stage, config, arch, remat_saves=remat_saves) for stage in stages]


def _first_int(path: pathlib.Path) -> int | None:
    """The integer a cgroup file holds; None when absent, unreadable or "max" (no limit)."""
    try:
        text = path.read_text().split()[0]
    except (OSError, IndexError):
        return None
    return int(text) if text.isdigit() else None


def _stat_value(path: pathlib.Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def cgroup_available(proc: pathlib.Path = pathlib.Path("/proc"), sys_fs: pathlib.Path = pathlib.Path("/sys/fs/cgroup")
                     ) -> int | None:
    """Bytes this process's cgroup memory limit still allows (the tightest limit of its cgroup and its ancestors),
    None without a limit. v2: memory.max - (memory.current - inactive_file); v1: memory.limit_in_bytes -
    (memory.usage_in_bytes - total_inactive_file). Limits of 2^62 bytes or more mean none (v1's "unlimited")."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    candidates = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: "0::/path"
            base, files = sys_fs, ("memory.max", "memory.current", "memory.stat", "inactive_file")
        elif "memory" in controllers.split(","):
            base, files = sys_fs / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat",
                                              "total_inactive_file")
        else:
            continue
        relative = pathlib.PurePosixPath(path).relative_to("/")
        folders = [base / relative.parents[i] for i in range(len(relative.parents))]
        for folder in [base / relative, *folders]:  # the cgroup, then its ancestors up to the mount's root
            limit, usage = _first_int(folder / files[0]), _first_int(folder / files[1])
            if limit is None or limit >= 2**62:
                continue
            cache = _stat_value(folder / files[2], files[3])
            candidates.append(max(0, limit - max(0, (usage or 0) - cache)))
    return min(candidates) if candidates else None


def mem_available(proc: pathlib.Path = pathlib.Path("/proc")) -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None when it cannot be read: not Linux)."""
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # "MemAvailable:   23734252 kB"
    except (OSError, ValueError, IndexError):
        pass
    return None


def host_available(proc: pathlib.Path = pathlib.Path("/proc"), sys_fs: pathlib.Path = pathlib.Path("/sys/fs/cgroup")
                   ) -> tuple[int, str] | None:
    """(bytes, where the number comes from) of the host memory this process can still use: MemAvailable of
    /proc/meminfo, or the cgroup's allowance when lower; None when neither is known (not Linux)."""
    found = []
    if (meminfo := mem_available(proc)) is not None:
        found.append((meminfo, "MemAvailable in /proc/meminfo"))
    if (cgroup := cgroup_available(proc, sys_fs)) is not None:
        found.append((cgroup, "the memory limit of this process's cgroup"))
    return min(found) if found else None


def available_memory() -> tuple[int, str, bool] | None:
    """(bytes per device, where the number comes from, whether the devices share the host's memory): the smallest
    `bytes_limit` of the local accelerators, else the host's (`host_available`); None when unknown."""
    import jax

    devices = jax.local_devices()
    limits = [(d.memory_stats() or {}).get("bytes_limit") for d in devices if d.platform != "cpu"]
    limits = [limit for limit in limits if limit]
    if limits:
        return min(limits), f"{devices[0].device_kind} memory (bytes_limit)", False
    host = host_available()
    return None if host is None else (*host, True)


def per_device(estimate: Estimate, mesh_shape: tuple[int, int, int]) -> int:
    """`estimate.needed` on one device of a (data, fsdp, tensor) mesh: the `PARAMETER_PARTS` split over fsdp x
    tensor, the rest (batch-sized) over data x fsdp."""
    data, fsdp, tensor = mesh_shape
    total = sum(size / (fsdp * tensor) if name in PARAMETER_PARTS else size / (data * fsdp)
                for name, size in estimate.parts.items())
    return math.ceil(total * SAFETY)


def check(command: str, config: Any) -> list[Estimate]:
    """Raises ConfigError when a stage of `command` needs more memory than this machine has (one line: the stage,
    its estimate by part, the memory available, the flags that lower it); returns the estimates checked otherwise
    ([] where the machine's memory is unknown). Call it after `jax.distributed.initialize`, before any model is
    built."""
    import jax

    found = available_memory()
    if found is None:  # not Linux and no accelerator: nothing to compare with
        return []
    budget, source, on_host = found
    stages = estimates(command, config, remat_saves=not on_host)
    shape = config.platform.mesh.resolve(jax.device_count())
    devices = jax.local_device_count() if on_host else 1
    for estimate in stages:
        needed = per_device(estimate, shape) * devices
        if needed <= budget:
            continue
        where = " per device" if not on_host else f" on {devices} CPU devices" if devices > 1 else ""
        remedy = "" if on_host or config.platform.remat else ", turn on --platform.remat"
        raise ConfigError(f"{estimate.stage} needs about {gib(needed)}{where} ({estimate.describe()}; x{SAFETY} "
                          f"safety) but this machine has {gib(budget)} available ({source}); lower --data.batch-size "
                          f"({config.data.batch_size}) or --data.seq-len ({config.data.seq_len}){remedy}, or use a "
                          "smaller backbone; --no-preflight skips this check")
    return stages
