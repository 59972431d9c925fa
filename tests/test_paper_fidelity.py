"""The method as the authors' script trains it, and the silent errors found against it (issue 16).

Every test here failed on the code before its fix, or was checked by mutating the code once
(docs/paper-fidelity.md lists which test pins which decision).
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import yaml

from trainer import ConfigError, run_trial
from trainer.backbones import BackboneError, create_backbone
from trainer.cam import cam_from_parts, check_cam_support, grad_cam
from trainer.config import TrialConfig
from trainer.loop import plateau_scheduler
from trainer.metrics import METRICS, UnknownMetricError, higher_is_better
from trainer.priors import DEFAULT_PRIORS, create_prior, prior_table, region_masks

from .conftest import tiny_config

# ---- 1. the subcutaneous-emphysema region -----------------------------------------------------------


def _authors_masks(box: tuple[int, int, int, int], s: int = 224) -> dict[str, np.ndarray]:
    """The regions as the authors' script slices them (CustomLoss_ne / _np / _ns), as masks."""
    bx, by, bw, bh = box
    effusion = np.zeros((s, s), bool)
    effusion[round(by + bh / 2) : by + bh, bx : bx + bw] = True
    pneumothorax = np.zeros((s, s), bool)
    pneumothorax[by : round(by + bh / 2), bx : bx + bw] = True
    emphysema = np.ones((s, s), bool)
    emphysema[by:s, bx : bx + bw] = False
    return {"Effusion": effusion, "Pneumothorax": pneumothorax, "Subcutaneous Emphysema": emphysema}


def _ours(box, name: str, s: int = 224) -> np.ndarray:
    table = prior_table(["No Finding", name], {name: DEFAULT_PRIORS[name]})
    return region_masks(torch.tensor([box]), torch.tensor([1]), table, (s, s))[0, 0].bool().numpy()


def test_the_emphysema_region_is_the_authors_the_rows_above_the_lung_box_included():
    box = (30, 28, 164, 170)
    theirs = _authors_masks(box)["Subcutaneous Emphysema"]
    assert int(theirs.sum()) == 18032
    assert np.array_equal(_ours(box, "Subcutaneous Emphysema"), theirs)
    old = prior_table(["No Finding", "S"], {"S": create_prior("outside_lung_columns")})
    assert int(region_masks(torch.tensor([box]), torch.tensor([1]), old, (224, 224)).sum()) == 11760


@pytest.mark.parametrize("seed", range(20))
def test_every_default_region_matches_the_authors_slicing(seed):
    rng = random.Random(seed)
    w, h = rng.randrange(40, 200), 2 * rng.randrange(20, 100)  # even heights: their round() is exact
    box = (rng.randrange(0, 224 - w), rng.randrange(0, 224 - h), w, h)
    for name, theirs in _authors_masks(box).items():
        assert np.array_equal(_ours(box, name), theirs), (name, box)


# ---- 2. one direction per logged metric --------------------------------------------------------------

LOWER = {"fdr", "for", "loss", "ce", "attention_loss", "cam_zero_fraction", "epoch_time_s"}
LOWER |= {"epoch_train_s", "epoch_val_s", "outside_evidence", "outside_dependence"}
NOT_A_SCORE = {"youden_threshold", "grad_ratio", "lambda", "lr", "epoch", "best_epoch", "epochs_run"}


@pytest.mark.parametrize("name", sorted(METRICS))
def test_every_logged_metric_has_its_direction(name):
    from trainer.metrics import logged_names

    logged = [p + name for p in ("", "train_", "val_", "test_", "best_val_") if p + name in logged_names(p)]
    assert logged, f"{name}: in the table but logged nowhere"
    for full in {name, *logged}:
        if name in NOT_A_SCORE:
            with pytest.raises(UnknownMetricError, match="not a score"):
                higher_is_better(full)
        else:
            assert higher_is_better(full) is (name not in LOWER), full


def test_an_unknown_metric_is_refused_with_the_near_misses():
    with pytest.raises(UnknownMetricError, match="did you mean val_f1_macro or val_f1_weighted"):
        higher_is_better("val_f1")
    with pytest.raises(UnknownMetricError, match="not a metric a trial logs"):
        higher_is_better("forward")


