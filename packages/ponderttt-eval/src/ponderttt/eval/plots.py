"""Plots of a results.json document with Matplotlib's Agg renderer, for a paper: each figure is written as PNG
(linked from report.md) and, next to it, as PDF and SVG (vector, same stem).

Figures are built with ``matplotlib.figure.Figure`` (no pyplot, no global backend switch), so plotting
works headless and leaves the caller's Matplotlib state alone. Matplotlib is imported here only, never
by ``import ponderttt.eval``.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from ponderttt.eval.render import UNIT_LABELS

_DPI = 130
FORMATS = ("png", "pdf", "svg")  # every plot is saved in each; the path returned is the PNG's
# axis labels of the per-chunk signals and targets the runners pass (other names are shown as they are)
SIGNAL_LABELS = {
    "recon_loss": "step-0 reconstruction loss",
    "entropy": "prediction entropy (nats)",
    "confidence": "token confidence (mean max. probability)",
    "ttt_improvement": "reconstruction-loss drop of the update",
    "oracle_advantage": "oracle advantage: loss(SKIP) − loss(UPDATE_1) (nats)",
}


def _colors(names: Sequence[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {n: cmap(i % cmap.N) for i, n in enumerate(names)}


def _save(fig: Figure, path: pathlib.Path) -> pathlib.Path:
    """Writes the figure as PNG at ``path`` and as PDF / SVG next to it; returns the PNG's path."""
    for fmt in FORMATS:
        fig.savefig(path.with_suffix(f".{fmt}"), dpi=_DPI, bbox_inches="tight", facecolor="white", format=fmt)
    return path.with_suffix(".png")


def _grid(n: int) -> tuple[int, int]:
    """(rows, columns) for n panels, with no empty panel where n allows it (4 -> 2 x 2, 6 -> 2 x 3)."""
    cols = n if n <= 3 else 2 if n in (4,) else 3
    return math.ceil(n / cols), cols


def plot_pareto(doc: Mapping, path: str | pathlib.Path) -> pathlib.Path:
    """`pareto_figure` saved at ``path`` (PNG) and as PDF / SVG next to it; returns the PNG's path."""
    return _save(pareto_figure(doc), pathlib.Path(path))


def pareto_figure(doc: Mapping) -> Figure:
    """Loss vs. cost of every method (one line through its budgets), the frontier dashed; one row per protocol, one
    column per cost unit every record has. The loss is shown as the difference to SKIP on the same chunks (when the
    records carry ``loss_skip``) with the paired 95% CI of that difference (``delta_skip_ci``) as vertical error
    bars (the loss and its CI otherwise); on the wall-clock axis the horizontal error bars span the measured spread
    (IQR) of each record's cost."""
    results = doc["results"]
    protocols = sorted({r["protocol"] for r in results})
    units = [
        u
        for u in ("relative_flops", "published", "wall_clock_s")
        if any(u in doc["pareto"].get(p, {}) for p in protocols)
    ]
    if not units:
        raise ValueError("no cost unit is shared by every record; nothing to plot on a Pareto chart")
    methods = sorted({r["method"] for r in results})
    colors = _colors(methods)
    fig = Figure(figsize=(5.2 * len(units) + 2.4, 4.2 * len(protocols)))
    axes = np.atleast_2d(fig.subplots(len(protocols), len(units), squeeze=False))
    for i, protocol in enumerate(protocols):
        recs = [r for r in results if r["protocol"] == protocol]
        relative = all(r.get("loss_skip") is not None for r in recs)

        def y_of(r: Mapping, relative: bool = relative) -> float:  # the loss less SKIP's on the same chunks, or as is
            return r["loss"] - r["loss_skip"] if relative else r["loss"]

        ylabel = "Δ loss vs SKIP (nats / token)" if relative else "loss (nats / token)"
        for j, unit in enumerate(units):
            ax = axes[i, j]
            entry = doc["pareto"].get(protocol, {}).get(unit)
            if entry is None:
                ax.set_axis_off()
                continue
            scale = 1e3 if unit == "wall_clock_s" else 1.0  # seconds -> milliseconds on the axis
            for method in methods:
                own = sorted((r for r in recs if r["method"] == method), key=lambda r: r["cost"][unit])
                if not own:
                    continue
                xs = np.asarray([scale * r["cost"][unit] for r in own])
                ys = np.asarray([y_of(r) for r in own])
                # on the difference axis the paired CI of the difference (same chunks), else the loss's own CI
                ci = [r.get("delta_skip_ci") if relative else r.get("loss_ci") for r in own]
                yerr = None
                if all(c is not None for c in ci):
                    centre = [r["delta_skip"] if relative else r["loss"] for r in own]
                    yerr = np.maximum([[m - c[0] for m, c in zip(centre, ci, strict=True)],
                                       [c[1] - m for m, c in zip(centre, ci, strict=True)]], 0.0)
                xerr = None
                if unit == "wall_clock_s" and all(r["cost"].get("wall_clock_spread_s") is not None for r in own):
                    xerr = np.asarray([scale * r["cost"]["wall_clock_spread_s"] / 2 for r in own])
                single = len(own) == 1
                ax.errorbar(xs, ys, yerr=yerr, xerr=xerr, color=colors[method], label=method,
                            marker="s" if single else "o", markersize=7 if single else 5,
                            linestyle="none" if single else "-", linewidth=1.6, elinewidth=0.9, capsize=2.5)
            front = entry["frontier"]
            by_key = {(r["method"], r["budget"]): r for r in recs}
            fx = [scale * p["cost"] for p in front]
            fy = [y_of(by_key[(p["method"], p["budget"])]) for p in front]
            xmax = scale * max(r["cost"][unit] for r in recs)
            ax.step(fx + [xmax], fy + [fy[-1]], where="post", color="0.35", linestyle="--", linewidth=1.0,
                    label="Pareto frontier", zorder=0)
            if relative:
                ax.axhline(0.0, color="0.6", linewidth=0.8, zorder=0)
            ax.set_xlabel("wall-clock ms / chunk" if unit == "wall_clock_s" else UNIT_LABELS.get(unit, unit))
            ax.ticklabel_format(axis="both", useOffset=False, style="plain")  # 1.001, not 1 + 1e-3
            ax.set_ylabel(ylabel)
            ax.set_title(f"protocol: {protocol}", fontsize=10)
            ax.grid(True, alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=9)
    bars = "paired 95% CI of the difference to SKIP" if all(
        r.get("loss_skip") is not None for r in results) else "95% CI of the loss"
    fig.suptitle(f"Quality vs. compute (error bars: {bars}; wall-clock: IQR of the timings)", fontsize=11)
    fig.tight_layout()
    return fig


