"""GPT-2 and Gemma 3 causal LMs in Flax NNX, numerically equal to HF transformers.

`CausalLM.__call__` owns everything the two share: positions from the attention mask, the KV cache, the
masks, the layer loop, the optional fast-weight adapter at the head and the float32 logits. `GPT2` and
`Gemma3` only say how to embed, what a block is and how to read out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.typing import DTypeLike

from ponderttt.models.config import GLOBAL_ATTENTION, LOCAL_ATTENTION, Gemma3Config, GPT2Config, ModelConfig
from ponderttt.models.layers import (
    Dense,
    Embed,
    LayerCache,
    LayerNorm,
    RMSNorm,
    apply_rope,
    attention,
    causal_mask,
    gelu_tanh,
    merge_heads,
    remat_policy,
    ring_mask,
    rope_inv_freq,
    split_heads,
    write_cache,
)
from ponderttt.models.sharding import LOGICAL_RULES, Rules, constrain

ACT_BTC = ("batch", "seq", "act_embed")
ACT_BTHD = ("batch", "seq", "act_heads", None)
ACT_BTKD = ("batch", "seq", "act_kv", None)
ACT_BTF = ("batch", "seq", "act_mlp")
ACT_BTV = ("batch", "seq", "act_vocab")

# Queries per attention block when there is no cache (see layers.attention); 128 was fastest on CPU at T=1024.
ATTENTION_QUERY_BLOCK = 128


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for `S` slots, written left to right.

    keys/values: per layer [B, S, kv_heads, head_dim], or for a sliding-window layer whose window W is shorter
    than S a ring buffer [B, W, kv_heads, head_dim] (slot a lives in entry a % W: memory O(W) however long the
    generation); key_valid [B, S] marks slots holding a real token (left padding is False); next_position [B] is
    the position id of each row's next token; index is the next slot to write (shared by the batch: rows are
    left-padded to a common length).
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    key_valid: jax.Array
    next_position: jax.Array
    index: jax.Array

    @property
    def max_length(self) -> int:
        """S: the slots the cache holds (prompt plus generated tokens), whatever a ring buffer's size."""
        return self.key_valid.shape[1]


@flax.struct.dataclass
class ModelOutput:
    """logits [B, T, vocab] float32; hidden_states (embeddings, each block, final norm) when asked; cache when
    decoding; ttt_stats / ttt_state, each a mapping site -> TTTStats / fast weights, when fast-weight adapters ran
    (see `ponderttt.models.adapter.AdaptedLM`)."""

    logits: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    cache: KVCache | None = None
    ttt_stats: Mapping[str, Any] | None = None
    ttt_state: Mapping[str, Any] | None = None


class BackboneOutput(NamedTuple):
    """`CausalLM.hidden`: h [B, T, C] (the final norm's output, after the head adapter if any); hidden_states
    when asked; the new cache when decoding; per adapter site its TTTStats (none when decoding), its new state
    (decode state when decoding) and its input [B, T, C] (empty mappings for a backbone without adapters)."""

    h: jax.Array
    hidden_states: tuple[jax.Array, ...] | None
    cache: KVCache | None
    ttt_stats: Mapping[str, Any]
    ttt_state: Mapping[str, Any]
    adapter_inputs: Mapping[str, jax.Array]

    @property
    def head_features(self) -> jax.Array:
        """The final norm's output [B, T, C]: the head adapter's input when there is one, else h."""
        return self.adapter_inputs.get("head", self.h)


SiteHook = Callable[[str, jax.Array], jax.Array]
"""`hook(site, h) -> h`: called with the residual stream after every block ("block_<i>") and after the final norm
("head"); an adapted model runs its fast-weight adapters there (identity at sites without one)."""


