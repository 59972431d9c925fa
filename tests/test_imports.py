"""trainer/ is a plain library: it imports and runs a trial with Ray, MLflow and Optuna blocked."""

import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent(
    """
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"ray", "mlflow", "optuna"}:
                raise ImportError(f"blocked import of {name}")
    sys.meta_path.insert(0, _Block())
    """
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + code], capture_output=True, text=True, timeout=300)


def test_blocker_blocks():
    assert _run("import mlflow").returncode != 0


def test_trainer_imports_without_ray_mlflow_optuna():
    code = textwrap.dedent(
        """
        import trainer, trainer.loop, trainer.cam, trainer.attention_loss, trainer.metrics
        import trainer.backbones, trainer.priors, trainer.schedules, trainer.plots
        import trainer.data.cache, trainer.data.phantom, trainer.data.sources, trainer.data.transforms
        import trainer.segmenter, trainer.data.prepare, trainer.data.splits
        import trainer.data.pairs, trainer.data.images, trainer.epoch, trainer.presets, trainer.checkpoint
        print("ok")
        """
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_trial_runs_without_ray_mlflow_optuna(ne_cache, tmp_path):
    code = textwrap.dedent(
        f"""
        from trainer import run_trial
        cfg = dict(output_dir={str(tmp_path)!r}, data=dict(cache={str(ne_cache)!r}, task="ne"),
                   model=dict(backbone="test_resnet"), train=dict(epochs=1, batch_size=32, lr=1e-3),
                   attention={{"lambda": 0.5, "mode": "soft"}})
        r = run_trial(cfg)
        print(sorted(k for k in r if k.startswith("test_"))[:3])
        """
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr


def test_a_config_is_checked_without_pytorch():
    """Validating a trial config (what ``sweep status`` and the sweep checks do for every trial) needs
    the loss modes' properties only: PyTorch, scikit-learn and timm stay unimported."""
    code = textwrap.dedent(
        """
        import sys
        from trainer.config import AttentionConfig
        for mode in ("paper", "soft", "energy"):
            AttentionConfig.model_validate({"mode": mode, "lambda": 0.5}).inactive()
        print(sorted(m for m in ("torch", "sklearn", "timm") if m in sys.modules))
        """
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_the_mode_table_is_what_the_loss_registry_holds():
    from trainer.attention_loss import LOSS_MODES, create_loss_mode
    from trainer.loss_modes import BUILTIN_MODES, mode_info, mode_names

    assert set(BUILTIN_MODES) <= set(LOSS_MODES.names()) and mode_names() == LOSS_MODES.names()
    for name in LOSS_MODES.names():
        mode = create_loss_mode(name)
        assert (mode_info(name).differentiable, mode_info(name).uses) == (mode.differentiable, mode.uses)
