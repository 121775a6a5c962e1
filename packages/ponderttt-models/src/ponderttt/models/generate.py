"""KV-cache generation for GPT-2 and Gemma 3: greedy, temperature, top-p, stop sequences, left-padded batches.

With fast-weight adapters (at the head and/or inside blocks), generation follows the chunk protocol of PonderTTT:
  * the prompt runs through the model as one chunk, every adapter updating with the λ a gate callback picks;
  * each generated token runs through every adapter under its current fast weights without updating them
    (the primal `decode_step` with λ = 0: O(1) per token, equal to the adapter over the chunk with λ = 0);
  * after every `chunk_size` generated tokens the gate callback sees the chunk (its tokens, head features and a
    no-update probe loss per sequence, all known before the decision) and returns λ per sequence; every
    adapter's fast weights are then updated on the inputs it saw during the chunk, for the tokens that follow.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ponderttt.models.adapter import AdaptedLM, FastState, TTTControl
from ponderttt.models.model import CausalLM


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """max_new_tokens; temperature 0 = greedy; top_p < 1 = nucleus sampling; stop_sequences of token ids
    (eos_token_id counts as one); stop_strings end a row when its decoded text contains one (a string may span
    several tokens or be tokenized differently on its own; needs `generate(..., decode=)`); pad_token_id fills
    rows after they stop; seed for sampling."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    eos_token_id: int | None = None
    pad_token_id: int = 0
    seed: int = 0
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        object.__setattr__(self, "stop_sequences", tuple(tuple(int(t) for t in s) for s in self.stop_sequences))
        if any(len(s) == 0 for s in self.stop_sequences):
            raise ValueError("stop_sequences may not contain an empty sequence")
        object.__setattr__(self, "stop_strings", tuple(x for x in self.stop_strings if x))

    @property
    def stops(self) -> tuple[tuple[int, ...], ...]:
        """The token stop sequences, eos included."""
        extra = () if self.eos_token_id is None else ((int(self.eos_token_id),),)
        return self.stop_sequences + extra


@dataclasses.dataclass(frozen=True)
class GateContext:
    """What a gate may see before deciding λ for a chunk: chunk_index (-1 = prompt), tokens [B, n] (host),
    features [B, n, C] (head inputs: the final norm's output), probe_loss [B] (reconstruction loss without
    update, the mean over adapter sites), state (fast weights, {site: state}), probe_losses {site: [B]}, active [B]
    (rows still generating when the decision is made: a row that stopped gets no update whatever λ says; None:
    every row)."""

    chunk_index: int
    tokens: np.ndarray
    features: jax.Array
    probe_loss: np.ndarray
    state: FastState
    probe_losses: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    active: np.ndarray | None = None


GateFn = Callable[[GateContext], Any]


@dataclasses.dataclass
class GenerationResult:
    """tokens [B, max_new_tokens] (pad after a stop); lengths [B] generated tokens incl. the stop sequence;
    logits [B, steps, vocab] when asked; ttt_state and the gate's λ per chunk ([B] each, prompt first)."""

    tokens: np.ndarray
    lengths: np.ndarray
    logits: np.ndarray | None = None
    ttt_state: FastState | None = None
    gate_scales: list[np.ndarray] = dataclasses.field(default_factory=list)


