"""Results of an evaluation run: one record per (method, budget, protocol), written as ``results.json``
(a versioned, documented schema), ``report.md`` (readable tables) and PNG plots.

The runner either builds records itself (dicts following ``RESULT_FIELDS``) or, usually, calls
``summarize_method`` with per-chunk arrays (losses under the method, under SKIP and under the update, the
actions or λ, token counts, languages, document ids) and gets a record with every number and its CI.
``write_report`` validates everything first and raises ``ReportError`` listing each missing or bad field.
The schema is documented in the package README ("results.json schema"); ``SCHEMA_VERSION`` changes
whenever a field changes meaning or a required field is added.
"""

from __future__ import annotations

import datetime
import json
import math
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from ponderttt.eval import metrics
from ponderttt.eval.cost import COST_UNITS, CostTable, chunk_costs, chunk_wall_clock
from ponderttt.eval.pareto import frontier_auc, pareto_frontier
from ponderttt.eval.protocol import ACTION_NAMES, PROTOCOLS
from ponderttt.eval.stats import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, bootstrap_ci, compare_paired, iqm_ci, ratio_ci

SCHEMA_VERSION = 2
BUDGET_UNITS = ("update_rate", *COST_UNITS)

# field -> (required, accepted types, meaning). Types: "number", "int", "str", "interval", "dict", "null".
RESULT_FIELDS: dict[str, tuple[bool, tuple[str, ...], str]] = {
    "method": (True, ("str",), "gate / method name, e.g. 'recon_gate', 'fixed_update_1', 'oracle'"),
    "budget": (True, ("number", "null"), "target budget in budget_unit; null for methods without one"),
    "budget_unit": (False, ("str", "null"), f"unit of budget, one of {BUDGET_UNITS}; required with a budget"),
    "protocol": (True, ("str",), f"fast-weight state across chunks, one of {PROTOCOLS}"),
    "n_chunks": (True, ("int",), "chunks evaluated"),
    "n_tokens": (True, ("int",), "unmasked tokens evaluated"),
    "update_rate": (True, ("number",), "realised fraction of chunks that updated"),
    "loss": (True, ("number",), "token-weighted mean cross-entropy (nats)"),
    "loss_ci": (False, ("interval", "null"), "[low, high] bootstrap CI of loss (documents resampled)"),
    "perplexity": (True, ("number",), "exp(loss)"),
    "perplexity_ci": (False, ("interval", "null"), "exp of loss_ci"),
    "cost": (
        True,
        ("dict",),
        "mean cost per chunk: flops, relative_flops, published, wall_clock_s (null if unmeasured); "
        "wall_clock_spread_s: the measured spread (IQR) of wall_clock_s",
    ),
    "budget_adherence": (False, ("dict", "null"), "metrics.budget_adherence in budget_unit"),
    "loss_skip": (False, ("number", "null"), "loss of SKIP on the same chunks"),
    "loss_oracle": (False, ("number", "null"), "loss of the budget-matched oracle (same number of updates)"),
    "delta_skip": (False, ("number", "null"), "loss - loss_skip on the same chunks (nats)"),
    "delta_skip_ci": (False, ("interval", "null"), "[low, high] paired bootstrap CI of delta_skip (over documents)"),
    "recovery": (False, ("number", "null"), "(loss_skip - loss) / (loss_skip - loss_oracle)"),
    "recovery_ci": (False, ("interval", "null"), "[low, high] bootstrap CI of recovery"),
    "per_language": (False, ("dict", "null"), "language -> {loss, perplexity, tokens, update_rate, loss_skip, ...}"),
    "actions": (False, ("dict", "null"), "action name -> fraction of chunks"),
    "lambda": (False, ("dict", "null"), "metrics.lambda_summary of continuous scales"),
    "extra": (False, ("dict", "null"), "anything else the runner wants kept (free form)"),
}
COST_FIELDS = ("flops", "relative_flops", "published", "wall_clock_s")
OPTIONAL_COST_FIELDS = ("wall_clock_spread_s",)


class ReportError(ValueError):
    """The results handed to the report writer are incomplete or malformed; the message lists every problem."""


