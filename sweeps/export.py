"""Export a trial's best model: TorchScript and ONNX, checked against PyTorch, with a model card,
registered in the MLflow Model Registry.

The model is rebuilt from the saved config (``create_backbone(..., pretrained_file=None)``: no
downloads) and loaded from the trial's ``model.pt`` — the best-validation epoch. Choices:

- **TorchScript** is traced with three methods: ``forward`` (logits), ``features`` (the backbone's
  last feature map, ``forward_features``) and ``head`` (``forward_head``). ``cxr-sweep predict``
  runs :func:`trainer.cam.grad_cam` on those two halves, so the exported file gives the *same*
  Grad-CAM as training and evaluation did (gradients flow through a loaded TorchScript module).
- **ONNX** (opset 18, ``torch.onnx.export(dynamo=True)``; the TorchScript-based exporter if that
  fails) holds ``image → logits`` with a dynamic batch axis and the preprocessing in its metadata.
  An ONNX graph has no autograd, so it serves probabilities only; CAMs need the TorchScript file.
- Each file is reloaded and run on a batch of a different size than it was traced with (test
  images from the trial's cache when readable, else a seeded random batch); the export fails
  unless the max abs logit difference to PyTorch is ≤ ``atol`` (1e-4).
- The registry gets the eager model via ``mlflow.pytorch.log_model(name="model",
  serialization_format="pt2")``: ``torch.export`` programs load without unpickling code. It is
  logged into the trial's own run, and every ``best_val_*`` / ``test_*`` metric becomes a tag of
  the new model version.

Files are written to a temporary folder and renamed into place, so a failed export leaves nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .select import RunRow, SelectionError, find_runs, open_store, rank_runs, row_from_run

__all__ = [
    "META_FILE",
    "SUPPORTED_FORMATS",
    "ExportError",
    "ExportResult",
    "export_model",
    "load_torchscript",
    "load_trained",
    "parse_formats",
    "resolve_run",
    "staged_folder",
]

SUPPORTED_FORMATS = ("torchscript", "onnx")
META_FILE = "export.json"  # what predict reads: classes, preprocessing, files
_FILES = {"torchscript": "model.torchscript.pt", "onnx": "model.onnx"}
_RUN_ID = re.compile(r"[0-9a-f]{32}")
_OPSET = 18


class ExportError(SelectionError):
    """The model cannot be found, rebuilt or exported faithfully."""


@dataclass
class ExportResult:
    out_dir: Path
    run: RunRow
    files: dict[str, Path]
    max_abs_diff: dict[str, float]
    registered: tuple[str, str] | None = None  # (registered model name, version)
    meta: dict[str, Any] = field(default_factory=dict)


def parse_formats(text: str) -> list[str]:
    """``"torchscript,onnx"`` → ``["torchscript", "onnx"]``; unknown names fail listing the supported."""
    wanted = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in wanted if f not in SUPPORTED_FORMATS]
    if bad or not wanted:
        raise ExportError(
            f"--format: unsupported export format(s) {bad or [text]}; "
            f"supported: {', '.join(SUPPORTED_FORMATS)}"
        )
    return list(dict.fromkeys(wanted))


# ---- which run, which file --------------------------------------------------------------------------
def resolve_run(
    source: str,
    *,
    storage: str | Path | None = None,
    tracking_uri: str | None = None,
    metric: str | None = None,
) -> tuple[str, RunRow]:
    """``source`` is an MLflow run id (that run) or a sweep name (its best run on validation)."""
    if _RUN_ID.fullmatch(source):
        uri = open_store(None, None, tracking_uri)
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        try:
            run = client.get_run(source)
        except MlflowException:
            raise ExportError(f"unknown run id {source!r} in {uri}") from None
        return uri, row_from_run(run, client.get_experiment(run.info.experiment_id).name)
    found = find_runs([source], storage=storage, tracking_uri=tracking_uri)
    return found.tracking_uri, rank_runs(found.runs, metric or found.default_metric)[0]


def _model_file(run: RunRow, workdir: Path) -> Path:
    uri = run.tags.get("cxr.model_uri") or (
        str(Path(run.params["output_dir"]) / "model.pt") if run.params.get("output_dir") else ""
    )
    if not uri:
        raise ExportError(
            f"run {run.run_id}: no model file recorded (tag cxr.model_uri) and no output_dir param"
        )
    if "://" in uri:  # remote sweep storage, e.g. s3://bucket/sweeps/.../model.pt
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(uri)
        local = workdir / "model.pt"
        try:
            with fs.open_input_stream(path) as src, open(local, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except OSError as e:
            raise ExportError(f"run {run.run_id}: cannot fetch its model file {uri}: {e}") from None
        return local
    path = Path(uri)
    if not path.is_file():
        raise ExportError(
            f"run {run.run_id}: its model file {path} does not exist (was the sweep storage moved?)"
        )
    return path


def load_trained(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the backbone from a ``model.pt`` payload (saved config, no download) with its weights."""
    from trainer.backbones import create_backbone

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ExportError(f"{path}: not a trial model file: {e}") from None
    missing = [k for k in ("state_dict", "backbone", "classes", "image_size", "config") if k not in payload]
    if missing:
        raise ExportError(f"{path}: not a trial model file (missing {missing})")
    model = create_backbone(
        payload["backbone"],
        num_classes=len(payload["classes"]),
        drop_rate=float(payload["config"].get("model", {}).get("drop_rate", 0.0)),
    )
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise ExportError(f"{path}: weights do not fit backbone {payload['backbone']!r}: {e}") from None
    return model.eval(), payload


