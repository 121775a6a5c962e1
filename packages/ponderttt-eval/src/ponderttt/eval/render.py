"""report.md from a validated results.json document (see ``report.build_results_json``)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

from ponderttt.eval.verdicts import verdict

UNIT_LABELS = {
    "flops": "FLOPs / chunk",
    "relative_flops": "FLOPs relative to SKIP",
    "published": "published cost (SKIP 1, UPDATE_k 1+2k)",
    "wall_clock_s": "wall-clock s / chunk",
    "update_rate": "update rate",
}
_SI = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def _num(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:.{digits}f}"


def _ci(ci, digits: int = 4) -> str:
    return "" if not ci or any(v is None for v in ci) else f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _signed(x, digits: int = 4) -> str:
    return "—" if x is None else f"{x:+.{digits}f}"


def _pct(x) -> str:
    return "—" if x is None else f"{100.0 * x:.1f}%"


def _flops(x) -> str:
    if x is None:
        return "—"
    for scale, prefix in _SI:
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}"
    return f"{x:.3g}"


def _budget(rec: Mapping) -> str:
    if rec.get("budget") is None:
        return "—"
    if rec.get("budget_unit") == "update_rate":
        return f"{_pct(rec['budget'])} updates"
    return f"{rec['budget']:g} ({rec.get('budget_unit')})"


def _label(rec: Mapping) -> str:
    return rec["method"] if rec.get("budget") is None else f"{rec['method']} @ {_budget(rec)}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _sorted(records: Sequence[Mapping]) -> list[Mapping]:
    return sorted(records, key=lambda r: (r["method"], -1.0 if r.get("budget") is None else r["budget"]))


def _adherence(rec: Mapping) -> str:
    adh = rec.get("budget_adherence")
    if not adh:
        return "—"
    return f"{adh['ratio']:.3f}× ({'within' if adh['within'] else 'over'})"


def _results_section(doc: Mapping, protocol: str) -> str:
    recs = _sorted([r for r in doc["results"] if r["protocol"] == protocol])
    header = [
        "Method",
        "Budget",
        "Update rate",
        "Loss [95% CI]",
        "Δ vs SKIP [paired 95% CI]",
        "PPL",
        "FLOPs/SKIP",
        "Published",
        "Wall-clock ms",
        "Recovery [95% CI]",
        "Budget used",
    ]
    rows = []
    for r in recs:
        wall = r["cost"].get("wall_clock_s")
        rows.append(
            [
                r["method"],
                _budget(r),
                _pct(r["update_rate"]),
                _num(r["loss"]) + _ci(r.get("loss_ci")),
                _signed(r.get("delta_skip")) + _ci(r.get("delta_skip_ci")),
                _num(r["perplexity"], 3),
                _num(r["cost"].get("relative_flops"), 4),
                _num(r["cost"].get("published"), 3),
                "—" if wall is None else f"{1e3 * wall:.2f}",
                _pct(r.get("recovery"))
                + ("" if not r.get("recovery_ci") else f" [{_pct(r['recovery_ci'][0])}, {_pct(r['recovery_ci'][1])}]"),
                _adherence(r),
            ]
        )
    return _table(header, rows)


def _language_section(doc: Mapping, protocol: str) -> str | None:
    model = str(doc.get("run", {}).get("model", "—"))
    rows = []
    for r in _sorted([r for r in doc["results"] if r["protocol"] == protocol]):
        for lang, e in sorted((r.get("per_language") or {}).items()):
            rows.append(
                [
                    model,
                    _label(r),
                    lang,
                    _num(e.get("loss_skip")),
                    _num(e.get("loss_oracle")),
                    f"**{_num(e['loss'])}**",
                    f"**{_pct(e.get('recovery'))}**",
                    _pct(e.get("update_rate")),
                    str(e.get("tokens", "—")),
                ]
            )
    if not rows:
        return None
    header = [
        "Model",
        "Method",
        "Language",
        "Baseline (SKIP)",
        "Oracle",
        "Method loss",
        "Oracle capture",
        "Update rate",
        "Tokens",
    ]
    return _table(header, rows)


def _actions_section(doc: Mapping) -> str | None:
    recs = [r for r in doc["results"] if r.get("actions") or r.get("lambda")]
    if not recs:
        return None
    names = []
    for r in recs:
        for n in r.get("actions") or {}:
            if n not in names:
                names.append(n)
    header = ["Method", "Protocol", *names, "λ mean", "λ median", "λ = 0"]
    rows = []
    for r in _sorted(recs):
        acts = r.get("actions") or {}
        lam = r.get("lambda") or {}
        rows.append(
            [
                _label(r),
                r["protocol"],
                *[_pct(acts.get(n)) if acts else "—" for n in names],
                _num(lam.get("mean"), 3),
                _num((lam.get("quantiles") or {}).get("p50"), 3),
                _pct(lam.get("fraction_zero")) if lam else "—",
            ]
        )
    return _table(header, rows)


def _pareto_section(doc: Mapping) -> str | None:
    parts = []
    for protocol, units in sorted(doc.get("pareto", {}).items()):
        for unit, entry in units.items():
            pts = ", ".join(
                f"{p['method']}{'' if p['budget'] is None else '@' + format(p['budget'], 'g')} "
                f"({p['cost']:.6g}, {_num(p['loss'])})"
                for p in entry["frontier"]
            )
            parts.append(f"- `{protocol}`, {UNIT_LABELS.get(unit, unit)}: frontier (cost, loss) = {pts}")
    if not parts:
        return None
    rows = []
    for protocol, units in sorted(doc.get("pareto", {}).items()):
        for unit, entry in units.items():
            for method, auc in sorted(entry["auc"].items(), key=lambda kv: (kv[0] == "all", kv[0])):
                lo, hi = auc["cost_range"]
                rows.append(
                    [
                        protocol,
                        UNIT_LABELS.get(unit, unit),
                        method,
                        f"{lo:.6g} – {hi:.6g}",
                        _num(auc["mean_loss"]),
                        _num(auc.get("improvement")),
                    ]
                )
    text = "\n".join(parts)
    if rows:
        text += "\n\nArea under the frontier (mean best loss over the cost range; lower is better; "
        text += "improvement = mean SKIP loss − mean loss):\n\n"
        text += _table(["Protocol", "Cost unit", "Method", "Cost range", "Mean loss", "Improvement"], rows)
    return text


def _signals_section(doc: Mapping) -> str | None:
    sig = doc.get("signals") or []
    if not sig:
        return None
    pairs = []
    for s in sig:
        if (s["signal"], s["target"]) not in pairs:
            pairs.append((s["signal"], s["target"]))
    groups = []
    for s in sig:
        g = (s.get("model", "—"), s.get("language", "—"))
        if g not in groups:
            groups.append(g)
    lookup = {(s.get("model", "—"), s.get("language", "—"), s["signal"], s["target"]): s for s in sig}
    pivot_rows = []
    for model, lang in groups:
        cells = []
        for signal, target in pairs:
            s = lookup.get((model, lang, signal, target))
            cells.append("—" if s is None else f"{s['pearson_r']:+.2f}")
        pivot_rows.append([model, lang, *cells])
    pivot = _table(["Model", "Language", *[f"{sg} vs {tg} (r)" for sg, tg in pairs]], pivot_rows)
    detail_rows = [
        [
            s.get("model", "—"),
            s.get("language", "—"),
            s["signal"],
            s["target"],
            s["n"],
            f"{s['pearson_r']:+.3f}{_ci(s.get('pearson_ci'), 3)}",
            _num(s.get("pearson_p"), 4),
            f"{s['spearman_rho']:+.3f}{_ci(s.get('spearman_ci'), 3)}",
            _num(s.get("spearman_p"), 4),
        ]
        for s in sig
    ]
    detail = _table(
        ["Model", "Language", "Signal", "Target", "n", "Pearson r [CI]", "p", "Spearman ρ [CI]", "p"], detail_rows
    )
    return pivot + "\n\n" + detail


def render_signals_markdown(rows: Sequence[Mapping]) -> str:
    """signals.md: the rows of ``signal_table`` as a pivot of Pearson r per (model, language) and signal, then
    every row with its n, r and Spearman ρ with CIs and p-values."""
    return "# Signals vs oracle advantage\n\n" + (_signals_section({"signals": list(rows)}) or "No signal.") + "\n"


def _comparisons_section(doc: Mapping) -> str | None:
    comps = doc.get("comparisons") or []
    if not comps:
        return None

    def name(x):
        return x["method"] if x.get("budget") is None else f"{x['method']}@{x['budget']:g}"

    rows = []
    for c in comps:
        diff = c["difference"]
        poi = c["probability_of_improvement"]
        t = c.get("paired_t") or {}
        decided = verdict(c)
        rows.append(
            [
                decided["head"] + (" (n < 30)" if decided["warning"] else ""),
                name(c["a"]),
                name(c["b"]),
                c["a"]["protocol"],
                c.get("metric", "—"),
                c["n"],
                f"{diff['value']:+.4f}{_ci(diff.get('ci'))}",
                _num(c["wilcoxon"]["pvalue"], 4),
                _num(t.get("pvalue"), 4),
                _num(c.get("cohens_d"), 3),
                _num(c.get("cliffs_delta"), 3),
                f"{poi['value']:.3f}{_ci(poi.get('ci'), 3)}",
            ]
        )
    return _table(
        [
            "Verdict (paired CI)",
            "A",
            "B",
            "Protocol",
            "Metric",
            "n",
            "Mean A − B [CI]",
            "Wilcoxon p",
            "t-test p",
            "Cohen's d",
            "Cliff's δ",
            "P(A better) [CI]",
        ],
        rows,
    )


def _aggregates_section(doc: Mapping) -> str | None:
    rows = [
        [
            a["method"],
            a.get("protocol") or "—",
            a["metric"],
            f"{a.get('runs', '—')} × {a.get('tasks', '—')}",
            _num(a["iqm"]) + _ci(a.get("ci")),
        ]
        for a in doc.get("aggregates") or []
    ]
    if not rows:
        return None
    return _table(["Method", "Protocol", "Metric", "Runs × tasks", "IQM [95% stratified-bootstrap CI]"], rows)


def _data_section(doc: Mapping) -> str | None:
    """The corpus read: files and skipped entries (never opened) per split, or None without a ``data`` section."""
    data = doc.get("data")
    if not data:
        return None
    splits = data.get("splits") or {}
    rows = []
    for split, counts in splits.items():
        skipped = counts.get("skipped") or {}
        reasons = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in sorted(skipped.items()))
        rows.append([split, str(counts.get("files", "—")), str(counts.get("used", "—")), reasons or "none"])
    total = sum(sum((counts.get("skipped") or {}).values()) for counts in splits.values())
    lead = f"{total} entries skipped (never opened)" if total else "no entries skipped"
    return f"Corpus `{data.get('corpus', '—')}`: {lead}.\n\n" + _table(["Split", "Files", "Used", "Skipped"], rows)


def _cost_section(doc: Mapping) -> str | None:
    table = doc.get("cost_table")
    if not table:
        return None

    def ms(value) -> str:
        return "—" if value is None else f"{1e3 * value:.3f}"

    rows = []
    for name, c in sorted(table.items(), key=lambda kv: kv[1]["steps"]):
        rows.append(
            [
                name,
                c["steps"],
                _flops(c["flops"]),
                _num(c["relative_flops"], 4),
                _num(c["published"], 1),
                ms(c.get("wall_clock_s")),
                ms(c.get("wall_clock_spread_s")),
                str(c.get("wall_clock_repeats") or "—"),
            ]
        )
    overheads = doc.get("wall_clock_overheads") or {}
    for name, w in sorted(overheads.items()):
        rows.append([f"+ {name}", "—", "—", "—", "—", ms(w["median_s"]), ms(w["spread_s"]), str(w["repeats"])])
    header = ["Action", "Inner steps", "FLOPs / chunk", "FLOPs / SKIP", "Published", "Wall-clock ms (median)",
              "Spread ms (IQR)", "Repeats"]
    out = _table(header, rows)
    if overheads:
        out += (
            "\n\nEach action's wall-clock times its forward alone (after warm-up, the actions interleaved). "
            "Rows marked + are work some gates do on every chunk, timed apart: a method's wall-clock adds the "
            "rows its gate reads."
        )
    return out


def render_markdown(doc: Mapping, plot_files: Mapping[str, str] | None = None) -> str:
    """The report as Markdown: run, data, costs, results per protocol, languages, actions, Pareto, signals, tests."""
    plot_files = dict(plot_files or {})
    out = [
        "# PonderTTT evaluation report",
        "",
        f"results.json schema_version {doc['schema_version']} · created {doc.get('created', '—')}",
        "",
    ]
    run = doc.get("run") or {}
    if run:
        out += [
            "## Run",
            "",
            _table(["Key", "Value"], [[k, v if isinstance(v, str) else json.dumps(v)] for k, v in run.items()]),
            "",
        ]
    sections = [("Data", _data_section(doc)), ("Cost per action (per chunk)", _cost_section(doc))]
    for protocol in sorted({r["protocol"] for r in doc["results"]}):
        sections.append((f"Results — protocol `{protocol}`", _results_section(doc, protocol)))
        sections.append((f"Per language — protocol `{protocol}`", _language_section(doc, protocol)))
    sections += [
        ("Gate decisions", _actions_section(doc)),
        ("Pareto frontier", _pareto_section(doc)),
        ("Across seeds (IQM)", _aggregates_section(doc)),
        ("Signals vs. update benefit", _signals_section(doc)),
        ("Paired comparisons", _comparisons_section(doc)),
    ]
    for title, body in sections:
        if body:
            out += [f"## {title}", "", body, ""]
    if plot_files:
        out += ["## Plots", ""]
        for name, file in plot_files.items():
            stem = file.rsplit(".", 1)[0]
            vector = f"Vector versions: [{stem}.pdf]({stem}.pdf), [{stem}.svg]({stem}.svg)."
            out += [f"![{name}]({file})", "", vector, ""]
    out.append(
        "Losses are token-weighted mean cross-entropy in nats; CIs are bootstrap intervals over documents; "
        "recovery = (L_skip − L_method) / (L_skip − L_oracle) with the oracle updating the same number of "
        "chunks."
    )
    return "\n".join(out) + "\n"
