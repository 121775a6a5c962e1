import json
import math

import numpy as np
import pytest
import scipy.stats

from ponderttt.eval.cost import AdapterSpec, BackboneSpec, build_cost_table
from ponderttt.eval.report import (
    SCHEMA_VERSION,
    ReportError,
    aggregate_records,
    comparison_record,
    load_results,
    summarize_method,
    validate_results,
    write_report,
)
from ponderttt.eval.signals import signal_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def toy():
    """12 documents x 4 chunks in two languages; the update helps chunks with a high 'recon' signal."""
    rng = np.random.default_rng(0)
    n_docs, per_doc = 12, 4
    n = n_docs * per_doc
    docs = np.repeat(np.arange(n_docs), per_doc)
    langs = np.where(docs % 2 == 0, "python", "go")
    tokens = rng.integers(100, 129, n).astype(float)
    recon = rng.gamma(2.0, 1.0, n)
    advantage = 0.3 * recon + rng.normal(0, 0.2, n)
    loss_skip = 4.0 + rng.normal(0, 0.3, n)
    bb = BackboneSpec(num_layers=2, hidden_size=64, num_heads=4, vocab_size=256, seq_len=256, chunk_size=128)
    table = build_cost_table(
        bb,
        AdapterSpec.for_backbone(bb),
        wall_clock_s={"skip": 0.01, "update_1": 0.02, "update_2": 0.03, "update_4": 0.05},
    )
    return dict(
        n=n,
        docs=docs,
        langs=langs,
        tokens=tokens,
        recon=recon,
        advantage=advantage,
        loss_skip=loss_skip,
        loss_update=loss_skip - advantage,
        table=table,
    )


def _record(toy, method, actions, budget=None, protocol="reset", **kw):
    steps = np.asarray(actions)
    loss = np.where(steps > 0, toy["loss_update"], toy["loss_skip"])
    return summarize_method(
        method,
        protocol,
        loss=loss,
        tokens=toy["tokens"],
        actions=steps,
        budget=budget,
        budget_unit=None if budget is None else "update_rate",
        cost_table=toy["table"],
        loss_skip=toy["loss_skip"],
        loss_update=toy["loss_update"],
        languages=toy["langs"],
        documents=toy["docs"],
        n_resamples=200,
        **kw,
    )


def _suite(toy):
    n = toy["n"]
    order = np.argsort(np.argsort(-toy["recon"]))
    recs = [_record(toy, "skip", np.zeros(n, int)), _record(toy, "update_1", np.ones(n, int))]
    for b in (0.25, 0.5):
        recs.append(_record(toy, "recon_gate", (order < int(b * n)).astype(int), budget=b))
        recs.append(
            _record(toy, "random", (np.random.default_rng(1).permutation(n) < int(b * n)).astype(int), budget=b)
        )
    return recs


