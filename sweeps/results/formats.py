"""The export formats: TorchScript (logits, and the two halves Grad-CAM needs) and ONNX (logits),
each written by one function and run back by another so the export can check it.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "FILES",
    "SUPPORTED_FORMATS",
    "export_file",
    "export_onnx",
    "export_torchscript",
    "load_torchscript",
    "max_abs_diff",
    "run_file",
    "run_onnx",
    "run_torchscript",
]

FILES = {"torchscript": "model.torchscript.pt", "onnx": "model.onnx"}  # format → file in an export
SUPPORTED_FORMATS = tuple(FILES)
_OPSET = 18


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


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
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


def export_torchscript(model: nn.Module, example: torch.Tensor, meta: dict, path: Path) -> None:
    wrapper = _Traceable(model).eval()
    with torch.no_grad(), _jit_deprecation_quiet():
        feats = model.forward_features(example)
        traced = torch.jit.trace_module(
            wrapper, {"forward": example, "features": example, "head": feats}, check_trace=False
        )
        torch.jit.save(traced, str(path), _extra_files={"cxr/meta.json": json.dumps(meta)})


def run_torchscript(path: Path, x: torch.Tensor) -> torch.Tensor:
    module = load_torchscript(path)
    with torch.no_grad():
        return module(x)


def export_onnx(model: nn.Module, example: torch.Tensor, meta: dict, path: Path) -> str:
    import onnx

    common = {"input_names": ["image"], "output_names": ["logits"], "opset_version": _OPSET}
    common["verbose"] = os.environ.get("CXR_VERBOSE", "0") not in ("", "0")  # progress lines: CXR_VERBOSE=1
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


def run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def export_file(fmt: str, model: nn.Module, example: torch.Tensor, meta: dict, path: Path) -> dict[str, Any]:
    """Write ``model`` in format ``fmt`` to ``path``; return what the export's metadata should add."""
    if fmt == "torchscript":
        export_torchscript(model, example, meta, path)
        return {}
    return {"onnx_exporter": export_onnx(model, example, meta, path)}


def run_file(fmt: str, path: Path, x: torch.Tensor) -> torch.Tensor:
    """Logits of the exported file ``path`` (format ``fmt``) on ``x``."""
    return run_torchscript(path, x) if fmt == "torchscript" else run_onnx(path, x)
