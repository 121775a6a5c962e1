"""Typed configuration of every `uv run apps/train` command: frozen dataclasses, presets, validation.

Each section checks itself in `__post_init__`, so an invalid configuration cannot be built, and the
error names the offending value and what to do. Checks that need the file system (a backbone or a
checkpoint directory) live in `ponderttt.train.rundir`, run when a command starts.

Imports only the standard library: `--help` must not pay for jax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Annotated, Any, Literal

import tyro

from ponderttt.eval.benchmarks.tasks import BENCHMARKS
from ponderttt.eval.protocol import ACTION_NAMES, PROTOCOLS, AdapterKind, ProtocolName


class ConfigError(ValueError):
    """A configuration value is invalid; the message names it and says what to do."""


class TrainingDiverged(RuntimeError):
    """A stage's loss or parameters went non-finite: the stage stops, and the poisoned state is not saved."""


# Gating methods the pipeline knows, under the names results.json uses.
FIXED_METHODS = ACTION_NAMES  # the fixed gates are the actions (ponderttt.eval.protocol)
BASELINE_METHODS = ("random", "oracle")
TRAINING_FREE_GATES = ("recon", "recon_inverted")
TRAINABLE_GATES = ("gumbel", "continuous", "ppo")
KNOWN_METHODS = FIXED_METHODS + BASELINE_METHODS + TRAINING_FREE_GATES + TRAINABLE_GATES
PRESET_NAMES = ("smoke", "cpu", "gpu", "tpu-pod")
DEFAULT_PRESET = "cpu"
MIN_TIMING_REPEATS = 5  # timed rounds of the wall-clock cost table, at least
LATER_STAGES = ("gate", "compare", "analyze", "evaluate")  # commands that work on an existing run
# `reproduce --scales`: scale name -> directory name of the HF checkpoint under --backbone-root.
SCALE_DIRS = {
    "125m": "gpt2",
    "350m": "gpt2-medium",
    "1b": "gpt2-large",
    "xl": "gpt2-xl",
    "gemma3-1b": "gemma-3-1b-pt",
    "gemma3-4b": "gemma-3-4b-pt",
    "gemma3-12b": "gemma-3-12b-pt",
    "gemma3-27b": "gemma-3-27b-pt",
}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_budget(flag: str, budget: float) -> None:
    _require(0.0 < budget <= 1.0, f"{flag}={budget} is outside (0, 1]: a budget is the fraction of chunks that may "
                                  "update, e.g. 0.5")