def test_summary_numbers_by_hand(toy):
    n = toy["n"]
    chosen = np.argsort(np.argsort(-toy["recon"])) < n // 2
    rec = _record(toy, "recon_gate", chosen.astype(int), budget=0.5)
    w = toy["tokens"]
    loss = np.where(chosen, toy["loss_update"], toy["loss_skip"])
    expected = float(np.sum(loss * w) / np.sum(w))
    assert rec["loss"] == pytest.approx(expected) and rec["perplexity"] == pytest.approx(math.exp(expected))
    assert rec["loss_ci"][0] < rec["loss"] < rec["loss_ci"][1]
    assert rec["update_rate"] == 0.5 and rec["n_chunks"] == n and rec["n_tokens"] == int(w.sum())
    # oracle: the n/2 chunks with the largest advantage
    top = np.argsort(-toy["advantage"], kind="stable")[: n // 2]
    oracle_loss = toy["loss_skip"].copy()
    oracle_loss[top] = toy["loss_update"][top]
    l_skip = float(np.sum(toy["loss_skip"] * w) / w.sum())
    l_oracle = float(np.sum(oracle_loss * w) / w.sum())
    assert rec["loss_skip"] == pytest.approx(l_skip) and rec["loss_oracle"] == pytest.approx(l_oracle)
    assert rec["recovery"] == pytest.approx((l_skip - expected) / (l_skip - l_oracle))
    assert rec["recovery_ci"][0] <= rec["recovery"] <= rec["recovery_ci"][1]
    table = toy["table"]
    assert rec["cost"]["published"] == pytest.approx(2.0)
    assert rec["cost"]["wall_clock_s"] == pytest.approx(0.015)
    assert rec["cost"]["relative_flops"] == pytest.approx((1.0 + table["update_1"].relative_flops) / 2)
    assert rec["budget_adherence"]["within"] is True and rec["budget_adherence"]["ratio"] == 1.0
    per_doc_rate = np.bincount(toy["docs"], chosen) / np.bincount(toy["docs"])
    assert rec["budget_adherence"]["documents_over_budget"] == pytest.approx(np.mean(per_doc_rate > 0.5))
    py = toy["langs"] == "python"
    assert rec["per_language"]["python"]["loss"] == pytest.approx(np.sum((loss * w)[py]) / np.sum(w[py]))
    assert rec["per_language"]["python"]["update_rate"] == pytest.approx(chosen[py].mean())
    assert rec["actions"] == {"skip": 0.5, "update_1": 0.5, "update_2": 0.0, "update_4": 0.0}
    assert validate_results([rec]) == []


def test_continuous_gate_record(toy):
    lam = np.clip(toy["recon"] - 1.0, 0.0, 3.0)
    rec = summarize_method(
        "continuous", "carry", loss=toy["loss_skip"] - 0.1 * lam, tokens=toy["tokens"], lambdas=lam, n_resamples=100
    )
    assert rec["update_rate"] == pytest.approx(np.mean(lam > 0))
    assert rec["cost"]["published"] == pytest.approx(1.0 + 2.0 * np.mean(lam > 0))  # no table: published only
    assert rec["cost"]["relative_flops"] is None and rec["actions"] is None
    assert sum(rec["lambda"]["histogram"]["counts"]) == toy["n"]
    assert validate_results([rec]) == []


def test_summarize_names_bad_inputs(toy):
    with pytest.raises(ReportError, match="tokens has 3 entries, loss has 48"):
        summarize_method("m", "reset", loss=toy["loss_skip"], tokens=[1, 2, 3], actions=np.zeros(48, int))
    with pytest.raises(ReportError, match="exactly one of actions="):
        summarize_method("m", "reset", loss=toy["loss_skip"], tokens=toy["tokens"])
    with pytest.raises(ReportError, match="protocol 'persist' is not one of"):
        summarize_method("m", "persist", loss=toy["loss_skip"], tokens=toy["tokens"], actions=np.zeros(48, int))


def test_validation_lists_every_problem(toy):
    good = _record(toy, "skip", np.zeros(toy["n"], int))
    bad = {k: v for k, v in good.items() if k not in ("loss", "n_tokens")}
    bad["update_rate"] = 1.5
    bad["cost"] = {"flops": 1.0}
    problems = validate_results([good, bad, dict(good), {**good, "colour": "red"}])
    text = "\n".join(problems)
    assert "results[1] (method='skip', budget=None, protocol='reset'): missing required ['n_tokens', 'loss']" in text
    assert "update_rate=1.5 must lie in [0, 1]" in text
    assert "cost is missing ['relative_flops', 'published', 'wall_clock_s']" in text
    assert "results[2]" in text and "duplicates results[0]" in text
    assert "unknown fields ['colour']" in text
    assert validate_results([]) == ["results is empty: the report needs at least one (method, budget, protocol) record"]
    with pytest.raises(ReportError, match="problem"):
        write_report("unused", [bad], plots=False)


def test_write_report_end_to_end(toy, tmp_path):
    recs = _suite(toy)
    recs += [dict(r, protocol="carry") for r in recs]
    per_doc = {}  # per-document losses of two gates at a 50% budget, for the paired comparison
    n_docs = toy["docs"].max() + 1
    for name, chosen in (
        ("recon_gate", np.argsort(np.argsort(-toy["recon"])) < toy["n"] // 2),
        ("random", np.random.default_rng(1).permutation(toy["n"]) < toy["n"] // 2),
    ):
        loss = np.where(chosen, toy["loss_update"], toy["loss_skip"]) * toy["tokens"]
        per_doc[name] = np.bincount(toy["docs"], loss, n_docs) / np.bincount(toy["docs"], toy["tokens"], n_docs)
    comp = comparison_record(
        ("recon_gate", 0.5, "reset"),
        ("random", 0.5, "reset"),
        per_doc["recon_gate"],
        per_doc["random"],
        n_resamples=100,
    )
    samples = {
        "model": np.full(toy["n"], "toy"),
        "language": toy["langs"],
        "recon_loss": toy["recon"],
        "oracle_advantage": toy["advantage"],
    }
    sig = signal_table(samples, signals=["recon_loss"], n_resamples=100)
    paths = write_report(
        tmp_path,
        recs,
        run={"model": "toy", "seed": 0},
        cost_table=toy["table"],
        comparisons=[comp],
        signals=sig,
        signal_samples=samples,
        signal_names=["recon_loss"],
    )
    assert set(paths) == {"results", "report", "pareto", "actions", "signals"}
    for key in ("pareto", "actions", "signals"):
        data = paths[key].read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
        assert paths[key].with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"  # every plot also as vector graphics
        assert b"<svg" in paths[key].with_suffix(".svg").read_bytes()[:2000]
    doc = load_results(paths["results"])
    assert doc["schema_version"] == SCHEMA_VERSION and len(doc["results"]) == len(recs)
    front = doc["pareto"]["reset"]["published"]["frontier"]
    assert [(p["method"], p["budget"]) for p in front][0] == ("skip", None)
    assert front[-1]["loss"] == min(r["loss"] for r in recs if r["protocol"] == "reset")
    auc = doc["pareto"]["reset"]["published"]["auc"]
    assert set(auc) == {"recon_gate", "random", "all"} and auc["recon_gate"]["mean_loss"] < auc["random"]["mean_loss"]
    md = paths["report"].read_text()
    assert "## Results — protocol `reset`" in md and "## Per language — protocol `carry`" in md
    assert "| recon_gate | 50.0% updates | 50.0% |" in md
    assert "![pareto](pareto.png)" in md and "## Paired comparisons" in md and "recon_loss vs oracle_advantage" in md
    text = json.loads(paths["results"].read_text())
    assert text["comparisons"][0]["a"] == {"method": "recon_gate", "budget": 0.5, "protocol": "reset"}


def test_load_rejects_other_schema_versions(tmp_path, toy):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"schema_version": 99, "results": []}))
    with pytest.raises(ReportError, match="schema_version 99"):
        load_results(path)


