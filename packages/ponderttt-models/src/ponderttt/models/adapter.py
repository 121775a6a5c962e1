"""A frozen backbone with fast-weight adapters from ponderttt.ttt, built in one step: `AdaptedLM(backbone, spec)`.

A site is "head" (after the final norm, before the readout: the default) or "block_<i>" (after block i, fed
through a fresh norm of the backbone's kind). Each site adds `h + out_scale * TTT(x)` with `out_scale`
initialised to zero, so an adapted model equals its backbone exactly until `out_scale` is trained.

How a gate's λ reaches the inner loop, in one line per hop:
  `TTTControl(scale=λ, num_steps=k, protocol=...)`  what the gate decided, with the fast-weight state per site
  → `AdaptedLM.__call__` / `AdaptedLM.step`        the whole sequence, or one chunk of recorded site inputs
  → `AdapterSite.__call__`                        [norm →] layer → zero-initialised output scale
  → `TTTLinear.__call__(gating_scale=λ, ...)`      ponderttt.ttt: λ multiplies the inner learning rate η.

Only adapter parameters are trainable: `TRAINABLE` is the nnx filter to give `nnx.Optimizer(..., wrt=...)`,
`nnx.grad(..., argnums=nnx.DiffState(0, TRAINABLE))` and `nnx.state(model, TRAINABLE)`; `BACKBONE` is the rest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ponderttt.models.layers import LayerNorm, RMSNorm
from ponderttt.models.model import ACT_BTV, BackboneOutput, CausalLM, KVCache, ModelOutput
from ponderttt.models.sharding import constrain
from ponderttt.ttt import TTTMLP, LoRATTT, TTTConfig, TTTLinear, TTTStats

ADAPTER_KINDS: dict[str, type[nnx.Module]] = {"linear": TTTLinear, "mlp": TTTMLP, "lora": LoRATTT}
PROTOCOLS = ("carry", "reset")
Protocol = Literal["carry", "reset"]
FastState = dict[str, Any]
"""Fast weights of every adapter site: site name -> that layer's state (leaves [B, ...])."""

# Parameters under `adapters` (fast-weight layers, their norms and output scales) or under a `gate` attribute.
TRAINABLE = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("adapters"), nnx.PathContains("gate")))
BACKBONE = nnx.All(nnx.Param, nnx.Not(TRAINABLE))


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """Which fast-weight adapters a model carries.

    ttt: the layers' `TTTConfig` (hidden_size must equal the backbone's); kind: "linear" (TTTLinear), "mlp"
    (TTTMLP) or "lora" (LoRATTT); sites: "head" and/or block indices (ints or "block_<i>"), run in model order;
    seed: initialisation of the adapters' parameters (`nnx.Rngs(seed)`).
    """

    ttt: TTTConfig
    kind: str = "linear"
    sites: tuple[str | int, ...] = ("head",)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(f"adapter kind={self.kind!r} is not known; choose one of {sorted(ADAPTER_KINDS)}")
        object.__setattr__(self, "sites", tuple(self.sites))

    def site_names(self, num_layers: int) -> tuple[str, ...]:
        """The sites as names ("head", "block_<i>"), checked against a backbone of `num_layers` blocks."""
        names = []
        for site in self.sites:
            if site == "head":
                names.append("head")
                continue
            index = int(site.removeprefix("block_")) if isinstance(site, str) else int(site)
            if not 0 <= index < num_layers:
                raise ValueError(f"adapter site {site!r}: block index must be in [0, {num_layers})")
            names.append(f"block_{index}")
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"adapter sites {list(self.sites)} must be distinct and not empty")
        return tuple(names)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TTTControl:
    """What a gate decided for the chunks of one call, and the fast weights it starts from.

    state: fast weights per site (`FastState`; None or a missing site: the layer's learned initial weights).
    scale: the gate's λ: None (1), a scalar, [B], [B, n_chunks] or [B, n_minibatches]; 0 = no inner update.
    reset_mask: [B, T] bool, True where a new document starts (fresh fast weights from there), or None.
    num_steps: inner gradient steps per mini-batch (0 = no update); protocol: "carry" (fast weights run on across
    chunks) or "reset" (fresh at every chunk); chunk_size: tokens per gating chunk (None: the TTTConfig's).
    A pytree: state, scale and reset_mask are leaves; num_steps, protocol and chunk_size are static.
    """

    state: Mapping[str, Any] | None = None
    scale: Any = None
    reset_mask: jax.Array | None = None
    num_steps: int = dataclasses.field(default=1, metadata={"static": True})
    protocol: Protocol = dataclasses.field(default="carry", metadata={"static": True})
    chunk_size: int | None = dataclasses.field(default=None, metadata={"static": True})

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"TTTControl.protocol={self.protocol!r}: choose one of {PROTOCOLS}")
        if not isinstance(self.num_steps, int) or self.num_steps < 0:
            raise ValueError(f"TTTControl.num_steps={self.num_steps!r} must be a non-negative int (0 = no update)")

    def replace(self, **changes: Any) -> TTTControl:
        """A copy with `changes` applied."""
        return dataclasses.replace(self, **changes)


