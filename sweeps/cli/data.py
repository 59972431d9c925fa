"""Data commands of ``cxr-sweep``: the lung segmenter, ``prepare`` (dataset caches) and ``prior``
(usage: docs/data.md).

A dataset source is a reader in :mod:`trainer.data.sources` (records and what it skipped) and a
short command here that hands them to :func:`trainer.data.prepare.prepare_cache`.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.table import Table

from .common import console, fail, progress, user_errors

__all__ = ["register"]

segmenter_app = typer.Typer(
    help="The lung U-Net: train it on image/mask pairs, predict masks.", no_args_is_help=True
)
prepare_app = typer.Typer(
    help="Build a dataset cache (images, lung masks and boxes, splits) from NIH, class folders or a CSV.",
    no_args_is_help=True,
)
_DATA_ERRORS = (OSError,)  # unwritable or full output folders, unreadable inputs: the message names the path


# ---- segmenter ----------------------------------------------------------------------------------
@segmenter_app.command("train")
def segmenter_train(
    images: Annotated[Path, typer.Option(help="Folder of chest X-rays (searched recursively).")],
    masks: Annotated[
        Path, typer.Option(help="Folder of lung masks, paired by file stem (left/right united).")
    ],
    out: Annotated[Path, typer.Option(help="Checkpoint file to write (.pt).")] = Path("lung_unet.pt"),
    size: Annotated[int, typer.Option(min=32, max=1024, help="U-Net input size in pixels.")] = 256,
    encoder: Annotated[str, typer.Option(help="segmentation-models-pytorch encoder name.")] = "resnet34",
    depth: Annotated[int, typer.Option(min=3, max=5, help="Encoder depth (decoder stages).")] = 5,
    decoder_channels: Annotated[
        str | None, typer.Option(help="Comma-separated decoder widths, one per stage (default 256,...,16).")
    ] = None,
    encoder_weights: Annotated[
        Path | None, typer.Option(help="Local encoder weights file (e.g. ImageNet); none = random init.")
    ] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 40,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    lr: Annotated[float, typer.Option(min=0.0)] = 1e-3,
    val_fraction: Annotated[float, typer.Option(min=0.01, max=0.9)] = 0.15,
    seed: int = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    augment: Annotated[bool, typer.Option(help="Random affine + intensity jitter while training.")] = True,
) -> None:
    """Train the lung U-Net (Dice + BCE); keeps the epoch with the best validation Dice."""
    from trainer.data.pairs import find_pairs
    from trainer.segmenter import SegmenterMeta, load_pairs_resized, train_segmenter

    with user_errors(*_DATA_ERRORS):
        found = find_pairs(images, masks)
        if not found.pairs:
            raise fail(f"no image in {images} has a mask in {masks} (masks are paired by file stem)")
        console.print(
            f"{len(found.pairs)} image/mask pairs; {len(found.images_without_mask)} images without a mask "
            f"(skipped), {len(found.masks_without_image)} masks without an image"
        )
        dec = _decoder(decoder_channels, depth)
        meta = SegmenterMeta(encoder=encoder, encoder_depth=depth, decoder_channels=dec, input_size=size)
        x, y = load_pairs_resized(found.pairs, size)
        with progress("training") as bar:
            task = bar.add_task("epochs", total=epochs)

            def report(epoch: int, m: dict[str, float]) -> None:
                bar.update(
                    task, completed=epoch, description=f"loss {m['loss']:.3f} val Dice {m['val_dice']:.3f}"
                )

            seg = train_segmenter(
                x,
                y,
                out,
                meta=meta,
                epochs=epochs,
                batch_size=batch_size,
                lr=lr,
                val_fraction=val_fraction,
                seed=seed,
                device=device,
                encoder_weights=str(encoder_weights) if encoder_weights else None,
                augment=augment,
                progress=report,
            )
        console.print(
            f"segmenter: {seg.path}  best validation Dice {seg.meta.val_dice:.4f} at epoch {seg.meta.epochs} "
            f"({seg.meta.n_train} train / {seg.meta.n_val} validation images)"
        )


def _decoder(spec: str | None, depth: int) -> tuple[int, ...]:
    if spec is None:
        return (256, 128, 64, 32, 16)[5 - depth :] if depth < 5 else (256, 128, 64, 32, 16)
    try:
        dec = tuple(int(v) for v in spec.split(","))
    except ValueError:
        raise fail(f"--decoder-channels {spec!r}: expected comma-separated integers") from None
    if len(dec) != depth:
        raise fail(f"--decoder-channels {spec!r}: {len(dec)} values for --depth {depth}")
    return dec


@segmenter_app.command("predict")
def segmenter_predict(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint from `segmenter train`.")],
    images: Annotated[Path, typer.Option(help="Folder of images (searched recursively).")],
    out: Annotated[Path, typer.Option(help="Folder for <stem>.png masks (0/255) and lung_boxes.csv.")],
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    device: str = "auto",
) -> None:
    """Write a post-processed lung mask per image at its own size, and the union lung boxes."""
    import csv

    import numpy as np
    import torch
    from PIL import Image

    from trainer.data.boxes import boxes_from_masks
    from trainer.data.images import read_gray
    from trainer.data.pairs import list_images
    from trainer.segmenter import load_segmenter

    with user_errors(*_DATA_ERRORS):
        seg = load_segmenter(checkpoint, device=device)
        files = list_images(images)
        if not files:
            raise fail(f"{images}: no image files")
        out.mkdir(parents=True, exist_ok=True)
        rows, fallbacks = [], 0
        with progress("segmenting") as bar:
            task = bar.add_task("images", total=len(files))
            for i in range(0, len(files), batch_size):
                chunk = files[i : i + batch_size]
                masks = seg.masks_at_own_size([read_gray(f) for f in chunk])  # each (H, W) of its image
                for f, mask in zip(chunk, masks, strict=True):
                    Image.fromarray(mask * np.uint8(255)).save(out / f"{f.stem}.png")
                    box, empty = boxes_from_masks(torch.from_numpy(mask)[None])
                    fallbacks += int(empty[0])
                    rows.append([f.name, *box[0].tolist(), int(empty[0])])
                bar.update(task, advance=len(chunk))
        with open(out / "lung_boxes.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["image", "x", "y", "w", "h", "fallback_whole_image"])
            w.writerows(rows)
        console.print(f"{len(rows)} masks in {out}; nothing found (whole-image box) in {fallbacks}")


# ---- prepare ------------------------------------------------------------------------------------
_DataAccess = Literal["private", "public", "synthetic"]
_SegOpt = Annotated[
    Path | None,
    typer.Option(help="Lung U-Net checkpoint (`segmenter train`); needed unless lung masks are given."),
]
_OutOpt = Annotated[Path, typer.Option(help="Cache directory to write.")]
_SizeOpt = Annotated[
    int, typer.Option(min=16, max=2048, help="Image size stored in the cache (training size).")
]
_SeedOpt = Annotated[int, typer.Option(help="Seed of the split and of down-sampling.")]
_BalanceOpt = Annotated[
    bool, typer.Option(help="Down-sample every class to the rarest one per split (paper).")
]
_MaxOpt = Annotated[int | None, typer.Option(help="At most this many images per class (a quick subset).")]
_DryOpt = Annotated[bool, typer.Option(help="Write only the split manifest and counts; read no image.")]
_OverOpt = Annotated[bool, typer.Option(help="Replace an existing cache.")]
_WorkersOpt = Annotated[int, typer.Option(min=1, help="Threads decoding images.")]
_SegSizeOpt = Annotated[int | None, typer.Option(help="Refuse a segmenter not trained at this input size.")]
_SegEncOpt = Annotated[str | None, typer.Option(help="Refuse a segmenter with another encoder.")]


_SHARED = (
    "out",
    "segmenter",
    "size",
    "seed",
    "balance",
    "max_per_class",
    "overwrite",
    "workers",
    "segmenter_size",
)


def _shared(options: dict[str, Any]) -> dict[str, Any]:
    """The options every ``prepare`` command has, from that command's arguments (``locals()``)."""
    return {k: options[k] for k in (*_SHARED, "segmenter_size", "segmenter_encoder")}