@pytest.mark.parametrize(
    ("selection", "plateau_on", "mode"),
    [("val_f1_macro", "selection", "max"), ("val_ce", "selection", "min"), ("val_fdr", "selection", "min"),
     ("val_accuracy", "val_loss", "min")],
)  # fmt: skip
def test_the_plateau_scheduler_runs_in_the_direction_of_what_it_watches(selection, plateau_on, mode):
    cfg = TrialConfig.from_dict(
        {"data": {"cache": "/x"}, "train": {"selection_metric": selection, "plateau_on": plateau_on}}
    )
    sched, watched = plateau_scheduler(cfg, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0))
    assert sched.mode == mode and watched == (selection if plateau_on == "selection" else "val_loss")


# ---- scripted validation: selection, early stopping and the plateau as the loop applies them --------


def _scripted(monkeypatch, values: list[dict[str, float]]):
    """Make each epoch's validation return the given metrics (on top of a real evaluation)."""
    import trainer.loop as loop

    real, calls = loop.evaluate, []

    def fake(model, loader, prep, cfg, table, amp, lam, keep_examples=0, outside_limit=0):
        out = real(model, loader, prep, cfg, table, amp, lam, keep_examples)
        if keep_examples == 0:  # validation (the test pass keeps examples)
            out["metrics"] |= values[min(len(calls), len(values) - 1)]
            calls.append(1)
        return out

    monkeypatch.setattr(loop, "evaluate", fake)


def test_selection_on_ce_keeps_the_epoch_of_the_lowest_ce(ne_cache, tmp_path, monkeypatch):
    _scripted(monkeypatch, [{"ce": v} for v in (0.9, 0.3, 0.6, 0.5)])
    cfg = tiny_config(ne_cache, tmp_path, train={"epochs": 4, "selection_metric": "val_ce"})
    assert run_trial(cfg)["best_epoch"] == 1


@pytest.mark.parametrize(("rule", "epochs_run"), [("consecutive", 5), ("total", 4)])
def test_early_stopping_counts_in_a_row_or_in_total(ne_cache, tmp_path, monkeypatch, rule, epochs_run):
    # epoch 0 best, 1 worse, 2 better, 3 and 4 worse: two in a row after 4, two in total after 3
    _scripted(monkeypatch, [{"accuracy": v} for v in (0.5, 0.4, 0.6, 0.55, 0.55, 0.55, 0.55)])
    train = {"epochs": 7, "selection_metric": "val_accuracy", "early_stop": rule, "early_stop_patience": 2}
    result = run_trial(tiny_config(ne_cache, tmp_path, train=train))
    assert result["epochs_run"] == epochs_run and result["best_epoch"] == 2


def test_the_plateau_watches_the_validation_loss_down_to_min_lr(ne_cache, tmp_path, monkeypatch):
    # accuracy keeps improving while the validation loss stalls: only plateau_on=val_loss cuts the lr
    _scripted(monkeypatch, [{"accuracy": 0.5 + 0.05 * e, "loss": 1.0} for e in range(6)])
    lrs = []
    train = {"epochs": 6, "selection_metric": "val_accuracy", "plateau_patience": 0, "plateau_factor": 0.1}
    for plateau_on in ("selection", "val_loss"):
        seen: list[float] = []
        train |= {"plateau_on": plateau_on, "plateau_min_lr": 1e-5, "early_stop_patience": 10}
        cfg = tiny_config(ne_cache, tmp_path / plateau_on, train=train)
        run_trial(cfg, report=lambda m, e, d, seen=seen: seen.append(m["lr"]))
        lrs.append(seen)
    assert lrs[0] == [1e-3] * 6
    assert lrs[1] == pytest.approx(
        [1e-3, 1e-3, 1e-4, 1e-5, 1e-5, 1e-5]
    )  # cut after each stall, down to min_lr


def test_the_paper_preset_trains_as_the_authors_and_yields_to_the_config():
    cfg = TrialConfig.from_dict({"preset": "paper", "data": {"cache": "/x"}, "train": {"epochs": 3}})
    t, a = cfg.train, cfg.attention
    assert (t.optimizer, t.lr, t.plateau_on, t.plateau_min_lr, t.early_stop) == (
        "adam",
        1e-5,
        "val_loss",
        1e-10,
        "total",
    )
    assert (t.early_stop_patience, t.selection_metric, t.epochs) == (30, "val_accuracy", 3)
    assert (a.mode, a.cam_target, a.cam_pass, cfg.model.image_size) == ("paper", "predicted", "eval", 224)


