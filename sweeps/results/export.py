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
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..tracking.lookup import RunRow, SelectionError, find_runs, open_store, row_from_run
from . import formats as exporters
from .model_card import META_FILE, export_meta, model_card, register_model
from .select import rank_runs

__all__ = [
    "META_FILE",
    "ExportError",
    "ExportResult",
    "best_seed_run",
    "export_model",
    "load_trained",
    "model_file",
    "parse_formats",
    "resolve_run",
    "staged_folder",
]

_RUN_ID = re.compile(r"[0-9a-f]{32}")


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
    configuration: RunRow | None = None  # seed repeats: the configuration's run (``run`` is its best seed)


def parse_formats(text: str) -> list[str]:
    """``"torchscript,onnx"`` → ``["torchscript", "onnx"]``; unknown names fail listing the supported."""
    wanted = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in wanted if f not in exporters.SUPPORTED_FORMATS]
    if bad or not wanted:
        raise ExportError(
            f"--format: unsupported export format(s) {bad or [text]}; "
            f"supported: {', '.join(exporters.SUPPORTED_FORMATS)}"
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


def best_seed_run(uri: str, run: RunRow) -> tuple[RunRow, RunRow | None]:
    """The run whose model an export takes, and the configuration it belongs to: a configuration
    trained with seed repeats (ranked on the mean over seeds) gives its best seed on validation,
    as the sweep chose it (tag ``cxr.best_seed_run``); any other run gives itself and None."""
    seed_id = run.tags.get("cxr.best_seed_run")
    if not seed_id:
        return run, None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        seed = MlflowClient(uri).get_run(seed_id)
    except MlflowException:
        raise ExportError(f"run {run.run_id}: its best seed's run {seed_id} is not in {uri}") from None
    return row_from_run(seed, run.experiment), run


def model_file(run: RunRow, workdir: Path) -> Path:
    """The run's ``model.pt`` as a local file (fetched into ``workdir`` from remote storage)."""
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
    run, configuration = best_seed_run(uri, run)
    out = Path(out_dir or f"export-{run.run_id[:8]}").resolve()
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists (pass --overwrite to replace it)")
    with staged_folder(out) as tmp:
        model, payload = load_trained(model_file(run, tmp))
        (tmp / "model.pt").unlink(missing_ok=True)  # a fetched remote copy is not part of the export
        x, x_source = _check_batch(payload)
        meta = export_meta(model, payload, run, uri)
        with torch.no_grad():
            reference = model(x)
        files: dict[str, Path] = {}
        diffs: dict[str, float] = {}
        example = x[:2]  # traced at batch 2, checked at batch len(x) and 1: the batch axis is dynamic
        for fmt in formats:
            path = tmp / exporters.FILES[fmt]
            meta.update(exporters.export_file(fmt, model, example, meta, path))
            diffs[fmt] = max(
                exporters.max_abs_diff(exporters.run_file(fmt, path, x), reference),
                exporters.max_abs_diff(exporters.run_file(fmt, path, x[:1]), reference[:1]),
            )
            if diffs[fmt] > atol:
                raise ExportError(
                    f"{fmt}: exported logits differ from PyTorch by {diffs[fmt]:.3g} > {atol:g} "
                    f"on {x_source}; nothing was written"
                )
            files[fmt] = out / exporters.FILES[fmt]
        meta.update(
            formats=formats,
            files={f: exporters.FILES[f] for f in formats},
            sha256={f: _sha256(tmp / exporters.FILES[f]) for f in formats},
            max_abs_logit_diff=diffs,
            atol=atol,
            check_batch=x_source,
        )
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        (tmp / "model_card.md").write_text(model_card(meta, payload, run, configuration))
    files.update({"meta": out / META_FILE, "card": out / "model_card.md"})
    result = ExportResult(out, run, files, diffs, meta=meta, configuration=configuration)
    if register:
        name = registered_name or f"cxr-{run.sweep}"
        result.registered = register_model(uri, run, model, x[:2], out, name, configuration)
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
