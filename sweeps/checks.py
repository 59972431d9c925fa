"""What a sweep file is checked for while it loads (:func:`sweeps.space.load_sweep`), before any
trial starts: overrides applied into it, one selection metric for every trial, the trial config
under each probe of every searched value, and searched settings that some loss mode reads."""

from __future__ import annotations

import copy
from typing import Any

import yaml

from trainer.config import TrialConfig
from trainer.dotted import apply_overrides, flatten, set_dotted
from trainer.errors import ConfigError

__all__ = ["apply_sweep_overrides", "one_selection_metric", "settings_used_by_the_modes", "validate_trial"]


def settings_used_by_the_modes(spec, base: TrialConfig, source: str) -> None:
    """A searched attention setting (threshold, τ) that the sweep's loss modes never read spends
    trials on noise: refuse it, or ask for ``when`` where only some of the modes read it."""
    from trainer.loss_modes import mode_info, mode_names

    searched = spec.params.get("attention.mode")
    modes = list(searched.values) if searched is not None else [base.attention.mode]
    settings = {s for name in mode_names() for s in mode_info(name).uses}
    for key, p in spec.params.items():
        setting = key.removeprefix("attention.")
        if not key.startswith("attention.") or setting not in settings:
            continue
        allowed = [m for m in modes if m in (p.when or {}).get("attention.mode", modes)]
        users = [m for m in allowed if setting in mode_info(m).uses]
        if not users:
            raise ConfigError(
                f"{source}: params.{key}: no loss mode this sweep runs ({', '.join(allowed)}) reads "
                f"{setting}: every trial would draw it for nothing"
            )
        if len(users) < len(allowed):
            raise ConfigError(
                f"{source}: params.{key}: only mode {', '.join(users)} reads {setting}: add "
                f"`when: {{attention.mode: [{', '.join(users)}]}}` so the other modes' trials do not draw it"
            )


def one_selection_metric(trial: dict[str, Any], metric: str, source: str) -> None:
    """Each trial picks its best epoch on the sweep's metric: the searcher, ASHA and every
    ``best_val_*`` then rank one quantity. A trial config that names another is refused."""
    train = trial.setdefault("train", {})
    given = train.get("selection_metric") if isinstance(train, dict) else None
    if given is not None and given != metric:
        raise ConfigError(
            f"{source}: trial.train.selection_metric {given!r} differs from metric {metric!r}: trials "
            "would keep their best epoch on one while the searcher and ASHA rank the other. Set one of "
            "them (the sweep's metric is every trial's selection metric)"
        )
    if isinstance(train, dict):
        train["selection_metric"] = metric


def apply_sweep_overrides(raw: dict[str, Any], overrides: list[str]) -> None:
    """``key.sub=value`` overrides; ``params.<dotted.name>.<field>=value`` reaches into a parameter."""
    plain = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if key.startswith("params.") and sep and key.count(".") >= 2:
            name, _, field = key.removeprefix("params.").rpartition(".")
            params = raw.setdefault("params", {})
            if name not in params:
                raise ConfigError(f"override {item!r}: no searched parameter {name!r}; have {sorted(params)}")
            params[name][field] = yaml.safe_load(value)
        else:
            plain.append(item)
    apply_overrides(raw, plain)


def validate_trial(trial: dict[str, Any], overrides: dict[str, Any], source: str, where: str) -> TrialConfig:
    raw = copy.deepcopy(trial)
    try:
        for key, value in overrides.items():
            set_dotted(raw, key, value)
        return TrialConfig.from_dict(raw, source=f"{source}: {where}{_describe(overrides)}")
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {where}: {e}") from None


def _describe(overrides: dict[str, Any]) -> str:
    shown = flatten(overrides)
    return f" (with {', '.join(f'{k}={v!r}' for k, v in shown.items())})" if shown else ""
