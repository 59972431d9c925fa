"""What an export says about itself: its metadata (``export.json``), the model card, and its entry
in the MLflow Model Registry (the eager model as a ``torch.export`` program, metrics as tags).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from trainer.data.cache import read_header
from trainer.metrics import LOCALIZATION_METRICS, METRIC_NAMES

from ..tracking.lookup import RunRow

__all__ = ["META_FILE", "export_meta", "model_card", "register_model"]

META_FILE = "export.json"  # what predict reads: classes, preprocessing, files


def export_meta(model: nn.Module, payload: dict[str, Any], run: RunRow, uri: str) -> dict[str, Any]:
    """The export's metadata before its files are written (``files``, hashes and checks come later)."""
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
        "cache_size": read_header(cache).get("size", int(payload["image_size"])),
        "normalization": payload.get("normalization", {"mean": 0.5, "std": 0.5}),
        "input": "grey image resized to image_size, scaled to [0, 1], (x - mean) / std, as 3 channels",
        "best_epoch": int(payload.get("epoch", -1)),
        "cam_target_layer": layer,
        "cam_score": payload["config"].get("attention", {}).get("cam_score", "logit"),
        "num_features": int(getattr(model, "num_features", 0)),
        "num_prefix_tokens": int(getattr(model, "num_prefix_tokens", 0)),
        "dataset_cache": str(cache),
        "dataset_cache_hash": run.tags.get("cxr.cache_hash")
        or read_header(cache).get("content_hash", "unknown (cache header not readable here)"),
        "data_access": run.tags.get("cxr.data_access", ""),
    }


def _seed_section(run: RunRow, configuration: RunRow | None, selection: str) -> list[str]:
    """What a model card says of seed repeats: which seed this is, and its configuration's spread."""
    if configuration is None:
        return []
    k = configuration.tags.get("cxr.repeats", "?")
    seed = run.params.get("train.seed", configuration.tags.get("cxr.best_seed", "?"))
    rows = []
    for name in (*METRIC_NAMES, *LOCALIZATION_METRICS):
        m = configuration.metrics
        if f"test_{name}" not in m:
            continue
        cell = [f"{m[f'test_{name}']:.4f}"]
        if f"test_{name}_std" in m:
            cell.append(f"± {m[f'test_{name}_std']:.4f}")
        if f"test_{name}_ci_low" in m:
            cell.append(f"[{m[f'test_{name}_ci_low']:.4f}, {m[f'test_{name}_ci_high']:.4f}]")
        rows.append(f"| {name} | {' '.join(cell)} |")
    return [
        "## Seed repeats",
        "",
        f"This configuration (MLflow run `{configuration.run_id}`, {configuration.run_name}) was trained "
        f"with {k} seeds; the sweep ranked it on their mean. **This model is seed {seed}'s** (run "
        f"`{run.run_id}`), the best of the {k} on validation `{selection}`; the metrics above are this "
        "seed's. Another seed of the same configuration would score differently by about the spread "
        "below (test split, mean ± standard deviation over seeds [95 % t-interval of the mean]):",
        "",
        "| metric | mean ± std [95 % CI] |",
        "|---|---|",
        *rows,
        "",
    ]


def model_card(
    meta: dict[str, Any], payload: dict[str, Any], run: RunRow, configuration: RunRow | None = None
) -> str:
    """The Markdown model card of an export (``configuration``: the repeated configuration of a seed)."""
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
            f"- Weights: the epoch with the best validation score (epoch {meta['best_epoch']}, "
            "counted from 0); "
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
            *_seed_section(run, configuration, payload["config"]["train"]["selection_metric"]),
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


def register_model(
    uri: str,
    run: RunRow,
    model: nn.Module,
    example: torch.Tensor,
    out: Path,
    name: str,
    configuration: RunRow | None = None,
) -> tuple[str, str]:
    """Log the model into the run that trained it (pt2) and register it; its metrics become version
    tags (a seed's: plus the configuration run it belongs to)."""
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri, registry_uri=uri)
    ended = client.get_run(run.run_id).info  # start_run/end_run would restamp the trial's end time
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
    client.set_terminated(run.run_id, status=ended.status, end_time=ended.end_time)
    version = str(info.registered_model_version)
    tags = {k: repr(v) for k, v in run.metrics.items() if k.startswith(("best_val_", "test_"))}
    tags.update({"cxr.run_id": run.run_id, "cxr.sweep": run.sweep, "cxr.export_dir": str(out)})
    if configuration is not None:
        tags["cxr.configuration_run"] = configuration.run_id
        tags["cxr.seed"] = run.params.get("train.seed", "")
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    client.update_model_version(name, version, description=(out / "model_card.md").read_text()[:5000])
    return name, version
