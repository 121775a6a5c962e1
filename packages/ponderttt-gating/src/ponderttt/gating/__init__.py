"""ponderttt.gating.

Gates and policies behind one interface: fixed, random, oracle, reconstruction, Gumbel, continuous, PPO-Lagrangian.
See ``base.py`` for the interface and README.md for an overview.
"""

from importlib.metadata import version as _version

from ponderttt.gating.actions import (
    ACTION_NAMES,
    NUM_ACTIONS,
    NUM_STEPS,
    SKIP,
    UPDATE_1,
    UPDATE_2,
    UPDATE_4,
    CostTable,
    action_from_name,
    action_to_gating_scale,
    action_to_num_steps,
)
from ponderttt.gating.base import (
    Gate,
    GateInput,
    GateOutput,
    available_gates,
    decision_cost,
    make_gate,
    register_gate,
    roll_gate,
)
from ponderttt.gating.baselines import (
    FixedGate,
    OracleGate,
    RandomGate,
    budget_count,
    oracle_update_mask,
    top_k_mask,
)
from ponderttt.gating.continuous import (
    ContinuousConfig,
    ContinuousGate,
    ContinuousState,
    budget_remaining,
    continuous_gate_loss,
)
from ponderttt.gating.features import (
    FeatureConfig,
    FeatureExtractor,
    FeatureInputs,
    FeatureState,
    entropy_and_confidence,
    extract_features,
    feature_index,
    gradient_variance,
    init_feature_state,
    reset_sequences,
)
from ponderttt.gating.generation import GenerationGate
from ponderttt.gating.gumbel import (
    GumbelConfig,
    GumbelGate,
    gumbel_softmax,
    gumbel_temperature,
    straight_through_one_hot,
)
from ponderttt.gating.pid import PIDConfig, PIDState, PIDTerms, pid_init, pid_update
from ponderttt.gating.ppo import (
    PPOBatch,
    PPOConfig,
    PPOGate,
    PPOLearner,
    PPOMetrics,
    PPOTrainState,
    PPOUpdateInfo,
    build_ppo_batch,
    compute_gae,
    ppo_loss,
)
from ponderttt.gating.recon import ReconConfig, ReconGate, ReconState, calibrate_threshold, recon_decide

__version__ = _version(__name__.replace(".", "-"))

__all__ = [
    "ACTION_NAMES",
    "NUM_ACTIONS",
    "NUM_STEPS",
    "SKIP",
    "UPDATE_1",
    "UPDATE_2",
    "UPDATE_4",
    "ContinuousConfig",
    "ContinuousGate",
    "ContinuousState",
    "CostTable",
    "FeatureConfig",
    "FeatureExtractor",
    "FeatureInputs",
    "FeatureState",
    "FixedGate",
    "Gate",
    "GateInput",
    "GenerationGate",
    "GateOutput",
    "GumbelConfig",
    "GumbelGate",
    "OracleGate",
    "PIDConfig",
    "PIDState",
    "PIDTerms",
    "PPOBatch",
    "PPOConfig",
    "PPOGate",
    "PPOLearner",
    "PPOMetrics",
    "PPOTrainState",
    "PPOUpdateInfo",
    "RandomGate",
    "ReconConfig",
    "ReconGate",
    "ReconState",
    "action_from_name",
    "action_to_gating_scale",
    "action_to_num_steps",
    "available_gates",
    "budget_count",
    "budget_remaining",
    "build_ppo_batch",
    "calibrate_threshold",
    "compute_gae",
    "continuous_gate_loss",
    "decision_cost",
    "entropy_and_confidence",
    "extract_features",
    "feature_index",
    "gradient_variance",
    "gumbel_softmax",
    "gumbel_temperature",
    "init_feature_state",
    "make_gate",
    "roll_gate",
    "oracle_update_mask",
    "pid_init",
    "pid_update",
    "ppo_loss",
    "recon_decide",
    "register_gate",
    "reset_sequences",
    "straight_through_one_hot",
    "top_k_mask",
]