# ---- the exported modules ---------------------------------------------------------------------------
class _Traceable(nn.Module):
    """``forward`` = logits; ``features`` / ``head`` = the two halves Grad-CAM differentiates between."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) → (B, K)
        return self.model(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) → the last feature map
        return self.model.forward_features(x)

    def head(self, feats: torch.Tensor) -> torch.Tensor:  # last feature map → (B, K)
        return self.model.forward_head(feats)


def _check_batch(payload: dict[str, Any], n: int = 6) -> tuple[torch.Tensor, str]:
    """Preprocessed test images of the trial's cache (as in evaluation), else a seeded random batch."""
    from trainer.data.cache import CacheDataset, collate_batch, open_cache
    from trainer.data.transforms import BatchTransform

    size = int(payload["image_size"])
    try:
        cache = open_cache(payload["config"]["data"]["cache"], classes=payload["classes"], verify=False)
        ds = CacheDataset(cache, "test")
        take = min(n, len(ds))
        if take >= 3:
            batch = collate_batch(ds.__getitems__(list(range(take))))
            return BatchTransform("cpu", size=size)(batch)[
                "image"
            ], f"{take} test images of the trial's cache"
    except Exception:  # the cache is not readable here (another machine): a random batch still checks
        pass
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=g), f"{n} random N(0, 1) images (cache not readable)"


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


