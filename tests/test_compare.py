"""`cxr-sweep compare`: the statistics with known answers, then the whole path on a real sweep."""

import json
import math

import numpy as np
import pytest
from scipy import stats as sps
from typer.testing import CliRunner

from sweeps.cli import app
from sweeps.results.stats import (
    BOOTSTRAP_METRICS,
    bootstrap_intervals,
    bootstrap_metrics,
    delong,
    holm,
    mcnemar_exact,
    paired_bootstrap,
    paired_seeds,
    stratified_indices,
)
from trainer.metrics import METRIC_NAMES, compute_metrics

from . import _results_fixtures as fx

real_sweep = fx.real_sweep  # the fixture
runner = CliRunner()


def _predictions(rng, n, n_classes, signal):
    labels = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, n_classes)) + signal * np.eye(n_classes)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return labels, np.round(probs, 2)  # rounded: ties in the scores, as real models have


@pytest.mark.parametrize(("n_classes", "n"), [(2, 300), (3, 250), (4, 40)])
def test_the_bootstrap_metrics_are_the_logged_metrics_on_the_full_set(n_classes, n):
    rng = np.random.default_rng(n_classes)
    labels, probs = _predictions(rng, n, n_classes, 1.0)
    got = bootstrap_metrics(labels, probs, np.arange(n)[None])
    want = compute_metrics(labels, probs)
    assert set(got) == set(METRIC_NAMES) >= set(BOOTSTRAP_METRICS)  # every contract metric (report --ci)
    for m in METRIC_NAMES:
        assert math.isclose(got[m][0], want[m], rel_tol=0, abs_tol=1e-12), (m, got[m][0], want[m])
    idx = stratified_indices(labels, 50, seed=1)  # and on every resample
    for b in (0, 17, 49):
        again = compute_metrics(labels[idx[b]], probs[idx[b]])
        each = bootstrap_metrics(labels, probs, idx[b : b + 1])
        assert all(math.isclose(each[m][0], again[m], abs_tol=1e-12) for m in METRIC_NAMES), b


def test_stratified_resamples_keep_the_class_counts():
    labels = np.array([0] * 30 + [1] * 7 + [2] * 3)
    idx = stratified_indices(labels, 100, seed=0)
    assert idx.shape == (100, 40)
    for c, count in ((0, 30), (1, 7), (2, 3)):
        assert ((labels[idx] == c).sum(1) == count).all()


def test_delong_auc_is_the_mann_whitney_auc_and_its_test_is_symmetric():
    rng = np.random.default_rng(0)
    labels, a = _predictions(rng, 400, 2, 1.0)
    _, b = _predictions(np.random.default_rng(1), 400, 2, 1.5)
    pos = labels == 1
    auc_a, auc_b, z, p = delong(pos, a[:, 1], b[:, 1])
    for auc, s in ((auc_a, a[:, 1]), (auc_b, b[:, 1])):
        u = sps.mannwhitneyu(s[pos], s[~pos]).statistic  # an independent computation, ties included
        assert math.isclose(auc, u / (pos.sum() * (~pos).sum()), abs_tol=1e-6)
    back = delong(pos, b[:, 1], a[:, 1])
    assert math.isclose(back[2], -z, abs_tol=1e-12) and math.isclose(back[3], p, abs_tol=1e-12)
    assert delong(pos, a[:, 1], a[:, 1])[3] == 1.0  # a model against itself: no difference


def test_mcnemar_exact_on_a_hand_built_table():
    # 10 images only A got right, 2 only B, 20 both, 5 neither
    right_a = np.array([1] * 10 + [0] * 2 + [1] * 20 + [0] * 5, dtype=bool)
    right_b = np.array([0] * 10 + [1] * 2 + [1] * 20 + [0] * 5, dtype=bool)
    b, c, p = mcnemar_exact(right_a, right_b)
    assert (b, c) == (10, 2)
    assert math.isclose(p, 2 * (1 + 12 + 66) / 4096, rel_tol=1e-12)  # 2 · P(X ≤ 2), X ~ Bin(12, 1/2)
    assert mcnemar_exact(right_a, right_a)[2] == 1.0


def test_holm_adjusts_in_the_given_order():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5] and holm([0.2, 0.9]) == pytest.approx([0.4, 0.9])


@pytest.mark.slow
def test_the_95_percent_interval_covers_the_true_difference_93_to_97_percent_of_the_time():
    """200 test sets of 400 images drawn from a population of 200 000 where two correlated models
    differ by a known amount; the interval of ΔF1 must cover that amount 93–97 % of the time."""
    rng = np.random.default_rng(2026)
    n_pop = 200_000
    labels = rng.integers(0, 2, n_pop)
    shared = rng.normal(size=n_pop)  # both models see the same hard images: paired, correlated
    score_a = 1.0 * (2 * labels - 1) + shared + rng.normal(size=n_pop)
    score_b = 1.3 * (2 * labels - 1) + shared + rng.normal(size=n_pop)
    to_probs = lambda s: np.stack([1 / (1 + np.exp(s)), 1 / (1 + np.exp(-s))], axis=1)  # noqa: E731
    pa, pb = to_probs(score_a), to_probs(score_b)
    everyone = np.arange(n_pop)[None]
    truth = {
        m: bootstrap_metrics(labels, pb, everyone)[m][0] - bootstrap_metrics(labels, pa, everyone)[m][0]
        for m in ("f1_macro", "accuracy")
    }
    covered = {m: 0 for m in truth}
    for i in range(200):
        test = rng.choice(n_pop, 400, replace=False)
        out = paired_bootstrap(labels[test], pa[test], pb[test], n_resamples=1000, seed=i)
        for m in truth:
            covered[m] += out[m].low <= truth[m] <= out[m].high
    print({m: v / 200 for m, v in covered.items()}, truth)
    for m in truth:
        assert 0.93 * 200 <= covered[m] <= 0.97 * 200, (m, covered[m] / 200)


