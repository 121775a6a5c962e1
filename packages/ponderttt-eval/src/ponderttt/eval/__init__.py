"""ponderttt.eval.

Metrics, cost model, Pareto/recovery, statistics, reports and plots, code and reasoning benchmarks, sandboxed execution.

``import ponderttt.eval`` stays light: the names below are loaded from their submodules on first use, and
Matplotlib, ``datasets`` and the sandbox are never imported here (use ``ponderttt.eval.execution`` and
``ponderttt.eval.benchmarks`` directly).
"""

from importlib import import_module as _import_module
from importlib.metadata import version as _version

__version__ = _version(__name__.replace(".", "-"))

_EXPORTS = {
    "metrics": (
        "token_nll",
        "chunk_nll",
        "chunk_cross_entropy",
        "mean_loss",
        "perplexity",
        "group_losses",
        "document_losses",
        "oracle_advantage",
        "budget_matched_oracle",
        "oracle_recovery",
        "update_rate",
        "budget_adherence",
        "action_distribution",
        "lambda_summary",
        "per_group_update_rate",
    ),
    "cost": (
        "BackboneSpec",
        "AdapterSpec",
        "FlopBreakdown",
        "ActionCost",
        "CostTable",
        "WallClock",
        "action_flops",
        "backbone_chunk_flops",
        "build_cost_table",
        "chunk_costs",
        "chunk_wall_clock",
        "published_cost",
        "action_steps",
    ),
    "pareto": ("pareto_frontier", "lower_hull", "frontier_loss", "frontier_auc"),
    "stats": (
        "Estimate",
        "bootstrap_ci",
        "mean_ci",
        "paired_difference_ci",
        "ratio_ci",
        "iqm",
        "iqm_ci",
        "probability_of_improvement",
        "wilcoxon",
        "paired_t_test",
        "cohens_d",
        "cliffs_delta",
        "compare_paired",
    ),
    "signals": ("correlate", "signal_table"),
    "render": ("render_signals_markdown",),
    "verdicts": ("verdict", "MIN_PAIRED"),
    "report": (
        "SCHEMA_VERSION",
        "ReportError",
        "summarize_method",
        "comparison_record",
        "aggregate_records",
        "validate_sections",
        "validate_results",
        "build_results_json",
        "load_results",
        "write_report",
        "pareto_summary",
    ),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = ["__version__", *_WHERE]


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'ponderttt.eval' has no attribute {name!r}")
    value = getattr(_import_module(f"ponderttt.eval.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