@contextlib.contextmanager
def _jit_deprecation_quiet():
    """torch 2.14 flags torch.jit as deprecated on every call; TorchScript is what this export ships."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*deprecated")
        yield


def load_torchscript(path: str | Path, extra_files: dict[str, str] | None = None):
    """A TorchScript export on the CPU (``extra_files`` is filled in with the stored metadata)."""
    with _jit_deprecation_quiet():
        return torch.jit.load(str(path), map_location="cpu", _extra_files=extra_files or {})


def _export_torchscript(model: nn.Module, example: torch.Tensor, meta: dict, path: Path) -> None:
    wrapper = _Traceable(model).eval()
    with torch.no_grad(), _jit_deprecation_quiet():
        feats = model.forward_features(example)
        traced = torch.jit.trace_module(
            wrapper, {"forward": example, "features": example, "head": feats}, check_trace=False
        )
        torch.jit.save(traced, str(path), _extra_files={"cxr/meta.json": json.dumps(meta)})


def _run_torchscript(path: Path, x: torch.Tensor) -> torch.Tensor:
    module = load_torchscript(path)
    with torch.no_grad():
        return module(x)


def _export_onnx(model: nn.Module, example: torch.Tensor, meta: dict, path: Path) -> str:
    import onnx

    common = {"input_names": ["image"], "output_names": ["logits"], "opset_version": _OPSET}
    exporter = "dynamo"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                external_data=False,
                dynamic_shapes={"x": {0: batch}},
                **common,
            )
        except Exception:  # a backbone torch.export cannot capture: the TorchScript-based exporter
            exporter = "torchscript"
            axes = {"image": {0: "batch"}, "logits": {0: "batch"}}
            torch.onnx.export(model, (example,), str(path), dynamo=False, dynamic_axes=axes, **common)
    proto = onnx.load(str(path))
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"cxr.{k}", json.dumps(v)
    onnx.save(proto, str(path))
    return exporter


def _run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.numpy()})[0])


# ---- the whole export --------------------------------------------------------------------------------
def export_model(
    source: str,
    formats: list[str],
    out_dir: str | Path | None = None,
    *,
    storage: str | Path | None = None,
    tracking_uri: str | None = None,
    metric: str | None = None,
    atol: float = 1e-4,
    register: bool = True,
    registered_name: str | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Export the model of run/sweep ``source`` into ``out_dir`` (default ``./export-<run id prefix>``)."""
    uri, run = resolve_run(source, storage=storage, tracking_uri=tracking_uri, metric=metric)
    out = Path(out_dir or f"export-{run.run_id[:8]}").resolve()
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists (pass --overwrite to replace it)")
    with staged_folder(out) as tmp:
        model, payload = load_trained(_model_file(run, tmp))
        (tmp / "model.pt").unlink(missing_ok=True)  # a fetched remote copy is not part of the export
        x, x_source = _check_batch(payload)
        meta = _meta(model, payload, run, uri)
        with torch.no_grad():
            reference = model(x)
        files: dict[str, Path] = {}
        diffs: dict[str, float] = {}
        example = x[:2]  # traced at batch 2, checked at batch len(x) and 1: the batch axis is dynamic
        for fmt in formats:
            path = tmp / _FILES[fmt]
            if fmt == "torchscript":
                _export_torchscript(model, example, meta, path)
                run_file = _run_torchscript
            else:
                meta["onnx_exporter"] = _export_onnx(model, example, meta, path)
                run_file = _run_onnx
            diffs[fmt] = max(_diff(run_file(path, x), reference), _diff(run_file(path, x[:1]), reference[:1]))
            if diffs[fmt] > atol:
                raise ExportError(
                    f"{fmt}: exported logits differ from PyTorch by {diffs[fmt]:.3g} > {atol:g} "
                    f"on {x_source}; nothing was written"
                )
            files[fmt] = out / _FILES[fmt]
        meta.update(
            formats=formats,
            files={f: _FILES[f] for f in formats},
            sha256={f: _sha256(tmp / _FILES[f]) for f in formats},
            max_abs_logit_diff=diffs,
            atol=atol,
            check_batch=x_source,
        )
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        (tmp / "model_card.md").write_text(_model_card(meta, payload, run))
    files.update({"meta": out / META_FILE, "card": out / "model_card.md"})
    result = ExportResult(out, run, files, diffs, meta=meta)
    if register:
        result.registered = _register(uri, run, model, x[:2], out, registered_name or f"cxr-{run.sweep}")
    return result


@contextlib.contextmanager
def staged_folder(out: Path):
    """Yield a temporary sibling of ``out``; on success it replaces ``out``, on any error it is removed.

    Readers never see a half-written folder: an export or a prediction is complete or absent.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _meta(model: nn.Module, payload: dict[str, Any], run: RunRow, uri: str) -> dict[str, Any]:
    info = getattr(model, "feature_info", None)
    layer = info[-1]["module"] if info else "forward_features output"
    cache = payload["config"]["data"]["cache"]
    return {
        "run_id": run.run_id,
        "run_name": run.run_name,
        "sweep": run.sweep,
        "tracking_uri": uri,
        "backbone": payload["backbone"],
        "task": payload["config"]["data"]["task"],
        "classes": list(payload["classes"]),
        "image_size": int(payload["image_size"]),
        "cache_size": _cache_header(cache).get("size", int(payload["image_size"])),
        "normalization": payload.get("normalization", {"mean": 0.5, "std": 0.5}),
        "input": "grey image resized to image_size, scaled to [0, 1], (x - mean) / std, as 3 channels",
        "best_epoch": int(payload.get("epoch", -1)),
        "cam_target_layer": layer,
        "cam_score": payload["config"].get("attention", {}).get("cam_score", "logit"),
        "num_features": int(getattr(model, "num_features", 0)),
        "num_prefix_tokens": int(getattr(model, "num_prefix_tokens", 0)),
        "dataset_cache": str(cache),
        "dataset_cache_hash": run.tags.get("cxr.cache_hash")
        or _cache_header(cache).get("content_hash", "unknown (cache header not readable here)"),
        "data_access": run.tags.get("cxr.data_access", ""),
    }


def _cache_header(cache: str) -> dict[str, Any]:
    """The trial cache's header, or ``{}`` where it is not readable (export on another machine)."""
    try:
        return json.loads((Path(cache) / "header.json").read_text())
    except (OSError, ValueError):
        return {}


