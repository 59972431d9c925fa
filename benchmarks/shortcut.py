"""Does the attention loss stop a classifier from learning a shortcut? Measured with the product.

Phantom tasks where a marker outside the lungs (a lead letter block in the upper-left corner) is
on most train/val positives and few negatives (``--shortcut`` correlation; 0.9 = 95 % / 5 %) and
independent of the label in test. Every method runs as a ``cxr-sweep`` sweep (Ray Tune + MLflow)
and is selected on validation only, through the same code as ``cxr-sweep best`` / ``report``:

* **CE** (λ = 1) and **paper** mode over the paper's grid λ ∈ {0.75, 0.5, 0.25, adaptive}: the
  grid once (seed 0, as the paper ran it); paper's λ is the one with the best validation F1; then
  CE and that λ again with the other seeds.
* **soft**, **energy** and **energy-lsm** (energy with ``attention.cam_score: log_softmax``, the
  class-contrastive CAM): an Optuna search over λ / t / τ (``search_spaces/shortcut.yaml``) on
  seed 0, then the best configuration (validation F1) again with every seed.
* **Guidance on the decision** (``--methods``): ``input_grad`` (the input gradient's share
  outside the lungs), ``energy-lsm-prev`` (energy-lsm on the stage before the last feature map,
  ``attention.layer: previous``) and ``outside_mask`` (CE with the outside of the lungs replaced
  on a searched share of training images), searched and repeated as above.
* **Lung-only selection** (``--lung-selection``): a second row per method (``@lungs``), whose
  configuration and epochs are chosen on ``val_inside_only_f1_macro``, because validation shares
  the shortcut.
* **Control** (``--control-tasks``): the same phantoms without the marker; CE, and each mode at
  the configuration validation picked with the shortcut.

Per method: test macro F1, AUC, Youden's index, discriminant power, pointing game, CAM-in-lesion
and CAM-in-prior shares (each run's own CAM: ``cam_score`` as trained), mean ± std over seeds,
and the **marker effect**: the mean change of P(finding) on the test images when the marker block
is pasted in vs erased (0 = the marker is ignored; null where test has no marker), the trials'
own ``outside_evidence`` and lung-only F1 (trainer/outside.py), and each method's Δ test F1 vs CE
with a paired bootstrap interval over the test images (as ``cxr-sweep compare``). Also a
Grad-CAM montage CE vs attention on the same test images and the paper-format report of the grid.

    python benchmarks/shortcut.py --out benchmarks/results/shortcut_cpu.json \\
        --markdown benchmarks/results/shortcut_cpu.md --montage docs/shortcut_cams.png
    python benchmarks/shortcut.py --tasks ne --control-tasks ne --seeds 3 --optuna-trials 8 \\
        --methods ce,energy-lsm,input_grad,outside_mask --lung-selection \\
        --out benchmarks/results/shortcut_decision_cpu.json \\
        --markdown benchmarks/results/shortcut_decision_cpu.md --montage docs/shortcut_decision_cams.png
    python benchmarks/shortcut.py --smoke --out /tmp/sc.json     # about a minute, for tests
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from trainer.attention_loss import create_loss_mode

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "search_spaces" / "shortcut.yaml"
PAPER_LAMBDAS: list[Any] = [1.0, 0.75, 0.5, 0.25, "adaptive"]
SHOWN = (
    *("f1_macro", "auc", "youden_index", "discriminant_power"),
    *("pointing_game", "cam_in_region", "cam_in_prior"),
)
# what the decision reads outside the lungs (trainer/outside.py): columns where a run logged them
OUTSIDE = ("outside_evidence", "inside_only_f1_macro")
# the searched methods: (trial overrides, searched params; None = the space's λ and what the mode
# reads of t, τ). "-lsm" = class-contrastive CAM, "-prev" = at the stage before the last feature
# map (attention.layer: previous); outside_mask = CE with the outside of the lungs
# replaced at random in training (its share p searched)
_AUGMENT = {"outside.augment": {"type": "uniform", "low": 0.25, "high": 1.0}}
SEARCHED: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {
    "soft": ({"attention": {"mode": "soft"}}, None),
    "energy": ({"attention": {"mode": "energy"}}, None),
    "energy-lsm": ({"attention": {"mode": "energy", "cam_score": "log_softmax"}}, None),
    "energy-lsm-prev": (
        {"attention": {"mode": "energy", "cam_score": "log_softmax", "layer": "previous"}},
        None,
    ),
    "input_grad": ({"attention": {"mode": "input_grad"}}, None),
    "outside_mask": ({"attention": {"lambda": 1.0}}, _AUGMENT),
}
METHODS = ("ce", "paper", *SEARCHED)
LUNGS = "@lungs"  # a second row per method: configuration and epoch chosen on lung-only val F1
LUNG_METRIC = "val_inside_only_f1_macro"


# ---- sweeps --------------------------------------------------------------------------------------
def _base(space: Path, storage: Path, args) -> dict[str, Any]:
    spec = yaml.safe_load(space.read_text())
    spec["storage_path"] = str(storage)
    trial = spec["trial"]
    trial["model"] = {"backbone": args.backbone, "image_size": args.size}
    trial["train"]["epochs"] = args.epochs
    spec["num_samples"] = args.optuna_trials
    spec["max_concurrent_trials"] = args.concurrent
    return spec


def _sweep(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """Run one sweep from a spec dict (written next to the results, as a user would); its runs."""
    from sweeps.driver import run_sweep
    from sweeps.tracking.lookup import find_runs

    path = work / "spaces" / f"{spec['name']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    t0 = time.perf_counter()
    outcome = run_sweep(path, overwrite=True)
    wall = time.perf_counter() - t0
    bad = [r for r in outcome.rows if r["state"] != "DONE"]
    if bad:
        raise RuntimeError(f"sweep {spec['name']}: trials not done: {bad}")
    runs = find_runs([spec["name"]], storage=spec["storage_path"]).runs
    print(f"  sweep {spec['name']}: {len(runs)} trials in {wall:.0f} s", flush=True)
    return {"name": spec["name"], "wall_s": wall, "runs": runs}


def _grid_spec(base, name, cache, task, lambdas, seeds, mode="paper") -> dict[str, Any]:
    spec = copy.deepcopy(base)
    spec.update(name=name, search={"algorithm": "grid"}, num_samples=1)
    spec["trial"]["data"] = {"cache": str(cache), "task": task}
    spec["trial"]["attention"]["mode"] = mode
    spec["params"] = {
        "attention.lambda": {"type": "grid", "values": list(lambdas)},
        "train.seed": {"type": "grid", "values": list(seeds)},
    }
    return spec


def _search_spec(base, name, cache, task, method) -> dict[str, Any]:
    spec = copy.deepcopy(base)
    spec["name"] = name
    spec["trial"]["data"] = {"cache": str(cache), "task": task}
    overrides, params = SEARCHED[method]
    for section, values in overrides.items():
        spec["trial"].setdefault(section, {}).update(values)
    att = spec["trial"]["attention"]
    if params is not None:
        spec["params"] = copy.deepcopy(params)
        return spec
    uses = create_loss_mode(att["mode"]).uses  # search only the settings the mode reads (energy: none)
    spec["params"] = {
        k: p
        for k, p in spec["params"].items()
        if k == "attention.lambda" or not k.startswith("attention.") or k.removeprefix("attention.") in uses
    }
    return spec


def _seeds_spec(
    base, name, cache, task, method, chosen: dict[str, Any], seeds, selection: str | None = None
) -> dict[str, Any]:
    spec = _search_spec(base, name, cache, task, method)
    spec.update(search={"algorithm": "grid"}, num_samples=1)
    att = spec["trial"]["attention"]
    for key in ("lambda", "threshold", "tau"):
        if key in chosen:
            att[key] = chosen[key]
    if "augment" in chosen:
        spec["trial"].setdefault("outside", {})["augment"] = chosen["augment"]
    if selection is not None:  # each trial's best epoch too (the sweep metric is the selection metric)
        spec["metric"] = selection
    spec["params"] = {"train.seed": {"type": "grid", "values": list(seeds)}}
    return spec


def _lam(run) -> str:
    from sweeps.results.report import lambda_label

    return lambda_label(run.params.get("attention.lambda", ""))


def _chosen(run) -> dict[str, Any]:
    """The attention settings of a selected run, as trial-config values."""
    out: dict[str, Any] = {}
    lam = run.params.get("attention.lambda", "")
    out["lambda"] = lam if lam == "adaptive" else float(lam)
    for key in ("threshold", "tau"):
        if f"attention.{key}" in run.params:
            out[key] = float(run.params[f"attention.{key}"])
    if float(run.params.get("outside.augment", 0) or 0) > 0:
        out["augment"] = float(run.params["outside.augment"])
    return out


def _tried(runs) -> list[dict[str, Any]]:
    """What a search tried: each run's setting with its validation and test F1 (for the JSON)."""
    return [
        {"config": _chosen(r), "val_f1_macro": _val(r), "test_f1_macro": r.metrics.get("test_f1_macro")}
        for r in runs
    ]