# ---- 3. the sweep metric, its mode and the trial's selection metric ----------------------------------


def _space(tmp_path, **changes) -> str:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    raw = yaml.safe_load((root / "search_spaces/demo.yaml").read_text())
    raw.update(changes)
    if "params" in changes:  # the demo's first point (λ = 1) names its own λ parameter
        raw["search"].pop("points_to_evaluate", None)
    raw["trial"]["data"]["cache"] = str(root / "demo-output/cache/ne")
    f = tmp_path / "space.yaml"
    f.write_text(yaml.safe_dump(raw))
    return str(f)


def test_the_sweep_mode_follows_its_metric_and_may_not_contradict_it(tmp_path):
    from sweeps.space import load_sweep

    spec, base = load_sweep(_space(tmp_path, metric="val_fdr"))
    assert spec.mode == "min" and base.train.selection_metric == "val_fdr"  # one quantity everywhere
    with pytest.raises(ConfigError, match="mode: 'max' contradicts metric 'val_fdr' \\(lower is better\\)"):
        load_sweep(_space(tmp_path, metric="val_fdr", mode="max"))
    with pytest.raises(ConfigError, match="'val_f1' is not a validation metric .*did you mean val_f1_macro"):
        load_sweep(_space(tmp_path, metric="val_f1"))
    with pytest.raises(ConfigError, match="selection_metric 'val_auc' differs from metric 'val_f1_macro'"):
        load_sweep(_space(tmp_path), overrides=["trial.train.selection_metric=val_auc"])


def test_a_stopped_trial_is_summarised_at_the_epoch_the_trial_chose(tmp_path):
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from sweeps.space import load_sweep
    from sweeps.tracking.callback import MlflowSweepCallback
    from sweeps.tracking.runs import experiment_id

    spec, _ = load_sweep(_space(tmp_path))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = experiment_id(client, "x", uri)
    parent = client.create_run(exp).info.run_id
    cb = MlflowSweepCallback(uri, exp, parent, spec)

    class Trial(SimpleNamespace):
        def __str__(self) -> str:
            return "t1"

    trial = Trial(trial_id="t1", config={}, path=str(tmp_path), local_path=None, checkpoint=None)
    for epoch, f1 in enumerate((0.6, 0.8, 0.7)):
        result = {"epoch": epoch, "epochs_done": epoch + 1, "train_loss": 1.0, "val_f1_macro": f1}
        result |= {"best_epoch": 1 if epoch else 0, "best_val_f1_macro": max(0.6, f1 if epoch < 2 else 0.8)}
        cb._trial_result(trial, result)
    trial.last_result = result
    cb._trial_complete(trial)  # stopped by ASHA: no final report
    run = client.get_run(cb.runs["t1"])
    assert run.data.metrics["best_epoch"] == 1 and run.data.metrics["best_val_f1_macro"] == 0.8
    assert run.data.tags["cxr.stopped_early"] == "true"


# ---- 5. the CAM of a training step: train pass or eval pass; comparable validation quantities --------


@pytest.mark.parametrize("cam_pass", ["train", "eval"])
def test_the_training_cam_comes_from_the_pass_the_config_names(ne_cache, tmp_path, monkeypatch, cam_pass):
    import trainer.cam as cam

    real, modes = cam.grad_cam_parts, []

    def spy(model, *args, **kwargs):
        if torch.is_grad_enabled():  # the training steps (the backbone check runs without gradients)
            modes.append(model.training)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(cam, "grad_cam_parts", spy)
    att = {"lambda": 0.5, "mode": "soft", "cam_pass": cam_pass}
    run_trial(tiny_config(ne_cache, tmp_path, attention=att, train={"epochs": 1}))
    assert modes and set(modes) == {cam_pass == "train"}


