import math

import pytest
import yaml

from trainer.config import ConfigError, TrialConfig


def _base(**attention):
    return {"data": {"cache": "/tmp/nowhere", "task": "ne"}, "attention": attention}


def test_defaults_follow_the_paper():
    cfg = TrialConfig.from_dict(_base())
    assert cfg.train.lr == 1e-5 and cfg.train.optimizer == "adam"
    assert cfg.train.plateau_factor == 0.1 and cfg.train.plateau_patience == 10
    assert cfg.train.epochs == 100 and cfg.train.early_stop_patience == 30
    assert cfg.train.selection_metric == "val_f1_macro"
    adaptive = TrialConfig.from_dict(_base(**{"lambda": "adaptive"})).attention
    assert adaptive.schedule == {"slope": 0.023, "floor": 0.2}  # the schedule's defaults, resolved
    assert cfg.attention.mode == "paper" and cfg.attention.cam_target == "predicted"
    assert cfg.attention.cam_score == "logit"  # Grad-CAM as published


def test_adaptive_lambda_schedule():
    cfg = TrialConfig.from_dict(_base(**{"lambda": "adaptive"}))
    assert cfg.attention.lambda_at(0) == 1.0
    assert cfg.attention.lambda_at(10) == pytest.approx(1 - 0.23)
    assert cfg.attention.lambda_at(100) == 0.2  # floor
    fixed = TrialConfig.from_dict(_base(**{"lambda": 0.25}))
    assert fixed.attention.lambda_at(7) == 0.25


@pytest.mark.parametrize(
    ("attention", "field"),
    [
        ({"lambda": 1.5}, "attention.lambda"),
        ({"lambda": -0.1}, "attention.lambda"),
        ({"lambda": "sometimes"}, "attention.lambda"),
        ({"threshold": 0.0}, "attention.threshold"),
        ({"threshold": 1.0}, "attention.threshold"),
        ({"tau": 0.0}, "attention.tau"),
        ({"tau": -1}, "attention.tau"),
        ({"mode": "magic"}, "attention.mode"),
        ({"cam_target": "random"}, "attention.cam_target"),
        ({"cam_score": "softmax"}, "attention.cam_score"),
        ({"lamda": 0.5}, "attention.lamda"),
    ],
)
def test_bad_attention_fields_are_named(attention, field):
    with pytest.raises(ConfigError) as e:
        TrialConfig.from_dict(_base(**attention))
    assert field in str(e.value)


def test_unknown_mode_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"valid: energy, input_grad, paper, soft"):
        TrialConfig.from_dict(_base(mode="magic"))


def test_unknown_backbone_lists_registered():
    with pytest.raises(ConfigError) as e:
        TrialConfig.from_dict({**_base(), "model": {"backbone": "resnet5000"}})
    msg = str(e.value)
    assert "model.backbone" in msg and "resnet5000" in msg
    assert "pvt_v2_b2_li" in msg and "vgg16" in msg and "resnet50" in msg


def test_any_timm_model_is_accepted():
    cfg = TrialConfig.from_dict({**_base(), "model": {"backbone": "convnext_atto"}})
    assert cfg.model.backbone == "convnext_atto"


def test_unknown_task_and_selection_on_test_rejected():
    with pytest.raises(ConfigError, match="data.task"):
        TrialConfig.from_dict({"data": {"cache": "x", "task": "nx"}})
    with pytest.raises(ConfigError, match="test data is never used"):
        TrialConfig.from_dict({**_base(), "train": {"selection_metric": "test_f1_macro"}})


def test_missing_prior_for_a_task_class():
    with pytest.raises(ConfigError, match="no region prior"):
        TrialConfig.from_dict(
            {"data": {"cache": "x", "task": "nep"}, "attention": {"lambda": 0.5, "priors": {}}}
        )
    # plain CE needs no prior
    TrialConfig.from_dict({"data": {"cache": "x", "task": "nep"}, "attention": {"lambda": 1, "priors": {}}})


def test_yaml_roundtrip_with_overrides_and_infinite_prior(tmp_path):
    src = tmp_path / "trial.yaml"
    src.write_text(
        yaml.safe_dump(
            {
                "data": {"cache": "cache/ne", "task": "ns"},
                "attention": {"lambda": 0.5, "mode": "energy"},
                "output_dir": "runs/x",
            }
        )
    )
    cfg = TrialConfig.from_file(src, ["attention.lambda=adaptive", "train.epochs=3"])
    assert cfg.attention.lambda_ == "adaptive" and cfg.train.epochs == 3
    assert cfg.data.cache == (tmp_path / "cache/ne").resolve()  # relative to the YAML file
    assert cfg.output_dir.is_absolute()
    assert math.isinf(cfg.attention.priors["Subcutaneous Emphysema"].boxes[0].y[1])
    saved = cfg.save(tmp_path / "resolved.yaml")
    again = TrialConfig.from_file(saved)
    assert again == cfg
    params = cfg.flat_params()
    assert params["attention.lambda"] == "adaptive" and params["data.task"] == "ns"
    assert "attention.threshold" not in params and "attention.tau" not in params  # energy reads neither


@pytest.mark.parametrize(
    ("attention", "name", "logged", "left_out"),
    [
        ({"lambda": 1.0, "mode": "soft"}, "CE λ=1 [t1]", {"attention.cam_score"}, {"attention.mode"}),
        (
            {"lambda": 0.8744, "mode": "soft", "threshold": 0.61},
            "soft λ=0.874 t=0.61 τ=0.05 [t1]",
            {"attention.threshold", "attention.tau"},
            set(),
        ),
        (
            {"lambda": 0.5, "mode": "paper"},
            "paper λ=0.5 t=0.5 [t1]",
            {"attention.threshold"},
            {"attention.tau"},
        ),
        (
            {"lambda": "adaptive", "mode": "energy"},
            "energy λ=adaptive [t1]",
            {"attention.schedule.slope"},
            {"attention.threshold", "attention.tau"},
        ),
    ],
)
def test_a_run_is_named_and_described_by_the_settings_that_take_effect(attention, name, logged, left_out):
    from sweeps.tracking.runs import run_title

    cfg = TrialConfig.from_dict({"data": {"cache": "/tmp/c"}, "attention": attention})
    assert run_title(cfg, "t1") == name
    params = cfg.flat_params()
    assert logged <= set(params) and not left_out & set(params)
    if attention["lambda"] == 1.0:  # plain cross-entropy: no setting of the attention loss
        assert not {k for k in params if k in {f"attention.{n}" for n in ("threshold", "tau", "cam_pass")}}


def test_malformed_yaml_and_wrong_types_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {cache: x\n  task: ne")
    with pytest.raises(ConfigError, match="bad.yaml: malformed YAML"):
        TrialConfig.from_file(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("data: {cache: x}\ntrain: {epochs: many}\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml.*\n.*train.epochs"):
        TrialConfig.from_file(wrong)
    with pytest.raises(ConfigError, match="not found"):
        TrialConfig.from_file(tmp_path / "missing.yaml")