def _val(run) -> float:
    return run.metrics.get("best_val_f1_macro", math.nan)


# ---- the marker intervention and CAMs -------------------------------------------------------------
def _model(run):
    from sweeps.results.export import load_trained, model_file

    with tempfile.TemporaryDirectory() as tmp:
        model, payload = load_trained(model_file(run, Path(tmp)))
    return model, payload


def _normalise(images: np.ndarray) -> torch.Tensor:
    from trainer.data.transforms import MEAN, STD

    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)[:, None]  # (N, 1, S, S)
    return ((x - MEAN) / STD).expand(-1, 3, -1, -1).contiguous()


def _marker_slices(size: int) -> tuple[slice, slice]:
    from trainer.data.phantom import MARKER_BOX

    x0, y0, x1, y1 = MARKER_BOX
    pad = max(1, round(0.01 * size))  # the block's blur reaches past its box
    ys = slice(max(0, math.floor(y0 * size) - pad), min(size, math.ceil(y1 * size) + pad))
    xs = slice(max(0, math.floor(x0 * size) - pad), min(size, math.ceil(x1 * size) + pad))
    return ys, xs


def _test_split(cache_dir: Path):
    from trainer.data.cache import open_cache

    cache = open_cache(cache_dir, verify=False)
    idx = cache.split_indices("test")
    markers = np.array([int(cache.manifest[i].get("marker", 0) or 0) for i in idx], dtype=bool)
    return cache, idx, markers