class CausalLM(nnx.Module):
    """A frozen backbone's shared forward pass; subclasses define `embed`, `blocks`, `final_norm`, `readout`,
    `num_kv_heads`, `head_dim` and `attention_window`. Fast-weight adapters wrap it: `adapter.AdaptedLM`."""

    config: ModelConfig
    blocks: nnx.List

    def _setup_common(self, dtype: DTypeLike, mesh: Mesh | None, rules: Rules, remat: str | None) -> None:
        self.dtype = jnp.dtype(dtype)
        self.mesh = mesh
        self.rules = tuple(rules)
        self.remat = remat
        remat_policy(remat)  # validates the name early

    # Subclasses define embed(ids, positions), final_norm(h), readout(h) -> float32 logits, the properties
    # num_kv_heads and head_dim, and attention_window(layer) when some layers use a sliding window.
    def attention_window(self, layer: int) -> int | None:
        """The sliding-window length of `layer`'s attention, or None for global attention."""
        return None

    # -- cache --------------------------------------------------------------------------------------
    def init_cache(self, batch_size: int, max_length: int) -> KVCache:
        """An empty cache of `max_length` slots (prompt plus everything to be generated); sliding-window layers
        get a ring buffer of their window when it is shorter."""
        sizes = []
        for i in range(len(self.blocks)):
            window = self.attention_window(i)
            sizes.append(window if window is not None and window < max_length else max_length)

        def zeros(size: int) -> jax.Array:
            return jnp.zeros((batch_size, size, self.num_kv_heads, self.head_dim), self.dtype)

        return KVCache(
            keys=tuple(zeros(n) for n in sizes),
            values=tuple(zeros(n) for n in sizes),
            key_valid=jnp.zeros((batch_size, max_length), bool),
            next_position=jnp.zeros((batch_size,), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )

    # -- forward ------------------------------------------------------------------------------------
    def hidden(
        self,
        input_ids: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        return_hidden_states: bool = False,
        hook: SiteHook | None = None,
    ) -> BackboneOutput:
        """Embeddings → blocks → final norm: the final hidden states h [B, T, C] (before the readout), with
        `hook(site, h)` applied after every block and after the final norm (adapters; see `SiteHook`)."""
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be int [batch, time], got shape {input_ids.shape}")
        b, t = input_ids.shape
        valid_bt = jnp.ones((b, t), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        start = jnp.zeros((b,), jnp.int32) if cache is None else cache.next_position
        if positions is None:
            positions = start[:, None] + jnp.maximum(jnp.cumsum(valid_bt, axis=1, dtype=jnp.int32) - 1, 0)
        self._check_length(t if cache is None else cache.max_length)

        if cache is None:
            q_slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            k_slots = jnp.arange(t, dtype=jnp.int32)
            key_valid = valid_bt
        else:
            index = cache.index
            q_slots = jnp.broadcast_to(index + jnp.arange(t, dtype=jnp.int32), (b, t))
            k_slots = jnp.arange(cache.max_length, dtype=jnp.int32)
            key_valid = jax.lax.dynamic_update_slice(cache.key_valid, valid_bt, (0, index))
        adapt = (lambda site, h: h) if hook is None else hook

        masks: dict[tuple[int | None, int | None], jax.Array] = {}
        h = constrain(self.embed(input_ids, positions), ACT_BTC, self.mesh, self.rules)
        hidden = [h] if return_hidden_states else None
        new_keys, new_values = [], []
        policy = remat_policy(self.remat)
        for i, block in enumerate(self.blocks):
            window = self.attention_window(i)
            ring = cache is not None and cache.keys[i].shape[1] < cache.max_length
            mask_key = (window, cache.keys[i].shape[1] if ring else None)
            if mask_key not in masks:
                if ring:
                    masks[mask_key] = ring_mask(q_slots, valid_bt, key_valid, cache.index, mask_key[1], window)
                else:
                    masks[mask_key] = causal_mask(q_slots, k_slots, key_valid, window)
            mask = masks[mask_key]
            layer_cache = None if cache is None else (cache.keys[i], cache.values[i], cache.index, ring)
            if policy is not None and cache is None:
                h, kv = nnx.remat(lambda blk, x, p, m: blk(x, p, m, None), policy=policy)(block, h, positions, mask)
            else:
                h, kv = block(h, positions, mask, layer_cache)
            h = constrain(adapt(f"block_{i}", h), ACT_BTC, self.mesh, self.rules)
            new_keys.append(kv[0])
            new_values.append(kv[1])
            if hidden is not None:
                hidden.append(h)
        h = self.final_norm(h)
        if hidden is not None:
            hidden.append(h)
        h = adapt("head", h)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(
                keys=tuple(new_keys),
                values=tuple(new_values),
                key_valid=key_valid,
                next_position=cache.next_position + valid_bt.sum(axis=1, dtype=jnp.int32),
                index=cache.index + t,
            )
        return BackboneOutput(h, tuple(hidden) if hidden is not None else None, new_cache, {}, {}, {})

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        return_hidden_states: bool = False,
    ) -> ModelOutput:
        """Logits of `input_ids` [B, T] (int); everything else is optional.

        attention_mask [B, T]: 1 for real tokens, 0 for (left) padding; positions [B, T]: position ids
        (default: count of real tokens so far); cache: a KVCache to read and extend (generation).
        """
        out = self.hidden(
            input_ids,
            attention_mask=attention_mask,
            positions=positions,
            cache=cache,
            return_hidden_states=return_hidden_states,
        )
        logits = constrain(self.readout(out.h), ACT_BTV, self.mesh, self.rules)
        return ModelOutput(logits=logits, hidden_states=out.hidden_states, cache=out.cache)

    def _check_length(self, length: int) -> None:
        limit = self.config.position_limit
        if limit is not None and length > limit:
            raise ValueError(
                f"{type(self).__name__}: {length} positions requested but the model has n_positions={limit}; "
                "use shorter sequences or a smaller cache"
            )


# ------------------------------------------------------------------------------------------------
# GPT-2
# ------------------------------------------------------------------------------------------------


class GPT2Attention(nnx.Module):
    """GPT-2 causal self-attention: q, k, v and c_proj are Dense [C, C] with bias (HF's fused c_attn split in
    three); logits scaled by head_dim^-1/2 (1 without scale_attn_weights), and by 1 / (layer + 1) with
    scale_attn_by_inverse_layer_idx."""

    def __init__(self, cfg: GPT2Config, layer: int, *, dtype: DTypeLike, rngs: nnx.Rngs):
        c = cfg.n_embd
        self.num_heads = cfg.n_head
        self.q = Dense(c, c, ("embed", "heads"), use_bias=True, dtype=dtype, rngs=rngs)
        self.k = Dense(c, c, ("embed", "heads"), use_bias=True, dtype=dtype, rngs=rngs)
        self.v = Dense(c, c, ("embed", "heads"), use_bias=True, dtype=dtype, rngs=rngs)
        self.c_proj = Dense(c, c, ("heads", "embed"), use_bias=True, dtype=dtype, rngs=rngs)
        scale = cfg.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
        self.scale = scale / (layer + 1) if cfg.scale_attn_by_inverse_layer_idx else scale

    def __call__(
        self, x: jax.Array, mask: jax.Array, layer_cache: LayerCache | None, mesh: Mesh | None, rules: Rules
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """x [B, T, C] attending under the boolean mask [B, T, S] (over the cache when given) → (out [B, T, C],
        (keys, values) of the new layer cache, or this call's k, v [B, T, H, D] without a cache)."""
        q = constrain(split_heads(self.q(x), self.num_heads), ACT_BTHD, mesh, rules)
        k = constrain(split_heads(self.k(x), self.num_heads), ACT_BTHD, mesh, rules)
        v = constrain(split_heads(self.v(x), self.num_heads), ACT_BTHD, mesh, rules)
        out, new_kv = _cached_attention(q, k, v, mask, layer_cache, self.scale, mesh)
        return self.c_proj(merge_heads(out)), new_kv


class GPT2MLP(nnx.Module):
    """GPT-2 MLP: c_proj(gelu_tanh(c_fc(x))), Dense [C, mlp_size] and [mlp_size, C] with bias."""

    def __init__(self, cfg: GPT2Config, *, dtype: DTypeLike, rngs: nnx.Rngs):
        self.c_fc = Dense(cfg.n_embd, cfg.mlp_size, ("embed", "mlp"), use_bias=True, dtype=dtype, rngs=rngs)
        self.c_proj = Dense(cfg.mlp_size, cfg.n_embd, ("mlp", "embed"), use_bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mesh: Mesh | None, rules: Rules) -> jax.Array:
        """x [B, T, C] → [B, T, C]; the hidden [B, T, mlp_size] is sharded as ("batch", "seq", "act_mlp")."""
        return self.c_proj(constrain(gelu_tanh(self.c_fc(x)), ACT_BTF, mesh, rules))


class GPT2Block(nnx.Module):
    """GPT-2 pre-LayerNorm block (HF `GPT2Block`): h + attn(ln_1(h)), then h + mlp(ln_2(h))."""

    def __init__(
        self, cfg: GPT2Config, layer: int, *, dtype: DTypeLike, mesh: Mesh | None, rules: Rules, rngs: nnx.Rngs
    ):
        self.mesh, self.rules = mesh, rules
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, dtype=dtype)
        self.attn = GPT2Attention(cfg, layer, dtype=dtype, rngs=rngs)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, dtype=dtype)
        self.mlp = GPT2MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(
        self, h: jax.Array, positions: jax.Array, mask: jax.Array, layer_cache: LayerCache | None
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Residual stream h [B, T, C] → (h [B, T, C], (keys, values) as `GPT2Attention` returns them).

        positions [B, T] is unused (GPT-2 adds learned positions at the embedding); mask [B, T, S] is boolean.
        """
        del positions  # GPT-2 adds learned positions at the embedding
        a, kv = self.attn(self.ln_1(h), mask, layer_cache, self.mesh, self.rules)
        h = h + a
        h = h + self.mlp(self.ln_2(h), self.mesh, self.rules)
        return h, kv


class GPT2(CausalLM):
    """GPT-2 LM (HF `GPT2LMHeadModel`). Parameter names follow HF's with c_attn split into q, k, v."""

    def __init__(
        self,
        config: GPT2Config,
        *,
        dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
        mesh: Mesh | None = None,
        rules: Rules = LOGICAL_RULES,
        remat: str | None = None,
    ):
        self.config = config
        self._setup_common(dtype, mesh, rules, remat)
        self.wte = Embed(config.vocab_size, config.n_embd, ("vocab", "embed"), dtype=dtype, rngs=rngs)
        self.wpe = Embed(config.n_positions, config.n_embd, ("pos", "embed"), dtype=dtype, rngs=rngs, init_std=0.01)
        self.blocks = nnx.List(
            [GPT2Block(config, i, dtype=dtype, mesh=mesh, rules=self.rules, rngs=rngs) for i in range(config.n_layer)]
        )
        self.ln_f = LayerNorm(config.n_embd, config.layer_norm_epsilon, dtype=dtype)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Dense(config.n_embd, config.vocab_size, ("embed", "vocab"), use_bias=False, dtype=dtype, rngs=rngs)
        )

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads per layer (= n_head): the cache's third axis."""
        return self.config.n_head

    @property
    def head_dim(self) -> int:
        """n_embd // n_head: the cache's last axis."""
        return self.config.head_dim

    def embed(self, input_ids: jax.Array, positions: jax.Array) -> jax.Array:
        """wte[input_ids] + wpe[positions] for int [B, T] ids and positions → [B, T, C] in the model dtype."""
        return (self.wte(input_ids) + self.wpe(positions)).astype(self.dtype)

    def final_norm(self, h: jax.Array) -> jax.Array:
        """ln_f of the last block's output [B, T, C]."""
        return self.ln_f(h)

    def readout(self, h: jax.Array) -> jax.Array:
        """Logits [B, T, vocab] float32 of h [B, T, C]: h @ wteᵀ when tied, else h @ lm_head."""
        if self.lm_head is None:
            return self.wte.attend(h)
        return jnp.einsum("...c,cv->...v", h, self.lm_head.kernel[...], preferred_element_type=jnp.float32)