def test_signal_samples_must_have_named_columns(toy, tmp_path):
    rec = _record(toy, "skip", np.zeros(toy["n"], int))
    with pytest.raises(ReportError, match=r"missing \['entropy'\]"):
        write_report(
            tmp_path,
            [rec],
            signal_samples={"recon_loss": toy["recon"]},
            signal_names=["entropy"],
            target_names=[],
            plots=False,
        )


def test_aggregates_and_section_validation(toy, tmp_path):
    rng = np.random.default_rng(3)
    seeds_by_languages = {"recon_gate": 3.0 + rng.normal(0, 0.1, (5, 4)), "random": 3.4 + rng.normal(0, 0.1, (5, 4))}
    agg = aggregate_records(seeds_by_languages, metric="loss", protocol="reset", reps=200)
    by = {a["method"]: a for a in agg}
    assert by["recon_gate"]["iqm"] == pytest.approx(
        scipy.stats.trim_mean(seeds_by_languages["recon_gate"], 0.25, axis=None)
    )
    assert (by["random"]["runs"], by["random"]["tasks"]) == (5, 4)
    assert by["recon_gate"]["ci"][1] < by["random"]["ci"][0]
    rec = _record(toy, "skip", np.zeros(toy["n"], int))
    paths = write_report(tmp_path, [rec], aggregates=agg, plots=False)
    md = paths["report"].read_text()
    assert "## Across seeds (IQM)" in md and "| recon_gate | reset | loss | 5 × 4 |" in md
    assert load_results(paths["results"])["aggregates"][0]["metric"] == "loss"
    with pytest.raises(ReportError, match=r"signals\[0\]: missing \['n', 'pearson_r', 'spearman_rho'\]"):
        write_report(tmp_path, [rec], signals=[{"signal": "s", "target": "t"}], plots=False)
    with pytest.raises(ReportError, match=r"comparisons\[0\] is a list"):
        write_report(tmp_path, [rec], comparisons=[[1, 2]], plots=False)