@torch.no_grad()
def marker_effect(model, cache_dir: Path) -> float:
    """Mean over test images of P(finding | marker pasted) − P(finding | marker erased).

    The block (with a small margin) is copied from a test image that has the marker, or from one
    that has none, into every test image; only the marker differs between the two versions.
    """
    cache, idx, markers = _test_split(cache_dir)
    if not markers.any() or markers.all():
        return math.nan
    images = np.asarray(cache.images[idx])
    ys, xs = _marker_slices(cache.size)
    with_m, without = images.copy(), images.copy()
    with_m[:, ys, xs] = images[np.flatnonzero(markers)[0], ys, xs]
    without[:, ys, xs] = images[np.flatnonzero(~markers)[0], ys, xs]
    p = [1.0 - torch.softmax(model(_normalise(a)), 1)[:, 0] for a in (with_m, without)]
    return float((p[0] - p[1]).mean())


def montage(models: dict[str, Any], cache_dir: Path, path: Path, per_kind: int = 3) -> Path:
    """Grad-CAM (of the predicted class) of each method's model on the same test images: the first
    ``per_kind`` positives and negatives that carry the marker, where a shortcut shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trainer.cam import grad_cam

    cache, idx, markers = _test_split(cache_dir)
    labels = cache.labels[idx]
    pick = [
        *np.flatnonzero(markers & (labels != 0))[:per_kind],
        *np.flatnonzero(markers & (labels == 0))[:per_kind],
    ]
    images = np.asarray(cache.images[idx[pick]])
    x = _normalise(images)
    lesions = np.asarray(cache.lesion_masks[idx[pick]])
    classes = cache.classes
    fig, axes = plt.subplots(
        len(models), len(pick), figsize=(1.7 * len(pick), 1.9 * len(models)), squeeze=False
    )
    for r, (name, model) in enumerate(models.items()):
        with torch.no_grad():
            logits, cam = grad_cam(model, x, "predicted")
        pred = logits.argmax(1).numpy()
        for c, ax in enumerate(axes[r]):
            ax.imshow(images[c], cmap="gray", vmin=0, vmax=255)
            ax.imshow(cam[c, 0].numpy(), cmap="jet", alpha=0.4, vmin=0, vmax=1)
            if lesions[c].any():
                ax.contour(lesions[c], levels=[0.5], colors="white", linewidths=0.6)
            t, p = int(labels[pick[c]]), int(pred[c])
            colour = "green" if t == p else "red"
            ax.set_title(f"{classes[t][:10]}→{classes[p][:10]}", fontsize=6, color=colour)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle("Grad-CAM of the predicted class on test images with the marker (white: lesion)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- summaries ------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> dict[str, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": statistics.fmean(vals), "std": std, "n": len(vals)}


def _method(runs, cache_dir: Path, chosen: dict[str, Any] | None) -> dict[str, Any]:
    runs = sorted(runs, key=lambda r: int(r.params.get("train.seed", 0)))
    per_seed = []
    for run in runs:
        model, _ = _model(run)
        row = {"seed": int(run.params.get("train.seed", 0)), "run_id": run.run_id, "val_f1_macro": _val(run)}
        row.update({m: run.metrics.get(f"test_{m}", math.nan) for m in (*SHOWN, *OUTSIDE)})
        row["marker_effect"] = marker_effect(model, cache_dir)
        per_seed.append(row)
    keys = ["val_f1_macro", *SHOWN, *OUTSIDE, "marker_effect"]
    return {
        "config": chosen or {},
        "first_run": runs[0],  # for the montage; not written to the JSON
        "runs": runs,  # for the intervals; not written to the JSON
        "per_seed": per_seed,
        "summary": {k: _mean_std([r[k] for r in per_seed]) for k in keys},
    }


def _paper_choice(runs) -> str:
    """Paper's λ: the grid value (λ < 1) with the best (mean) validation F1; ties: grid order."""
    groups: dict[str, list[float]] = {}
    for run in runs:
        if _lam(run) != "1":
            groups.setdefault(_lam(run), []).append(_val(run))
    from sweeps.results.report import lambda_label

    order = [lambda_label(str(v)) for v in PAPER_LAMBDAS]
    return max(groups, key=lambda k: (statistics.fmean(groups[k]), -order.index(k)))