# ------------------------------------------------------------------------------------------------
# Gemma 3
# ------------------------------------------------------------------------------------------------


class Gemma3Attention(nnx.Module):
    """Gemma 3 grouped-query attention without bias: q_proj [C, H * D], k_proj and v_proj [C, kv * D], o_proj
    [H * D, C]; per-head RMSNorm of q and k, then RoPE (global or local base by layer type); logits scaled by
    query_pre_attn_scalar^-1/2; local layers see only the last `sliding_window` slots."""

    def __init__(self, cfg: Gemma3Config, layer: int, *, dtype: DTypeLike, rngs: nnx.Rngs):
        c, h, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads = h, kv
        self.q_proj = Dense(c, h * d, ("embed", "heads"), use_bias=False, dtype=dtype, rngs=rngs)
        self.k_proj = Dense(c, kv * d, ("embed", "kv"), use_bias=False, dtype=dtype, rngs=rngs)
        self.v_proj = Dense(c, kv * d, ("embed", "kv"), use_bias=False, dtype=dtype, rngs=rngs)
        self.o_proj = Dense(h * d, c, ("heads", "embed"), use_bias=False, dtype=dtype, rngs=rngs)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype)
        is_global = cfg.layer_types[layer] == GLOBAL_ATTENTION
        self.window = None if is_global else cfg.sliding_window
        base = cfg.rope_global_base if is_global else cfg.rope_local_base
        scale = cfg.rope_global_scale if is_global else 1.0
        self.inv_freq = tuple(float(f) for f in rope_inv_freq(d, base, scale))  # static: no parameter
        self.scale = cfg.query_pre_attn_scalar**-0.5

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        layer_cache: LayerCache | None,
        mesh: Mesh | None,
        rules: Rules,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """x [B, T, C] at int positions [B, T] (for RoPE) attending under the boolean mask [B, T, S] → (out
        [B, T, C], (keys, values) of the new layer cache, or this call's k, v [B, T, kv, D] without a cache)."""
        inv_freq = jnp.asarray(self.inv_freq, jnp.float32)
        q = constrain(split_heads(self.q_proj(x), self.num_heads), ACT_BTHD, mesh, rules)
        k = constrain(split_heads(self.k_proj(x), self.num_kv_heads), ACT_BTKD, mesh, rules)
        v = constrain(split_heads(self.v_proj(x), self.num_kv_heads), ACT_BTKD, mesh, rules)
        q = apply_rope(self.q_norm(q), positions, inv_freq)
        k = apply_rope(self.k_norm(k), positions, inv_freq)
        out, new_kv = _cached_attention(q, k, v, mask, layer_cache, self.scale, mesh, self.window)
        return self.o_proj(merge_heads(out)), new_kv


