"""Cost of each gate action: analytic FLOPs, the published convention, and measured wall-clock.

The backbone and the adapter are described by plain numbers (no import of ``ponderttt.models``), so the
cost model works for any checkpoint. FLOPs count matrix products only, 2·m·n·k per [m, n] x [n, k] product
(the Kaplan / Chinchilla convention); layer norms, activations, softmax and other element-wise work are
left out everywhere, so the relative costs of actions compare like with like.

Per chunk of ``chunk_size`` tokens:

- ``backbone``: the frozen model's forward pass: attention projections, causal attention against every
  earlier token of the sequence (or of the window), the MLP, and the LM head. Chunks later in a sequence
  attend to more keys; the figure is the mean over the ``seq_len // chunk_size`` chunks of a sequence.
- ``adapter``: the fast-weight layer's own projections (θ_Q, θ_K, θ_V, θ_O and the token learning-rate
  head for TTT layers) and, for SKIP, the inner model applied to the queries with unchanged fast weights.
- ``probe``: the no-update reconstruction loss some gates read before deciding (inner model on the keys),
  paid by every action when ``AdapterSpec.probe`` is set; plus a fixed ``gate_flops_per_chunk``.
- ``inner``: for UPDATE_k, k passes of the inner loop over the chunk's mini-batches. Each pass computes the
  inner model on the keys, the gradient of the reconstruction loss with respect to every fast weight and
  the update; the last pass also applies the updated inner model to the queries (the output), and for
  TTT-Linear includes the dual form's within-mini-batch products (XQ·XKᵀ, (η⊙M⊙XQ·XKᵀ)·G, (η⊙M)·G).

The published convention (SKIP 1, UPDATE_k 1 + 2k) counts each step as a full forward and backward pass;
reports give it as a third column.

Measured wall-clock seconds per chunk come from the runner as repeated timings (`WallClock`: the median and the
interquartile range of the repeats). Each action's row times that action's forward alone; work only some gates
do (the reconstruction probe a threshold gate reads, the learned gates' features) is timed separately and kept
as the table's ``overheads``, which a method adds to every chunk it decides on (`chunk_wall_clock`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ponderttt.eval import protocol
from ponderttt.eval.protocol import ACTION_NAMES, ADAPTER_KINDS

COST_UNITS = ("flops", "relative_flops", "published", "wall_clock_s")

_UPDATE_RE = re.compile(r"^update_(\d+)$")


def action_steps(action: str | int) -> int:
    """``"skip"`` -> 0, ``"update_k"`` / ``"UPDATE_k"`` -> k, a non-negative int (or its digits) -> itself."""
    if isinstance(action, bool):
        raise TypeError(f"action must be a name like 'update_2' or a step count, got {action!r}")
    if isinstance(action, int | np.integer):
        if action < 0:
            raise ValueError(f"a step count must be >= 0, got {action}")
        return int(action)
    key = str(action).strip().lower().replace("-", "_")
    if key == "skip":
        return 0
    if key.isdigit():  # a step count that went through a string array (mixed lists)
        return int(key)
    match = _UPDATE_RE.match(key)
    if match is None:
        raise ValueError(f"unknown action {action!r}; use 'skip', 'update_<k>' (e.g. 'update_2') or a step count")
    return int(match.group(1))


def action_name(steps: int) -> str:
    """0 -> ``"skip"``, k -> ``"update_k"``."""
    return "skip" if steps == 0 else f"update_{steps}"


def published_cost(action: str | int) -> float:
    """The published convention (`ponderttt.eval.protocol.published_cost`): SKIP costs 1, UPDATE_k costs 1 + 2k."""
    return protocol.published_cost(action_steps(action))


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """The frozen backbone, as plain numbers.

    ``mlp_hidden`` defaults to 4 x hidden; ``mlp_gated`` counts three MLP matrices (GeGLU / SwiGLU) instead
    of two; ``num_kv_heads`` (grouped-query attention) defaults to ``num_heads``; ``head_dim`` defaults to
    hidden / heads; ``attention_window`` caps the keys each token attends to (sliding-window attention).
    """

    num_layers: int
    hidden_size: int
    num_heads: int
    vocab_size: int
    seq_len: int
    chunk_size: int = 512
    mlp_hidden: int | None = None
    mlp_gated: bool = False
    num_kv_heads: int | None = None
    head_dim: int | None = None
    attention_window: int | None = None

    def __post_init__(self):
        for field in ("num_layers", "hidden_size", "num_heads", "vocab_size", "seq_len", "chunk_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
                raise ValueError(f"BackboneSpec.{field} must be a positive int, got {value!r}")
        if self.seq_len % self.chunk_size:
            raise ValueError(
                f"seq_len={self.seq_len} is not a multiple of chunk_size={self.chunk_size}; "
                "sequences are split into whole chunks, so pick seq_len = n * chunk_size"
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; pass head_dim"
            )
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    @property
    def resolved_head_dim(self) -> int:
        """``head_dim``, or hidden_size // num_heads when unset."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def resolved_mlp_hidden(self) -> int:
        """``mlp_hidden``, or 4 x hidden_size when unset."""
        return self.mlp_hidden if self.mlp_hidden is not None else 4 * self.hidden_size

    @property
    def chunks_per_sequence(self) -> int:
        """seq_len // chunk_size (exact: ``__post_init__`` checks divisibility)."""
        return self.seq_len // self.chunk_size

    @classmethod
    def gpt2_125m(cls, seq_len: int = 1024, chunk_size: int = 512) -> BackboneSpec:
        """GPT-2 small: 12 layers, hidden 768, 12 heads, vocabulary 50257."""
        return cls(12, 768, 12, 50257, seq_len, chunk_size)

    @classmethod
    def gpt2_350m(cls, seq_len: int = 1024, chunk_size: int = 512) -> BackboneSpec:
        """GPT-2 medium: 24 layers, hidden 1024, 16 heads, vocabulary 50257."""
        return cls(24, 1024, 16, 50257, seq_len, chunk_size)

    @classmethod
    def gpt2_774m(cls, seq_len: int = 1024, chunk_size: int = 512) -> BackboneSpec:
        """GPT-2 large: 36 layers, hidden 1280, 20 heads, vocabulary 50257."""
        return cls(36, 1280, 20, 50257, seq_len, chunk_size)

    @classmethod
    def gpt2_1_5b(cls, seq_len: int = 1024, chunk_size: int = 512) -> BackboneSpec:
        """GPT-2 XL: 48 layers, hidden 1600, 25 heads, vocabulary 50257."""
        return cls(48, 1600, 25, 50257, seq_len, chunk_size)


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """The fast-weight layer, as plain numbers.

    ``kind`` (one of ``protocol.ADAPTER_KINDS``): ``linear`` (TTT-Linear: per head, inner model d x d), ``mlp``
    (TTT-MLP: per head, d -> mlp_multiplier·d -> d) or ``lora`` (LoRA-TTT: one low-rank pair, hidden -> rank ->
    hidden, so ``num_heads`` is 1 and ``inner_dim`` the rank). ``width`` is the hidden size the adapter reads and
    writes. ``projections`` is the number of width x (heads·inner_dim) projections around the inner model (Q, K,
    V, O: 4 for TTT layers, 0 for LoRA-TTT that reuses the backbone's); TTT layers add a width -> heads token
    learning-rate head. ``num_layers`` adapters are inserted. ``probe``: the gate reads a no-update
    reconstruction loss first.
    """

    kind: str
    width: int
    num_heads: int
    inner_dim: int
    mini_batch_size: int = 16
    mlp_multiplier: int = 4
    num_layers: int = 1
    projections: int | None = None
    probe: bool = False
    gate_flops_per_chunk: float = 0.0

    def __post_init__(self):
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(f"unknown adapter kind {self.kind!r}; expected one of {ADAPTER_KINDS}")
        for field in ("width", "num_heads", "inner_dim", "mini_batch_size", "mlp_multiplier", "num_layers"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
                raise ValueError(f"AdapterSpec.{field} must be a positive int, got {value!r}")
        if self.kind == "lora" and self.num_heads != 1:
            raise ValueError(f"lora (LoRA-TTT) has one low-rank pair: num_heads must be 1, got {self.num_heads}")
        if self.projections is not None and self.projections < 0:
            raise ValueError(f"AdapterSpec.projections must be >= 0, got {self.projections}")
        if self.gate_flops_per_chunk < 0:
            raise ValueError(f"gate_flops_per_chunk must be >= 0, got {self.gate_flops_per_chunk}")

    @property
    def resolved_projections(self) -> int:
        """``projections``, or the kind's default: 4 (Q, K, V, O) for TTT layers, 0 for LoRA-TTT."""
        if self.projections is not None:
            return self.projections
        return 0 if self.kind == "lora" else 4

    @classmethod
    def for_backbone(cls, backbone: BackboneSpec, kind: str = "linear", **overrides: Any) -> AdapterSpec:
        """An adapter sized like the backbone: TTT heads = backbone heads, inner_dim = hidden / heads;
        LoRA-TTT with rank 16 unless ``inner_dim`` is given."""
        if kind == "lora":
            base = dict(kind=kind, width=backbone.hidden_size, num_heads=1, inner_dim=16)
        else:
            base = dict(
                kind=kind,
                width=backbone.hidden_size,
                num_heads=backbone.num_heads,
                inner_dim=backbone.hidden_size // backbone.num_heads,
            )
        base.update(overrides)
        return cls(**base)

    def inner_shapes(self) -> list[tuple[int, int]]:
        """[(in, out)] of the inner model's matrices, for one head."""
        d = self.inner_dim
        if self.kind == "linear":
            return [(d, d)]
        if self.kind == "mlp":
            return [(d, self.mlp_multiplier * d), (self.mlp_multiplier * d, d)]
        return [(self.width, d), (d, self.width)]


@dataclasses.dataclass(frozen=True)
class FlopBreakdown:
    """FLOPs of one action on one chunk, by part."""

    backbone: float
    adapter: float
    probe: float
    inner: float

    @property
    def total(self) -> float:
        """backbone + adapter + probe + inner FLOPs."""
        return self.backbone + self.adapter + self.probe + self.inner


def backbone_chunk_flops(spec: BackboneSpec) -> float:
    """Forward FLOPs of the frozen backbone on one chunk, averaged over the chunks of a sequence."""
    c, hd = spec.hidden_size, spec.resolved_head_dim
    q_dim = spec.num_heads * hd
    kv_dim = (spec.num_kv_heads or spec.num_heads) * hd
    mats = 3 if spec.mlp_gated else 2
    per_token_dense = spec.num_layers * (
        2 * c * (q_dim + 2 * kv_dim) + 2 * q_dim * c + mats * 2 * c * spec.resolved_mlp_hidden
    )
    per_token_dense += 2 * c * spec.vocab_size  # LM head
    positions = np.arange(1, spec.seq_len + 1, dtype=np.float64)  # keys seen by the token at each position
    if spec.attention_window is not None:
        positions = np.minimum(positions, spec.attention_window)
    attention_all = spec.num_layers * 4.0 * q_dim * positions.sum()  # QKᵀ and (softmax)V
    return float(per_token_dense * spec.chunk_size + attention_all / spec.chunks_per_sequence)


def _inner_forward_per_token(adapter: AdapterSpec) -> float:
    return adapter.num_heads * sum(2.0 * i * o for i, o in adapter.inner_shapes())


def _inner_backward_per_token(adapter: AdapterSpec) -> float:
    shapes = adapter.inner_shapes()
    weight_grads = sum(2.0 * i * o for i, o in shapes)
    activation_grads = sum(2.0 * i * o for i, o in shapes[1:])  # no gradient w.r.t. the keys themselves
    return adapter.num_heads * (weight_grads + activation_grads)


def _dual_form_extra_per_token(adapter: AdapterSpec) -> float:
    if adapter.kind != "linear":
        return 0.0
    # XQ·XKᵀ, (η⊙M⊙A)·G and (η⊙M)·G: three [b, b] x [b, d]-sized products per mini-batch, 2·b·d per token each.
    return adapter.num_heads * 3 * 2.0 * adapter.mini_batch_size * adapter.inner_dim


def action_flops(backbone: BackboneSpec, adapter: AdapterSpec, action: str | int) -> FlopBreakdown:
    """FLOPs of ``action`` (``"skip"``, ``"update_k"`` or k) on one chunk; see the module docstring."""
    steps = action_steps(action)
    if adapter.width != backbone.hidden_size:
        raise ValueError(
            f"adapter width {adapter.width} != backbone hidden_size {backbone.hidden_size}; "
            "build the adapter with AdapterSpec.for_backbone(backbone, kind)"
        )
    tokens = backbone.chunk_size
    inner_width = adapter.num_heads * adapter.inner_dim
    outer = adapter.resolved_projections * 2.0 * adapter.width * inner_width
    if adapter.kind != "lora":
        outer += 2.0 * adapter.width * adapter.num_heads  # token learning-rate head
    forward = _inner_forward_per_token(adapter)
    backward = _inner_backward_per_token(adapter)
    carry_pass = forward + backward  # inner model on the keys, then the gradient and the update
    if steps == 0:
        adapter_per_token = outer + forward  # inner model on the queries with the fast weights unchanged
        inner_per_token = 0.0
    else:
        adapter_per_token = outer
        inner_per_token = steps * carry_pass + forward + _dual_form_extra_per_token(adapter)
    probe_per_token = forward if adapter.probe else 0.0
    layers = adapter.num_layers
    return FlopBreakdown(
        backbone=backbone_chunk_flops(backbone),
        adapter=layers * adapter_per_token * tokens,
        probe=layers * probe_per_token * tokens + adapter.gate_flops_per_chunk,
        inner=layers * inner_per_token * tokens,
    )


@dataclasses.dataclass(frozen=True)
class WallClock:
    """A measured wall-clock cost per chunk: the median of ``repeats`` timings and their spread (the interquartile
    range, 0 for one timing)."""

    median_s: float
    spread_s: float
    repeats: int

    def __post_init__(self):
        if not (math.isfinite(self.median_s) and math.isfinite(self.spread_s) and self.spread_s >= 0):
            raise ValueError(f"wall-clock median {self.median_s}, spread {self.spread_s}: finite, spread >= 0 expected")
        if self.repeats < 1:
            raise ValueError(f"wall-clock repeats must be >= 1, got {self.repeats}")

    @classmethod
    def of(cls, value: float | Sequence[float] | WallClock) -> WallClock:
        """From repeated timings (seconds per chunk), one timing, or a `WallClock` (returned as it is)."""
        if isinstance(value, WallClock):
            return value
        samples = np.atleast_1d(np.asarray(value, dtype=np.float64))
        if samples.ndim != 1 or samples.size == 0:
            raise ValueError(f"wall-clock timings must be a number or a flat list of numbers, got {value!r}")
        q25, median, q75 = np.percentile(samples, [25, 50, 75])
        return cls(float(median), float(q75 - q25), int(samples.size))

    def to_dict(self) -> dict:
        """``{"median_s", "spread_s", "repeats"}``."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ActionCost:
    """One action's cost per chunk in every unit; the wall-clock fields are None until the runner measures them
    (``wall_clock_s`` is the median of ``wall_clock_repeats`` timings, ``wall_clock_spread_s`` their IQR)."""

    action: str
    steps: int
    flops: float
    relative_flops: float
    published: float
    wall_clock_s: float | None = None
    wall_clock_spread_s: float | None = None
    wall_clock_repeats: int | None = None

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict (the wall-clock fields may be None)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class CostTable:
    """Per-action costs (name -> ActionCost); ``relative_flops`` is FLOPs / FLOPs(skip). ``overheads``: measured
    wall-clock of work some gates add to every chunk (name -> WallClock, e.g. ``recon_probe``, ``gate_features``),
    timed apart from the actions."""

    actions: Mapping[str, ActionCost]
    overheads: Mapping[str, WallClock] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if "skip" not in self.actions:
            raise ValueError(f"a cost table needs a 'skip' entry, got actions {sorted(self.actions)}")
        clash = sorted(set(self.overheads) & set(self.actions))
        if clash:
            raise ValueError(f"overhead rows {clash} have the names of actions; name them after the work they time")

    def __getitem__(self, action: str | int) -> ActionCost:
        name = action_name(action_steps(action))
        if name not in self.actions:
            raise KeyError(f"action {name!r} is not in the cost table (has {sorted(self.actions)})")
        return self.actions[name]

    @property
    def has_wall_clock(self) -> bool:
        """True when every action has a measured ``wall_clock_s`` (so the "wall_clock_s" unit is usable)."""
        return all(a.wall_clock_s is not None for a in self.actions.values())

    def with_wall_clock(
        self,
        seconds_per_chunk: Mapping[str | int, float | Sequence[float] | WallClock],
        overheads: Mapping[str, float | Sequence[float] | WallClock] | None = None,
    ) -> CostTable:
        """A copy with measured wall-clock seconds per chunk for each action (every action must be given) and the
        measured ``overheads``: each value one timing, the timings of the repeats, or a `WallClock`."""
        given = {action_name(action_steps(k)): v for k, v in seconds_per_chunk.items()}
        missing = sorted(set(self.actions) - set(given))
        if missing:
            raise ValueError(f"wall-clock seconds missing for actions {missing}; measure every action in the table")
        measured = {}
        for name, value in given.items():
            clock = WallClock.of(value)
            if clock.median_s < 0:
                raise ValueError(f"wall-clock seconds must be finite and >= 0, got {name}: {value}")
            measured[name] = clock
        return CostTable(
            {
                k: dataclasses.replace(
                    a,
                    wall_clock_s=measured[k].median_s,
                    wall_clock_spread_s=measured[k].spread_s,
                    wall_clock_repeats=measured[k].repeats,
                )
                for k, a in self.actions.items()
            },
            {name: WallClock.of(value) for name, value in (overheads or {}).items()},
        )

    def to_dict(self) -> dict:
        """Action name -> ``ActionCost.to_dict()``; ``from_dict`` reads it back (with ``overheads_to_dict()``)."""
        return {name: cost.to_dict() for name, cost in self.actions.items()}

    def overheads_to_dict(self) -> dict:
        """Overhead name -> ``WallClock.to_dict()`` (results.json ``wall_clock_overheads``)."""
        return {name: clock.to_dict() for name, clock in self.overheads.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping], overheads: Mapping[str, Mapping] | None = None) -> CostTable:
        """The inverse of ``to_dict`` / ``overheads_to_dict`` (e.g. a results.json ``cost_table`` and
        ``wall_clock_overheads``); raises ValueError without "skip"."""
        return cls(
            {name: ActionCost(**dict(entry)) for name, entry in data.items()},
            {name: WallClock(**dict(entry)) for name, entry in (overheads or {}).items()},
        )

    def unit_costs(self, unit: str) -> dict[int, float]:
        """steps -> cost in ``unit`` (one of COST_UNITS)."""
        if unit not in COST_UNITS:
            raise ValueError(f"unknown cost unit {unit!r}; expected one of {COST_UNITS}")
        out = {}
        for cost in self.actions.values():
            value = getattr(cost, unit)
            if value is None:
                raise ValueError(f"no {unit} for action {cost.action!r}; call CostTable.with_wall_clock(...) first")
            out[cost.steps] = float(value)
        return out


def build_cost_table(
    backbone: BackboneSpec,
    adapter: AdapterSpec,
    actions: Iterable[str | int] = ACTION_NAMES,
    wall_clock_s: Mapping[str | int, float | Sequence[float] | WallClock] | None = None,
    overheads: Mapping[str, float | Sequence[float] | WallClock] | None = None,
) -> CostTable:
    """Analytic FLOPs, relative FLOPs and the published convention for each action, and the measured wall-clock
    (timings per action, and ``overheads`` rows) if given (see `CostTable.with_wall_clock`)."""
    steps = sorted({action_steps(a) for a in actions} | {0})
    skip_flops = action_flops(backbone, adapter, 0).total
    table = CostTable(
        {
            action_name(k): ActionCost(
                action=action_name(k),
                steps=k,
                flops=(flops := action_flops(backbone, adapter, k).total),
                relative_flops=flops / skip_flops,
                published=published_cost(k),
            )
            for k in steps
        }
    )
    if wall_clock_s is None:
        if overheads:
            raise ValueError("wall-clock overheads need the actions' wall-clock too (wall_clock_s=)")
        return table
    return table.with_wall_clock(wall_clock_s, overheads)


def chunk_costs(
    table: CostTable,
    *,
    actions: Sequence[str | int] | np.ndarray | None = None,
    lambdas: Sequence[float] | np.ndarray | None = None,
    unit: str = "relative_flops",
) -> np.ndarray:
    """Per-chunk cost in ``unit`` from discrete actions (names or step counts) or continuous scales λ.

    A continuous gate runs one λ-scaled inner pass, so λ > 0 costs what ``update_1`` costs and λ = 0 what
    ``skip`` costs (the compute does not grow with λ; the gating package's interpolated training penalty
    is a different quantity).
    """
    return _per_chunk(table.unit_costs(unit), actions, lambdas)


def _per_chunk(
    per_steps: Mapping[int, float],
    actions: Sequence[str | int] | np.ndarray | None,
    lambdas: Sequence[float] | np.ndarray | None,
) -> np.ndarray:
    """The value of each chunk's action (steps -> value) for discrete ``actions`` or continuous ``lambdas``."""
    if (actions is None) == (lambdas is None):
        raise ValueError("pass exactly one of actions= (discrete gates) or lambdas= (continuous gates)")
    if actions is not None:
        steps = [action_steps(a) for a in np.asarray(actions).ravel().tolist()]
        missing = sorted({s for s in steps if s not in per_steps})
        if missing:
            raise ValueError(f"actions with steps {missing} are not in the cost table (has {sorted(per_steps)})")
        return np.asarray([per_steps[s] for s in steps], dtype=np.float64).reshape(np.shape(actions))
    lam = np.asarray(lambdas, dtype=np.float64)
    if not np.all(np.isfinite(lam)) or np.any(lam < 0):
        raise ValueError("λ values must be finite and >= 0")
    if 1 not in per_steps:
        raise ValueError("continuous gates cost one inner pass: the cost table needs 'update_1'")
    return np.where(lam > 0, per_steps[1], per_steps[0])


def chunk_wall_clock(
    table: CostTable,
    *,
    actions: Sequence[str | int] | np.ndarray | None = None,
    lambdas: Sequence[float] | np.ndarray | None = None,
    overheads: Sequence[str] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """Per-chunk wall-clock seconds and their spread (IQR) for discrete ``actions`` or continuous ``lambdas``, with
    the table's ``overheads`` rows of the given names added to every chunk (the work the method's gate does)."""
    missing = sorted(set(overheads) - set(table.overheads))
    if missing:
        raise ValueError(f"overheads {missing} are not measured in the cost table (has {sorted(table.overheads)})")
    wall = chunk_costs(table, actions=actions, lambdas=lambdas, unit="wall_clock_s")
    spreads = {a.steps: a.wall_clock_spread_s or 0.0 for a in table.actions.values()}
    spread = _per_chunk(spreads, actions, lambdas)
    for name in overheads:  # an overhead timed below the noise (a negative paired difference) adds nothing
        wall = wall + max(table.overheads[name].median_s, 0.0)
        spread = spread + table.overheads[name].spread_s
    return wall, spread