def _goals(res: dict[str, Any]) -> dict[str, Any]:
    def m(method, key):
        return res["methods"][method]["summary"][key]["mean"]

    ran = [k for k in res["methods"] if k != "ce"]
    out = {}
    for method in ran:
        out[f"{method}_minus_ce_f1"] = m(method, "f1_macro") - m("ce", "f1_macro")
        if method.removesuffix(LUNGS) != "paper":
            out[f"{method}_minus_ce_pointing"] = m(method, "pointing_game") - m("ce", "pointing_game")
            out[f"{method}_minus_ce_marker_effect"] = m(method, "marker_effect") - m("ce", "marker_effect")
    outside = {k: v for k, v in res["methods"].items() if "outside_evidence" in v["summary"]}
    if len(outside) >= 3 and res["condition"] == "shortcut":  # does the score rank as the marker effect?
        from scipy.stats import spearmanr

        ev = [m(k, "outside_evidence") for k in outside]
        me = [m(k, "marker_effect") for k in outside]
        out["spearman_outside_evidence_vs_marker_effect"] = float(spearmanr(ev, me).statistic)
    return out


def _delta_f1(storage: Path, base_runs: list, runs: list, where: Path) -> dict[str, float]:
    """Test macro F1 of a method's seeds − CE's seeds: a paired, stratified bootstrap over the test
    images (the mean over seeds on each resample), as ``cxr-sweep compare`` computes it."""
    from mlflow.tracking import MlflowClient

    from sweeps.results.stats import paired_bootstrap
    from sweeps.results.stored import read_test_predictions
    from sweeps.tracking.lookup import open_store

    client = MlflowClient(open_store(base_runs[0].sweep, storage, None))

    def stack(rs):
        parts = [read_test_predictions(client, r, where / r.run_id) for r in rs]
        return parts[0][0], parts[0][1], np.stack([p for _, _, p in parts])

    b_idx, labels, b = stack(base_runs)
    c_idx, _, c = stack(runs)
    if not np.array_equal(b_idx, c_idx):
        raise RuntimeError("a method and CE were tested on different images")
    d = paired_bootstrap(labels, b, c, n_resamples=2000, seed=0)["f1_macro"]
    return {"delta": d.delta, "low": d.low, "high": d.high, "p": d.p, "n_images": len(labels)}


