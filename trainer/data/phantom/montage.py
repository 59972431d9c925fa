"""Example phantoms for the eye: one image per class and patient, and a figure of them
(``python -m trainer.data.phantom --montage docs/phantoms.png``)."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import numpy as np

from ...tasks import CLASS_NAMES
from .anatomy import sample_anatomy
from .dataset import generate
from .render import draw

__all__ = ["example", "main", "montage"]


def example(
    label: str, seed: int, size: int, marker: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image of ``label`` from patient ``seed`` (used by the montage and the tests)."""
    ss_pat, ss_img = np.random.SeedSequence([seed, 7]).spawn(2)
    anat = sample_anatomy(np.random.default_rng(ss_pat))
    return draw(anat, np.random.default_rng(ss_img), label, marker, size)


def montage(
    out_png: str | os.PathLike[str], size: int = 256, seed: int = 0, per_class: int = 3
) -> pathlib.Path:
    """Save a figure of example phantoms: one row per class plus one row with the marker.

    Lung masks are outlined in cyan, lesion masks in red. Returns the PNG path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [(name, name, False) for name in CLASS_NAMES]
    rows.append(("marker (shortcut)", None, True))
    fig = Figure(figsize=(2.3 * per_class, 2.45 * len(rows)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), per_class, squeeze=False)
    for r, (title, label, marker) in enumerate(rows):
        for col in range(per_class):
            lab = label if label is not None else CLASS_NAMES[col % len(CLASS_NAMES)]
            img, lung, les = example(lab, seed * 1000 + r * 100 + col, size, marker)
            ax = axes[r, col]
            ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.contour(lung, levels=[0.5], colors="cyan", linewidths=0.7)
            if les.any():
                ax.contour(les, levels=[0.5], colors="red", linewidths=0.8)
            ax.set_title(title if label is not None else f"{title}: {lab}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    out = pathlib.Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m trainer.data.phantom", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--montage", metavar="PNG", help="write an example montage to this PNG")
    parser.add_argument("--generate", metavar="DIR", help="write a data set (images, masks, labels.csv) here")
    parser.add_argument("--n-patients", type=int, default=100)
    parser.add_argument("--classes", nargs="+", default=list(CLASS_NAMES))
    parser.add_argument("--size", type=int, default=None, help="image side (default 256 montage, 128 data)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-class", type=int, default=3)
    args = parser.parse_args(argv)
    if not args.montage and not args.generate:
        parser.error("nothing to do: give --montage PNG and/or --generate DIR")
    if args.montage:
        print(montage(args.montage, size=args.size or 256, seed=args.seed, per_class=args.per_class))
    if args.generate:
        print(generate(args.generate, args.n_patients, args.classes, size=args.size or 128, seed=args.seed))
    return 0
