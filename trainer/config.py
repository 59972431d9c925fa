"""The typed, validated configuration of one trial.

One :class:`TrialConfig` describes everything a trial needs. It loads from YAML
(:meth:`TrialConfig.from_file`), rejects unknown keys, validates ranges, and is saved
resolved next to every run (:meth:`TrialConfig.save`). Names of backbones, loss modes,
λ schedules, region priors and tasks are checked against their registries so a typo fails
early with the list of valid names.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .dotted import apply_overrides, flatten, format_validation_error, load_yaml_mapping
from .errors import ConfigError
from .loss_modes import mode_info
from .metrics.names import check_metric, higher_is_better, logged_names
from .presets import apply_preset
from .priors import DEFAULT_PRIORS, RegionPrior, create_prior
from .schedules import FIXED, create_schedule, resolve_schedule, schedule_names, schedule_parameters
from .tasks import TASKS, classes_for

__all__ = [
    "AttentionConfig",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OutsideConfig",
    "TrainConfig",
    "TrialConfig",
    "load_config",
    "resolve_priors_file",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class DataConfig(_Strict):
    cache: Path = Field(description="Dataset cache directory written by `cxr-sweep prepare`/`phantoms`.")
    task: str = Field("ne", description="Task name: " + ", ".join(TASKS) + " (fixes the class list).")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (0 = main process).")
    augment: bool = Field(False, description="Random affine + intensity augmentation (kornia), on device.")

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        classes_for(v)
        return v

    @property
    def classes(self) -> tuple[str, ...]:
        return classes_for(self.task)


class ModelConfig(_Strict):
    backbone: str = Field("resnet18", description="Registered backbone or any timm model name.")
    pretrained_file: Path | None = Field(
        None, description="Local weight file (.pth/.safetensors) to initialise the backbone from."
    )
    image_size: int | None = Field(
        None, ge=16, le=2048, description="Network input size; default: the cache's image size."
    )
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout before the classifier.")

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, v: str) -> str:
        from .backbones import check_backbone_name

        check_backbone_name(v)
        return v


class TrainConfig(_Strict):
    epochs: int = Field(100, ge=1, description="Maximum number of epochs.")
    batch_size: int = Field(32, ge=1, description="Images per optimisation step.")
    optimizer: Literal["adam", "adamw", "sgd"] = Field("adam", description="Optimiser.")
    lr: float = Field(1e-5, gt=0.0, le=1.0, description="Learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="Weight decay.")
    plateau_factor: float = Field(0.1, gt=0.0, lt=1.0, description="ReduceLROnPlateau factor.")
    plateau_patience: int = Field(10, ge=0, description="ReduceLROnPlateau patience (epochs).")
    plateau_on: Literal["selection", "val_loss"] = Field(
        "selection",
        description="What ReduceLROnPlateau watches: the selection metric (in its direction), or the "
        "validation loss λ·CE + (1−λ)·L_att (min; the authors').",
    )
    plateau_min_lr: float = Field(0.0, ge=0.0, description="ReduceLROnPlateau min_lr (the authors': 1e-10).")
    early_stop_patience: int = Field(30, ge=1, description="Stop after this many epochs without improvement.")
    early_stop: Literal["consecutive", "total"] = Field(
        "consecutive",
        description="Count non-improving epochs in a row (reset on improvement) or in total (never reset: "
        "the authors').",
    )
    selection_metric: str = Field(
        "val_f1_macro", description="Validation metric that selects the best epoch (never a test metric)."
    )
    seed: int = Field(0, ge=0, description="Seed for weights, data order and augmentation.")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N (auto = first visible CUDA device).")
    amp: bool = Field(True, description="Mixed precision (bf16 where supported) on CUDA; ignored on CPU.")
    channels_last: bool = Field(True, description="channels_last memory format on CUDA.")
    compile_attention: bool = Field(
        False,
        description="torch.compile the attention term's CAM → region → loss tail into a few fused "
        "kernels on CUDA (ignored on CPU; falls back to eager with a warning if compiling fails).",
    )
    deterministic: bool = Field(True, description="Deterministic algorithms (always exact on CPU).")

    @field_validator("selection_metric")
    @classmethod
    def _validation_only(cls, v: str) -> str:
        if not v.startswith("val_"):
            raise ValueError(
                f"selection_metric must be a validation metric (val_*), got {v!r}: "
                "test data is never used to choose"
            )
        check_metric(v, logged_names("val_"), "a validation metric a trial logs")
        higher_is_better(v)  # a score, with a direction to select on
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in {"auto", "cpu", "cuda"} or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {v!r}")


class AttentionConfig(_Strict):
    lambda_: float | str = Field(
        1.0,
        alias="lambda",
        description="Weight of cross-entropy: L = λ·CE + (1−λ)·L_att. A number in [0, 1] (1 = plain CE), "
        "or the name of a λ schedule: " + ", ".join(schedule_names()) + " (trainer/schedules.py).",
    )
    schedule: dict[str, float] = Field(
        default_factory=dict,
        validate_default=True,
        description="Parameters of the λ schedule that `lambda` names, e.g. {slope: 0.023, floor: 0.2} for "
        "adaptive; the schedule's defaults fill what is left out. Empty for a fixed λ.",
    )
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="CAM threshold t of the attention loss.")
    mode: str = Field("paper", description="Attention-loss mode: paper | soft | energy | input_grad.")
    tau: float = Field(0.05, gt=0.0, description="Temperature τ of the soft threshold (mode soft).")
    cam_target: Literal["predicted", "label"] = Field(
        "predicted", description="Class whose Grad-CAM is steered: the predicted class (paper) or the label."
    )
    cam_pass: Literal["train", "eval"] = Field(
        "train",
        description="Where the training CAM comes from: the training forward pass itself (one forward; "
        "BatchNorm batch statistics, dropout on) or a second pass in eval mode (running statistics, no "
        "dropout: the authors'; one more forward, and its backward for a differentiable mode).",
    )
    cam_score: Literal["logit", "log_softmax"] = Field(
        "logit",
        description=(
            "What the Grad-CAM differentiates: the class logit (Grad-CAM, the paper) or its log-softmax "
            "(class-contrastive: evidence routed into another class's logit shows up). Used by the loss "
            "and the CAM metrics."
        ),
    )
    input_region: Literal["lung", "prior"] = Field(
        "lung",
        description="Where mode input_grad lets the decision read: the dilated lung mask "
        "(outside.dilate_px) or each finding's region prior (the lung mask for No Finding).",
    )
    layer: Literal["last", "previous"] = Field(
        "last",
        description="Where the Grad-CAM is taken: the last feature map, or the stage before it at twice "
        "the resolution (ResNet layer3, PVT stages.2, VGG before its last pool). Used by the loss and the "
        "CAM metrics.",
    )
    priors: dict[str, RegionPrior] = Field(
        default_factory=lambda: dict(DEFAULT_PRIORS),
        description=(
            "Region prior per pathology class name: a registered prior's name (lower_lung, upper_lung, "
            "outside_lung_columns, whole_lung), an inline {x, y, columns} relative to the lung box, or the "
            "path of a priors YAML written by `cxr-sweep prior` (its classes replace the defaults)."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _schedule_parameters_beside_lambda(cls, data: Any) -> Any:
        """Configs written before ``schedule`` existed give a schedule's parameters beside λ
        (``attention: {lambda: adaptive, slope: 0.05}``): they move into ``schedule``. Beside a fixed
        λ they never had an effect, and are dropped."""
        if not isinstance(data, dict):
            return data
        lam = data.get("lambda", data.get("lambda_"))
        loose = [
            k
            for k in data
            if k not in cls.model_fields
            and k != "lambda"
            and any(k in schedule_parameters(n) for n in schedule_names())
        ]
        if not loose:
            return data
        data = dict(data)
        if isinstance(lam, str) and lam in schedule_names():
            own = schedule_parameters(lam)
            schedule = dict(data.get("schedule") or {})
            for k in loose:
                if k in own:
                    schedule.setdefault(k, data.pop(k))
            data["schedule"] = schedule
        elif not isinstance(lam, str):
            for k in loose:
                data.pop(k)
        return data

    @field_validator("lambda_")
    @classmethod
    def _lambda(cls, v: float | str) -> float | str:
        if isinstance(v, str) and v in schedule_names():
            return v
        try:
            create_schedule(FIXED, value=float(v))  # the range check
        except ValueError:
            schedules = ", ".join(schedule_names())
            raise ValueError(f"lambda must be in [0, 1] or a λ schedule ({schedules}), got {v!r}") from None
        return float(v)

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, v: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        lam = info.data.get("lambda_")
        if isinstance(lam, str):
            return resolve_schedule(lam, v)
        if v and lam is not None:
            raise ValueError(f"a fixed lambda ({lam}) takes no schedule parameters, got {', '.join(v)}")
        return v

    @field_validator("priors", mode="before")
    @classmethod
    def _priors(cls, v: Any) -> Any:
        if isinstance(v, str | Path):
            from .priors import load_priors

            return {**DEFAULT_PRIORS, **load_priors(v)}
        if isinstance(v, Mapping):
            return {k: create_prior(p) if isinstance(p, str) else p for k, p in v.items()}
        return v

    @field_validator("mode")
    @classmethod
    def _known_mode(cls, v: str) -> str:
        mode_info(v)  # raises with the registered names
        return v

    @property
    def loss_mode(self):
        """The :class:`~trainer.attention_loss.LossMode` that ``mode`` names."""
        from .attention_loss import create_loss_mode

        return create_loss_mode(self.mode)

    @property
    def uses_attention(self) -> bool:
        """False when λ is fixed at 1: the step is plain cross-entropy and no CAM is needed."""
        return self.lambda_ != 1.0

    def inactive(self) -> set[str]:
        """Settings that take no effect in this configuration: those the loss mode does not read
        (threshold for energy, tau for paper), and every setting of the attention loss when λ is
        fixed at 1 (plain cross-entropy; ``cam_score`` and ``priors`` still shape the CAM metrics)."""
        if not self.uses_attention:
            return {"mode", "threshold", "tau", "cam_target", "cam_pass", "input_region"}
        info = mode_info(self.mode)
        cam_rule = {"cam_target", "cam_pass", "layer"} if info.input_gradient else set()
        return ({"threshold", "tau", "input_region"} - info.uses) | cam_rule

    def lambda_at(self, epoch: int) -> float:
        """λ of ``epoch`` (counted from 0)."""
        if isinstance(self.lambda_, str):
            return create_schedule(self.lambda_, **self.schedule)(epoch)
        return create_schedule(FIXED, value=self.lambda_)(epoch)


class OutsideConfig(_Strict):
    """What the decision reads outside the lungs (:mod:`trainer.outside`): the score, and the augmentation."""

    score: bool = Field(
        True,
        description="Log outside_evidence, outside_dependence, inside_only_accuracy and "
        "inside_only_f1_macro: the model asked again with everything outside the dilated lung mask "
        "replaced by `fill` (validation every epoch, test at the end; one more forward pass per "
        "evaluated image).",
    )
    subset: int = Field(
        0, ge=0, description="Score the first N validation images each epoch (0 = all); test: always all."
    )
    fill: Literal["mean", "blur", "noise"] = Field(
        "mean", description="What replaces the outside: the image's mean, a heavy blur, or matched noise."
    )
    dilate_px: int = Field(8, ge=0, le=64, description="Lung-mask dilation in pixels at 224 px (scaled).")
    augment: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Share of training images whose outside is replaced by `fill` (the outside_mask "
        "augmentation, a data-level baseline; 0 = off).",
    )


class TrialConfig(_Strict):
    preset: str | None = Field(
        None, description="A named set of defaults under this config (trainer/presets.py): paper."
    )
    name: str = Field("trial", min_length=1, description="Trial name (run name in MLflow).")
    output_dir: Path = Field(Path("runs/trial"), description="Where checkpoints and artifacts go.")
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    attention: AttentionConfig = Field(default_factory=AttentionConfig)
    outside: OutsideConfig = Field(default_factory=OutsideConfig)

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        return apply_preset(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _a_step_that_trains(self) -> TrialConfig:
        if self.attention.uses_attention and not mode_info(self.attention.mode).differentiable:
            zero = [e for e in range(self.train.epochs) if self.attention.lambda_at(e) == 0.0]
            if zero:
                raise ValueError(
                    f"attention.lambda: λ reaches 0 at epoch {zero[0]} with mode {self.attention.mode!r}, "
                    "whose attention term has no gradient: those epochs would train nothing (use a "
                    "differentiable mode, soft or energy, or keep λ > 0)"
                )
        return self

    @model_validator(mode="after")
    def _priors_cover_task(self) -> TrialConfig:
        missing = [c for c in self.data.classes[1:] if c not in self.attention.priors]
        if missing and self.attention.uses_attention:
            raise ValueError(
                f"attention.priors: no region prior for {missing}; "
                f"priors given for: {sorted(self.attention.priors)}"
            )
        return self

    # ---- loading and saving -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> TrialConfig:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, source)) from None

    @classmethod
    def from_file(cls, path: str | Path, overrides: list[str] | None = None) -> TrialConfig:
        path = Path(path)
        raw = load_yaml_mapping(path, "config file")
        apply_overrides(raw, overrides or [])
        resolve_priors_file(raw, path.parent)
        cfg = cls.from_dict(raw, source=str(path))
        return cfg.resolve_paths(base=path.parent)

    def resolve_paths(self, base: Path | None = None) -> TrialConfig:
        """Make every path absolute (relative ones against ``base`` or the cwd): Ray moves cwd."""
        base = Path.cwd() if base is None else Path(base).resolve()

        def _abs(p: Path | None) -> Path | None:
            if p is None:
                return None
            p = p.expanduser()
            return p if p.is_absolute() else (base / p).resolve()

        upd = self.model_copy(deep=True)
        upd.output_dir = _abs(self.output_dir)
        upd.data.cache = _abs(self.data.cache)
        upd.model.pretrained_file = _abs(self.model.pretrained_file)
        return upd

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        tmp.replace(path)
        return path

    def flat_params(self) -> dict[str, str]:
        """The config as flat ``section.key`` → string (MLflow params), without the attention
        settings that take no effect in it (:meth:`AttentionConfig.inactive`): a parameter shown
        for a run is one that shaped it."""
        unused = {f"attention.{k}" for k in self.attention.inactive()}
        flat = flatten(self.to_dict())
        return {k: "" if v is None else str(v) for k, v in flat.items() if k not in unused}


def resolve_priors_file(raw: dict[str, Any], base: Path) -> None:
    """A relative ``attention.priors`` file path in a config mapping is relative to the file's folder."""
    att = raw.get("attention")
    if isinstance(att, dict) and isinstance(att.get("priors"), str):
        p = Path(att["priors"]).expanduser()
        att["priors"] = str(p if p.is_absolute() else (Path(base).resolve() / p))


def load_config(source: str | Path | dict[str, Any] | TrialConfig) -> TrialConfig:
    """Accept a TrialConfig, a dict (e.g. from Ray Tune) or a YAML path."""
    if isinstance(source, TrialConfig):
        return source
    if isinstance(source, dict):
        return TrialConfig.from_dict(source)
    return TrialConfig.from_file(source)