def test_validation_measures_the_attention_loss_by_the_training_rule(ne_cache, tmp_path):
    from trainer.attention_loss import attention_loss
    from trainer.data.cache import open_cache
    from trainer.data.transforms import BatchTransform
    from trainer.epoch import evaluate
    from trainer.loop import split_loader

    raw = tiny_config(ne_cache, tmp_path, attention={"lambda": 0.4, "cam_target": "predicted"})
    cfg = TrialConfig.from_dict({**raw, "train": {**raw["train"], "batch_size": 10_000}})  # one batch
    cache, cpu = open_cache(ne_cache), torch.device("cpu")
    model = create_backbone("test_resnet", num_classes=2).eval()
    with torch.no_grad():
        model.get_classifier().bias.copy_(torch.tensor([10.0, 0.0]))  # predicts No Finding: not the label
    table = prior_table(cfg.data.classes, cfg.attention.priors)
    prep = BatchTransform(cpu, size=cache.size)
    loader = split_loader(cache, "val", cfg, cpu)
    m = evaluate(model, loader, prep, cfg, table, None, 0.4)["metrics"]
    b = prep(next(iter(loader)), train=False)
    region = region_masks(b["box"], b["label"], table, b["image"].shape[-2:])
    with torch.no_grad():
        _, by_prediction = grad_cam(model, b["image"], "predicted")
        _, by_label = grad_cam(model, b["image"], b["label"])
    by_rule = float(attention_loss(by_prediction, region, b["label"], "soft", 0.5, 0.1))
    by_truth = float(attention_loss(by_label, region, b["label"], "soft", 0.5, 0.1))
    assert m["attention_loss"] == pytest.approx(by_rule, abs=1e-6) and by_rule != pytest.approx(
        by_truth, abs=1e-4
    )
    assert m["loss"] == pytest.approx(0.4 * m["ce"] + 0.6 * m["attention_loss"])


# ---- 6. a class-token ViT has an all-zero CAM: refused, and an all-zero epoch is reported -----------


def test_a_class_token_vit_gives_an_all_zero_cam_and_is_refused_for_attention(ne_cache, tmp_path):
    import timm

    vit = timm.create_model("test_vit", pretrained=False, num_classes=2)
    _, cam = grad_cam(vit, torch.randn(2, 3, 64, 64), "predicted")
    assert torch.count_nonzero(cam) == 0  # values, not shapes: the patch tokens have no gradient
    with pytest.raises(BackboneError, match="Grad-CAM is all zero"):
        check_cam_support(vit, 64, "test_vit")
    avg = timm.create_model("test_vit", pretrained=False, num_classes=2, global_pool="avg")
    _, cam = grad_cam(avg, torch.randn(2, 3, 64, 64), "predicted")
    assert cam.amax().item() == pytest.approx(1.0, abs=1e-5) and cam.amin().item() == 0.0  # a real CAM
    check_cam_support(avg, 64, "test_vit")
    with pytest.raises(BackboneError, match="all zero"):
        run_trial(tiny_config(ne_cache, tmp_path, model={"backbone": "test_vit"}))
    ce = tiny_config(ne_cache, tmp_path / "ce", model={"backbone": "test_vit"}, attention={"lambda": 1.0})
    run_trial({**ce, "train": {**ce["train"], "epochs": 1}})  # plain CE needs no CAM: it trains


def test_an_epoch_of_all_zero_cams_is_said_in_the_log_and_in_mlflow(ne_cache, tmp_path, monkeypatch):
    import trainer.cam as cam
    from sweeps.tracking.runs import CAM_ZERO_TAG, TrialRun

    real = cam.grad_cam_parts

    def zero_weights(*args, **kwargs):
        logits, fmap, weights = real(*args, **kwargs)
        return logits, fmap, weights * 0.0 if torch.is_grad_enabled() else weights  # training steps only

    seen = []
    monkeypatch.setattr(cam, "grad_cam_parts", zero_weights)
    run = TrialRun(f"sqlite:///{tmp_path / 'm.db'}", "x", "t")
    with pytest.warns(RuntimeWarning, match="every training CAM of epoch 0 was all zero"):
        cfg = tiny_config(ne_cache, tmp_path / "r", train={"epochs": 1})
        run_trial(cfg, report=lambda m, e, d: (seen.append(m), run.log_epoch(m, e)))
    assert seen[0]["train_cam_zero_fraction"] == 1.0
    assert run.client.get_run(run.run_id).data.tags[CAM_ZERO_TAG].startswith("epoch 0")


# ---- 7. what λ balances: the gradient ratio, and tiny-range CAMs -------------------------------------