def _check_methods(flag: str, names: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    for name in names:
        _require(name in allowed, f"{flag}: unknown gate name {name!r}; known names: {', '.join(allowed)}")
    _require(len(set(names)) == len(names), f"{flag}={' '.join(names)} names a gate twice")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Where a run writes, whether it resumes, and how often it checkpoints and logs."""

    output_dir: str = "outputs"
    """Root of the run directories (outputs/<run>/) and of the shared cache (outputs/cache/)."""
    name: str | None = None
    """Run directory name under --output-dir. Default: <command>-<preset>-<UTC time>; with --resume, the newest run."""
    resume: bool = False
    """Continue the run from its latest checkpoint (bit-identical to an uninterrupted run)."""
    seed: int = 0
    """Seed of every random choice (initialisation, data order, gates)."""
    keep_checkpoints: int = 3
    """Checkpoints kept per stage (older ones are deleted)."""
    checkpoint_every: int = 100
    """Steps between checkpoints (the last step is always saved)."""
    log_every: int = 10
    """Steps between metric lines (metrics.jsonl and TensorBoard)."""
    eval_every: int = 200
    """Steps between held-out evaluations during training."""
    progress: bool = True
    """Show progress bars (tokens/s and ETA) on stderr."""
    preflight: bool = True
    """Before any model is built, check that each stage's estimated peak memory fits this machine (ponderttt.train.
    preflight); --no-preflight skips the check."""

    def __post_init__(self) -> None:
        _require(self.keep_checkpoints >= 1, f"--keep-checkpoints={self.keep_checkpoints} must be at least 1")
        for flag, value in (("--checkpoint-every", self.checkpoint_every), ("--log-every", self.log_every),
                            ("--eval-every", self.eval_every)):
            _require(value >= 1, f"{flag}={value} must be a positive number of steps")
        if self.name is not None:
            _require(self.name not in ("", ".", "..") and "/" not in self.name and self.name != "cache",
                     f"--name={self.name!r} is not a run directory name: use letters, digits, '-' or '_'")


@dataclasses.dataclass(frozen=True)
class ReadRunConfig(RunConfig):
    """Where a run is and how its output is shown, for a command that reads a trained run (compare, analyze,
    evaluate): the training-only options (checkpoints, logging and evaluation intervals) are not offered."""

    keep_checkpoints: Annotated[int, tyro.conf.Suppress] = RunConfig.keep_checkpoints
    checkpoint_every: Annotated[int, tyro.conf.Suppress] = RunConfig.checkpoint_every
    log_every: Annotated[int, tyro.conf.Suppress] = RunConfig.log_every
    eval_every: Annotated[int, tyro.conf.Suppress] = RunConfig.eval_every


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """One trainer's optimiser (optax): the update rule, its learning-rate schedule, global-norm gradient clipping
    and weight decay. The peak learning rate is the trainer's own flag (e.g. --adapter.lr)."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    """adamw (decoupled weight decay), adam (weight decay must be 0), sgd (momentum b1)."""
    b1: float = 0.9
    """Adam's first-moment decay; SGD's momentum."""
    b2: float = 0.999
    """Adam's second-moment decay."""
    weight_decay: float = 0.0
    """Decoupled weight decay (adamw; sgd adds it to the gradient)."""
    schedule: Literal["warmup_cosine", "constant"] = "warmup_cosine"
    """warmup_cosine: linear warm-up from 0, then cosine decay to end_fraction x the peak; constant: the peak."""
    warmup_fraction: float = 0.1
    """Warm-up steps as a fraction of the trainer's steps (at least one step; warmup_cosine)."""
    end_fraction: float = 0.1
    """Final learning rate as a fraction of the peak (warmup_cosine)."""
    clip_norm: float | None = 1.0
    """Clip the gradients' global norm to this (None: no clipping)."""

    def check(self, flag: str) -> None:
        """ConfigError naming `flag`.<field> (e.g. --adapter.optimizer.b2) for a value outside its range."""
        for name in ("b1", "b2"):
            value = getattr(self, name)
            _require(0.0 <= value < 1.0, f"{flag}.{name}={value} must lie in [0, 1)")
        _require(0.0 <= self.weight_decay < float("inf"),
                 f"{flag}.weight-decay={self.weight_decay} must be finite and >= 0")
        _require(self.name != "adam" or self.weight_decay == 0.0,
                 f"{flag}.weight-decay={self.weight_decay}: adam has no weight decay; use {flag}.name adamw")
        _require(0.0 <= self.warmup_fraction < 1.0, f"{flag}.warmup-fraction={self.warmup_fraction} must lie in [0, 1)")
        _require(0.0 <= self.end_fraction <= 1.0, f"{flag}.end-fraction={self.end_fraction} must lie in [0, 1]")
        _require(self.clip_norm is None or 0.0 < self.clip_norm < float("inf"),
                 f"{flag}.clip-norm={self.clip_norm} must be positive and finite (or None: no clipping)")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape; -1 fills the remaining devices (at most one axis)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self) -> None:
        shape = (self.data, self.fsdp, self.tensor)
        for axis, size in zip(("data", "fsdp", "tensor"), shape, strict=True):
            _require(size == -1 or size >= 1, f"--platform.mesh.{axis}={size} must be -1 (fill) or a positive size")
        _require(shape.count(-1) <= 1, f"mesh (data, fsdp, tensor)={shape}: at most one axis may be -1")

    def resolve(self, n_devices: int) -> tuple[int, int, int]:
        """The concrete (data, fsdp, tensor) shape for `n_devices` devices."""
        shape = [self.data, self.fsdp, self.tensor]
        fixed = 1
        for size in shape:
            fixed *= size if size != -1 else 1
        if -1 in shape:
            _require(n_devices % fixed == 0,
                     f"mesh (data, fsdp, tensor)={tuple(shape)} needs a device count divisible by {fixed}, "
                     f"got {n_devices} devices")
            shape[shape.index(-1)] = n_devices // fixed
        else:
            _require(fixed == n_devices,
                     f"mesh (data, fsdp, tensor)={tuple(shape)} has {fixed} devices, but {n_devices} are present; "
                     "set one axis to -1")
        return shape[0], shape[1], shape[2]