def _model_card(meta: dict[str, Any], payload: dict[str, Any], run: RunRow) -> str:
    from trainer.metrics import METRIC_NAMES

    from .select import LOCALIZATION_METRICS

    rows = []
    for name in (*METRIC_NAMES, *LOCALIZATION_METRICS):
        v, t = run.metrics.get(f"best_val_{name}"), run.metrics.get(f"test_{name}")
        if v is not None or t is not None:
            rows.append(f"| {name} | {'' if v is None else f'{v:.4f}'} | {'' if t is None else f'{t:.4f}'} |")
    norm = meta["normalization"]
    files = ", ".join(f"`{f}` (sha256 {meta['sha256'][k][:12]}…)" for k, f in meta["files"].items())
    diffs = ", ".join(f"{k} {v:.2e}" for k, v in meta["max_abs_logit_diff"].items())
    return "\n".join(
        [
            f"# Model card: {meta['backbone']} for {meta['task']} ({', '.join(meta['classes'])})",
            "",
            f"- MLflow run `{run.run_id}` ({run.run_name}), sweep `{run.sweep}`, "
            f"store `{meta['tracking_uri']}`",
            f"- Weights: the epoch with the best validation score (epoch {meta['best_epoch']}); "
            f"selection metric `{payload['config']['train']['selection_metric']}` — test data never chose.",
            f"- Dataset cache: `{meta['dataset_cache']}`, content hash `{meta['dataset_cache_hash']}`"
            + (f", access `{meta['data_access']}`" if meta["data_access"] else ""),
            f"- Input: {meta['input']} (image_size {meta['image_size']}, "
            f"mean {norm['mean']}, std {norm['std']}).",
            f"- Output: logits over {meta['classes']}; softmax gives probabilities.",
            f"- Grad-CAM target layer: `{meta['cam_target_layer']}` (the backbone's last feature map, "
            "timm `forward_features`); the TorchScript file exposes `features` and `head` for it. "
            f"Score differentiated: `{meta.get('cam_score', 'logit')}` (as in training).",
            f"- Files: {files}; max abs logit difference to PyTorch {diffs} on {meta['check_batch']} "
            f"(tolerance {meta['atol']:g}).",
            "",
            "## Metrics (best validation epoch; test split)",
            "",
            "| metric | validation | test |",
            "|---|---:|---:|",
            *rows,
            "",
            "Youden's index = sensitivity + specificity − 1; DP = discriminant power (√3/π, base-10 logs).",
            "",
            "## Intended use",
            "",
            "Research on localization-aware chest X-ray classification (Wu et al. 2026): comparing "
            "training settings, studying where the classifier looks (Grad-CAM), reproducing tables.",
            "",
            "## Limitations",
            "",
            "- **Research use only. Not a medical device**; not validated for diagnosis, triage or any "
            "clinical decision.",
            "- Trained and tested on one dataset cache only (see its hash); performance on other "
            "hospitals, scanners, projections or populations is unknown. Synthetic phantoms are not X-rays.",
            "- Probabilities are not calibrated. The classes are the task's only: an image with any "
            "other finding still gets one of these labels.",
            "- Grad-CAM shows where the score is sensitive, not a segmentation of the lesion.",
            "",
            "## Training configuration",
            "",
            "```yaml",
            yaml.safe_dump(payload["config"], sort_keys=False).rstrip(),
            "```",
            "",
        ]
    )


@contextlib.contextmanager
def _fluent_uris(uri: str):
    """Point MLflow's fluent API (``log_model`` needs it) at ``uri``, then restore the process exactly.

    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI``; left behind, it would redirect
    every later store lookup of this process (and its children).
    """
    import mlflow

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])  # None: unset, back to the default
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)


def _register(
    uri: str, run: RunRow, model: nn.Module, example: torch.Tensor, out: Path, name: str
) -> tuple[str, str]:
    """Log the model into its trial run (pt2) and register it; metrics become version tags."""
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    with _fluent_uris(uri), mlflow.start_run(run_id=run.run_id):
        info = mlflow.pytorch.log_model(
            pytorch_model=model,
            name="model",
            registered_model_name=name,
            serialization_format="pt2",
            input_example=example.numpy(),
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            metadata={"classes": json.dumps(json.loads((out / META_FILE).read_text())["classes"])},
            await_registration_for=60,
        )
        mlflow.log_artifact(str(out / "model_card.md"), artifact_path="export")
        mlflow.log_artifact(str(out / META_FILE), artifact_path="export")
    version = str(info.registered_model_version)
    client = MlflowClient(uri, registry_uri=uri)
    tags = {k: repr(v) for k, v in run.metrics.items() if k.startswith(("best_val_", "test_"))}
    tags.update({"cxr.run_id": run.run_id, "cxr.sweep": run.sweep, "cxr.export_dir": str(out)})
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    client.update_model_version(name, version, description=(out / "model_card.md").read_text()[:5000])
    return name, version