# ---------------------------------------------------------------- building records


def _key(record: Mapping) -> str:
    return f"(method={record.get('method')!r}, budget={record.get('budget')!r}, protocol={record.get('protocol')!r})"


def _cluster_sums(values: np.ndarray, clusters: np.ndarray | None) -> np.ndarray:
    if clusters is None:
        return values
    _, inverse = np.unique(clusters, return_inverse=True)
    return np.bincount(inverse, weights=values)


def _recovery_stat(skip, method, oracle, axis=-1):
    s, m, o = (np.sum(a, axis=axis) for a in (skip, method, oracle))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(s - o > 0, (s - m) / np.where(s - o > 0, s - o, 1.0), np.nan)


def _losses_and_oracle(loss_skip, loss_update, steps, tokens, sel):
    """(loss_skip, loss_oracle, oracle per-chunk losses) on the chunks in ``sel``, matched to the update count."""
    skip, upd = loss_skip[sel], loss_update[sel]
    chosen = metrics.budget_matched_oracle(skip, upd, int(np.sum(steps[sel] > 0)))
    oracle_chunks = np.where(chosen, upd, skip)
    w = tokens[sel]
    return metrics.mean_loss(skip * w, w), metrics.mean_loss(oracle_chunks * w, w), oracle_chunks