@dataclasses.dataclass(frozen=True)
class PlatformConfig:
    """Numerics, memory and parallelism: the only thing that differs between CPU, GPU and TPU pods."""

    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype of the backbone and adapter (parameters of trained parts stay float32)."""
    remat: bool = False
    """Rematerialise activations in the backward pass (less memory, more compute)."""
    mesh: MeshConfig = MeshConfig()
    distributed: Literal["off", "auto", "manual"] = "off"
    """off: one process. auto: jax.distributed.initialize() detects the cluster (TPU pods, SLURM).
    manual: use --platform.coordinator-address, --platform.num-processes, --platform.process-id."""
    coordinator_address: str | None = None
    """host:port of process 0 (distributed=manual)."""
    num_processes: int = 1
    process_id: int = 0
    cpu_collectives: Literal["gloo", "none"] = "gloo"
    """CPU collectives between processes (gloo for multi-process runs on CPU hosts)."""

    def __post_init__(self) -> None:
        if self.distributed == "manual":
            _require(self.coordinator_address is not None and ":" in self.coordinator_address,
                     f"--platform.coordinator-address={self.coordinator_address!r}: distributed=manual needs host:port")
            _require(self.num_processes >= 1, f"--platform.num-processes={self.num_processes} must be at least 1")
            _require(0 <= self.process_id < self.num_processes,
                     f"--platform.process-id={self.process_id} must lie in [0, {self.num_processes})")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Corpus, tokenizer and packing: documents -> sequences of seq_len -> chunks -> mini-batches."""

    corpus: str = "stdlib"
    """'stdlib' (the running interpreter's standard library, offline) or a directory of source files."""
    vocab_size: int = 2048
    """Byte-level BPE vocabulary size (trained on the training split, cached)."""
    seq_len: int = 256
    """Tokens per packed sequence."""
    chunk_size: int = 64
    """Tokens per chunk: the unit a gate decides on."""
    mini_batch_size: int = 16
    """Tokens per inner-loop mini-batch of the TTT layer."""
    batch_size: int = 8
    """Global sequences per training step (split over processes and the data axes of the mesh)."""
    val_fraction: float = 0.05
    """Fraction of files in the validation split (periodic evaluation while training); split by file hash."""
    test_fraction: float = 0.05
    """Fraction of files in the held-out test split (compare, analyze, report)."""
    max_files: int | None = None
    """Use at most this many training files, and an eighth as many (at least 4) per held-out split (None: all)."""

    def __post_init__(self) -> None:
        for flag, value in (("--data.vocab-size", self.vocab_size), ("--data.seq-len", self.seq_len),
                            ("--data.chunk-size", self.chunk_size), ("--data.mini-batch-size", self.mini_batch_size),
                            ("--data.batch-size", self.batch_size)):
            _require(value >= 1, f"{flag}={value} must be positive")
        _require(self.vocab_size >= 257, f"--data.vocab-size={self.vocab_size}: a byte-level BPE needs at least 257")
        _require(self.chunk_size % self.mini_batch_size == 0,
                 f"--data.chunk-size={self.chunk_size} is not divisible by --data.mini-batch-size="
                 f"{self.mini_batch_size}; choose a chunk size that is a multiple of it")
        _require(self.seq_len % self.chunk_size == 0,
                 f"--data.seq-len={self.seq_len} is not divisible by --data.chunk-size={self.chunk_size}; "
                 "choose a sequence length that is a multiple of it")
        for flag, value in (("--data.val-fraction", self.val_fraction), ("--data.test-fraction", self.test_fraction)):
            _require(0.0 < value < 0.5, f"{flag}={value} must lie in (0, 0.5)")
        if self.max_files is not None:
            _require(self.max_files >= 1, f"--data.max-files={self.max_files} must be positive")

    @property
    def chunks_per_sequence(self) -> int:
        """N = seq_len // chunk_size: the gate's decisions per sequence."""
        return self.seq_len // self.chunk_size


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    """The frozen backbone: an HF directory, or the small in-house GPT-2 pretrained on the corpus (cached)."""

    path: str | None = None
    """Directory with config.json and *.safetensors (GPT-2 or Gemma 3). None: the cached in-house GPT-2."""
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    pretrain_steps: int = 400
    """Optimizer steps of the in-house pretraining (ignored with --backbone.path)."""
    pretrain_lr: float = 3e-3
    optimizer: OptimizerConfig = OptimizerConfig(b2=0.95, weight_decay=0.1)
    """The pretraining optimiser (peak learning rate: --backbone.pretrain-lr)."""

    def __post_init__(self) -> None:
        for flag, value in (("--backbone.n-layer", self.n_layer), ("--backbone.n-head", self.n_head),
                            ("--backbone.n-embd", self.n_embd), ("--backbone.pretrain-steps", self.pretrain_steps)):
            _require(value >= 1, f"{flag}={value} must be positive")
        _require(self.n_embd % self.n_head == 0,
                 f"--backbone.n-embd={self.n_embd} is not divisible by --backbone.n-head={self.n_head}")
        _require(0 < self.pretrain_lr < float("inf"), f"--backbone.pretrain-lr={self.pretrain_lr} must be positive and "
                                                      "finite")
        self.optimizer.check("--backbone.optimizer")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """The TTT adapter, trained with a fixed UPDATE_k: L = L_CE + beta * L_TTT."""

    kind: AdapterKind = "linear"
    """Fast-weight layer: TTT-Linear, TTT-MLP or LoRA-TTT."""
    num_heads: int = 4
    base_lr: float = 1.0
    """Inner-loop base learning rate (eta)."""
    update_steps: Literal[1, 2, 4] = 1
    """Inner gradient steps per chunk while training the adapter (UPDATE_k)."""
    beta: float = 0.1
    """Weight of the TTT reconstruction loss in L = L_CE + beta * L_TTT."""
    train_steps: int = 200
    lr: float = 1e-3
    protocol: ProtocolName = "reset"
    """Fast-weight state across the chunks of a sequence while training."""
    optimizer: OptimizerConfig = OptimizerConfig()
    """The adapter's optimiser (peak learning rate: --adapter.lr)."""

    def __post_init__(self) -> None:
        _require(self.num_heads >= 1, f"--adapter.num-heads={self.num_heads} must be positive")
        _require(self.base_lr > 0, f"--adapter.base-lr={self.base_lr} must be positive")
        _require(self.beta >= 0, f"--adapter.beta={self.beta} must be non-negative")
        _require(self.train_steps >= 1, f"--adapter.train-steps={self.train_steps} must be positive")
        _require(0 < self.lr < float("inf"), f"--adapter.lr={self.lr} must be positive and finite")
        self.optimizer.check("--adapter.optimizer")


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """Learned gates, trained on the frozen backbone + adapter to meet an update budget."""

    gates: tuple[str, ...] = TRAINABLE_GATES
    """Gates to train: gumbel (hard skip), continuous (learned scale), ppo (PID-Lagrangian budget)."""
    budget: float = 0.5
    """Target fraction of updated chunks during gate training, in (0, 1]."""
    train_steps: int = 100
    lr: float = 3e-4
    scale_max: float = 2.0
    """Largest scale λ of the continuous gate (λ = 1 is one UPDATE_1 step's learning rate)."""
    ppo_epochs: int = 4
    """PPO epochs over each rollout (one training batch: chunks x sequences decisions)."""
    ppo_minibatches: int = 4
    """PPO minibatches per epoch; must divide chunks per sequence x --data.batch-size."""
    optimizer: OptimizerConfig = OptimizerConfig(name="adam", schedule="constant")
    """The gumbel and continuous gates' optimiser (peak learning rate: --gate.lr)."""
    ppo_optimizer: OptimizerConfig = OptimizerConfig(name="adam", schedule="constant", clip_norm=0.5)
    """The PPO gate's optimiser (peak learning rate: --gate.lr), applied once per PPO minibatch."""

    def __post_init__(self) -> None:
        _check_methods("--gate.gates", self.gates, TRAINABLE_GATES)
        _check_budget("--gate.budget", self.budget)
        _require(self.train_steps >= 1, f"--gate.train-steps={self.train_steps} must be positive")
        _require(0 < self.lr < float("inf"), f"--gate.lr={self.lr} must be positive and finite")
        self.optimizer.check("--gate.optimizer")
        self.ppo_optimizer.check("--gate.ppo-optimizer")
        _require(self.scale_max > 0, f"--gate.scale-max={self.scale_max} must be positive")
        _require(self.ppo_epochs >= 1, f"--gate.ppo-epochs={self.ppo_epochs} must be positive")
        _require(self.ppo_minibatches >= 1, f"--gate.ppo-minibatches={self.ppo_minibatches} must be positive")


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """Every method x budget on the same held-out chunks, under the reset and the carry protocol."""

    methods: tuple[str, ...] = ("skip", "update_1", "random", "oracle", "recon") + TRAINABLE_GATES
    budgets: tuple[float, ...] = (0.25, 0.5, 0.75)
    """Update budgets (fraction of chunks), each in (0, 1]."""
    protocols: tuple[ProtocolName, ...] = PROTOCOLS
    eval_sequences: int = 64
    """Held-out sequences evaluated (the same ones for every method)."""
    n_resamples: int = 1000
    """Bootstrap resamples of every confidence interval of the run (compare, analyze and evaluate use this one
    count, so that a number has the same CI in every file); documents (problems for benchmarks) are resampled."""

    timing_repeats: int = 10
    """Timed rounds of the wall-clock cost table (every action and gate overhead once per round, interleaved, after a
    warm-up); the table keeps the median and the interquartile range. At least 5."""

    def __post_init__(self) -> None:
        _require(self.n_resamples >= 10, f"--compare.n-resamples={self.n_resamples} must be at least 10")
        _require(self.timing_repeats >= MIN_TIMING_REPEATS,
                 f"--compare.timing-repeats={self.timing_repeats} must be at least {MIN_TIMING_REPEATS}: the cost "
                 "table records the median and spread of repeated timings")
        _check_methods("--compare.methods", self.methods, KNOWN_METHODS)
        _require(len(self.budgets) >= 1, "--compare.budgets needs at least one budget, e.g. 0.5")
        for budget in self.budgets:
            _check_budget("--compare.budgets", budget)
        _require(len(set(self.budgets)) == len(self.budgets),
                 f"--compare.budgets={' '.join(f'{b:g}' for b in self.budgets)} names a budget twice")
        _require(len(self.protocols) >= 1, "--compare.protocols needs reset, carry or both")
        _require(self.eval_sequences >= 1, f"--compare.eval-sequences={self.eval_sequences} must be positive")