def sample_logits(logits_bv: jax.Array, rng: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Next tokens [B] from float32 logits: argmax when temperature == 0, else temperature + nucleus sampling."""
    if temperature == 0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits = logits_bv / temperature
    if top_p < 1:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < top_p  # the smallest prefix whose mass reaches top_p (always the top token)
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


# -- jitted pieces -------------------------------------------------------------------------------------------


class _Passes:
    """The jitted pieces of generation for one model structure (`graphdef`), taking the model's state as an
    argument: compiled once per structure and shape, and no NNX graph traversal per decoded token (nnx.jit's
    per-call split/merge of a 125M model costs more than the decoding step itself on CPU)."""

    def __init__(self, graphdef):
        self.graphdef = graphdef
        self.prompt = jax.jit(self._prompt, static_argnames=("chunk_size",))
        self.step = jax.jit(self._step, static_argnames=("temperature", "top_p"), donate_argnames=("cache",))
        self.sites = jax.jit(self._sites, static_argnames=("chunk_size",))
        self.sample = jax.jit(self._sample, static_argnames=("temperature", "top_p"))

    def _prompt(self, params, ids, mask, cache, states, gating_scale, reset_mask, chunk_size):
        """The prompt through the backbone and, when `states` is given, every adapter as one chunk of λ =
        gating_scale [B]; writes `cache` when given. Returns the BackboneOutput."""
        model = nnx.merge(self.graphdef, params)
        if states is None:
            return _backbone(model).hidden(ids, attention_mask=mask, cache=cache)
        control = TTTControl(state=states, scale=gating_scale, reset_mask=reset_mask, chunk_size=chunk_size)
        return model.hidden(ids, attention_mask=mask, cache=cache, ttt=control)

    def _step(self, params, token_b, cache, decode_states, rng, temperature, top_p):
        """One token per row through the model (every adapter without update) and the next token sampled:
        (logits, next token, new cache, new decode states, {site: input [B, C]}, head features [B, C], rng)."""
        model = nnx.merge(self.graphdef, params)
        rng, sub = jax.random.split(rng)
        if not decode_states:  # None (no adapters) or {} (what the backbone's pass returns)
            out = _backbone(model).hidden(token_b[:, None], cache=cache)
        else:
            out = model.hidden(token_b[:, None], cache=cache, decode=decode_states)
        inputs = {site: x[:, 0] for site, x in out.adapter_inputs.items()}
        logits = model.readout(out.h[:, 0])
        token = sample_logits(logits, sub, temperature, top_p)
        return logits, token, out.cache, out.ttt_state, inputs, out.head_features[:, 0], rng

    def _sites(self, params, inputs, states, gating_scale, chunk_size):
        """The chunk step: every adapter over its chunk of inputs [B, n, C] with λ = gating_scale [B]:
        {site: TTTStats}."""
        control = TTTControl(state=states, scale=gating_scale, chunk_size=chunk_size)
        return nnx.merge(self.graphdef, params).step(inputs, control).stats

    def _sample(self, params, h_bc, rng, temperature, top_p):
        rng, sub = jax.random.split(rng)
        logits = nnx.merge(self.graphdef, params).readout(h_bc)
        return logits, sample_logits(logits, sub, temperature, top_p), rng


@functools.lru_cache(maxsize=16)
def _passes(graphdef) -> _Passes:
    return _Passes(graphdef)


def _stopped(generated: list[int], config: GenerationConfig, decode: Callable[[list[int]], str] | None) -> bool:
    """Whether a row's generated tokens end in a stop sequence, or its text now holds a stop string."""
    if any(len(generated) >= len(s) and tuple(generated[-len(s) :]) == s for s in config.stops):
        return True
    if config.stop_strings and decode is not None:
        # a stop string ending at this token lies within the last len(stop) + 1 tokens (a token is >= 1 byte)
        tail = decode(generated[-(max(map(len, config.stop_strings)) + 1) :])
        return any(x in tail for x in config.stop_strings)
    return False


def _backbone(model: CausalLM | AdaptedLM) -> CausalLM:
    return model.backbone if isinstance(model, AdaptedLM) else model


def generate(
    model: CausalLM | AdaptedLM,
    input_ids: np.ndarray | jax.Array,
    attention_mask: np.ndarray | jax.Array | None = None,
    config: GenerationConfig | None = None,
    *,
    gate: GateFn | None = None,
    ttt_state: FastState | None = None,
    ttt_chunk_size: int | None = None,
    use_ttt: bool = True,
    return_logits: bool = False,
    decode: Callable[[list[int]], str] | None = None,
) -> GenerationResult:
    """Generates up to `config.max_new_tokens` tokens after each row of the (left-padded) prompt batch.

    input_ids [B, P] int; attention_mask [B, P] (0 = left padding; default all real).
    With fast-weight adapters (head and/or blocks): gate(GateContext) -> λ [B] (or scalar) per chunk, default
    λ = 1 everywhere; ttt_state: fast weights to start from ({site: state}; a missing site or None: the learned
    initial weights); rows with left padding start fresh at their first real token;
    use_ttt=False decodes with the backbone alone; decode(tokens) -> text, needed by `config.stop_strings`.
    """
    config = GenerationConfig() if config is None else config
    if config.stop_strings and decode is None:
        raise ValueError("GenerationConfig.stop_strings needs generate(..., decode=tokens -> text)")
    ids = np.asarray(input_ids, np.int32)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, prompt_len], got shape {ids.shape}")
    b, p = ids.shape
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    real = mask.astype(bool)
    if not real.any(axis=1).all():
        raise ValueError("every prompt row needs at least one real token")
    if (np.diff(real.astype(np.int8), axis=1) < 0).any():
        raise ValueError("prompts must be left-padded: a 0 in attention_mask after a 1 was found")

    graphdef, params = nnx.split(model)
    run = _passes(graphdef)
    cache = model.init_cache(b, p + config.max_new_tokens)
    ids_d, mask_d = jnp.asarray(ids), jnp.asarray(mask)
    scales: list[np.ndarray] = []
    states = decode_states = None
    if not isinstance(model, AdaptedLM) or not use_ttt:
        out = run.prompt(params, ids_d, mask_d, cache, None, None, None, None)
    else:
        mini_batch = model.ttt_config.mini_batch_size
        chunk = model.ttt_config.chunk_size if ttt_chunk_size is None else ttt_chunk_size
        if chunk % mini_batch:
            raise ValueError(f"ttt_chunk_size={chunk} must be a multiple of mini_batch_size={mini_batch}")
        states = model.full_state(ttt_state, b)
        first_real = real.argmax(axis=1)
        reset = np.zeros_like(real)
        reset[np.arange(b), first_real] = first_real > 0  # padded rows start fresh at their first token
        reset_d = jnp.asarray(reset)
        prompt_chunk = -(-p // mini_batch) * mini_batch
        lam = np.ones((b,), np.float32)
        if gate is not None:
            probe = run.prompt(params, ids_d, mask_d, None, states, jnp.zeros((b,)), reset_d, prompt_chunk)
            lam = _ask(gate, model, -1, ids, probe.head_features, probe.ttt_stats, states, np.ones(b, bool))
        scales.append(lam)
        out = run.prompt(params, ids_d, mask_d, cache, states, jnp.asarray(lam), reset_d, prompt_chunk)
        states = out.ttt_state
        decode_states = model.init_decode_state(states, b)
        pending: dict[str, list[jax.Array]] = {site: [] for site in model.sites}
        chunk_features: list[jax.Array] = []
        chunk_tokens: list[np.ndarray] = []
    cache = out.cache

    temperature, top_p = config.temperature, config.top_p
    logits, token, rng = run.sample(params, out.h[:, -1], jax.random.key(config.seed), temperature, top_p)
    logits_steps = []
    generated: list[list[int]] = [[] for _ in range(b)]
    done = np.zeros(b, bool)
    out_tokens = np.full((b, config.max_new_tokens), config.pad_token_id, np.int32)
    for step in range(config.max_new_tokens):
        if return_logits:
            logits_steps.append(np.asarray(logits))
        host = np.asarray(token)
        for row in range(b):
            if not done[row]:
                generated[row].append(int(host[row]))
                out_tokens[row, step] = host[row]
                done[row] = _stopped(generated[row], config, decode)
        if done.all() or step == config.max_new_tokens - 1:
            break
        logits, token, cache, decode_states, inputs, features, rng = run.step(
            params, token, cache, decode_states, rng, temperature, top_p
        )
        if states is not None:
            chunk_features.append(features)
            for site in model.sites:
                pending[site].append(inputs[site])
            chunk_tokens.append(host)
            if len(chunk_tokens) == chunk:  # a full generated chunk: the gate decides, then the fast weights update
                seen = {key: jnp.stack(values, axis=1) for key, values in pending.items()}
                lam = np.ones((b,), np.float32)
                if gate is not None:
                    probe = run.sites(params, seen, states, jnp.zeros((b,)), chunk)
                    tokens, features = np.stack(chunk_tokens, 1), jnp.stack(chunk_features, axis=1)
                    lam = _ask(gate, model, len(scales) - 1, tokens, features, probe, states, ~done)
                scales.append(lam)
                states = {
                    site: stats.state
                    for site, stats in run.sites(params, seen, states, jnp.asarray(lam), chunk).items()
                }
                decode_states = model.init_decode_state(states, b)
                pending = {site: [] for site in model.sites}
                chunk_features, chunk_tokens = [], []

    lengths = np.asarray([len(g) for g in generated], np.int32)
    return GenerationResult(
        tokens=out_tokens,
        lengths=lengths,
        logits=np.stack(logits_steps, axis=1) if return_logits else None,
        ttt_state=states,
        gate_scales=scales,
    )


def _ask(gate: GateFn, model: AdaptedLM, index: int, tokens: np.ndarray, features: jax.Array,
         stats: dict[str, Any], states: FastState, active: np.ndarray) -> np.ndarray:
    """The gate's λ [B] for a chunk, from its GateContext: the chunk's tokens and head features, the no-update
    stats of every site and the rows still generating (a stopped row's λ is set to 0)."""
    tokens = np.asarray(tokens)
    batch = tokens.shape[0]
    losses = {site: np.asarray(stats[site].chunk_loss_step0[:, 0]) for site in model.sites}
    context = GateContext(
        chunk_index=index,
        tokens=tokens,
        features=features,
        probe_loss=np.mean(np.stack(list(losses.values())), axis=0),
        state=states,
        probe_losses=losses,
        active=active.copy(),
    )
    lam = np.broadcast_to(np.asarray(gate(context), np.float32), (batch,)).copy()
    if not np.isfinite(lam).all() or (lam < 0).any():
        raise ValueError(f"gate returned λ={lam}; expected finite values >= 0 per sequence")
    return np.where(active, lam, np.float32(0.0))