@prepare_app.command("nih")
def prepare_nih(
    csv: Annotated[Path, typer.Option(help="Data_Entry_2017_v2020.csv[.gz].")],
    task: Annotated[str, typer.Option(help="ne, np or nep.")],
    out: _OutOpt,
    images: Annotated[
        Path | None,
        typer.Option(help="Image folder (images_001/images/... or flat); optional with --dry-run."),
    ] = None,
    bbox: Annotated[Path | None, typer.Option(help="BBox_List_2017.csv: ground-truth lesion boxes.")] = None,
    view: Annotated[str, typer.Option(help="PA, AP or both.")] = "both",
    official_split: Annotated[
        Path | None,
        typer.Option(help="Folder with train_val_list.txt and test_list.txt (official test split)."),
    ] = None,
    segmenter: _SegOpt = None,
    size: _SizeOpt = 224,
    seed: _SeedOpt = 0,
    balance: _BalanceOpt = True,
    max_per_class: _MaxOpt = None,
    dry_run: _DryOpt = False,
    overwrite: _OverOpt = False,
    workers: _WorkersOpt = 4,
    segmenter_size: _SegSizeOpt = None,
    segmenter_encoder: _SegEncOpt = None,
) -> None:
    """NIH ChestX-ray14: single-label rows, patient-disjoint class-balanced 60/20/20 splits."""
    from trainer.data.sources import nih_records, read_official_split

    options = _shared(locals())
    with user_errors(*_DATA_ERRORS):
        if images is None and not dry_run:
            raise fail("--images is required (only --dry-run works from the CSV alone)")
        records, skipped = nih_records(csv, task, images_dir=images, view=view, bbox_csv=bbox)
        official = read_official_split(official_split) if official_split else None
        _prepare(
            records,
            skipped,
            task=task,
            dry_run=dry_run,
            root=images or csv.parent,
            source=f"nih:{csv.name}",
            data_access="public",
            official=official,
            patient_ids_known=True,
            **options,
        )


