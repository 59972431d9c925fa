"""Ray for a sweep: joining or starting it, and the Tuner (searcher, scheduler, resources,
failure and checkpoint settings, storage, callbacks) built from a :class:`SweepSpec`."""

from __future__ import annotations

import logging
import os
from typing import Any

from trainer.errors import ConfigError

from ..space import SweepSpec, optuna_space, ray_param_space, sweep_dir

__all__ = ["build_tuner", "by_optuna", "init_ray", "search_algorithm", "verbose"]


def verbose() -> bool:
    """Whether the libraries may talk (``CXR_VERBOSE=1``, ``--verbose``): Ray's config box, warnings
    and trial tracebacks, Optuna's study line. Quiet by default: the sweep's own view says what
    happens, and a failed trial's error is in its row, its MLflow run and its error file."""
    return os.environ.get("CXR_VERBOSE", "0") not in ("", "0")


def init_ray(address: str | None) -> None:
    """Start a Ray of this sweep's own (no dashboard), or join the cluster at ``address`` (with no
    ``--address``, Ray's own ``RAY_ADDRESS`` if set). ``ray.init()`` without an address would join
    any Ray already running on this machine (another sweep, another user's job, a test suite beside
    this one), and that Ray's end would take this sweep's trials with it."""
    import ray

    # JSON/CSV result files are added explicitly; no TensorBoard files (MLflow is the record)
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # a checkpoint every epoch is the point: no "snapshotting may become a bottleneck" warnings
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if not verbose():
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the legacy reporter at verbose=0 prints nothing
        logging.getLogger("ray").setLevel(logging.CRITICAL)
    if ray.is_initialized():
        return
    if address in (None, ""):
        address = os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    else:
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError) as e:
            raise ConfigError(f"--address: cannot connect to Ray at {address}: {e}") from None


def build_tuner(spec: SweepSpec, callbacks: list, restore: bool, warm=None):
    """A new Tuner for ``spec``, or (``restore``) the interrupted one from its experiment state;
    ``warm``: the :class:`~sweeps.driver.warm.WarmStart` its searcher starts from."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import FIFOScheduler

    from .checkpoints import MissingCheckpoints
    from .scheduler import FinishingASHA
    from .trainable import sweep_trainable

    trainable = tune.with_resources(
        tune.with_parameters(sweep_trainable, spec=spec.model_dump()),
        {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu},
    )
    callbacks = [MissingCheckpoints(), *callbacks, JsonLoggerCallback(), CSVLoggerCallback()]
    if restore:
        # The random/grid space holds functions (λ's conditional draw) that Ray saved as placeholders:
        # trials not yet started when the driver died need the same space given back to resolve them.
        space = None if by_optuna(spec) else ray_param_space(spec)
        tuner = tune.Tuner.restore(
            sweep_dir(spec), trainable=trainable, resume_errored=True, param_space=space
        )
        # Ray brings back the callbacks pickled with the experiment: copies of the first driver's,
        # not the ones this driver reads (the storage guard's `full`, the tracking writer it settles).
        # Through Ray Client (ray://) the Tuner runs remotely and keeps the pickled ones.
        if getattr(tuner, "_local_tuner", None) is not None:
            tuner._local_tuner.get_run_config().callbacks = callbacks
        return tuner
    epochs = int(spec.trial["train"]["epochs"])
    if spec.scheduler.type == "asha":
        # ASHA stops a trial once it reaches max_t; one beyond the last epoch lets a trial that
        # trains all its epochs finish its test evaluation and final report.
        scheduler = FinishingASHA(
            time_attr="epochs_done",
            max_t=(spec.scheduler.max_t or epochs) + 1,
            grace_period=min(spec.scheduler.grace_period, epochs),
            reduction_factor=spec.scheduler.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    search_alg, param_space = search_algorithm(spec, warm)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=search_alg,
            scheduler=scheduler,
            num_samples=spec.num_samples,
            max_concurrent_trials=spec.max_concurrent_trials if by_optuna(spec) else None,
            reuse_actors=spec.reuse_actors,
            metric=spec.metric,
            mode=spec.mode,
        ),
        run_config=tune.RunConfig(
            name=spec.name,
            storage_path=spec.storage_path,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            verbose=0,
        ),
    )


def by_optuna(spec: SweepSpec) -> bool:
    """Whether Ray's ``OptunaSearch`` draws the trials: for ``optuna``, and for ``random`` with
    ``search.points_to_evaluate`` (Ray's variant generator cannot preset a ``sample_from``
    parameter such as λ: its placeholder is not a value), on Optuna's ``RandomSampler``."""
    return spec.search.algorithm == "optuna" or bool(spec.search.points_to_evaluate)


def search_algorithm(spec: SweepSpec, warm=None) -> tuple[Any, dict[str, Any]]:
    """The Tune searcher of ``spec`` and the param space it needs (empty for Optuna's define-by-run);
    ``warm``: earlier trials its Optuna study holds before the first suggestion."""
    if by_optuna(spec):
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        if not verbose():
            optuna.logging.set_verbosity(optuna.logging.WARNING)
        seed = spec.search.seed
        if spec.search.algorithm != "optuna":
            sampler = optuna.samplers.RandomSampler(seed=seed)
        elif spec.search.sampler == "nsga2":
            sampler = optuna.samplers.NSGAIISampler(seed=seed)
        else:  # TPE: multi-objective TPE (MOTPE) when the sweep has several metrics
            sampler = optuna.samplers.TPESampler(seed=seed)
        several = bool(spec.objectives)
        storage = None
        if warm is not None:
            from .warm import warm_storage

            storage = warm_storage(spec, warm)
        search = OptunaSearch(
            space=optuna_space(spec),
            metric=spec.all_metrics if several else spec.metric,
            mode=spec.all_modes if several else spec.mode,
            sampler=sampler,
            points_to_evaluate=spec.first_points() or None,
            storage=storage,
        )
        return search, {}
    from ray.tune.search import BasicVariantGenerator

    # TuneConfig.max_concurrent_trials only limits a Searcher; the variant generator takes its own
    generator = BasicVariantGenerator(
        random_state=spec.search.seed, max_concurrent=spec.max_concurrent_trials or 0
    )
    return generator, ray_param_space(spec)