@dataclasses.dataclass(frozen=True)
class AnalyzeConfig:
    """Signal correlations with the oracle advantage (the published scaling table)."""

    signals: tuple[str, ...] = ("recon_loss", "entropy", "confidence", "ttt_improvement")
    """Per-chunk signals correlated (Pearson r) with the oracle advantage."""
    eval_sequences: int = 64

    def __post_init__(self) -> None:
        _require(len(self.signals) >= 1, "--analyze.signals needs at least one signal")
        _require(self.eval_sequences >= 1, f"--analyze.eval-sequences={self.eval_sequences} must be positive")


# `evaluate`: benchmarks read from local files, and the TTT modes compared while generating.
EVALUATE_BENCHMARKS = tuple(BENCHMARKS)  # the registry of ponderttt.eval (light: no numpy or jax)
EVALUATE_GATES = ("skip", "update_1", "recon", "random")


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """Code and reasoning benchmarks, with TTT during generation (greedy by default)."""

    benchmark_dir: str | None = None
    """Directory of benchmark files: <name>.jsonl (or <name>.json) with the hub data set's fields, e.g.
    DIR/humaneval.jsonl; optional few-shot examples in <name>.shots.jsonl. None: no benchmark is run."""
    benchmarks: tuple[str, ...] = ("humaneval", "mbpp", "gsm8k")
    """Benchmarks to run: humaneval mbpp classeval gsm8k math500 gpqa_diamond livecodebench."""
    max_problems: int | None = None
    """Use the first N problems of each benchmark (None: all)."""
    max_new_tokens: int = 128
    gates: tuple[str, ...] = ("skip", "update_1", "recon")
    """TTT modes compared while generating: skip (lambda 0), update_1 (lambda 1 on every chunk), recon (the
    reconstruction-loss threshold gate at --evaluate.budget), random (updates with probability budget)."""
    budget: float = 0.5
    """Target update rate of the recon and random gates, in (0, 1]."""
    batch_size: int = 8
    """Problems generated together (left-padded)."""
    shots: int | None = None
    """Few-shot examples from <name>.shots.jsonl (None: the benchmark's usual count when that file exists:
    mbpp 3, gsm8k 8, math500 4; 0 otherwise)."""
    temperature: float = 0.0
    """0: greedy decoding."""
    timeout_s: float = 3.0
    """Sandbox wall-clock limit per program (code benchmarks)."""
    isolation: Literal["full", "namespace", "process"] = "full"
    """Sandbox of the code benchmarks (`ponderttt.eval.execution`): full (namespaces, a cgroup capping processes,
    memory and CPU, a private root with only the interpreter's files); namespace (no cgroup, host files visible
    read-only) and process (rlimits only) are weaker and run only when asked for here. Where the machine cannot
    give the chosen mode, `evaluate` stops before generating."""

    def __post_init__(self) -> None:
        _require(self.max_new_tokens >= 1, f"--evaluate.max-new-tokens={self.max_new_tokens} must be positive")
        _require(len(self.benchmarks) >= 1, "--evaluate.benchmarks needs at least one benchmark, e.g. humaneval")
        for name in self.benchmarks:
            _require(name in EVALUATE_BENCHMARKS, f"--evaluate.benchmarks: unknown benchmark {name!r}; known: "
                                                  f"{', '.join(EVALUATE_BENCHMARKS)}")
        _require(len(set(self.benchmarks)) == len(self.benchmarks),
                 f"--evaluate.benchmarks={' '.join(self.benchmarks)} names a benchmark twice")
        _require(len(self.gates) >= 1, "--evaluate.gates needs at least one gate, e.g. skip update_1 recon")
        _check_methods("--evaluate.gates", self.gates, EVALUATE_GATES)
        _check_budget("--evaluate.budget", self.budget)
        if self.max_problems is not None:
            _require(self.max_problems >= 1, f"--evaluate.max-problems={self.max_problems} must be positive")
        _require(self.batch_size >= 1, f"--evaluate.batch-size={self.batch_size} must be positive")
        if self.shots is not None:
            _require(self.shots >= 0, f"--evaluate.shots={self.shots} must be 0 or more")
        _require(self.temperature >= 0, f"--evaluate.temperature={self.temperature} must be >= 0 (0: greedy)")
        _require(self.timeout_s > 0, f"--evaluate.timeout-s={self.timeout_s} must be positive")