class Gemma3MLP(nnx.Module):
    """Gemma 3 gated MLP without bias: down_proj(gelu_tanh(gate_proj(x)) * up_proj(x)), hidden intermediate_size."""

    def __init__(self, cfg: Gemma3Config, *, dtype: DTypeLike, rngs: nnx.Rngs):
        c, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Dense(c, f, ("embed", "mlp"), use_bias=False, dtype=dtype, rngs=rngs)
        self.up_proj = Dense(c, f, ("embed", "mlp"), use_bias=False, dtype=dtype, rngs=rngs)
        self.down_proj = Dense(f, c, ("mlp", "embed"), use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mesh: Mesh | None, rules: Rules) -> jax.Array:
        """x [B, T, C] → [B, T, C]; the gated hidden [B, T, F] is sharded as ("batch", "seq", "act_mlp")."""
        hidden = constrain(gelu_tanh(self.gate_proj(x)) * self.up_proj(x), ACT_BTF, mesh, rules)
        return self.down_proj(hidden)


class Gemma3Block(nnx.Module):
    """Gemma 3 block with RMSNorm before and after each sublayer (HF `Gemma3DecoderLayer`):
    h + post_attention_layernorm(attn(input_layernorm(h))), then the same around the MLP."""

    def __init__(
        self, cfg: Gemma3Config, layer: int, *, dtype: DTypeLike, mesh: Mesh | None, rules: Rules, rngs: nnx.Rngs
    ):
        self.mesh, self.rules = mesh, rules
        eps, c = cfg.rms_norm_eps, cfg.hidden_size
        self.input_layernorm = RMSNorm(c, eps, dtype=dtype)
        self.self_attn = Gemma3Attention(cfg, layer, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(c, eps, dtype=dtype)
        self.pre_feedforward_layernorm = RMSNorm(c, eps, dtype=dtype)
        self.mlp = Gemma3MLP(cfg, dtype=dtype, rngs=rngs)
        self.post_feedforward_layernorm = RMSNorm(c, eps, dtype=dtype)

    def __call__(
        self, h: jax.Array, positions: jax.Array, mask: jax.Array, layer_cache: LayerCache | None
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Residual stream h [B, T, C] at int positions [B, T] under the boolean mask [B, T, S] → (h [B, T, C],
        (keys, values) as `Gemma3Attention` returns them)."""
        a, kv = self.self_attn(self.input_layernorm(h), positions, mask, layer_cache, self.mesh, self.rules)
        h = h + self.post_attention_layernorm(a)
        m = self.mlp(self.pre_feedforward_layernorm(h), self.mesh, self.rules)
        h = h + self.post_feedforward_layernorm(m)
        return h, kv


class Gemma3(CausalLM):
    """Gemma 3 text LM (HF `Gemma3ForCausalLM`); parameter names follow HF's."""

    def __init__(
        self,
        config: Gemma3Config,
        *,
        dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
        mesh: Mesh | None = None,
        rules: Rules = LOGICAL_RULES,
        remat: str | None = None,
    ):
        self.config = config
        self._setup_common(dtype, mesh, rules, remat)
        c = config.hidden_size
        self.embed_tokens = Embed(config.vocab_size, c, ("vocab", "embed"), dtype=dtype, rngs=rngs)
        self.blocks = nnx.List(
            [
                Gemma3Block(config, i, dtype=dtype, mesh=mesh, rules=self.rules, rngs=rngs)
                for i in range(config.num_layers)
            ]
        )
        self.norm = RMSNorm(c, config.rms_norm_eps, dtype=dtype)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Dense(c, config.vocab_size, ("embed", "vocab"), use_bias=False, dtype=dtype, rngs=rngs)
        )

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads per layer (grouped-query attention): the cache's third axis."""
        return self.config.num_kv_heads

    @property
    def head_dim(self) -> int:
        """config.head_dim (not hidden_size // num_heads in general): the cache's last axis."""
        return self.config.head_dim

    def attention_window(self, layer: int) -> int | None:
        """`sliding_window` for a "sliding_attention" layer, None for a "full_attention" one."""
        return self.config.sliding_window if self.config.layer_types[layer] == LOCAL_ATTENTION else None

    def embed(self, input_ids: jax.Array, positions: jax.Array) -> jax.Array:
        """embed_tokens[input_ids] * sqrt(C) for int ids [B, T] → [B, T, C] in the model dtype (positions unused)."""
        del positions  # RoPE is applied inside attention
        scale = jnp.asarray(math.sqrt(self.config.hidden_size), self.dtype)  # HF rounds it to the weight dtype
        return self.embed_tokens(input_ids).astype(self.dtype) * scale

    def final_norm(self, h: jax.Array) -> jax.Array:
        """The final RMSNorm of the last block's output [B, T, C]."""
        return self.norm(h)

    def readout(self, h: jax.Array) -> jax.Array:
        """Logits [B, T, vocab] float32 of h [B, T, C] (tied or lm_head), soft-capped as
        cap * tanh(logits / cap) when `final_logit_softcapping` is set."""
        if self.lm_head is None:
            logits = self.embed_tokens.attend(h)
        else:
            logits = jnp.einsum("...c,cv->...v", h, self.lm_head.kernel[...], preferred_element_type=jnp.float32)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else jnp.tanh(logits / cap) * cap


def _cached_attention(
    q: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    mask: jax.Array,
    layer_cache: LayerCache | None,
    scale: float,
    mesh: Mesh | None,
    window: int | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Attention of both backbones around the layer's cache: (output [B, T, H, D], (keys, values) of the cache).

    Without a cache, queries go in blocks of ATTENTION_QUERY_BLOCK (skipping masked keys) and, when no mesh is
    given or set, in a loop over sequences and heads (see layers.attention; a loop over a sharded axis would
    gather it). With a cache neither: a decoding step's one query per row would make the loop's cost dominate.
    """
    (k, v), new_kv = write_cache(k_new, v_new, layer_cache)
    block = ATTENTION_QUERY_BLOCK if layer_cache is None else None
    loop = block is not None and mesh is None and jax.sharding.get_abstract_mesh().empty
    return attention(q, k, v, mask, scale, query_block=block, window=window, loop=loop), new_kv


def build_model(
    config: GPT2Config | Gemma3Config,
    *,
    dtype: DTypeLike = jnp.float32,
    rngs: nnx.Rngs | None = None,
    **kwargs: Any,
) -> CausalLM:
    """GPT2 or Gemma3 for `config` (random initialisation; see `load_hf_causal_lm` for checkpoints).

    rngs defaults to nnx.Rngs(0); kwargs (mesh, rules, remat) go to the constructor. Raises TypeError for any
    other config type.
    """
    rngs = nnx.Rngs(0) if rngs is None else rngs
    if isinstance(config, GPT2Config):
        return GPT2(config, dtype=dtype, rngs=rngs, **kwargs)
    if isinstance(config, Gemma3Config):
        return Gemma3(config, dtype=dtype, rngs=rngs, **kwargs)
    raise TypeError(f"build_model: expected GPT2Config or Gemma3Config, got {type(config).__name__}")