def test_minimal_hand_built_records_render(tmp_path):
    def minimal(method, budget, loss, published):
        return {
            "method": method,
            "budget": budget,
            "budget_unit": None if budget is None else "published",
            "protocol": "carry",
            "n_chunks": 10,
            "n_tokens": 5000,
            "update_rate": (published - 1) / 2,
            "loss": loss,
            "perplexity": math.exp(loss),
            "cost": {"flops": None, "relative_flops": None, "published": published, "wall_clock_s": None},
        }

    recs = [minimal("skip", None, 3.0, 1.0), minimal("ppo", 2.0, 2.6, 2.0), minimal("ppo", 2.5, 2.5, 2.5)]
    paths = write_report(tmp_path, recs)
    assert set(paths) == {"results", "report", "pareto"}
    doc = load_results(paths["results"])
    assert [p["method"] for p in doc["pareto"]["carry"]["published"]["frontier"]] == ["skip", "ppo", "ppo"]
    assert "relative_flops" not in doc["pareto"]["carry"]
    assert "| ppo | 2 (published) | 50.0% | 2.6000 |" in paths["report"].read_text()


def test_chunks_without_tokens_are_ignored(toy):
    tokens = toy["tokens"].copy()
    tokens[:4] = 0
    loss = toy["loss_skip"].copy()
    loss[:4] = np.nan  # metrics.chunk_cross_entropy gives NaN for an empty chunk
    skip = toy["loss_skip"].copy()
    skip[:4] = np.nan
    rec = summarize_method(
        "skip",
        "reset",
        loss=loss,
        tokens=tokens,
        actions=np.zeros(toy["n"], int),
        loss_skip=skip,
        loss_update=toy["loss_update"],
        n_resamples=100,
    )
    assert rec["loss"] == pytest.approx(np.sum(toy["loss_skip"][4:] * tokens[4:]) / tokens[4:].sum())
    assert rec["n_tokens"] == int(tokens.sum()) and rec["loss_skip"] == pytest.approx(rec["loss"])
    loss[5] = np.nan
    with pytest.raises(ReportError, match="loss has NaN/inf entries on chunks with tokens"):
        summarize_method("skip", "reset", loss=loss, tokens=tokens, actions=np.zeros(toy["n"], int))