def summarize_method(
    method: str,
    protocol: str,
    *,
    loss: Sequence[float] | np.ndarray,
    tokens: Sequence[float] | np.ndarray,
    actions: Sequence | np.ndarray | None = None,
    lambdas: Sequence[float] | np.ndarray | None = None,
    budget: float | None = None,
    budget_unit: str | None = None,
    cost_table: CostTable | None = None,
    wall_clock_s_per_chunk: float | None = None,
    overheads: Sequence[str] = (),
    loss_skip: Sequence[float] | np.ndarray | None = None,
    loss_update: Sequence[float] | np.ndarray | None = None,
    languages: Sequence[str] | np.ndarray | None = None,
    documents: Sequence | np.ndarray | None = None,
    action_names: Sequence[str] = ACTION_NAMES,
    lambda_max: float | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
    extra: Mapping | None = None,
) -> dict:
    """One results record from per-chunk arrays (all of length N, one entry per evaluated chunk).

    loss: mean CE per chunk under the method; tokens: unmasked tokens per chunk. actions (names or step
    counts) or lambdas (continuous scales): the gate's decision per chunk. loss_skip / loss_update: CE per
    chunk under SKIP and under the oracle's update action, for the budget-matched oracle and recovery.
    documents: document id per chunk; CIs resample whole documents (default: every chunk on its own).
    Costs are mean per chunk from ``cost_table`` (λ > 0 costs one inner pass); ``overheads`` names the table's
    measured overhead rows the method's gate adds to every chunk's wall-clock (e.g. ``("recon_probe",)``); a
    measured ``wall_clock_s_per_chunk`` overrides the wall-clock column for this record.
    """
    tokens_arr = np.asarray(tokens, dtype=np.float64).ravel()
    loss_arr = np.asarray(loss, dtype=np.float64).ravel()
    n = loss_arr.size
    problems = []
    if n == 0:
        problems.append("loss is empty")
    arrays = {
        "tokens": tokens,
        "actions": actions,
        "lambdas": lambdas,
        "loss_skip": loss_skip,
        "loss_update": loss_update,
        "languages": languages,
        "documents": documents,
    }
    for name, value in arrays.items():
        if value is not None and np.asarray(value).size != n:
            problems.append(f"{name} has {np.asarray(value).size} entries, loss has {n}: one per chunk")
    if (actions is None) == (lambdas is None):
        problems.append("pass exactly one of actions= (discrete gate) or lambdas= (continuous gate)")
    if (loss_skip is None) != (loss_update is None):
        problems.append("loss_skip and loss_update come together (both are needed for the oracle)")
    if protocol not in PROTOCOLS:
        problems.append(f"protocol {protocol!r} is not one of {PROTOCOLS}")
    if budget is not None and budget_unit not in BUDGET_UNITS:
        problems.append(f"budget_unit {budget_unit!r} must be one of {BUDGET_UNITS} when a budget is given")
    if budget_unit not in (None, "update_rate", "published") and cost_table is None and budget is not None:
        problems.append(f"a budget in {budget_unit!r} needs cost_table= to price the chunks")
    if problems:
        raise ReportError(f"summarize_method({method!r}, {protocol!r}): " + "; ".join(problems))
    if np.any(tokens_arr < 0):
        raise ReportError(f"summarize_method({method!r}): tokens must be >= 0 per chunk")
    counted = tokens_arr > 0  # chunks without an unmasked token weigh nothing; their NaN losses are fine
    for name, value in (("loss", loss), ("loss_skip", loss_skip), ("loss_update", loss_update)):
        if value is not None and not np.all(np.isfinite(np.asarray(value, dtype=np.float64).ravel()[counted])):
            raise ReportError(f"summarize_method({method!r}): {name} has NaN/inf entries on chunks with tokens")
    if not counted.any():
        raise ReportError(f"summarize_method({method!r}): no chunk has an unmasked token")

    def _weighted_ready(x):  # zero out chunks without tokens so NaN losses there cannot leak into sums
        return np.where(counted, np.asarray(x, dtype=np.float64).ravel(), 0.0)

    loss_arr = _weighted_ready(loss_arr)
    if loss_skip is not None:
        loss_skip, loss_update = _weighted_ready(loss_skip), _weighted_ready(loss_update)

    steps = (
        metrics.steps_of(actions).ravel()
        if actions is not None
        else (np.asarray(lambdas, float).ravel() > 0).astype(int)
    )
    clusters = np.asarray(documents).ravel() if documents is not None else None
    boot = dict(n_resamples=n_resamples, confidence=confidence, seed=seed)

    nll = loss_arr * tokens_arr
    loss_est = ratio_ci(_cluster_sums(nll, clusters), _cluster_sums(tokens_arr, clusters), **boot)
    record: dict = {
        "method": method,
        "budget": None if budget is None else float(budget),
        "budget_unit": budget_unit if budget is not None else None,
        "protocol": protocol,
        "n_chunks": int(n),
        "n_tokens": int(round(tokens_arr.sum())),
        "update_rate": float(np.mean(steps > 0)),
        "loss": loss_est.value,
        "loss_ci": [loss_est.low, loss_est.high],
        "perplexity": math.exp(loss_est.value),
        "perplexity_ci": [math.exp(loss_est.low), math.exp(loss_est.high)],
    }

    decision = {"actions": actions} if actions is not None else {"lambdas": lambdas}
    cost = {field: None for field in COST_FIELDS}
    per_chunk_cost = {}
    if cost_table is not None:
        for unit in COST_FIELDS:
            if unit == "wall_clock_s":
                if cost_table.has_wall_clock:
                    wall, spread = chunk_wall_clock(cost_table, overheads=overheads, **decision)
                    per_chunk_cost[unit] = wall.ravel()
                    cost["wall_clock_spread_s"] = float(spread.mean())
                    cost[unit] = float(wall.mean())
                continue
            per_chunk_cost[unit] = chunk_costs(cost_table, unit=unit, **decision).ravel()
            cost[unit] = float(per_chunk_cost[unit].mean())
    else:  # the published convention needs no cost table: SKIP 1, UPDATE_k 1 + 2k (λ > 0: one pass, 3)
        per_chunk_cost["published"] = 1.0 + 2.0 * steps  # for λ gates steps is already 0 / 1
        cost["published"] = float(per_chunk_cost["published"].mean())
    if wall_clock_s_per_chunk is not None:
        cost["wall_clock_s"] = float(wall_clock_s_per_chunk)
    record["cost"] = cost

    if budget is not None:
        if budget_unit == "update_rate" or budget_unit in per_chunk_cost:
            spent = (steps > 0).astype(float) if budget_unit == "update_rate" else per_chunk_cost[budget_unit]
            adherence = metrics.budget_adherence(spent, budget)
            if clusters is not None:  # the fraction of documents whose own mean spend is over budget
                per_doc = _cluster_sums(spent, clusters) / _cluster_sums(np.ones_like(spent), clusters)
                adherence["documents_over_budget"] = float(np.mean(per_doc > budget + 1e-12))
            record["budget_adherence"] = adherence
        else:
            raise ReportError(f"{method!r}: budget in {budget_unit!r} but the cost table has no {budget_unit} column")
    else:
        record["budget_adherence"] = None

    record.update(
        loss_skip=None, loss_oracle=None, delta_skip=None, delta_skip_ci=None, recovery=None, recovery_ci=None
    )
    if loss_skip is not None:
        skip_arr = np.asarray(loss_skip, dtype=np.float64).ravel()
        upd_arr = np.asarray(loss_update, dtype=np.float64).ravel()
        delta = ratio_ci(_cluster_sums((loss_arr - skip_arr) * tokens_arr, clusters),
                         _cluster_sums(tokens_arr, clusters), **boot)  # paired: the same chunks, documents resampled
        record.update(delta_skip=delta.value, delta_skip_ci=[delta.low, delta.high])
        all_sel = np.ones(n, dtype=bool)
        l_skip, l_oracle, oracle_chunks = _losses_and_oracle(skip_arr, upd_arr, steps, tokens_arr, all_sel)
        rec = metrics.oracle_recovery(l_skip, record["loss"], l_oracle)
        record.update(loss_skip=l_skip, loss_oracle=l_oracle, recovery=None if math.isnan(rec) else rec)
        if not math.isnan(rec):
            sums = [_cluster_sums(a * tokens_arr, clusters) for a in (skip_arr, loss_arr, oracle_chunks)]
            est = bootstrap_ci(sums, _recovery_stat, paired=True, method="percentile", **boot)
            # resamples where the oracle does not beat SKIP have no recovery; then the interval is undefined
            finite = math.isfinite(est.low) and math.isfinite(est.high)
            record["recovery_ci"] = [est.low, est.high] if finite else None

    if languages is not None:
        langs = np.asarray(languages).ravel().astype(str)
        per_language = {}
        for lang in sorted(set(langs.tolist())):
            sel = langs == lang
            w = tokens_arr[sel]
            if w.sum() <= 0:
                continue
            lang_loss = metrics.mean_loss(loss_arr[sel] * w, w)
            entry = {
                "loss": lang_loss,
                "perplexity": math.exp(lang_loss),
                "tokens": int(round(w.sum())),
                "n_chunks": int(sel.sum()),
                "update_rate": float(np.mean(steps[sel] > 0)),
            }
            if loss_skip is not None:
                l_skip, l_oracle, _ = _losses_and_oracle(skip_arr, upd_arr, steps, tokens_arr, sel)
                rec = metrics.oracle_recovery(l_skip, lang_loss, l_oracle)
                entry.update(loss_skip=l_skip, loss_oracle=l_oracle, recovery=None if math.isnan(rec) else rec)
            per_language[lang] = entry
        record["per_language"] = per_language
    else:
        record["per_language"] = None

    if actions is not None:
        record["actions"] = metrics.action_distribution(actions, names=action_names)
        record["lambda"] = None
    else:
        record["actions"] = None
        record["lambda"] = metrics.lambda_summary(lambdas, lambda_max=lambda_max)
    record["extra"] = dict(extra) if extra is not None else None
    return record