def _signal_row(rows: Sequence[Mapping], model: str, signal: str, target: str, language: str) -> Mapping | None:
    for row in rows:
        if (row.get("signal"), row.get("target"), row.get("language")) == (signal, target, language) and (
            row.get("model") in (model, None)
        ):
            return row
    return None


def plot_signals(
    samples: Mapping[str, Sequence | np.ndarray], path: str | pathlib.Path, **options
) -> pathlib.Path:
    """`signals_figure(samples, **options)` saved at ``path`` (PNG) and as PDF / SVG next to it; returns the PNG's
    path."""
    return _save(signals_figure(samples, **options), pathlib.Path(path))


def signals_figure(
    samples: Mapping[str, Sequence | np.ndarray],
    *,
    signal_names: Sequence[str],
    target_names: Sequence[str] = ("oracle_advantage",),
    rows: Sequence[Mapping] = (),
    max_points: int = 4000,
    seed: int = 0,
) -> Figure:
    """Scatter of each signal against each target, one panel per (model, signal, target), colour per language, with
    the least-squares fit line; r and its 95% CI per language in the legend, taken from ``rows`` (the
    ``signal_table`` rows of the same columns, so a plot shows the CI report.md shows) or, without a row, r alone.
    Panels whose signal or target is constant (nothing to correlate) are left out. At most ``max_points`` points per
    panel are drawn (a seeded subsample); the fit and r use all of them."""
    n = len(np.asarray(samples[signal_names[0]]).ravel())
    models = np.asarray(samples.get("model", ["—"] * n)).ravel().astype(str)
    langs = np.asarray(samples.get("language", ["all"] * n)).ravel().astype(str)

    def varies(name: str) -> bool:
        values = np.asarray(samples[name], dtype=np.float64).ravel()
        finite = values[np.isfinite(values)]
        return finite.size >= 3 and np.ptp(finite) > 0

    panels = [
        (m, s, t)
        for m in sorted(set(models.tolist()))
        for s in signal_names
        for t in target_names
        if varies(s) and varies(t)
    ]
    if not panels:
        raise ValueError(f"every signal or target is constant: nothing to plot ({list(signal_names)})")
    n_rows, cols = _grid(len(panels))
    lang_names = sorted(set(langs.tolist()))
    colors = _colors(lang_names)
    fig = Figure(figsize=(4.8 * cols, 4.0 * n_rows))
    axes = np.atleast_1d(fig.subplots(n_rows, cols, squeeze=False)).ravel()
    for ax in axes[len(panels):]:
        fig.delaxes(ax)
    rng = np.random.default_rng(seed)
    for ax, (model, signal, target) in zip(axes, panels, strict=False):
        x_all = np.asarray(samples[signal], dtype=np.float64).ravel()
        y_all = np.asarray(samples[target], dtype=np.float64).ravel()
        for lang in lang_names:
            sel = np.flatnonzero((models == model) & (langs == lang) & np.isfinite(x_all) & np.isfinite(y_all))
            if sel.size == 0:
                continue
            x, y = x_all[sel], y_all[sel]
            label = lang
            row = _signal_row(rows, model, signal, target, lang)
            if row is not None and row.get("pearson_r") is not None:
                ci = row.get("pearson_ci")
                span = "" if not ci or None in ci else f" [{ci[0]:+.2f}, {ci[1]:+.2f}]"
                label += f": r = {row['pearson_r']:+.2f}{span}, n = {row.get('n', sel.size)}"
            elif sel.size >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
                label += f": r = {np.corrcoef(x, y)[0, 1]:+.2f}, n = {sel.size}"
            shown = sel if sel.size <= max_points else rng.choice(sel, max_points, replace=False)
            ax.scatter(x_all[shown], y_all[shown], s=8, alpha=0.45, color=colors[lang], label=label, linewidths=0)
            if sel.size >= 2 and np.ptp(x) > 0:
                slope, intercept = np.polyfit(x, y, 1)
                grid = np.linspace(x.min(), x.max(), 2)
                ax.plot(grid, slope * grid + intercept, color=colors[lang], linewidth=1.8)
        ax.axhline(0.0, color="0.5", linewidth=0.8)
        ax.set_xlabel(SIGNAL_LABELS.get(signal, signal), fontsize=9)
        ax.set_ylabel(SIGNAL_LABELS.get(target, target), fontsize=9)
        ax.set_title(signal if model == "—" else f"{model}: {signal}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7.5, loc="best", markerscale=1.5, title="r [95% paired-bootstrap CI]",
                  title_fontsize=7)
    fig.tight_layout()
    return fig