def test_measured_overheads_spread_and_wall_clock_resolution(toy, tmp_path):
    bb = BackboneSpec(num_layers=2, hidden_size=64, num_heads=4, vocab_size=256, seq_len=256, chunk_size=128)
    timings = {"skip": [0.010, 0.011, 0.009, 0.012, 0.010], "update_1": [0.020] * 5, "update_2": [0.030] * 5,
               "update_4": [0.050] * 5}
    table = build_cost_table(bb, AdapterSpec.for_backbone(bb), wall_clock_s=timings,
                             overheads={"recon_probe": [0.004, 0.005, 0.006, 0.005, 0.005]})
    n = toy["n"]
    half = (np.arange(n) % 2).astype(int)
    common = dict(tokens=toy["tokens"], cost_table=table, loss_skip=toy["loss_skip"], loss_update=toy["loss_update"],
                  documents=toy["docs"], n_resamples=50)
    plain = summarize_method("random", "reset", loss=toy["loss_skip"], actions=half, **common)
    gated = summarize_method("recon", "reset", loss=toy["loss_skip"] - 1e-3, actions=half, overheads=("recon_probe",),
                             **common)
    assert plain["cost"]["wall_clock_s"] == pytest.approx(0.015)
    assert gated["cost"]["wall_clock_s"] == pytest.approx(0.015 + 0.005)  # the gate pays its probe on every chunk
    assert plain["cost"]["wall_clock_spread_s"] == pytest.approx(0.0005)  # mean of the chunks' IQRs: (0.001 + 0) / 2
    assert gated["cost"]["wall_clock_spread_s"] == pytest.approx(0.0005)  # the probe's timings have IQR 0
    doc = json.loads(write_report(tmp_path, [plain, gated], cost_table=table, plots=False)["results"].read_text())
    probe = doc["wall_clock_overheads"]["recon_probe"]
    assert probe == {"median_s": 0.005, "spread_s": pytest.approx(0.0), "repeats": 5}
    wall = doc["pareto"]["reset"]["wall_clock_s"]
    # 5 ms apart with a spread of 0.5 ms: two frontier points; FLOPs see the same cost, the lower loss wins alone
    assert wall["resolution"] == pytest.approx(0.0005) and len(wall["frontier"]) == 2
    assert [p["method"] for p in doc["pareto"]["reset"]["relative_flops"]["frontier"]] == ["recon"]
    md = (tmp_path / "report.md").read_text()
    assert "| + recon_probe | — | — | — | — | 5.000 | 0.000 | 5 |" in md
    assert "| skip | 0 |" in md and "| 10.000 | 1.000 | 5 |" in md


def test_paper_plots_show_cis_differences_to_skip_and_fits(toy):
    from ponderttt.eval.plots import pareto_figure, signals_figure
    from ponderttt.eval.report import build_results_json

    doc = build_results_json(_suite(toy), cost_table=toy["table"])
    fig = pareto_figure(doc)
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
    assert len(panels) == 3  # relative FLOPs, published, wall-clock: one protocol
    ax = panels[0]
    assert ax.get_ylabel() == "Δ loss vs SKIP (nats / token)"
    recon = sorted((r for r in doc["results"] if r["method"] == "recon_gate"), key=lambda r: r["budget"])
    bars = {c.get_label(): c for c in ax.containers}
    line, caps, (vertical, *_) = bars["recon_gate"]
    np.testing.assert_allclose(line.get_ydata(), [r["loss"] - r["loss_skip"] for r in recon])
    assert all(r["delta_skip"] == pytest.approx(r["loss"] - r["loss_skip"]) for r in recon)
    segments = vertical.get_segments()  # one error bar per budget: the paired CI of the difference to SKIP
    np.testing.assert_allclose([seg[:, 1] for seg in segments], [r["delta_skip_ci"] for r in recon])
    for r in recon:  # the paired CI is narrower than the loss's own (the documents' shared difficulty cancels)
        assert r["delta_skip_ci"][1] - r["delta_skip_ci"][0] < r["loss_ci"][1] - r["loss_ci"][0]
    skip = bars["skip"][0]
    assert skip.get_ydata()[0] == pytest.approx(0.0)  # SKIP sits at 0 on the difference axis

    samples = {"model": np.full(toy["n"], "toy"), "language": toy["langs"], "recon_loss": toy["recon"],
               "constant": np.ones(toy["n"]), "oracle_advantage": toy["advantage"]}
    rows = signal_table(samples, signals=["recon_loss"], n_resamples=100)
    fig = signals_figure(samples, signal_names=["recon_loss", "constant"], rows=rows)
    assert len(fig.axes) == 1  # the constant signal has no panel, and no empty panel is left
    ax = fig.axes[0]
    assert ax.get_xlabel() == "step-0 reconstruction loss" and ax.get_ylabel().startswith("oracle advantage")
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    go = next(r for r in rows if r["language"] == "go")
    assert f"go: r = {go['pearson_r']:+.2f} [{go['pearson_ci'][0]:+.2f}, {go['pearson_ci'][1]:+.2f}], n = {go['n']}" \
        in texts  # r and its CI as in report.md
    assert len(ax.get_lines()) >= 2  # a fit line per language
    with pytest.raises(ValueError, match="constant"):
        signals_figure(samples, signal_names=["constant"])