class ChunkStep(NamedTuple):
    """The result of one chunk step, per site: outputs (the residual stream after the site, [B, n, C]), the new
    fast weights and the layer's TTTStats."""

    outputs: dict[str, jax.Array]
    state: FastState
    stats: dict[str, TTTStats]


class AdapterSite(nnx.Module):
    """[norm →] fast-weight layer → zero-initialised per-channel output scale, added to the residual stream."""

    def __init__(self, layer: nnx.Module, hidden_size: int, norm: nnx.Module | None):
        self.norm = norm
        self.layer = layer
        self.out_scale = nnx.Param(jnp.zeros((hidden_size,), jnp.float32), logical_axes=("norm",))

    def __call__(self, h: jax.Array, state: Any, control: TTTControl, reset_mask: jax.Array | None
                 ) -> tuple[jax.Array, TTTStats]:
        """The site on h [B, T, C] from fast weights `state` (None: initial) with the gate's decision `control`
        (reset_mask already includes the protocol's chunk starts): (new h, TTTStats with the new state)."""
        x = h if self.norm is None else self.norm(h)
        y, stats = self.layer(x, gating_scale=control.scale, num_steps=control.num_steps, state=state,
                              reset_mask=reset_mask, chunk_size=control.chunk_size)
        return self._residual(h, y), stats

    def decode(self, h_b1c: jax.Array, decode_state: Any) -> tuple[jax.Array, Any]:
        """One token per row under the fast weights of `decode_state` (from `layer.init_decode_state`), without
        update: equals `__call__` with gating_scale 0 token by token. Returns (h, new decode state)."""
        x = h_b1c if self.norm is None else self.norm(h_b1c)
        y, decode_state = self.layer.decode_step(x, decode_state, gating_scale=0.0)
        return self._residual(h_b1c, y), decode_state

    def _residual(self, h, y):
        return h + (y.astype(jnp.float32) * self.out_scale[...]).astype(h.dtype)


def chunk_reset_mask(batch: int, seq: int, chunk_size: int, reset_mask: jax.Array | None = None) -> jax.Array:
    """The `reset` protocol's [B, T] mask: fresh initial fast weights at every chunk start (OR any given mask)."""
    starts = jnp.asarray(np.arange(seq) % chunk_size == 0)
    mask = jnp.broadcast_to(starts, (batch, seq))
    return mask if reset_mask is None else mask | jnp.asarray(reset_mask, bool)