@prepare_app.command("folders")
def prepare_folders(
    root: Annotated[Path, typer.Option(help="root/{train,val,test}/<class>/*.png or root/<class>/*.png.")],
    task: Annotated[str, typer.Option(help="ne, np, ns, nep or neps.")],
    out: _OutOpt,
    patient_regex: Annotated[
        str | None,
        typer.Option(help="Regex on the file stem whose group 1 (or 'patient') is the patient id."),
    ] = None,
    data_access: Annotated[
        str, typer.Option(help="private (default: images never leave), public or synthetic.")
    ] = "private",
    segmenter: _SegOpt = None,
    size: _SizeOpt = 224,
    seed: _SeedOpt = 0,
    balance: _BalanceOpt = True,
    max_per_class: _MaxOpt = None,
    dry_run: _DryOpt = False,
    overwrite: _OverOpt = False,
    workers: _WorkersOpt = 4,
    segmenter_size: _SegSizeOpt = None,
    segmenter_encoder: _SegEncOpt = None,
) -> None:
    """A class-folder tree (the authors' layout; a private set such as Ottawa)."""
    from trainer.data.sources import folder_records

    options = _shared(locals())
    with user_errors(*_DATA_ERRORS):
        records, skipped = folder_records(root, task, patient_regex=patient_regex)
        _prepare(
            records,
            skipped,
            task=task,
            dry_run=dry_run,
            root=root,
            source=f"folders:{root.name}",
            data_access=_access(data_access),
            patient_ids_known=patient_regex is not None,
            **options,
        )


@prepare_app.command("csv")
def prepare_csv(
    csv: Annotated[Path, typer.Option(help="CSV with path, label, patient_id (+ split, image_id, masks).")],
    task: Annotated[str, typer.Option(help="ne, np, ns, nep or neps.")],
    out: _OutOpt,
    root: Annotated[
        Path | None, typer.Option(help="Data root the paths are relative to (default: CSV folder).")
    ] = None,
    data_access: Annotated[str, typer.Option(help="private (default), public or synthetic.")] = "private",
    segmenter: _SegOpt = None,
    size: _SizeOpt = 224,
    seed: _SeedOpt = 0,
    balance: _BalanceOpt = True,
    max_per_class: _MaxOpt = None,
    dry_run: _DryOpt = False,
    overwrite: _OverOpt = False,
    workers: _WorkersOpt = 4,
    segmenter_size: _SegSizeOpt = None,
    segmenter_encoder: _SegEncOpt = None,
) -> None:
    """A generic CSV of images; given lung masks are used as is, else the segmenter runs."""
    from trainer.data.sources import csv_records

    options = _shared(locals())
    with user_errors(*_DATA_ERRORS):
        records, skipped = csv_records(csv, task, root=root)
        _prepare(
            records,
            skipped,
            task=task,
            dry_run=dry_run,
            root=root or csv.resolve().parent,
            source=f"csv:{csv.name}",
            data_access=_access(data_access),
            **options,
        )


def _access(value: str) -> _DataAccess:
    if value not in ("private", "public", "synthetic"):
        raise fail(f"--data-access must be private, public or synthetic, got {value!r}")
    return value  # type: ignore[return-value]


def _prepare(records, skipped: Counter, *, task: str, dry_run: bool, **options: Any) -> None:
    """Plan the splits and build the cache (:func:`trainer.data.prepare.prepare_cache`) under a
    progress bar, then print the data-quality table."""
    from trainer.data.prepare import prepare_cache
    from trainer.tasks import classes_for

    with contextlib.nullcontext() if dry_run else progress("preparing") as bar:
        t = bar.add_task("images", total=None) if bar is not None else None

        def report(done: int, total: int) -> None:
            bar.update(t, completed=done, total=total)

        result = prepare_cache(
            records, skipped, task=task, dry_run=dry_run, progress=report if bar else None, **options
        )
    _print_quality(result.quality, classes_for(task))
    if result.dry_run:
        console.print(f"dry run: split manifest {result.path / 'manifest.csv'} (no image read)")
        return
    resumed = f", resumed {result.resumed_chunks} finished chunk(s)" if result.resumed_chunks else ""
    console.print(
        f"cache: {result.path}  ({result.quality['images']} images in {result.seconds:.1f} s, "
        f"{result.images_per_s:.1f} images/s{resumed})"
    )


