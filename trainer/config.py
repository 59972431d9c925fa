"""The typed, validated configuration of one trial.

One :class:`TrialConfig` describes everything a trial needs. It loads from YAML
(:meth:`TrialConfig.from_file`), rejects unknown keys, validates ranges, and is saved
resolved next to every run (:meth:`TrialConfig.save`). Names of backbones, loss modes,
λ schedules and tasks are checked against their registries so a typo fails early with
the list of valid names.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .priors import DEFAULT_PRIORS, RegionPrior
from .tasks import TASKS, classes_for

__all__ = [
    "AttentionConfig",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "TrialConfig",
    "apply_overrides",
    "format_validation_error",
    "load_config",
    "load_yaml_mapping",
    "resolve_priors_file",
    "set_dotted",
]


class ConfigError(ValueError):
    """A configuration problem; the message names the file and the field."""


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
    early_stop_patience: int = Field(30, ge=1, description="Stop after this many epochs without improvement.")
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
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in {"auto", "cpu", "cuda"} or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {v!r}")


class AttentionConfig(_Strict):
    lambda_: float | Literal["adaptive"] = Field(
        1.0,
        alias="lambda",
        description="Weight of cross-entropy: L = λ·CE + (1−λ)·L_att. 1 = plain CE; 'adaptive' = schedule.",
    )
    slope: float = Field(0.023, gt=0.0, description="Adaptive λ: λ_epoch = max(floor, 1 − slope·epoch).")
    floor: float = Field(0.2, ge=0.0, le=1.0, description="Adaptive λ floor.")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="CAM threshold t of the attention loss.")
    mode: str = Field("paper", description="Attention-loss mode: paper | soft | energy.")
    tau: float = Field(0.05, gt=0.0, description="Temperature τ of the soft threshold (mode soft).")
    cam_target: Literal["predicted", "label"] = Field(
        "predicted", description="Class whose Grad-CAM is steered: the predicted class (paper) or the label."
    )
    cam_score: Literal["logit", "log_softmax"] = Field(
        "logit",
        description=(
            "What the Grad-CAM differentiates: the class logit (Grad-CAM, the paper) or its log-softmax "
            "(class-contrastive: evidence routed into another class's logit shows up). Used by the loss "
            "and the CAM metrics."
        ),
    )
    priors: dict[str, RegionPrior] = Field(
        default_factory=lambda: dict(DEFAULT_PRIORS),
        description=(
            "Region prior per pathology class name (relative to the lung box), or the path of a "
            "priors YAML written by `cxr-sweep prior` (its classes replace the defaults)."
        ),
    )

    @field_validator("priors", mode="before")
    @classmethod
    def _priors_file(cls, v: Any) -> Any:
        if isinstance(v, str | Path):
            from .priors import load_priors

            return {**DEFAULT_PRIORS, **load_priors(v)}
        return v

    @field_validator("lambda_")
    @classmethod
    def _lambda_range(cls, v: float | str) -> float | str:
        if isinstance(v, str):
            return v
        if not (0.0 <= v <= 1.0) or math.isnan(v):
            raise ValueError(f"lambda must be in [0, 1] or 'adaptive', got {v}")
        return float(v)

    @field_validator("mode")
    @classmethod
    def _known_mode(cls, v: str) -> str:
        from .attention_loss import LOSS_MODES

        LOSS_MODES.get(v)
        return v

    @property
    def uses_attention(self) -> bool:
        """False when λ is fixed at 1: the step is plain cross-entropy and no CAM is needed."""
        return self.lambda_ != 1.0

    def lambda_at(self, epoch: int) -> float:
        from .schedules import create_schedule

        if self.lambda_ == "adaptive":
            return create_schedule("adaptive", slope=self.slope, floor=self.floor)(epoch)
        return create_schedule("fixed", value=float(self.lambda_))(epoch)


class TrialConfig(_Strict):
    name: str = Field("trial", min_length=1, description="Trial name (run name in MLflow).")
    output_dir: Path = Field(Path("runs/trial"), description="Where checkpoints and artifacts go.")
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    attention: AttentionConfig = Field(default_factory=AttentionConfig)

    @model_validator(mode="after")
    def _priors_cover_task(self) -> TrialConfig:
        missing = [c for c in self.data.classes[1:] if c not in self.attention.priors]
        if missing and self.attention.uses_attention:
            raise ValueError(
                f"attention.priors has no region prior for {missing}; "
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
        """The config as flat ``section.key`` → string (MLflow params)."""
        out: dict[str, str] = {}

        def walk(prefix: str, obj: Any) -> None:
            if isinstance(obj, dict):
                for k, v in obj.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                out[prefix] = "" if obj is None else str(obj)

        walk("", self.to_dict())
        return out


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


def load_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """A YAML file's top-level mapping; a missing file, bad YAML or a non-mapping names the file."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """``raw["a"]["b"]["c"] = value`` for ``key`` ``"a.b.c"``, creating missing sections."""
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part!r} is not a config section")
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML scalars) in place."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        set_dotted(raw, key, yaml.safe_load(value) if value != "" else None)
    return raw


def format_validation_error(e: ValidationError, source: str, what: str = "trial config") -> str:
    """One line per problem, each naming the field (``a.b.c``); unknown keys said plainly."""
    lines = [f"{source}: invalid {what}"]
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)