def plot_actions(doc: Mapping, path: str | pathlib.Path) -> pathlib.Path:
    """Stacked horizontal bars: the fraction of chunks per action, one bar per (method, budget, protocol)."""
    path = pathlib.Path(path)
    recs = [r for r in doc["results"] if r.get("actions")]
    if not recs:
        raise ValueError("no record has an action distribution")
    recs = sorted(recs, key=lambda r: (r["protocol"], r["method"], -1.0 if r["budget"] is None else r["budget"]))
    names: list[str] = []
    for r in recs:
        names += [n for n in r["actions"] if n not in names]
    colors = dict(zip(names, [(0.78, 0.78, 0.78, 1.0), *_colors(names[1:] or ["x"]).values()], strict=False))
    fig = Figure(figsize=(8.5, 0.38 * len(recs) + 1.6))
    ax = fig.subplots()
    labels = []
    for i, r in enumerate(recs):
        left = 0.0
        for n in names:
            frac = r["actions"].get(n, 0.0)
            ax.barh(i, frac, left=left, color=colors[n], edgecolor="white", linewidth=0.5, label=n if i == 0 else None)
            left += frac
        budget = "" if r["budget"] is None else f" @ {r['budget']:g}"
        labels.append(f"{r['method']}{budget} ({r['protocol']})")
    ax.set_yticks(range(len(recs)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of chunks")
    ax.set_title("Gate actions", fontsize=11)
    ax.legend(
        loc="upper center",
        bbox_to_anchor=(0.5, -0.12 - 0.25 / max(1, len(recs))),
        ncol=len(names),
        frameon=False,
        fontsize=8,
    )
    fig.tight_layout()
    return _save(fig, path)


def plot_lambda(doc: Mapping, path: str | pathlib.Path) -> pathlib.Path:
    """Histogram of continuous scales λ per record (fractions of chunks per bin)."""
    path = pathlib.Path(path)
    recs = [r for r in doc["results"] if r.get("lambda")]
    if not recs:
        raise ValueError("no record has a λ summary")
    labels = [
        f"{r['method']}{'' if r['budget'] is None else ' @ ' + format(r['budget'], 'g')} ({r['protocol']})"
        for r in recs
    ]
    colors = _colors(labels)
    fig = Figure(figsize=(7.5, 4.2))
    ax = fig.subplots()
    for r, label in zip(recs, labels, strict=True):
        hist = r["lambda"]["histogram"]
        counts = np.asarray(hist["counts"], dtype=np.float64)
        ax.stairs(
            counts / max(1.0, counts.sum()),
            hist["edges"],
            color=colors[label],
            linewidth=1.6,
            label=f"{label}: mean {r['lambda']['mean']:.2f}",
        )
    ax.set_xlabel("λ (scale of the inner learning rate)")
    ax.set_ylabel("fraction of chunks")
    ax.set_title("Continuous gate scales", fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_all(
    doc: Mapping,
    out_dir: str | pathlib.Path,
    *,
    signal_samples: Mapping[str, Sequence | np.ndarray] | None = None,
    signal_names: Sequence[str] = (),
    target_names: Sequence[str] = ("oracle_advantage",),
) -> dict[str, pathlib.Path]:
    """Every plot the document supports: pareto, actions, lambda, signals (name -> the PNG's path; each also as PDF
    and SVG next to it)."""
    out = pathlib.Path(out_dir)
    paths = {}
    if any(doc["pareto"].get(p) for p in doc["pareto"]):
        paths["pareto"] = plot_pareto(doc, out / "pareto.png")
    if any(r.get("actions") for r in doc["results"]):
        paths["actions"] = plot_actions(doc, out / "actions.png")
    if any(r.get("lambda") for r in doc["results"]):
        paths["lambda"] = plot_lambda(doc, out / "lambda.png")
    if signal_samples is not None and signal_names:
        paths["signals"] = plot_signals(
            signal_samples,
            out / "signals.png",
            signal_names=signal_names,
            target_names=target_names,
            rows=doc.get("signals") or (),
        )
    return paths