def _print_quality(q: dict[str, Any], classes) -> None:
    table = Table(title="data quality")
    table.add_column("split")
    for c in classes:
        table.add_column(c, justify="right")
    table.add_column("patients", justify="right")
    for split, counts in q["class_counts"].items():
        table.add_row(split, *(str(counts[c]) for c in classes), str(q["patients"][split]))
    console.print(table)
    notes = [f"patient overlap between splits: {q['patient_overlap']}"]
    if "lung_box_fallbacks" in q:
        notes.append(f"lung-box fallbacks (nothing segmented): {q['lung_box_fallbacks']}")
        a = q["lung_area_fraction"]
        notes.append(f"lung area fraction: mean {a['mean']:.3f}, p5 {a['p5']:.3f}, max {a['max']:.3f}")
    if "segmenter_dice_vs_given_masks" in q:
        d = q["segmenter_dice_vs_given_masks"]
        notes.append(f"segmenter Dice vs the source's lung masks: mean {d['mean']:.4f}, min {d['min']:.4f}")
    if q["skipped_rows"]:
        notes.append("skipped rows: " + ", ".join(f"{k} {v}" for k, v in q["skipped_rows"].items()))
    notes.append(f"down-sampled (balance / limit): {q['dropped_by_balancing_or_limit']}")
    if not q["patient_ids_known"]:
        notes.append(
            "[yellow]patient ids unknown (one per image): pass --patient-regex for patient-disjoint splits"
        )
    for n in notes:
        console.print(f"  {n}")


# ---- prior --------------------------------------------------------------------------------------
def prior(
    image: Annotated[Path, typer.Option(help="The annotated chest X-ray.")],
    box: Annotated[str, typer.Option(help="Lesion box x,y,w,h in the image's pixels.")],
    label: Annotated[str, typer.Option(help="Pathology of the box (effusion, pneumothorax, ...).")],
    out: Annotated[Path, typer.Option(help="Priors YAML to write (other classes in it are kept).")] = Path(
        "priors.yaml"
    ),
    segmenter: Annotated[Path | None, typer.Option(help="Lung U-Net checkpoint.")] = None,
    lung_mask: Annotated[
        Path | None, typer.Option(help="A lung mask of the image instead of a segmenter.")
    ] = None,
    columns: Annotated[str, typer.Option(help="auto, inside or outside the lung box's columns.")] = "auto",
    both_sides: Annotated[
        bool, typer.Option("--both-sides/--one-side", help="Mirror the column band to the other lung.")
    ] = True,
) -> None:
    """Derive a region prior from one annotated X-ray (the paper's single-annotation claim)."""
    from trainer.data.images import read_gray, read_mask
    from trainer.data.sources import canonical_label
    from trainer.priors import prior_from_image, save_prior
    from trainer.segmenter import load_segmenter
    from trainer.tasks import NO_FINDING

    with user_errors(*_DATA_ERRORS, ValueError):  # ValueError: a priors file that is not one
        name = canonical_label(label)
        if name is None or name == NO_FINDING:
            raise fail(f"--label {label!r}: not a pathology (effusion, pneumothorax, subcutaneous emphysema)")
        try:
            lesion = [float(v) for v in box.split(",")]
        except ValueError:
            lesion = []
        if len(lesion) != 4:
            raise fail(f"--box {box!r}: expected x,y,w,h (four numbers)")
        if columns not in ("auto", "inside", "outside"):
            raise fail(f"--columns must be auto, inside or outside, got {columns!r}")
        if (segmenter is None) == (lung_mask is None):
            raise fail("pass exactly one of --segmenter and --lung-mask")
        img = read_gray(image)
        mask = read_mask(lung_mask) if lung_mask else load_segmenter(segmenter).masks_at_own_size([img])[0]
        try:
            pr, lung_box = prior_from_image(img, lesion, mask, columns=columns, both_sides=both_sides)  # type: ignore[arg-type]
        except ValueError as e:
            raise fail(f"{image}: {e}") from None
        path = save_prior(out, name, pr, {"image": image.name, "lesion_box": lesion, "lung_box": lung_box})
        console.print(
            f"{name}: {pr.describe()} of the lung box  → {path}\n"
            f"Use it in a trial config: attention: {{priors: {json.dumps(str(path))}}}"
        )


def register(app: typer.Typer) -> None:
    """Add ``segmenter``, ``prepare`` and ``prior`` to the ``cxr-sweep`` app."""
    app.add_typer(segmenter_app, name="segmenter")
    app.add_typer(prepare_app, name="prepare")
    app.command("prior")(prior)