def _check_ppo_rollout(gate: GateConfig, data: DataConfig) -> None:
    decisions = data.chunks_per_sequence * data.batch_size
    _require("ppo" not in gate.gates or decisions % gate.ppo_minibatches == 0,
             f"--gate.ppo-minibatches={gate.ppo_minibatches} does not divide the {decisions} decisions of a rollout "
             f"(--data.seq-len / --data.chunk-size = {data.chunks_per_sequence} chunks x --data.batch-size="
             f"{data.batch_size}); choose a divisor of {decisions}")


def _check_compared_gates_are_trained(gate: GateConfig, compare: CompareConfig) -> None:
    missing = [m for m in compare.methods if m in TRAINABLE_GATES and m not in gate.gates]
    _require(not missing, f"--compare.methods includes {', '.join(missing)}, which --gate.gates does not train; "
                          "add it to --gate.gates or drop it from --compare.methods")


Run = Annotated[RunConfig, tyro.conf.OmitArgPrefixes]
ReadRun = Annotated[ReadRunConfig, tyro.conf.OmitArgPrefixes]
# A command that reads a trained run takes these sections from the run's config.json (no flags: nothing to train)
Trained = tyro.conf.Suppress


@dataclasses.dataclass(frozen=True)
class PretrainCommand:
    """Pretrain the small in-house GPT-2 backbone on the corpus (cached by config hash)."""

    run: Run = RunConfig()
    platform: PlatformConfig = PlatformConfig()
    data: DataConfig = DataConfig()
    backbone: BackboneConfig = BackboneConfig()