def _intervals(res: dict[str, Any], storage: Path, work: Path) -> None:
    base = res["methods"]["ce"]["runs"]
    for name, m in res["methods"].items():
        if name != "ce":
            m["delta_f1_vs_ce"] = _delta_f1(storage, base, m["runs"], work / "predictions" / name)


# ---- one task ---------------------------------------------------------------------------------------
def _phantoms(work: Path, task: str, args, shortcut: bool) -> Path:
    from trainer.data.phantom import generate
    from trainer.data.sources import cache_from_phantoms
    from trainer.tasks import classes_for

    tag = "shortcut" if shortcut else "clean"
    ph = work / "phantoms" / f"{task}-{tag}"
    sc = {"trainval": args.shortcut, "test": 0.0} if shortcut else None
    generate(
        ph,
        n_patients=args.patients,
        classes=classes_for(task),
        size=args.size,
        seed=args.data_seed,
        shortcut=sc,
    )
    return cache_from_phantoms(ph, work / "cache" / f"{task}-{tag}", task, overwrite=True)


def run_task(task: str, base, work: Path, args) -> dict[str, Any]:
    from sweeps.results.select import rank_runs

    cache = _phantoms(work, task, args, shortcut=True)
    seeds = list(range(args.seeds))
    p = f"sc-{task}"
    methods: dict[str, Any] = {}
    search: dict[str, Any] = {}
    if "paper" in args.methods:
        # the paper's grid once (seed 0), as the paper ran it; then CE and the chosen λ on the other seeds
        grid = _sweep(_grid_spec(base, f"{p}-grid", cache, task, PAPER_LAMBDAS, seeds[:1]), work)
        lam = _paper_choice(grid["runs"])
        chosen_run = next(r for r in grid["runs"] if _lam(r) == lam)
        sweeps, runs = [grid], list(grid["runs"])
        if len(seeds) > 1:
            lams = [1.0, _chosen(chosen_run)["lambda"]]
            more = _sweep(_grid_spec(base, f"{p}-grid-seeds", cache, task, lams, seeds[1:]), work)
            sweeps.append(more)
            runs += more["runs"]
        methods["ce"] = _method([r for r in runs if _lam(r) == "1"], cache, {"lambda": 1.0})
        methods["paper"] = _method([r for r in runs if _lam(r) == lam], cache, _chosen(chosen_run))
        search["paper"] = _tried(grid["runs"])
    else:
        ce = _sweep(_grid_spec(base, f"{p}-ce", cache, task, [1.0], seeds), work)
        sweeps, runs = [ce], list(ce["runs"])
        methods["ce"] = _method(runs, cache, {"lambda": 1.0})
    if args.lung_selection:  # CE too, its epoch chosen on lung-only validation F1 (the outside_mask
        # method's spec without its augmentation is plain CE)
        again = _sweep(
            _seeds_spec(
                base, f"{p}-ce-lungsel", cache, task, "outside_mask", {"lambda": 1.0}, seeds, LUNG_METRIC
            ),
            work,
        )
        methods[f"ce{LUNGS}"] = _method(again["runs"], cache, {"lambda": 1.0})
        sweeps.append(again)
    for method in [m for m in SEARCHED if m in args.methods]:
        found = _sweep(_search_spec(base, f"{p}-{method}-search", cache, task, method), work)
        chosen = _chosen(rank_runs(found["runs"], "val_f1_macro")[0])
        again = _sweep(_seeds_spec(base, f"{p}-{method}-seeds", cache, task, method, chosen, seeds), work)
        methods[method] = _method(again["runs"], cache, chosen)
        search[method] = _tried(found["runs"])
        sweeps += [found, again]
        if args.lung_selection:  # validation shares the shortcut: choose on the lung-only images too
            chosen = _chosen(rank_runs(found["runs"], LUNG_METRIC)[0])
            name = f"{p}-{method}-lungsel"
            again = _sweep(_seeds_spec(base, name, cache, task, method, chosen, seeds, LUNG_METRIC), work)
            methods[f"{method}{LUNGS}"] = _method(again["runs"], cache, chosen)
            sweeps.append(again)
    res = {"task": task, "condition": "shortcut", "cache": str(cache), "methods": methods, "search": search}
    _intervals(res, Path(base["storage_path"]), work)
    res["goals"] = _goals(res)
    res["sweeps"] = {s["name"]: round(s["wall_s"], 1) for s in sweeps}
    if "paper" in args.methods:
        res["paper_report"] = _report(
            runs, work / "reports" / f"{p}-grid", f"Paper grid on shortcut phantoms ({task})"
        )
    return res


