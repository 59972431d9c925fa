"""Attention-loss training step ÷ cross-entropy step, side by side on the same model and batch.

Every step is the product's own :func:`trainer.epoch.training_step` (λ = 1 is the plain CE
path, no CAM); the attention steps run λ = 0.5 in ``soft`` (CAM differentiable w.r.t. the
parameters) and ``paper`` (no gradient through the CAM) modes. For backbones where Grad-CAM
takes a head shortcut (VGG, see :mod:`trainer.cam`), ``soft_ref`` runs the same soft step with
the reference double backward through the whole head: the before/after of that optimization,
measured in the same run. Steps are interleaved — CE, soft, paper, [soft_ref,] CE, ... — so
drift in machine load hits all variants alike; the median of each is reported.

    python benchmarks/step_time.py --out benchmarks/results/step_time_cpu.json
    python benchmarks/step_time.py --device cuda --out benchmarks/results/step_time_gpu.json
    python benchmarks/step_time.py --profile vgg16:soft     # torch.profiler table of one step
    python benchmarks/step_time.py --smoke                  # seconds, for tests
    python benchmarks/step_time.py --device cuda --compile --only resnet50   # + torch.compile

On CUDA the cases run at batch 32–64 with bf16 autocast and channels_last (the trainer's GPU
defaults), and each variant's peak ``torch.cuda.max_memory_allocated`` is recorded too.
``--compile`` adds ``ce_compiled``, ``soft_compiled`` and ``paper_compiled``: the same steps on a
copy of the model whose ``forward_features`` (the backbone body, where the FLOPs are) goes
through ``torch.compile``; the head and the CAM stay eager, so the soft mode's double backward
(which only differentiates the head) is unaffected. Their first warm-up round's time, the
compilation, is recorded as ``compile_s``. ``--fused`` adds ``soft_fused`` and ``paper_fused``:
the trainer's ``train.compile_attention`` path, where only the attention term's elementwise tail
(CAM, region masks, loss) is compiled into a few kernels. ``--input-grad`` adds ``input_grad``:
mode ``input_grad``, whose term differentiates log p(label) w.r.t. the input with a graph (a
double backward through the whole network, not the head only). ``--previous-layer`` adds
``energy_lsm`` (mode ``energy``, ``cam_score: log_softmax``: the shortcut benchmark's
``energy-lsm``) and, with ``attention.layer: previous`` (the CAM one stage earlier, at twice the
resolution), ``soft_prev``, ``paper_prev`` and ``energy_lsm_prev``: what taking the CAM earlier
costs per step, against the same modes at the last layer.

    python benchmarks/step_time.py --previous-layer --only resnet18 resnet50 pvt_v2_b2_li \
        --out benchmarks/results/step_time_previous_layer_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import trainer.cam
from trainer.attention_loss import select_attention_term
from trainer.backbones import create_backbone
from trainer.cam import grad_cam_parts, has_head_shortcut
from trainer.config import AttentionConfig
from trainer.epoch import training_step
from trainer.priors import DEFAULT_PRIORS, prior_table
from trainer.tasks import classes_for

__all__ = ["CPU_CASES", "GPU_CASES", "StepCase", "main"]

CPU_CASES = [  # (backbone, image size, batch)
    ("resnet18", 128, 8),
    ("resnet50", 224, 2),
    ("vgg16", 224, 2),
    ("pvt_v2_b2_li", 224, 2),
]
GPU_CASES = [
    ("resnet50", 224, 64),
    ("vgg16", 224, 32),
    ("pvt_v2_b2_li", 224, 64),
]
SMOKE_CASES = [("test_resnet", 64, 4)]
CLASSES = classes_for("ne")
_ATTENTION = {
    "ce": ({"lambda": 1.0}, 1.0),
    "soft": ({"lambda": 0.5, "mode": "soft", "cam_target": "label"}, 0.5),
    "paper": ({"lambda": 0.5, "mode": "paper"}, 0.5),
    "soft_ref": ({"lambda": 0.5, "mode": "soft", "cam_target": "label"}, 0.5),
}
_ATTENTION |= {f"{k}_fused": _ATTENTION[k] for k in ("soft", "paper")}  # train.compile_attention
_ATTENTION["input_grad"] = ({"lambda": 0.5, "mode": "input_grad"}, 0.5)  # double backward to the input
_ATTENTION["energy_lsm"] = ({"lambda": 0.5, "mode": "energy", "cam_score": "log_softmax"}, 0.5)
_ATTENTION |= {  # attention.layer: previous (one stage earlier)
    f"{k}_prev": ({**_ATTENTION[k][0], "layer": "previous"}, 0.5) for k in ("soft", "paper", "energy_lsm")
}
PREVIOUS_LAYER_KINDS = ["energy_lsm", "soft_prev", "paper_prev", "energy_lsm_prev"]


class StepCase:
    """One backbone, batch and device with its optimizer; ``step(kind)`` runs one training step."""

    def __init__(
        self,
        name: str,
        size: int,
        batch: int,
        device: str = "cpu",
        compile: bool = False,
        fused: bool = False,
        input_grad: bool = False,
        previous_layer: bool = False,
    ) -> None:
        torch.manual_seed(0)
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.model = create_backbone(name, num_classes=2).to(self.device).train()
        if cuda:  # the trainer's GPU defaults (channels_last, bf16 autocast) + cuDNN autotuning,
            # which the trainer turns on only with train.deterministic: false
            self.model = self.model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        self.amp_dtype = torch.bfloat16 if cuda else None
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-5)
        if compile:  # a twin with the same weights whose backbone body is compiled
            self.compiled = copy.deepcopy(self.model)
            self.compiled.forward_features = torch.compile(self.compiled.forward_features)
            self.opt_compiled = torch.optim.Adam(self.compiled.parameters(), lr=1e-5)
        self.scaler = torch.amp.GradScaler("cuda", enabled=False)
        x = torch.randn(batch, 3, size, size, device=self.device)  # (B, 3, S, S)
        self.x = x.contiguous(memory_format=torch.channels_last) if cuda else x
        self.y = torch.arange(batch, device=self.device) % 2  # half No Finding, half Effusion
        box = [[size // 8, size // 8, 3 * size // 4, 3 * size // 4]] * batch
        self.box = torch.tensor(box, device=self.device)  # (B, 4) x, y, w, h
        self.table = prior_table(CLASSES, DEFAULT_PRIORS).to(self.device)
        self.region = torch.zeros(batch, 1, size, size, device=self.device)  # input_grad: the lung box
        self.region[..., size // 8 : 7 * size // 8, size // 8 : 7 * size // 8] = 1.0
        self.kinds = ["ce", "soft", "paper"]
        if has_head_shortcut(self.model):
            self.kinds.append("soft_ref")
        if compile:
            self.kinds += ["ce_compiled", "soft_compiled", "paper_compiled"]
        if fused:
            self.kinds += ["soft_fused", "paper_fused"]
        if input_grad:
            self.kinds.append("input_grad")
        if previous_layer:
            self.kinds += PREVIOUS_LAYER_KINDS

    def step(self, kind: str) -> float:
        """Seconds for one optimisation step of ``kind`` (device synchronised)."""
        base = kind.removesuffix("_compiled")
        model, opt = (self.compiled, self.opt_compiled) if base != kind else (self.model, self.opt)
        cfg, lam = _ATTENTION[base]
        self._sync()
        t0 = time.perf_counter()
        with _reference_cam() if kind == "soft_ref" else contextlib.nullcontext():
            training_step(
                model,
                self.x,
                self.y,
                self.box,
                opt,
                self.scaler,
                AttentionConfig(**cfg),
                lam,
                self.table,
                self.amp_dtype,
                term=select_attention_term(kind.endswith("_fused")),
                region=self.region if kind == "input_grad" else None,
            )
        self._sync()
        return time.perf_counter() - t0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@contextlib.contextmanager
def _reference_cam():
    """Make the training step take Grad-CAM's reference path (whole-head double backward)."""
    trainer.cam.grad_cam_parts = functools.partial(grad_cam_parts, cam_weights="autograd")
    try:
        yield
    finally:
        trainer.cam.grad_cam_parts = grad_cam_parts