@dataclasses.dataclass(frozen=True)
class TTTCommand:
    """Train the TTT adapter on the frozen backbone with a fixed UPDATE_k (L = L_CE + beta * L_TTT)."""

    run: Run = RunConfig()
    platform: PlatformConfig = PlatformConfig()
    data: DataConfig = DataConfig()
    backbone: BackboneConfig = BackboneConfig()
    adapter: AdapterConfig = AdapterConfig()


@dataclasses.dataclass(frozen=True)
class GateCommand:
    """Train the learned gates (gumbel hard skip, continuous scale, PPO) on a trained adapter."""

    run: Run = RunConfig()
    platform: PlatformConfig = PlatformConfig()
    data: DataConfig = DataConfig()
    backbone: BackboneConfig = BackboneConfig()
    adapter: AdapterConfig = AdapterConfig()
    gate: GateConfig = GateConfig()

    def __post_init__(self) -> None:
        _check_ppo_rollout(self.gate, self.data)


@dataclasses.dataclass(frozen=True)
class CompareCommand:
    """Compare every method x budget on the same held-out chunks (reset and carry protocols)."""

    run: ReadRun = ReadRunConfig()
    platform: PlatformConfig = PlatformConfig()
    data: DataConfig = DataConfig()
    backbone: Annotated[BackboneConfig, Trained] = BackboneConfig()
    adapter: Annotated[AdapterConfig, Trained] = AdapterConfig()
    gate: Annotated[GateConfig, Trained] = GateConfig()
    compare: CompareConfig = CompareConfig()

    def __post_init__(self) -> None:
        _check_compared_gates_are_trained(self.gate, self.compare)