def run_control(task: str, base, work: Path, args, shortcut_res: dict[str, Any]) -> dict[str, Any]:
    """The methods at the configurations validation chose with the shortcut, on clean phantoms
    (selected on validation F1: without a shortcut, lung-only selection has nothing to avoid)."""
    cache = _phantoms(work, task, args, shortcut=False)
    seeds = list(range(args.seeds))
    p = f"clean-{task}"
    chosen = {m: v["config"] for m, v in shortcut_res["methods"].items() if LUNGS not in m}
    lams = [1.0, chosen["paper"]["lambda"]] if "paper" in chosen else [1.0]
    grid = _sweep(_grid_spec(base, f"{p}-grid", cache, task, lams, seeds), work)
    methods = {"ce": _method([r for r in grid["runs"] if _lam(r) == "1"], cache, chosen["ce"])}
    if "paper" in chosen:
        methods["paper"] = _method([r for r in grid["runs"] if _lam(r) != "1"], cache, chosen["paper"])
    sweeps = [grid]
    for method in [m for m in SEARCHED if m in chosen]:
        again = _sweep(
            _seeds_spec(base, f"{p}-{method}-seeds", cache, task, method, chosen[method], seeds), work
        )
        methods[method] = _method(again["runs"], cache, chosen[method])
        sweeps.append(again)
    res = {"task": task, "condition": "clean", "cache": str(cache), "methods": methods}
    _intervals(res, Path(base["storage_path"]), work)
    res["goals"] = _goals(res)
    res["sweeps"] = {s["name"]: round(s["wall_s"], 1) for s in sweeps}
    return res


