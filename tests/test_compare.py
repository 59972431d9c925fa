"""`cxr-sweep compare`: the statistics with known answers, then the whole path on a real sweep."""

import csv
import json
import math
from pathlib import Path

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


def _delong_by_hand(pos: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """DeLong, DeLong & Clarke-Pearson (1988), term by term: ψ(x, y) = 1 if x > y, ½ if x = y, else 0;
    V10 of each positive and V01 of each negative, by loops; S10, S01 their covariances over the
    two models; z of AUC b − AUC a with var = (S10aa + S10bb − 2 S10ab)/m + (S01aa + S01bb − 2 S01ab)/n."""
    xs = [[float(s[i]) for i in range(len(s)) if pos[i]] for s in (a, b)]  # positives' scores
    ys = [[float(s[i]) for i in range(len(s)) if not pos[i]] for s in (a, b)]  # negatives'
    m, n = len(xs[0]), len(ys[0])

    def psi(x: float, y: float) -> float:
        return 1.0 if x > y else 0.5 if x == y else 0.0

    v10 = [[sum(psi(x, y) for y in ys[k]) / n for x in xs[k]] for k in range(2)]
    v01 = [[sum(psi(x, y) for x in xs[k]) / m for y in ys[k]] for k in range(2)]
    auc = [sum(v10[k]) / m for k in range(2)]

    def cov(v: list[list[float]], i: int, j: int) -> float:
        mi, mj = sum(v[i]) / len(v[i]), sum(v[j]) / len(v[j])
        return sum((p - mi) * (q - mj) for p, q in zip(v[i], v[j], strict=True)) / (len(v[i]) - 1)

    var = (cov(v10, 0, 0) + cov(v10, 1, 1) - 2 * cov(v10, 0, 1)) / m
    var += (cov(v01, 0, 0) + cov(v01, 1, 1) - 2 * cov(v01, 0, 1)) / n
    z = (auc[1] - auc[0]) / math.sqrt(var)
    return z, math.erfc(abs(z) / math.sqrt(2))  # two-sided normal p


@pytest.mark.parametrize(
    ("seed", "n", "positives"), [(0, 120, 0.5), (1, 200, 0.25), (2, 60, 0.6), (3, 150, 0.1)]
)
def test_delong_z_and_p_equal_delongs_1988_variance_computed_by_hand(seed, n, positives):
    rng = np.random.default_rng(seed)
    pos = rng.random(n) < positives
    pos[:2], pos[2:4] = True, False  # at least 2 of each
    shared = rng.normal(size=n)  # both models see the same hard images: correlated AUCs
    score = lambda signal: np.round(signal * pos + shared + rng.normal(size=n), 1)  # noqa: E731  (ties)
    a, b = score(1.0), score(1.4)
    z, p = _delong_by_hand(pos, a, b)
    got = delong(pos, a, b)
    assert math.isclose(got[2], z, rel_tol=0, abs_tol=1e-6), (got[2], z)
    assert math.isclose(got[3], p, rel_tol=0, abs_tol=1e-6), (got[3], p)
    assert abs(z) > 0.1  # a case with a difference to test, not a z of 0 either way


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


# ---- refusals that need stored predictions: runs written with MlflowClient, as trials write them -------
N_TEST = 30
ROWS = np.arange(100, 100 + N_TEST)  # the test split's cache rows
LABELS = np.arange(N_TEST) % 2


def _predictions_csv(path: Path, rows: np.ndarray, seed: int) -> Path:
    """``predictions.csv`` as ``trainer.loop.write_predictions`` writes it: val rows, then test rows."""
    rng = np.random.default_rng(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "row", "label", "p_normal", "p_effusion"])
        for split, split_rows in (("val", np.arange(len(rows))), ("test", rows)):
            p1 = np.clip(0.5 + 0.3 * (2 * LABELS - 1) + rng.normal(0, 0.2, len(rows)), 0.01, 0.99)
            for r, y, p in zip(split_rows, LABELS, p1, strict=True):
                w.writerow([split, int(r), int(y), repr(float(1 - p)), repr(float(p))])
    return path