@dataclasses.dataclass(frozen=True)
class AnalyzeCommand:
    """Correlate per-chunk signals with the oracle advantage (the published scaling table)."""

    run: ReadRun = ReadRunConfig()
    platform: PlatformConfig = PlatformConfig()
    data: DataConfig = DataConfig()
    backbone: Annotated[BackboneConfig, Trained] = BackboneConfig()
    adapter: Annotated[AdapterConfig, Trained] = AdapterConfig()
    analyze: AnalyzeConfig = AnalyzeConfig()
    compare: CompareConfig = CompareConfig()
    """Only --compare.n-resamples is read: one bootstrap count for every CI of a run."""


@dataclasses.dataclass(frozen=True)
class EvaluateCommand:
    """Evaluate on code and reasoning benchmarks with TTT during generation."""

    run: ReadRun = ReadRunConfig()
    platform: PlatformConfig = PlatformConfig()
    data: DataConfig = DataConfig()
    backbone: Annotated[BackboneConfig, Trained] = BackboneConfig()
    adapter: Annotated[AdapterConfig, Trained] = AdapterConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    compare: CompareConfig = CompareConfig()
    """Only --compare.n-resamples is read: one bootstrap count for every CI of a run."""


@dataclasses.dataclass(frozen=True)
class PipelineCommand:
    """The whole workflow: data, backbone, adapter, gates, compare, analyze, report (the default command)."""

    run: Run = RunConfig()
    platform: PlatformConfig = PlatformConfig()
    data: DataConfig = DataConfig()
    backbone: BackboneConfig = BackboneConfig()
    adapter: AdapterConfig = AdapterConfig()
    gate: GateConfig = GateConfig()
    compare: CompareConfig = CompareConfig()
    analyze: AnalyzeConfig = AnalyzeConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    """Benchmarks after the comparison, when --evaluate.benchmark-dir is given."""

    def __post_init__(self) -> None:
        _check_compared_gates_are_trained(self.gate, self.compare)
        _check_ppo_rollout(self.gate, self.data)


@dataclasses.dataclass(frozen=True)
class ReproduceCommand:
    """The published run-all-experiments workflow: for each backbone scale, train, compare, analyze; aggregate."""

    scales: tuple[str, ...] = ("125m", "350m")
    """Backbone scales: 125m 350m 1b xl (GPT-2) or gemma3-1b gemma3-4b gemma3-12b gemma3-27b."""
    backbone_root: str = "checkpoints"
    """Directory holding one HF checkpoint directory per scale (gpt2, gpt2-medium, gpt2-large, ...)."""
    run: Run = RunConfig()
    platform: PlatformConfig = PlatformConfig()
    data: DataConfig = DataConfig()
    adapter: AdapterConfig = AdapterConfig()
    gate: GateConfig = GateConfig()
    compare: CompareConfig = CompareConfig()
    analyze: AnalyzeConfig = AnalyzeConfig()

    def __post_init__(self) -> None:
        _require(len(self.scales) >= 1, "--scales needs at least one scale, e.g. --scales 125m 350m")
        for scale in self.scales:
            _require(scale in SCALE_DIRS, f"--scales: unknown scale {scale!r}; known: {', '.join(SCALE_DIRS)}")
        _check_compared_gates_are_trained(self.gate, self.compare)
        _check_ppo_rollout(self.gate, self.data)


COMMANDS: dict[str, type] = {
    "pipeline": PipelineCommand,
    "pretrain": PretrainCommand,
    "ttt": TTTCommand,
    "gate": GateCommand,
    "compare": CompareCommand,
    "analyze": AnalyzeCommand,
    "evaluate": EvaluateCommand,
    "reproduce": ReproduceCommand,
}


