"""TTTConfig: the frozen configuration shared by every fast-weight layer of this package."""

from __future__ import annotations

import dataclasses
from typing import Any

VARIANTS = ("base", "mamba")


@dataclasses.dataclass(frozen=True)
class TTTConfig:
    """Configuration of a TTT layer (TTT-Linear, TTT-MLP or LoRA-TTT).

    variant "base": separate q/k/v projections, no output gate (TTT-LM "linear" layer).
    variant "mamba": one shared q projection followed by two depthwise causal convolutions (width
    `conv_kernel`) giving Q and K, plus an output gate gelu_tanh(x θ_g). `share_qk` / `use_gate`
    override the variant's choice when set (the official loader needs every combination).
    """

    hidden_size: int = 768
    num_heads: int = 12
    mini_batch_size: int = 16
    base_lr: float = 1.0
    variant: str = "base"
    share_qk: bool | None = None  # None: True for "mamba", False for "base"
    use_gate: bool | None = None  # None: True for "mamba", False for "base"
    conv_kernel: int = 4
    rope_theta: float = 10000.0
    ttt_norm_eps: float = 1e-6  # per-head LayerNorm of the inner model
    post_norm_eps: float = 1e-6  # LayerNorm after the TTT output
    init_std: float = 0.02  # normal init of projections and of the initial fast weights
    mlp_expansion: int = 4  # TTT-MLP inner hidden = mlp_expansion * head_dim
    lora_rank: int = 16  # LoRA-TTT rank of the fast delta
    chunk_size: int = 512  # default tokens per chunk for per-chunk gating and stats
    inner_grad_clip: float | None = None  # clip each token's inner gradient dℓ/dz (per head) to this L2 norm
    remat_group: int | None = None  # mini-batches per rematerialised group of the scan (None: no remat)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"TTTConfig.variant={self.variant!r}: choose one of {VARIANTS}.")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"TTTConfig.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}."
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE on interleaved pairs.")
        for name in ("mini_batch_size", "conv_kernel", "mlp_expansion", "lora_rank", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TTTConfig.{name}={getattr(self, name)} must be >= 1.")
        if self.chunk_size % self.mini_batch_size:
            raise ValueError(
                f"TTTConfig.chunk_size={self.chunk_size} must be a multiple of mini_batch_size="
                f"{self.mini_batch_size} so that gating decisions align with mini-batches."
            )
        if self.inner_grad_clip is not None and not self.inner_grad_clip > 0:
            raise ValueError(f"TTTConfig.inner_grad_clip={self.inner_grad_clip} must be > 0 or None.")
        if self.remat_group is not None and self.remat_group < 1:
            raise ValueError(f"TTTConfig.remat_group={self.remat_group} must be >= 1 or None.")

    @property
    def head_dim(self) -> int:
        """d = hidden_size / num_heads, the width of each head's fast weights (LoRA-TTT uses the full width)."""
        return self.hidden_size // self.num_heads

    @property
    def qk_shared(self) -> bool:
        """Q and K come from one shared projection and two convolutions: `share_qk`, else the variant's choice."""
        return self.variant == "mamba" if self.share_qk is None else self.share_qk

    @property
    def gated(self) -> bool:
        """The output is multiplied by gelu_tanh(x θ_g): `use_gate`, else the variant's choice."""
        return self.variant == "mamba" if self.use_gate is None else self.use_gate

    def replace(self, **changes: Any) -> TTTConfig:
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    # Presets: the TTT-LM 125M layer shape, and a tiny one for tests and examples.
    @classmethod
    def ttt_125m(cls, **overrides: Any) -> TTTConfig:
        """The TTT-LM 125M layer: hidden 768, 12 heads (d = 64), mini-batch 16; `overrides` replace fields."""
        return cls(**{"hidden_size": 768, "num_heads": 12, "mini_batch_size": 16, **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> TTTConfig:
        """A tiny layer for tests and examples: hidden 32, 4 heads (d = 8), mini-batch 4, chunk 8."""
        return cls(**{"hidden_size": 32, "num_heads": 4, "mini_batch_size": 4, "chunk_size": 8, **overrides})