def _sweep(client, uri: str, name: str, runs: list[dict], where: Path) -> None:
    """Sweep ``name``: a parent run and one trial run per entry of ``runs`` (``lambda``, ``val_f1``;
    optional ``rows``, ``cache_hash``, ``seeds`` (k: k nested seed runs hold the predictions, as with
    ``repeats: k``) and ``predictions`` (False: none stored, as a run from before they were))."""
    from sweeps.tracking.runs import experiment_id, log_metrics, log_params, log_predictions

    exp = experiment_id(client, name, uri)
    parent = client.create_run(exp, run_name=name, tags={"cxr.kind": "sweep"}).info.run_id
    client.log_param(parent, "metric", "val_f1_macro")
    for i, spec in enumerate(runs):
        title = f"{'CE' if spec['lambda'] == '1.0' else 'soft'} λ={spec['lambda']} [t_{i}]"
        tags = {
            "mlflow.parentRunId": parent,
            "cxr.kind": "trial",
            "cxr.sweep": name,
            "ray.trial_id": f"t_{i}",
        }
        tags["cxr.cache_hash"] = spec.get("cache_hash", "c0ffee" * 8)
        k = spec.get("seeds", 0)
        if k:
            tags["cxr.repeats"] = str(k)
        rid = client.create_run(exp, run_name=title, tags=tags).info.run_id
        params = {"data.task": "ne", "model.backbone": "resnet18", "attention.lambda": spec["lambda"]}
        log_params(client, rid, params)
        log_metrics(client, rid, {"best_val_f1_macro": spec["val_f1"], "test_f1_macro": 0.7})
        holders = [rid]
        if k:
            holders = []
            for s in range(k):
                seed_tags = {**tags, "mlflow.parentRunId": rid, "cxr.kind": "seed", "cxr.seed_index": str(s)}
                del seed_tags["cxr.repeats"]
                sid = client.create_run(exp, run_name=f"{title} seed {s}", tags=seed_tags).info.run_id
                log_params(client, sid, {**params, "train.seed": str(s)})
                log_metrics(client, sid, {"best_val_f1_macro": spec["val_f1"], "test_f1_macro": 0.7})
                holders.append(sid)
        for j, holder in enumerate(holders):
            if spec.get("predictions", True):
                folder = where / holder
                folder.mkdir(parents=True)
                csv_path = _predictions_csv(folder / "predictions.csv", spec.get("rows", ROWS), 10 * i + j)
                log_predictions(client, holder, csv_path)
            if holder != rid:
                client.set_terminated(holder, "FINISHED")
        client.set_terminated(rid, "FINISHED")
    client.set_terminated(parent, "FINISHED")


@pytest.fixture(scope="module")
def refusals(tmp_path_factory) -> str:
    """One store, a sweep per refusal (the CE baseline first, then the attention run)."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("refusals")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    ce, att = {"lambda": "1.0", "val_f1": 0.70}, {"lambda": "0.5", "val_f1": 0.80}
    sweeps = {
        "ok": [ce, att],
        "other-cache": [ce, {**att, "cache_hash": "beef" * 12}],
        "old-runs": [ce, {**att, "predictions": False}],
        "other-rows": [ce, {**att, "rows": ROWS + 1000}],
        "repeats-one-side": [{**ce, "seeds": 2}, att],
    }
    for name, runs in sweeps.items():
        _sweep(client, uri, name, runs, root / "files" / name)
    return uri


def _compare(uri: str, sweep: str, out: Path):
    args = ["compare", sweep, "--tracking-uri", uri, "--out", str(out), "--resamples", "200", "--no-log"]
    return runner.invoke(app, args, env={"COLUMNS": "200"})


def test_the_refusal_stores_compare_when_nothing_is_wrong(refusals, tmp_path):
    """The control of the tests below: the same runs, nothing changed, compare fine."""
    result = _compare(refusals, "ok", tmp_path / "c")
    assert result.exit_code == 0, result.output
    (comp,) = json.loads((tmp_path / "c" / "compare.json").read_text())["comparisons"]
    assert comp["n_images"] == N_TEST and comp["baseline"]["run_name"] == "CE λ=1.0 [t_0]"


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        (
            "other-cache",
            "soft λ=0.5 [t_1] and the baseline CE λ=1.0 [t_0] were tested on different datasets "
            "(cache hash beefbeefbeef vs c0ffeec0ffee)",
        ),
        (
            "old-runs",
            "(soft λ=0.5 [t_1]) has no predictions/predictions.csv: it finished before trials stored "
            "their per-image predictions; run it again to compare it",
        ),
        (
            "other-rows",
            "soft λ=0.5 [t_1] and the baseline CE λ=1.0 [t_0] were tested on different images: "
            "a paired comparison needs the same test set",
        ),
        (
            "repeats-one-side",
            "soft λ=0.5 [t_1] and the baseline CE λ=1.0 [t_0]: one was trained with seed repeats and "
            "the other was not; compare runs of one sweep (or of sweeps with the same repeats)",
        ),
    ],
)
def test_compare_refuses_runs_it_cannot_pair_in_one_line(refusals, tmp_path, sweep, message):
    result = _compare(refusals, sweep, tmp_path / "c")
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert not (tmp_path / "c").exists()


def test_compare_does_not_load_pytorch(refusals, tmp_path):
    """The whole command (lookup, downloads, statistics, files) in a fresh process, as a user runs it,
    without PyTorch, timm or scikit-learn: importing PyTorch alone took ~4 s of its ~14 s on 2 cores."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from sweeps.cli import app\n"
        f"sys.argv = ['cxr-sweep', 'compare', 'ok', '--tracking-uri', {refusals!r}, '--resamples', '200',\n"
        f"            '--no-log', '--out', {str(tmp_path / 'c')!r}]\n"
        "try:\n    app()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = sorted(m for m in ('torch', 'sklearn', 'timm', 'ray') if m in sys.modules)\n"
        "print('loaded:', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "loaded: []" in out.stdout, out.stdout[-2000:]
    assert (tmp_path / "c" / "compare.json").is_file()