def _report(runs: list, out: Path, title: str) -> str:
    """The grid in the paper's table format, by ``cxr-sweep report``'s own code."""
    from sweeps.results.report import build_report

    report = build_report(runs, "val_f1_macro", out, title)
    return report.files["report.md"].read_text()


# ---- output -----------------------------------------------------------------------------------------
def _fmt(s: dict[str, float], digits: int = 3) -> str:
    if s["n"] == 0 or s["mean"] is None or math.isnan(s["mean"]):
        return "–"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def _cfg(c: dict[str, Any]) -> str:
    parts = []
    for k, sym in (("lambda", "λ"), ("threshold", "t"), ("tau", "τ"), ("augment", "p")):
        if k in c:
            v = c[k]
            parts.append(f"{sym}={v}" if isinstance(v, str) else f"{sym}={v:.3g}")
    return ", ".join(parts)


def _rows(res: dict[str, Any]) -> list[str]:
    """The methods a result holds, in table order: each followed by its lung-selected twin."""
    return [k for m in METHODS for k in (m, f"{m}{LUNGS}") if k in res["methods"]]


def markdown(result: dict[str, Any]) -> str:
    lines = []
    for res in result["tasks"]:
        rows = _rows(res)
        outside = all("outside_evidence" in res["methods"][m]["summary"] for m in rows)
        cols = [*SHOWN, *(OUTSIDE if outside else ()), "marker_effect"]
        head = ["Macro F1", "AUC", "YI", "DP", "Pointing", "CAM in lesion", "CAM in prior"]
        head += ["Outside evidence", "Lung-only F1"] if outside else []
        head += ["Marker effect"]
        what = "with the shortcut" if res["condition"] == "shortcut" else "no shortcut (control)"
        lines.append(f"#### {res['task']} — {what}")
        lines.append("")
        lines.append("| Method | Selected on validation | Val F1 | " + " | ".join(head) + " |")
        lines.append("|---" * (3 + len(head)) + "|")
        for m in rows:
            s = res["methods"][m]["summary"]
            cfg = _cfg({k: v for k, v in res["methods"][m]["config"].items() if m != "paper" or k != "tau"})
            cells = [_fmt(s[c]) for c in cols]
            lines.append(f"| {m} | {cfg} | {_fmt(s['val_f1_macro'])} | " + " | ".join(cells) + " |")
        g = res["goals"]
        lines.append("")
        attending = [m for m in rows if m.removesuffix(LUNGS) not in ("ce", "paper")]
        lines.append(
            "Δ test macro F1 vs CE: "
            + ", ".join(f"{m} {g[f'{m}_minus_ce_f1']:+.3f}" for m in rows if m != "ce")
            + "; Δ pointing game: "
            + ", ".join(f"{m} {g[f'{m}_minus_ce_pointing']:+.3f}" for m in attending)
        )
        ci = [m for m in rows if "delta_f1_vs_ce" in res["methods"][m]]
        if ci:
            d = {m: res["methods"][m]["delta_f1_vs_ce"] for m in ci}
            n = d[ci[0]]["n_images"]
            lines.append("")
            lines.append(
                f"Δ test macro F1 vs CE, 95 % paired bootstrap interval over the {n} test images "
                "(mean over seeds per resample): "
                + ", ".join(
                    f"{m} {v['delta']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}]" for m, v in d.items()
                )
            )
        if "spearman_outside_evidence_vs_marker_effect" in g:
            lines.append("")
            lines.append(
                "Spearman's ρ of outside evidence and marker effect over these rows: "
                f"{g['spearman_outside_evidence_vs_marker_effect']:+.2f}"
            )
        lines.append("")
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    """NaN (a metric that does not apply, e.g. the marker effect without markers) as null."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def full_markdown(result: dict[str, Any]) -> str:
    """The tables, then each task's paper-format report (``cxr-sweep report`` of its grid sweep)."""
    text = markdown(result) + "\n"
    for res in result["tasks"]:
        if "paper_report" in res:
            name = f"sc-{res['task']}-grid"
            text += f"\n<!-- cxr-sweep report of {name} + {name}-seeds -->\n" + res["paper_report"]
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/shortcut_cpu.json")
    ap.add_argument("--markdown", type=Path, default=None, help="Also write the tables as Markdown here.")
    ap.add_argument("--montage", type=Path, default=None, help="Grad-CAM montage PNG (first task).")
    ap.add_argument("--work", type=Path, default=None, help="Keep sweeps, caches and reports here.")
    ap.add_argument("--space", type=Path, default=SPACE)
    ap.add_argument("--tasks", default="ne,np")
    ap.add_argument("--control-tasks", default="ne")
    ap.add_argument("--shortcut", type=float, default=0.9, help="Marker-label correlation in train/val.")
    ap.add_argument("--patients", type=int, default=160)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--backbone", default="test_resnet")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--optuna-trials", type=int, default=5)
    ap.add_argument("--concurrent", type=int, default=2)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument(
        "--methods",
        default="ce,paper,soft,energy,energy-lsm",
        help=f"Comma-separated, of {', '.join(METHODS)} (ce always runs).",
    )
    ap.add_argument(
        "--lung-selection",
        action="store_true",
        help=f"A second row per method: configuration and epoch chosen on {LUNG_METRIC}.",
    )
    ap.add_argument("--smoke", action="store_true", help="One task, tiny everything (tests).")
    ap.add_argument(
        "--render",
        type=Path,
        default=None,
        help="Only print (--markdown: write) the tables of a results JSON.",
    )
    args = ap.parse_args(argv)
    if args.render is not None:
        result = json.loads(args.render.read_text())
        if args.markdown is not None:
            args.markdown.write_text(full_markdown(result))
        print(markdown(result))
        return 0
    if args.smoke:
        args.tasks, args.control_tasks, args.patients, args.size = "ne", "ne", 40, 64
        args.epochs, args.seeds, args.optuna_trials = 1, 2, 2
    args.methods = ["ce", *(m for m in args.methods.split(",") if m and m != "ce")]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        ap.error(f"--methods {','.join(bad)}: not a method; valid: {', '.join(METHODS)}")
    tasks = [t for t in args.tasks.split(",") if t]
    controls = [t for t in args.control_tasks.split(",") if t]
    unknown = [t for t in controls if t not in tasks]
    if unknown:
        ap.error(f"--control-tasks {unknown} must also be in --tasks (the control reuses their choices)")

    import ray

    own_ray = not ray.is_initialized()  # the sweeps start Ray; shut it down after unless a caller had it
    t0 = time.perf_counter()
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="cxr-shortcut-")
        work = Path(tmp.name)
    else:
        work = args.work.resolve()
        work.mkdir(parents=True, exist_ok=True)
    try:
        base = _base(args.space, work / "sweeps", args)
        results = []
        for task in tasks:
            print(f"task {task}, shortcut", flush=True)
            res = run_task(task, base, work, args)
            results.append(res)
            if task in controls:
                print(f"task {task}, control", flush=True)
                results.append(run_control(task, base, work, args, res))
        if args.montage is not None:
            first = results[0]
            models = {f"{m} (seed 0)": _model(first["methods"][m]["first_run"])[0] for m in _rows(first)}
            montage(models, Path(first["cache"]), args.montage)
        result = {
            "benchmark": "shortcut",
            "device": "cpu",
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "tasks": results,
            "wall_s": time.perf_counter() - t0,
        }
        for res in result["tasks"]:
            res.pop("cache")
            for m in res["methods"].values():
                m.pop("first_run")
                m.pop("runs")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(_json_safe(result), indent=2))
        if args.markdown is not None:
            args.markdown.write_text(full_markdown(result))
        print(markdown(result))
        print(f"wall {result['wall_s']:.0f} s -> {args.out}")
    finally:
        if own_ray and ray.is_initialized():
            ray.shutdown()
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