# ----------------------------------------------------------------------------------------------- presets
# A preset gives every section; a command takes the sections it has.


# The small in-house backbones need a larger inner learning rate and a lighter L_TTT weight than the TTT-LM
# defaults for an update to matter (60-step trials on the cpu backbone: UPDATE_1 - SKIP on validation went from
# -0.00003 nats with base_lr 1, beta 0.1 to -0.004 with these; noisy, measured under load).
SMALL_ADAPTER = {"base_lr": 30.0, "beta": 0.001, "lr": 3e-3}


def _smoke() -> dict[str, Any]:
    return dict(
        run=RunConfig(checkpoint_every=10, log_every=5, eval_every=20, keep_checkpoints=2),
        platform=PlatformConfig(),
        data=DataConfig(vocab_size=512, seq_len=128, chunk_size=32, mini_batch_size=8, batch_size=4, max_files=60),
        backbone=BackboneConfig(n_layer=2, n_head=2, n_embd=64, pretrain_steps=40, pretrain_lr=3e-3),
        adapter=AdapterConfig(num_heads=2, train_steps=20, **SMALL_ADAPTER),
        gate=GateConfig(train_steps=20),
        compare=CompareConfig(budgets=(0.5,), eval_sequences=8, n_resamples=100),
        analyze=AnalyzeConfig(eval_sequences=8),
        evaluate=EvaluateConfig(max_new_tokens=16, max_problems=4, batch_size=4),
    )


def _cpu() -> dict[str, Any]:
    return dict(
        run=RunConfig(),
        platform=PlatformConfig(),
        data=DataConfig(),
        backbone=BackboneConfig(),
        adapter=AdapterConfig(**SMALL_ADAPTER),
        gate=GateConfig(),
        compare=CompareConfig(),
        analyze=AnalyzeConfig(),
        evaluate=EvaluateConfig(),
    )


def _gpu() -> dict[str, Any]:
    return dict(
        run=RunConfig(checkpoint_every=500, log_every=20, eval_every=1000),
        platform=PlatformConfig(dtype="bfloat16", remat=True),
        data=DataConfig(vocab_size=32768, seq_len=2048, chunk_size=512, mini_batch_size=16, batch_size=32),
        backbone=BackboneConfig(n_layer=12, n_head=12, n_embd=768, pretrain_steps=20000, pretrain_lr=6e-4),
        adapter=AdapterConfig(num_heads=12, train_steps=10000, lr=3e-4),
        gate=GateConfig(train_steps=5000),
        compare=CompareConfig(eval_sequences=512),
        analyze=AnalyzeConfig(eval_sequences=512),
        evaluate=EvaluateConfig(max_new_tokens=512, batch_size=32),
    )


def _tpu_pod() -> dict[str, Any]:
    gpu = _gpu()
    return dict(
        gpu,
        platform=PlatformConfig(dtype="bfloat16", remat=True, mesh=MeshConfig(data=-1, fsdp=8, tensor=1),
                                distributed="auto", cpu_collectives="none"),
        data=dataclasses.replace(gpu["data"], batch_size=256),
        compare=CompareConfig(eval_sequences=4096),
        analyze=AnalyzeConfig(eval_sequences=4096),
    )


PRESETS: dict[str, Callable[[], dict[str, Any]]] = {"smoke": _smoke, "cpu": _cpu, "gpu": _gpu, "tpu-pod": _tpu_pod}


def preset(command: str, name: str = DEFAULT_PRESET) -> Any:
    """The config of `command` under preset `name` (before any flag)."""
    if name not in PRESETS:
        raise ConfigError(f"--preset={name!r} is not a preset; choose one of {', '.join(PRESET_NAMES)}")
    if command not in COMMANDS:
        raise ConfigError(f"unknown command {command!r}; choose one of {', '.join(COMMANDS)}")
    cls = COMMANDS[command]
    sections = PRESETS[name]()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if fields["run"].default is not dataclasses.MISSING and type(fields["run"].default) is not RunConfig:
        sections["run"] = type(fields["run"].default)(**dataclasses.asdict(sections["run"]))  # e.g. ReadRunConfig
    return cls(**{key: value for key, value in sections.items() if key in fields})


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (tuples become lists)."""
    return dataclasses.asdict(config)
