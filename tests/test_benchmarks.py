import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_step_time_smoke(tmp_path):
    import step_time

    out = tmp_path / "st.json"
    assert step_time.main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (r,) = report["results"]
    assert r["backbone"] == "test_resnet" and r["median_s"]["ce"] > 0
    assert r["ratio_soft_over_ce"] == r["median_s"]["soft"] / r["median_s"]["ce"]
    assert "soft_ref" not in r["median_s"]  # no head shortcut on a ResNet: nothing to compare


@pytest.mark.slow
def test_sweep_efficiency_smoke(tmp_path):
    import sweep_efficiency

    out = tmp_path / "se.json"
    assert sweep_efficiency.main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["grid"]["trials"] == 2 and report["optuna_asha"]["trials"] == 2
    over = report["overhead"]
    assert over["reuse_actors"]["ratio"] > 0 and over["fresh_actors"]["trials"] == 2


def test_authors_baseline_smoke(tmp_path):
    import authors_baseline

    out = tmp_path / "ab.json"
    assert authors_baseline.main(["--smoke", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["train_images"] == 2 and r["val_images"] == 2
    parts = r["authors_parts_s"]
    assert all(parts[k] > 0 for k in ("deepcopy", "unet", "gradcam", "read_batch", "classifier"))
    assert sum(parts.values()) <= r["authors_epoch_s"]
    assert set(r["ours_epoch_s"]) == {"paper", "soft"} and min(r["ours_epoch_s"].values()) > 0
    assert r["ratio_authors_over_ours"]["soft"] == r["authors_epoch_s"] / r["ours_epoch_s"]["soft"]
    tv = r["ours_train_val_s"]  # the passes alone: the like-for-like figure, never above the epoch
    assert set(tv) == {"paper", "soft"} and all(0 < tv[m] <= r["ours_epoch_s"][m] for m in tv)
    assert r["ratio_authors_over_ours_train_val"]["paper"] == r["authors_epoch_s"] / tv["paper"]
    assert r["device"] == "cpu" and r["target_ratio"] == 20.0


def test_profile_step_prints_the_profilers_totals():
    import step_time

    text = step_time.profile_step("test_resnet:soft", "cpu", rows=5)
    first, *_, last = text.splitlines()
    assert first.startswith("test_resnet 64px b4 soft step:") and last.startswith("Self CPU time total")


def test_classic_unet_shapes_and_channels():
    import authors_baseline
    import torch

    unet = authors_baseline.ClassicUNet(base=4).eval()
    convs = [m.out_channels for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert max(convs) == 64 and min(c for c in convs if c > 1) == 4  # base → 16·base, as 64 → 1024
    with torch.no_grad():
        assert unet(torch.zeros(1, 1, 32, 32)).shape == (1, 1, 32, 32)


def test_memory_smoke(tmp_path):
    import memory

    out = tmp_path / "mem.json"
    assert memory.main(["--smoke", "--out", str(out), "--steps", "1"]) == 0
    (r,) = json.loads(out.read_text())["results"]
    assert set(r["peak_rss_bytes"]) == {"ce", "soft", "paper"}
    assert r["peak_rss_bytes"]["ce"] > 100 * 2**20  # a real process peak, not a delta
    assert r["ratio_peak_soft_over_ce"] == r["peak_rss_bytes"]["soft"] / r["peak_rss_bytes"]["ce"]


def test_step_time_reference_variant_for_vgg_heads():
    """soft_ref (the before of the VGG head shortcut) runs where the shortcut applies, only there."""
    import step_time
    import torch
    from timm.models.vgg import VGG

    import trainer.cam
    from trainer.cam import grad_cam_parts

    case = step_time.StepCase("test_resnet", 64, 2)
    assert case.kinds == ["ce", "soft", "paper"]
    case.model = VGG([8, "M", 8, "M", 8, "M", 8, "M", 8, "M"], num_classes=2, mlp_ratio=1 / 64)
    case.opt = torch.optim.Adam(case.model.parameters())
    for kind in ("soft", "soft_ref"):
        assert case.step(kind) > 0
    assert trainer.cam.grad_cam_parts is grad_cam_parts  # the product's path is restored after the step


def test_compare_time_smoke(tmp_path):
    import compare_time

    out = tmp_path / "ct.json"
    assert (
        compare_time.main(["--images", "100", "--resamples", "200", "--repeats", "1", "--out", str(out)]) == 0
    )
    report = json.loads(out.read_text())
    assert [(r["classes"], r["seeds"]) for r in report["results"]] == [(2, 1), (3, 1), (2, 3)]
    assert report["results"][0]["median_s"] > 0


def test_compare_time_cli_smoke(tmp_path):
    import compare_time

    out = tmp_path / "ct.json"
    args = ["--cli", "--images", "50", "--resamples", "200", "--repeats", "1", "--out", str(out)]
    assert compare_time.main(args) == 0
    report = json.loads(out.read_text())
    assert [(r["classes"], r["seeds"]) for r in report["results"]] == [(2, 1), (3, 1), (2, 3)]  # kept
    cli = report["cli"]
    assert (cli["images"], cli["resamples"], len(cli["seconds"])) == (50, 200, 1)
    assert cli["median_s"] > 0 and cli["verdict"].startswith("soft λ=0.5 [t_00001]: ΔF1")


@pytest.mark.slow
def test_repeats_overhead_smoke(tmp_path):
    import repeats_overhead

    out = tmp_path / "ro.json"
    args = ["--repeats", "2", "--epochs", "1", "--pairs", "1", "--patients", "30", "--out", str(out)]
    assert repeats_overhead.main(args) == 0
    report = json.loads(out.read_text())
    for level in ("trainer", "sweep"):
        (pair,) = report["pairs"][level]
        assert pair["repeats_s"] > 0 and pair["ratio"] == pair["repeats_s"] / pair["singles_s"]


@pytest.mark.slow
def test_driver_scale_smoke(tmp_path):
    import driver_scale

    out = tmp_path / "ds.json"
    assert driver_scale.main(["--smoke", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["scenarios"]
    assert {(r["mode"], r["writers"]) for r in rows} == {
        (m, w) for m in ("replay", "ray") for w in ("0", "default")
    }
    for r in rows:  # 4 trials × (3 epochs + final): every value logged is stored, once
        assert r["results"] == 16 and r["lost_epochs"] == 0 and r["duplicated_epochs"] == 0
        assert r["metric_values_logged"] == r["metric_values_stored"] > 0
        assert r["latency_p99_s"] >= r["latency_p50_s"] > 0 and r["best_s"] > 0
    assert all(r["status_s"] > 0 for r in rows if r["mode"] == "ray")


def test_best_latency_times_both_reads(tmp_path):
    import best_latency

    from tests._results_fixtures import build_crafted

    c = build_crafted(tmp_path / "store")
    out = tmp_path / "best.json"
    assert (
        best_latency.main([c.experiment, "--tracking-uri", c.uri, "--repeats", "1", "--out", str(out)]) == 0
    )
    doc = json.loads(out.read_text())
    assert set(doc["seconds"]) == {"top5", "top_all"} and all(v[0] > 0 for v in doc["seconds"].values())
    assert doc["titles"]["top_all"].startswith("top 7 of 7 finished runs")


def test_step_time_input_grad_variant(tmp_path):
    import step_time

    out = tmp_path / "st.json"
    assert step_time.main(["--smoke", "--input-grad", "--out", str(out)]) == 0
    (r,) = json.loads(out.read_text())["results"]
    assert r["median_s"]["input_grad"] > 0 and "ratio_paired_input_grad_over_ce" in r


def test_step_time_previous_layer_variants(tmp_path):
    import step_time

    out = tmp_path / "st.json"
    assert step_time.main(["--smoke", "--previous-layer", "--out", str(out)]) == 0
    (r,) = json.loads(out.read_text())["results"]
    assert set(step_time.PREVIOUS_LAYER_KINDS) <= set(r["median_s"])
    assert set(r["ratio_paired_prev_over_last"]) == {"soft", "paper", "energy_lsm"}


def test_outside_cost_smoke(tmp_path):
    import outside_cost

    out = tmp_path / "oc.json"
    assert outside_cost.main(["--smoke", "--out", str(out)]) == 0
    (r,) = json.loads(out.read_text())["results"]
    assert set(r["median_s"]) == {"on", "off"} and r["ratio_on_over_off"] > 0
