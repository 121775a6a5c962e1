"""The study's shared vocabulary, defined once: gate actions, fast-weight protocols, adapter kinds and the published
cost convention.

Pure Python (no numpy, no jax), so configs and command-line parsers can import it. The cost model and reports of
this package use it, and so does the training app. ``ponderttt.gating`` (action codes) and ``ponderttt.models``
(protocols, adapter kinds) depend on no other ponderttt package, so they keep their runtime definitions; a
workspace test checks that they equal these.

* Actions, indexed by gating's int32 action code: ``skip`` (no inner update), ``update_k`` (k inner gradient
  steps on the chunk). ``ACTION_STEPS[code]`` is k.
* Protocols: ``reset`` (fresh fast weights at every chunk, the published protocol) and ``carry`` (fast weights
  run on across the chunks of a document).
* Adapter kinds: ``linear`` (TTT-Linear), ``mlp`` (TTT-MLP), ``lora`` (LoRA-TTT).
* Published cost: SKIP 1, UPDATE_k 1 + 2k (each inner step counted as a forward and a backward pass).
"""

from __future__ import annotations

from typing import Literal

ACTION_NAMES: tuple[str, ...] = ("skip", "update_1", "update_2", "update_4")
ACTION_STEPS: tuple[int, ...] = (0, 1, 2, 4)
UPDATE_ACTION = 1  # the action code of update_1: the update the oracle, the advantage and the gates refer to
PROTOCOLS: tuple[str, ...] = ("reset", "carry")
ProtocolName = Literal["reset", "carry"]
ADAPTER_KINDS: tuple[str, ...] = ("linear", "mlp", "lora")
AdapterKind = Literal["linear", "mlp", "lora"]


def published_cost(steps: int) -> float:
    """The published convention's cost of an action with `steps` inner steps: 1 + 2 · steps (SKIP = 1)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    return 1.0 + 2.0 * steps