class AdaptedLM(nnx.Module):
    """A frozen backbone (`CausalLM`) with the fast-weight adapters of `spec` at its sites. Built in one step,
    never mutated afterwards; every fast-weight call goes through one `TTTControl`.

    `model(ids, ttt=TTTControl(...))` runs the whole sequence (logits, stats and new state per site);
    `model.step(inputs, control)` is the chunk step: every site on its recorded inputs of one chunk.
    """

    def __init__(self, backbone: CausalLM, spec: AdapterSpec):
        hidden = backbone.config.hidden_size
        if spec.ttt.hidden_size != hidden:
            raise ValueError(
                f"TTTConfig.hidden_size={spec.ttt.hidden_size} but the model's hidden size is {hidden}; "
                f"build the config with hidden_size={hidden}"
            )
        self.backbone = backbone
        self.spec = spec
        self.sites = spec.site_names(backbone.config.num_layers)
        layer_cls = ADAPTER_KINDS[spec.kind]
        rngs = nnx.Rngs(spec.seed)
        adapters = []
        for name in self.sites:
            norm = None if name == "head" else _fresh_norm(backbone, hidden)
            adapters.append(AdapterSite(layer_cls(spec.ttt, rngs=rngs), hidden, norm))
        self.adapters = nnx.List(adapters)

    # -- what the backbone answers ------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        """The backbone's architecture config (a `ModelConfig`)."""
        return self.backbone.config

    @property
    def ttt_config(self) -> TTTConfig:
        """The adapters' TTTConfig (owner of mini_batch_size and the default chunk_size)."""
        return self.spec.ttt

    @property
    def mesh(self) -> Any:
        """The backbone's device mesh (None without sharding)."""
        return self.backbone.mesh

    def readout(self, h: jax.Array) -> jax.Array:
        """float32 logits [..., vocab] of final hidden states h [..., C]."""
        return self.backbone.readout(h)

    def init_cache(self, batch_size: int, max_length: int) -> KVCache:
        """The backbone's empty KV cache (see `CausalLM.init_cache`)."""
        return self.backbone.init_cache(batch_size, max_length)

    def site(self, name: str) -> AdapterSite:
        """The adapter at site `name`."""
        return self.adapters[self.sites.index(name)]

    # -- fast-weight state --------------------------------------------------------------------------------
    def init_state(self, batch_size: int) -> FastState:
        """Fresh fast weights of every site for `batch_size` sequences (the layers' learned initial weights)."""
        return {name: site.layer.init_state(batch_size) for name, site in zip(self.sites, self.adapters, strict=True)}

    def full_state(self, state: Mapping[str, Any] | None, batch_size: int) -> FastState:
        """Every site's fast weights: those of `state`, the learned initial weights where missing or None."""
        given = dict(state or {})
        unknown = set(given) - set(self.sites)
        if unknown:
            raise ValueError(f"fast-weight state has sites {sorted(unknown)} that the model lacks; its sites are "
                             f"{self.sites}")
        fresh = lambda name: self.site(name).layer.init_state(batch_size)
        return {name: fresh(name) if given.get(name) is None else given[name] for name in self.sites}

    def init_decode_state(self, state: FastState, batch_size: int) -> dict[str, Any]:
        """Per site the decode state (`layer.init_decode_state`) at the fast weights of `state`."""
        return {name: self.site(name).layer.init_decode_state(batch_size, state[name]) for name in self.sites}

    # -- the chunk step -------------------------------------------------------------------------------------
    def _run_site(self, name: str, h: jax.Array, control: TTTControl) -> tuple[jax.Array, TTTStats]:
        state = None if control.state is None else control.state.get(name)
        reset = control.reset_mask
        if control.protocol == "reset":
            chunk = self.spec.ttt.chunk_size if control.chunk_size is None else control.chunk_size
            reset = chunk_reset_mask(h.shape[0], h.shape[1], chunk, reset)
        return self.site(name)(h, state, control, reset)

    def step(self, inputs: Mapping[str, jax.Array], control: TTTControl) -> ChunkStep:
        """The chunk step: every site named in `inputs` on its inputs [B, n, C] (what it saw while the chunk was
        read) from the fast weights of `control.state`, with the gate's λ / steps / protocol. Returns per site the
        outputs, the new fast weights and the stats. Generation and the carry protocol use it; a forward pass runs
        the same site code inside the backbone (`hidden`)."""
        unknown = set(inputs) - set(self.sites)
        if unknown:
            raise ValueError(f"chunk inputs for sites {sorted(unknown)} that the model lacks; its sites are "
                             f"{self.sites}")
        outputs, state, stats = {}, {}, {}
        for name in (n for n in self.sites if n in inputs):
            outputs[name], stats[name] = self._run_site(name, inputs[name], control)
            state[name] = stats[name].state
        return ChunkStep(outputs, state, stats)

    # -- forward ------------------------------------------------------------------------------------------
    def hidden(
        self,
        input_ids: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        return_hidden_states: bool = False,
        ttt: TTTControl | None = None,
        decode: Mapping[str, Any] | None = None,
    ) -> BackboneOutput:
        """The backbone's final hidden states with every adapter applied at its site: under `ttt` (default
        `TTTControl()`: λ = 1 from the initial weights), or, with `decode` ({site: decode state}), every adapter
        without update on one new token per row (generation). Per site: stats, new (decode) state and input."""
        control = TTTControl() if ttt is None else ttt
        stats: dict[str, Any] = {}
        states: dict[str, Any] = {}
        inputs: dict[str, jax.Array] = {}

        def hook(name: str, h: jax.Array) -> jax.Array:
            if name not in self.sites:
                return h
            inputs[name] = h
            if decode is not None:
                h, states[name] = self.site(name).decode(h, decode[name])
                return h
            h, stats[name] = self._run_site(name, h, control)
            states[name] = stats[name].state
            return h

        out = self.backbone.hidden(input_ids, attention_mask=attention_mask, positions=positions, cache=cache,
                                   return_hidden_states=return_hidden_states, hook=hook)
        return out._replace(ttt_stats=stats, ttt_state=states, adapter_inputs=inputs)

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        return_hidden_states: bool = False,
        ttt: TTTControl | None = None,
        use_ttt: bool = True,
    ) -> ModelOutput:
        """Logits of `input_ids` [B, T] with every adapter under `ttt` (see `TTTControl`; default: λ = 1 from
        the learned initial weights, carry protocol); ttt_stats and ttt_state map each site to its TTTStats /
        new fast weights. use_ttt=False runs the backbone alone (a KV cache is only allowed then: decode with
        adapters through `ponderttt.models.generate.generate`)."""
        if not use_ttt:
            return self.backbone(input_ids, attention_mask=attention_mask, positions=positions, cache=cache,
                                 return_hidden_states=return_hidden_states)
        if cache is not None:
            raise ValueError(
                "a KV cache with fast-weight adapters: decode with ponderttt.models.generate.generate (it runs "
                "the adapters token by token and updates them chunk by chunk) or pass use_ttt=False"
            )
        out = self.hidden(input_ids, attention_mask=attention_mask, positions=positions,
                          return_hidden_states=return_hidden_states, ttt=ttt)
        logits = constrain(self.readout(out.h), ACT_BTV, self.backbone.mesh, self.backbone.rules)
        return ModelOutput(logits=logits, hidden_states=out.hidden_states, ttt_stats=out.ttt_stats,
                           ttt_state=out.ttt_state)


def _fresh_norm(backbone: CausalLM, hidden: int) -> nnx.Module:
    cfg = backbone.config
    norm = LayerNorm if cfg.norm == "layernorm" else RMSNorm
    return norm(hidden, cfg.norm_eps, dtype=backbone.dtype)


def adapt(backbone: CausalLM, ttt: TTTConfig, *, kind: str = "linear", sites: Sequence[str | int] = ("head",),
          seed: int = 0) -> AdaptedLM:
    """`AdaptedLM(backbone, AdapterSpec(ttt, kind, sites, seed))`: the backbone with fast-weight adapters."""
    return AdaptedLM(backbone, AdapterSpec(ttt, kind=kind, sites=tuple(sites), seed=seed))


def trainable_state(model: nnx.Module) -> nnx.State:
    """The trainable (adapter and gate) parameters of `model`."""
    return nnx.state(model, TRAINABLE)


def count_params(model: nnx.Module, what: Any = nnx.Param) -> int:
    """Number of scalars in the variables of `model` that match the filter `what`."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, what)))