def bench_case(
    name: str,
    size: int,
    batch: int,
    repeats: int,
    warmup: int,
    device: str,
    compile: bool = False,
    fused: bool = False,
    input_grad: bool = False,
    previous_layer: bool = False,
) -> dict:
    case = StepCase(name, size, batch, device, compile, fused, input_grad, previous_layer)
    first: dict[str, float] = {}
    for _ in range(warmup):
        for kind in case.kinds:
            first.setdefault(kind, case.step(kind))
    times: dict[str, list[float]] = {k: [] for k in case.kinds}
    for _ in range(repeats):
        for kind in case.kinds:
            times[kind].append(case.step(kind))
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}  # the least-disturbed step: load only ever adds time
    out = {
        "backbone": name,
        "image_size": size,
        "batch": batch,
        "repeats": repeats,
        "amp": str(case.amp_dtype).replace("torch.", "") if case.amp_dtype else "fp32",
        "channels_last": case.device.type == "cuda",
        "median_s": med,
        **{f"ratio_{k}_over_ce": med[k] / med["ce"] for k in case.kinds if k != "ce"},
        "min_s": low,
        **{  # median over rounds of (variant step ÷ the CE step of the same round)
            f"ratio_paired_{k}_over_ce": statistics.median(
                t / c for t, c in zip(times[k], times["ce"], strict=True)
            )
            for k in case.kinds
            if k != "ce"
        },
        **{f"ratio_min_{k}_over_ce": low[k] / low["ce"] for k in case.kinds if k != "ce"},
        "all_s": times,
    }
    if compile or fused:  # the first compiled step of each kind: compilation (and its one step)
        out["compile_s"] = {k: first[k] for k in case.kinds if k.endswith(("_compiled", "_fused"))}
    if previous_layer:  # the earlier CAM's cost over the same mode at the last layer, paired by round
        out["ratio_paired_prev_over_last"] = {
            k: statistics.median(t / c for t, c in zip(times[f"{k}_prev"], times[k], strict=True))
            for k in ("soft", "paper", "energy_lsm")
        }
    if compile:
        out["compiled_ratio_over_eager"] = {k: med[f"{k}_compiled"] / med[k] for k in ("ce", "soft", "paper")}
    if case.device.type == "cuda":
        out["peak_memory_bytes"] = _cuda_peaks(case)
        peaks = out["peak_memory_bytes"]
        out |= {f"ratio_peak_memory_{k}_over_ce": peaks[k] / peaks["ce"] for k in case.kinds if k != "ce"}
    return out