# ---- through the CLI, on a real sweep (a CE baseline and one attention run) ---------------------------
@pytest.mark.slow
def test_compare_a_real_sweep_against_its_ce_baseline(real_sweep, tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", real_sweep.name, "--storage", str(real_sweep.storage), "--out", str(out)]
    # the fixture's test split has 13 images: below the default minimum (checked below)
    result = runner.invoke(app, [*args, "--resamples", "500", "--min-images", "10"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "Downloading artifacts" not in result.output
    saved = json.loads((out / "compare.json").read_text())
    (comp,) = saved["comparisons"]
    assert comp["baseline"]["run_name"].startswith("CE λ=1")
    assert comp["verdict"] in result.output and "ΔF1" in comp["verdict"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(real_sweep.uri)
    base = client.get_run(comp["baseline"]["run_id"]).data.metrics
    cand = client.get_run(comp["candidate"]["run_id"]).data.metrics
    for m, d in comp["deltas"].items():  # the point estimates are the logged test metrics' difference
        assert math.isclose(d["delta"], cand[f"test_{m}"] - base[f"test_{m}"], abs_tol=1e-9), m
        assert d["low"] <= d["delta"] <= d["high"] or d["low"] == d["high"]
    assert {"compare.json", "compare.md", "compare.tex"} == {p.name for p in out.iterdir()}
    parent = client.search_runs(
        [client.get_experiment_by_name(real_sweep.name).experiment_id], "tags.`cxr.kind` = 'sweep'"
    )[0]
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "compare")}
    assert logged == {"compare/compare.json", "compare/compare.md", "compare/compare.tex"}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--baseline", "attention.lambda=0.3"], "no finished baseline run (attention.lambda=0.3)"),
        (["--candidates", "top-x"], "--candidates 'top-x': use best, top-N"),
        (["--baseline", "lambda"], "give key=value"),
        (["--resamples", "50"], "at least 200"),
        ([], "13 test images: too few for an interval (at least 20; --min-images lowers it)"),
    ],
)
def test_compare_refuses_bad_input_in_one_line(real_sweep, tmp_path, extra, message):
    args = ["compare", real_sweep.name, "--storage", str(real_sweep.storage), "--out", str(tmp_path / "c")]
    result = runner.invoke(app, [*args, *extra])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "c").exists()


def test_holm_leaves_a_test_that_could_not_be_made_out():
    assert holm([0.01, math.nan, 0.04]) == pytest.approx([0.02, math.nan, 0.04], nan_ok=True)


def test_paired_seeds_is_the_paired_t_test():
    base, cand = [0.60, 0.64, 0.58, 0.66], [0.63, 0.69, 0.60, 0.70]
    got = paired_seeds(base, cand)
    want = sps.ttest_rel(cand, base)
    assert got["p"] == pytest.approx(want.pvalue) and got["t"] == pytest.approx(want.statistic)
    assert got["n_seeds"] == 4 and got["delta_mean"] == pytest.approx(np.mean(np.subtract(cand, base)))
    assert got["candidate_std"] == pytest.approx(np.std(cand, ddof=1))
    assert math.isnan(paired_seeds([0.5], [0.6])["p"])  # one pair: nothing to test
    assert math.isnan(paired_seeds([0.5, 0.6], [0.5, 0.6])["p"])  # no spread in Δ


def test_seed_repeats_in_the_bootstrap_are_the_mean_over_seeds():
    rng = np.random.default_rng(5)
    labels, pa = _predictions(rng, 200, 2, 1.0)
    seeds_a = np.stack([pa, _predictions(np.random.default_rng(6), 200, 2, 1.0)[1]])
    seeds_b = np.stack([_predictions(np.random.default_rng(s), 200, 2, 1.5)[1] for s in (7, 8)])
    got = paired_bootstrap(labels, seeds_a, seeds_b, n_resamples=300, seed=2)
    full = np.arange(200)[None]
    for m in BOOTSTRAP_METRICS:
        mean_a = np.mean([bootstrap_metrics(labels, p, full)[m][0] for p in seeds_a])
        mean_b = np.mean([bootstrap_metrics(labels, p, full)[m][0] for p in seeds_b])
        assert got[m].delta == pytest.approx(mean_b - mean_a, abs=1e-12)
    intervals = bootstrap_intervals(labels, seeds_b, n_resamples=300, seed=2)
    assert set(intervals) == set(METRIC_NAMES)
    f1 = np.mean([compute_metrics(labels, p)["f1_macro"] for p in seeds_b])
    assert intervals["f1_macro"][0] < f1 < intervals["f1_macro"][1]