def comparison_record(
    a: Mapping | tuple,
    b: Mapping | tuple,
    scores_a: Sequence[float] | np.ndarray,
    scores_b: Sequence[float] | np.ndarray,
    *,
    metric: str = "document_loss",
    higher_is_better: bool = False,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> dict:
    """A paired comparison of two (method, budget, protocol) entries on the same items (e.g. documents)."""

    def ident(x):
        if isinstance(x, Mapping):
            return {"method": x["method"], "budget": x.get("budget"), "protocol": x["protocol"]}
        method, budget, protocol = x
        return {"method": method, "budget": budget, "protocol": protocol}

    stats = compare_paired(
        scores_a, scores_b, higher_is_better=higher_is_better, n_resamples=n_resamples, confidence=confidence, seed=seed
    )
    return {"a": ident(a), "b": ident(b), "metric": metric, **stats}


def aggregate_records(
    score_dict: Mapping[str, np.ndarray],
    *,
    metric: str = "loss",
    protocol: str | None = None,
    reps: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> list[dict]:
    """IQM over runs x tasks per method (e.g. seeds x languages) with stratified-bootstrap CIs (rliable).

    ``score_dict``: method label -> [runs, tasks] scores of ``metric``. One row per method.
    """
    estimates = iqm_ci(score_dict, reps=reps, confidence=confidence, seed=seed)
    shapes = {name: np.shape(scores) + (1,) * (2 - np.ndim(scores)) for name, scores in score_dict.items()}
    return [
        {
            "method": name,
            "protocol": protocol,
            "metric": metric,
            "runs": int(shapes[name][0]),
            "tasks": int(shapes[name][1]),
            "iqm": est.value,
            "ci": [est.low, est.high],
            "confidence": confidence,
        }
        for name, est in estimates.items()
    ]


# ---------------------------------------------------------------- validation


def _type_ok(value, kinds: tuple[str, ...]) -> bool:
    for kind in kinds:
        if kind == "null" and value is None:
            return True
        if kind == "str" and isinstance(value, str):
            return True
        if kind == "int" and isinstance(value, int | np.integer) and not isinstance(value, bool):
            return True
        if (
            kind == "number"
            and isinstance(value, int | float | np.integer | np.floating)
            and not isinstance(value, bool)
        ):
            return math.isfinite(float(value))
        if kind == "dict" and isinstance(value, Mapping):
            return True
        if kind == "interval" and isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
            return all(isinstance(v, int | float | np.integer | np.floating) and math.isfinite(v) for v in value) and (
                value[0] <= value[1]
            )
    return False


def validate_results(results: Sequence[Mapping]) -> list[str]:
    """Every problem in a list of result records, as readable lines (empty when valid)."""
    problems: list[str] = []
    if isinstance(results, Mapping) or not isinstance(results, Sequence):
        return [f"results must be a list of records (dicts), got {type(results).__name__}"]
    if not results:
        return ["results is empty: the report needs at least one (method, budget, protocol) record"]
    seen: dict[tuple, int] = {}
    for i, rec in enumerate(results):
        if not isinstance(rec, Mapping):
            problems.append(f"results[{i}] is a {type(rec).__name__}, not a dict")
            continue
        where = f"results[{i}] {_key(rec)}"
        missing = [f for f, (req, _, _) in RESULT_FIELDS.items() if req and f not in rec]
        if missing:
            problems.append(f"{where}: missing required {missing}")
        unknown = sorted(set(rec) - set(RESULT_FIELDS))
        if unknown:
            problems.append(f"{where}: unknown fields {unknown} (put free-form values under 'extra')")
        for field, (_, kinds, meaning) in RESULT_FIELDS.items():
            if field in rec and not _type_ok(rec[field], kinds):
                problems.append(f"{where}: {field}={rec[field]!r} is not {' or '.join(kinds)} ({meaning})")
        if rec.get("protocol") is not None and rec.get("protocol") not in PROTOCOLS:
            problems.append(f"{where}: protocol must be one of {PROTOCOLS}")
        if rec.get("budget") is not None and rec.get("budget_unit") not in BUDGET_UNITS:
            problems.append(f"{where}: budget_unit={rec.get('budget_unit')!r} must be one of {BUDGET_UNITS}")
        rate = rec.get("update_rate")
        if _type_ok(rate, ("number",)) and not 0.0 <= rate <= 1.0:
            problems.append(f"{where}: update_rate={rate} must lie in [0, 1]")
        if isinstance(rec.get("cost"), Mapping):
            cost = rec["cost"]
            absent = [f for f in COST_FIELDS if f not in cost]
            if absent:
                problems.append(f"{where}: cost is missing {absent} (use null for an unmeasured unit)")
            for f in COST_FIELDS + OPTIONAL_COST_FIELDS:
                if f in cost and not _type_ok(cost[f], ("number", "null")):
                    problems.append(f"{where}: cost.{f}={cost[f]!r} is not a number or null")
            if all(cost.get(f) is None for f in ("relative_flops", "published")):
                problems.append(f"{where}: cost needs at least relative_flops or published to place it on the frontier")
        key = (rec.get("method"), rec.get("budget"), rec.get("protocol"))
        if key in seen:
            problems.append(f"{where}: duplicates results[{seen[key]}]; (method, budget, protocol) must be unique")
        seen.setdefault(key, i)
    return problems


SECTION_FIELDS = {
    "comparisons": ("a", "b", "metric", "n", "difference", "wilcoxon", "probability_of_improvement"),
    "signals": ("signal", "target", "n", "pearson_r", "spearman_rho"),
    "aggregates": ("method", "metric", "iqm", "ci"),
}


def validate_sections(**sections: Sequence[Mapping]) -> list[str]:
    """Problems in the comparisons / signals / aggregates rows (each must carry its builder's fields)."""
    problems = []
    for section, rows in sections.items():
        required = SECTION_FIELDS[section]
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                problems.append(f"{section}[{i}] is a {type(row).__name__}, not a dict")
                continue
            missing = [f for f in required if f not in row]
            if missing:
                problems.append(f"{section}[{i}]: missing {missing}")
    return problems


def _check(results: Sequence[Mapping], **sections: Sequence[Mapping]) -> None:
    problems = validate_results(results) + validate_sections(**sections)
    if problems:
        raise ReportError(f"{len(problems)} problem(s) in the results:\n  - " + "\n  - ".join(problems))


# ---------------------------------------------------------------- Pareto summary


def pareto_summary(
    results: Sequence[Mapping], units: Sequence[str] = ("relative_flops", "published", "wall_clock_s")
) -> dict[str, dict[str, dict]]:
    """Per protocol and cost unit: the frontier over all records, and each multi-budget method's AUC.

    The AUC range is shared by the methods compared: from the highest of their cheapest points to the
    dearest point of any record, so every method's step frontier is defined over it. On the wall-clock axis each
    point's measured spread (``cost.wall_clock_spread_s``) is its resolution: two costs closer than the larger
    spread of the two count as equal, so no frontier step is narrower than what the timings can tell apart
    (``resolution`` reports the largest spread; each frontier point carries its own ``spread``).
    """
    out: dict = {}
    for protocol in sorted({r["protocol"] for r in results}):
        recs = [r for r in results if r["protocol"] == protocol]
        out[protocol] = {}
        for unit in units:
            usable = [r for r in recs if r["cost"].get(unit) is not None]
            if len(usable) < len(recs) or not usable:
                continue  # a unit some records lack is left out rather than comparing a subset
            costs = [r["cost"][unit] for r in usable]
            losses = [r["loss"] for r in usable]
            spreads = [(r["cost"].get("wall_clock_spread_s") or 0.0) if unit == "wall_clock_s" else 0.0 for r in usable]
            frontier = [
                {"method": usable[i]["method"], "budget": usable[i]["budget"], "cost": costs[i], "loss": losses[i],
                 "spread": spreads[i]}
                for i in pareto_frontier(costs, losses, resolution=spreads)
            ]
            resolution = float(max(spreads, default=0.0))
            methods = sorted({r["method"] for r in usable})
            multi = {m: [r for r in usable if r["method"] == m] for m in methods}
            multi = {m: rs for m, rs in multi.items() if len(rs) >= 2}
            auc = {}
            if multi:
                lo = max(min(r["cost"][unit] for r in rs) for rs in multi.values())
                hi = max(costs)
                skip = [r["loss_skip"] for r in usable if r.get("loss_skip") is not None]
                reference = float(np.mean(skip)) if skip else None
                for m, rs in multi.items():
                    auc[m] = frontier_auc(
                        [r["cost"][unit] for r in rs],
                        [r["loss"] for r in rs],
                        cost_range=(lo, hi),
                        reference_loss=reference,
                    )
                auc["all"] = frontier_auc(costs, losses, cost_range=(lo, hi), reference_loss=reference)
            out[protocol][unit] = {"frontier": frontier, "auc": auc, "resolution": resolution}
    return out


# ---------------------------------------------------------------- writing


def _jsonable(value):
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(float(value)) else None
    return value


def build_results_json(
    results: Sequence[Mapping],
    *,
    run: Mapping | None = None,
    cost_table: CostTable | None = None,
    comparisons: Sequence[Mapping] = (),
    signals: Sequence[Mapping] = (),
    aggregates: Sequence[Mapping] = (),
    data: Mapping | None = None,
) -> dict:
    """The results.json document (validated); see the README for the schema. ``data``: what the runner read (corpus,
    files and skipped entries per split), kept as the optional ``data`` section."""
    _check(results, comparisons=comparisons, signals=signals, aggregates=aggregates)
    optional = {} if data is None else {"data": dict(data)}
    return _jsonable(
        {
            "schema_version": SCHEMA_VERSION,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "run": dict(run or {}),
            **optional,
            "cost_table": cost_table.to_dict() if cost_table is not None else None,
            "wall_clock_overheads": cost_table.overheads_to_dict() if cost_table is not None else {},
            "results": [dict(r) for r in results],
            "pareto": pareto_summary(results),
            "comparisons": [dict(c) for c in comparisons],
            "signals": [dict(s) for s in signals],
            "aggregates": [dict(a) for a in aggregates],
        }
    )


def load_results(path: str | pathlib.Path) -> dict:
    """Reads and validates a results.json; raises ReportError on a wrong schema version or bad records."""
    doc = json.loads(pathlib.Path(path).read_text())
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ReportError(f"{path}: schema_version {version!r}; this reader understands {SCHEMA_VERSION}")
    _check(doc.get("results", []))
    return doc


def write_report(
    out_dir: str | pathlib.Path,
    results: Sequence[Mapping],
    *,
    run: Mapping | None = None,
    cost_table: CostTable | None = None,
    comparisons: Sequence[Mapping] = (),
    signals: Sequence[Mapping] = (),
    aggregates: Sequence[Mapping] = (),
    signal_samples: Mapping[str, Sequence | np.ndarray] | None = None,
    signal_names: Sequence[str] = (),
    target_names: Sequence[str] = ("oracle_advantage",),
    plots: bool = True,
    data: Mapping | None = None,
) -> dict[str, pathlib.Path]:
    """Validates ``results`` and writes results.json, report.md and (with ``plots``) PNGs into ``out_dir``.

    ``data``: the corpus read ({"corpus", "skipped", "splits": {split: {"files", "used", "skipped": {reason: n}}}}),
    results.json's ``data`` section and report.md's "Data" table;
    ``comparisons``: ``comparison_record`` rows; ``aggregates``: ``aggregate_records`` rows (IQM over seeds);
    ``signals``: rows of ``signals.signal_table``; ``signal_samples`` (per-chunk columns, as for
    ``signal_table``) with ``signal_names`` / ``target_names`` adds the signal-vs-target scatter plot.
    Returns {"results": path, "report": path, <plot name>: path, ...}.
    """
    from ponderttt.eval.render import render_markdown

    doc = build_results_json(
        results,
        run=run,
        cost_table=cost_table,
        comparisons=comparisons,
        signals=signals,
        aggregates=aggregates,
        data=data,
    )
    if signal_samples is not None:
        missing = [n for n in (*signal_names, *target_names) if n not in signal_samples]
        if missing or not signal_names:
            raise ReportError(
                f"signal_samples needs the columns named by signal_names and target_names; missing "
                f"{missing or 'signal_names'} (have {sorted(signal_samples)})"
            )
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.json", "report": out / "report.md"}
    plot_paths: dict[str, pathlib.Path] = {}
    if plots:
        from ponderttt.eval import plots as plotting

        plot_paths = plotting.plot_all(
            doc, out, signal_samples=signal_samples, signal_names=signal_names, target_names=target_names
        )
    paths["results"].write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    paths["report"].write_text(render_markdown(doc, plot_files={k: p.name for k, p in plot_paths.items()}))
    return paths | plot_paths