def test_the_gradient_balance_is_logged_every_epoch(ne_cache, tmp_path):
    def epochs(att: dict, name: str) -> list[dict]:
        seen: list[dict] = []
        run_trial(
            tiny_config(ne_cache, tmp_path / name, attention=att), report=lambda m, e, d: seen.append(m)
        )
        return seen

    soft = [m["train_grad_ratio"] for m in epochs({"lambda": 0.5, "mode": "soft"}, "soft")]
    paper = [m["train_grad_ratio"] for m in epochs({"lambda": 0.5, "mode": "paper"}, "paper")]
    assert len(soft) == 2 and all(r > 0 and math.isfinite(r) for r in soft)
    assert paper == [0.0, 0.0]  # no gradient in the attention term: nothing to balance against CE
    assert "train_grad_ratio" not in epochs({"lambda": 1.0}, "ce")[0]  # plain CE: no attention term


def test_a_cam_of_tiny_values_still_spans_zero_to_one():
    fmap = torch.rand(2, 4, 7, 7, generator=torch.Generator().manual_seed(0))
    weights = torch.ones(2, 4)
    for scale in (1.0, 1e-4, 1e-8):
        cam = cam_from_parts(fmap * scale, weights, (28, 28))
        assert cam.amax().item() == pytest.approx(1.0, abs=1e-4), scale
    assert (
        torch.count_nonzero(cam_from_parts(torch.ones(1, 4, 7, 7), torch.ones(1, 4), (28, 28))) == 0
    )  # flat


# ---- 9. a search spends nothing on settings its modes never read -------------------------------------


def test_lambda_zero_is_refused_where_the_attention_term_has_no_gradient():
    base = {"data": {"cache": "/x"}}
    with pytest.raises(ConfigError, match="λ reaches 0 at epoch 0 with mode 'paper'"):
        TrialConfig.from_dict({**base, "attention": {"lambda": 0.0, "mode": "paper"}})
    TrialConfig.from_dict({**base, "attention": {"lambda": 0.0, "mode": "soft"}})  # the attention term trains


def test_threshold_and_tau_are_drawn_only_for_the_mode_that_reads_them(tmp_path):
    from pathlib import Path

    from ray.tune.search.optuna import OptunaSearch

    from sweeps.space import load_sweep, optuna_space, trial_overrides

    root = Path(__file__).resolve().parents[1]
    spec, _ = load_sweep(root / "search_spaces/optuna_lambda.yaml")
    search = OptunaSearch(space=optuna_space(spec), metric="val_f1_macro", mode="max")
    modes = set()
    for i in range(16):
        config = search.suggest(str(i))
        mode = config["attention.mode"]
        modes.add(mode)
        drawn = {"attention.threshold", "attention.tau"} & set(config)
        assert drawn == ({"attention.threshold", "attention.tau"} if mode == "soft" else set())
        assert ({"attention.threshold", "attention.tau"} <= trial_overrides(spec, config).keys()) == (
            mode == "soft"
        )
    assert modes == {"soft", "energy"}
    only_tau = _space(tmp_path, params={"attention.tau": {"type": "uniform", "low": 0.1, "high": 0.2}})
    with pytest.raises(
        ConfigError, match="params.attention.tau: no loss mode this sweep runs \\(energy\\) reads"
    ):
        load_sweep(only_tau, overrides=["trial.attention.mode=energy"])


def test_a_localization_metric_needs_lesion_masks_in_the_validation_split(tmp_path):
    from sweeps.driver.preflight import check_sweep
    from sweeps.space import load_sweep
    from trainer.data.cache import write_cache

    labels = ["No Finding", "Effusion"] * 6
    rows = [
        {"image_id": f"i{i}", "patient_id": f"p{i}", "label": c, "split": ("train", "val", "test")[i % 3],
         "source_path": f"i{i}.png"}
        for i, c in enumerate(labels)
    ]  # fmt: skip
    images = np.zeros((len(rows), 32, 32), np.uint8)
    cache = write_cache(
        tmp_path / "cache", images=images, lung_masks=images + 1, manifest=rows, task="ne", source="test",
        classes=["No Finding", "Effusion"], segmenter="none", data_access="synthetic",
    )  # fmt: skip
    sets = [f"trial.data.cache={cache}", f"storage_path={tmp_path / 'sweeps'}"]
    spec, _ = load_sweep(_space(tmp_path, metric="val_pointing_game"), overrides=sets)
    with pytest.raises(ConfigError, match="no lesion masks in its validation split"):
        check_sweep(spec, None)