def _cuda_peaks(case: StepCase) -> dict[str, int]:
    """Each variant's peak allocated memory in one step (params, grads, Adam state included)."""
    peaks = {}
    for kind in case.kinds:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(case.device)
        case.step(kind)
        peaks[kind] = int(torch.cuda.max_memory_allocated(case.device))
    return peaks


_LAUNCH_EVENTS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def profile_step(spec: str, device: str, rows: int = 25) -> str:
    """``backbone:kind`` → torch.profiler table of one warm step, by input shape.

    On CUDA the table is sorted by the kernels' device time; its last lines are the profiler's
    totals of host (``Self CPU``) and kernel (``Self CUDA``) time, repeated under the step's
    wall time with the number of kernel launches: kernel time well under the wall time means
    the host's dispatch and launches, not the GPU, set the step's pace.
    """
    from torch.profiler import ProfilerActivity, profile

    name, kind = spec.split(":")
    cuda = device.startswith("cuda")
    cases = GPU_CASES if cuda else [*CPU_CASES, *SMOKE_CASES]
    size, batch = next(((s, b) for n, s, b in cases if n == name), (224, 2))
    case = StepCase(name, size, batch, device, fused=kind.endswith("_fused"))
    for _ in range(3):
        case.step(kind)
    acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=acts, record_shapes=True) as prof:
        seconds = case.step(kind)
    avg = prof.key_averages(group_by_input_shape=True)
    table = avg.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=rows)
    totals = [ln for ln in table.splitlines() if ln.startswith("Self ") and "time total" in ln]
    launches = sum(e.count for e in prof.key_averages() if e.key in _LAUNCH_EVENTS)
    head = f"{name} {size}px b{batch} {kind} step: {seconds * 1e3:.1f} ms (under the profiler)"
    if cuda:
        head += f", {launches} kernel launches"
    return "\n".join([head, table, head, *totals])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON file (default: results/step_time_<dev>.json)"
    )
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--smoke", action="store_true", help="one tiny case, one repeat")
    ap.add_argument("--only", nargs="*", help="backbone names to run")
    ap.add_argument("--profile", metavar="BACKBONE:KIND", help="print a profile of one step and exit")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--compile", action="store_true", help="add torch.compile'd variants (see above)")
    ap.add_argument("--fused", action="store_true", help="add soft_fused / paper_fused (see above)")
    ap.add_argument("--input-grad", action="store_true", help="add input_grad (mode input_grad's step)")
    ap.add_argument(
        "--previous-layer", action="store_true", help="add energy_lsm and the attention.layer=previous steps"
    )
    args = ap.parse_args(argv)
    if args.threads:  # 1 keeps ratios stable on a machine shared with other jobs (no OpenMP spin-waits)
        torch.set_num_threads(args.threads)
    if args.profile:
        print(profile_step(args.profile, args.device))
        return 0
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available on this machine")
    cases = SMOKE_CASES if args.smoke else GPU_CASES if cuda else CPU_CASES
    if args.only:
        cases = [c for c in cases if c[0] in args.only]
    repeats, warmup = (1, 1) if args.smoke else (args.repeats, args.warmup)
    out = args.out or Path(f"benchmarks/results/step_time_{'gpu' if cuda else 'cpu'}.json")
    results = []
    for name, size, batch in cases:
        r = bench_case(
            name,
            size,
            batch,
            repeats,
            warmup,
            args.device,
            args.compile,
            args.fused,
            args.input_grad,
            args.previous_layer,
        )
        results.append(r)
        med = r["median_s"]
        ratios = "  ".join(f"{k} {med[k]:.3f}s ({r[f'ratio_{k}_over_ce']:.3f}x)" for k in med if k != "ce")
        print(f"{name:14s} {size}px b{batch}: CE {med['ce']:.3f}s  {ratios}", flush=True)
    report = {
        "benchmark": "step_time",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "device": torch.cuda.get_device_name(args.device) if cuda else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "target_ratio": 1.10,
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
