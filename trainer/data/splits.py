"""Patient-disjoint, class-balanced train/val/test splits (DESIGN.md §1: 60/20/20).

The paper balances by down-sampling No Finding to the pathology count; with several pathologies
every class in a split is down-sampled to that split's rarest class. Patients are the unit of
assignment, so no patient's images cross splits: patients with pathology images are placed
first (largest first, into the split that most lacks their classes), then No Finding-only
patients fill each split up to what balancing will keep. Everything is seeded.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError

__all__ = [
    "SPLITS",
    "Record",
    "SplitError",
    "balance_and_limit",
    "check_splits",
    "make_splits",
    "patient_overlap",
    "split_counts",
]

SPLITS = ("train", "val", "test")


class SplitError(UserError):
    """Data that cannot be split as asked (empty class, patient overlap in a given split...)."""


@dataclass
class Record:
    """One source image before caching. ``where`` names its origin for error messages (file:row)."""

    image_id: str
    patient_id: str
    label: str
    path: str  # relative to the data root
    where: str
    split: str | None = None
    view: str = ""
    # lesion boxes x, y, w, h in source pixels (NIH BBox_List rows)
    lesion_boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    lung_mask_path: str | None = None
    lesion_mask_path: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


def split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Largest-remainder split of ``n``; a split with a positive fraction is non-empty when ``n`` allows."""
    k = len(fractions)
    raw = [n * f for f in fractions]
    counts = [math.floor(x) for x in raw]
    order = sorted(range(k), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    for i in range(k):
        if fractions[i] > 0 and counts[i] == 0:
            donor = max(range(k), key=lambda j: counts[j])
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[i] += 1
    return counts


def patient_overlap(records: Sequence[Record]) -> dict[str, list[str]]:
    """Patients whose images sit in more than one split: patient id → sorted splits."""
    where: dict[str, set[str]] = defaultdict(set)
    for r in records:
        if r.split is not None:
            where[r.patient_id].add(r.split)
    return {p: sorted(s) for p, s in where.items() if len(s) > 1}


def _assign(
    patients: list[str],
    counts: dict[str, Counter],
    classes: Sequence[str],
    targets: dict[str, list[int]],
    splits: Sequence[str],
) -> dict[str, str]:
    """Greedy: each patient (in the given order) goes to the split with the largest relative deficit."""
    have = {c: [0] * len(splits) for c in classes}
    out: dict[str, str] = {}
    for p in patients:
        best, best_score = 0, -math.inf
        for s in range(len(splits)):
            score = 0.0
            for c, n in counts[p].items():
                if c in targets and targets[c][s] > 0:
                    score += n * (targets[c][s] - have[c][s]) / targets[c][s]
                elif c in targets:
                    score -= n * 1e6  # a split meant to get none of this class
            if score > best_score:
                best, best_score = s, score
        out[p] = splits[best]
        for c, n in counts[p].items():
            if c in have:
                have[c][best] += n
    return out


def make_splits(
    records: Sequence[Record],
    classes: Sequence[str],
    *,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    splits: Sequence[str] = SPLITS,
    seed: int = 0,
    balance: bool = True,
) -> list[Record]:
    """Assign ``split`` to every record (patient-disjoint); returns the records (``split`` set).

    With ``balance``, No Finding-only patients are placed only until each split holds as many No
    Finding images as its rarest pathology; unplaced records keep ``split=None`` (dropped later by
    :func:`balance_and_limit`).
    """
    rng = np.random.default_rng(seed)
    nf, pathologies = classes[0], list(classes[1:])
    by_patient: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_patient[r.patient_id].append(r)
    counts = {p: Counter(r.label for r in rs) for p, rs in by_patient.items()}
    ids = sorted(by_patient)
    shuffled = [ids[i] for i in rng.permutation(len(ids))]
    sick = [p for p in shuffled if any(c in pathologies for c in counts[p])]
    sick_set = set(sick)
    healthy = [p for p in shuffled if p not in sick_set]
    sick.sort(key=lambda p: -sum(n for c, n in counts[p].items() if c in pathologies))  # stable: seeded ties
    totals = Counter(r.label for r in records)
    targets = {c: split_counts(totals[c], fractions) for c in pathologies}
    place = _assign(sick, counts, pathologies, targets, splits)
    if balance and pathologies:
        have: Counter = Counter()
        for p in sick:
            for c, n in counts[p].items():
                have[(place[p], c)] += n
        need = [min(have[(s, c)] for c in pathologies) for s in splits]
        nf_have = [have[(s, nf)] for s in splits]
        for p in healthy:  # fill the splits that lack No Finding most, stop when all are full
            gaps = [(need[i] - nf_have[i]) / max(1, need[i]) for i in range(len(splits))]
            i = int(np.argmax(gaps))
            if gaps[i] <= 0:
                break
            place[p] = splits[i]
            nf_have[i] += counts[p][nf]
    else:
        nf_targets = {nf: split_counts(sum(counts[p][nf] for p in healthy), fractions)}
        place.update(_assign(healthy, counts, [nf], nf_targets, splits))
    for p, rs in by_patient.items():
        for r in rs:
            r.split = place.get(p)
    return list(records)


def balance_and_limit(
    records: Sequence[Record],
    classes: Sequence[str],
    *,
    seed: int = 0,
    balance: bool = True,
    max_per_class: int | None = None,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    splits: Sequence[str] = SPLITS,
) -> tuple[list[Record], int]:
    """Keep, per split, at most the rarest class's count of every class (``balance``) and at most
    ``round(max_per_class · fraction)`` per class. Returns (kept records in input order, dropped)."""
    rng = np.random.default_rng(seed + 1)
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        if r.split is not None:
            groups[(r.split, r.label)].append(i)
    keep: set[int] = set()
    for si, s in enumerate(splits):
        sizes = {c: len(groups[(s, c)]) for c in classes}
        cap = {c: sizes[c] for c in classes}
        if balance:
            m = min(sizes.values())
            cap = dict.fromkeys(classes, m)
        if max_per_class is not None:
            lim = max(1, round(max_per_class * fractions[si]))
            cap = {c: min(v, lim) for c, v in cap.items()}
        for c in classes:
            idx = groups[(s, c)]
            chosen = idx if cap[c] >= len(idx) else rng.choice(idx, size=cap[c], replace=False).tolist()
            keep.update(chosen)
    kept = [r for i, r in enumerate(records) if i in keep]
    return kept, len(records) - len(kept)


def check_splits(records: Sequence[Record], classes: Sequence[str], source: str) -> None:
    """Every split must hold every class, and no patient may cross splits."""
    overlap = patient_overlap(records)
    if overlap:
        some = ", ".join(f"{p} ({'/'.join(s)})" for p, s in sorted(overlap.items())[:5])
        raise SplitError(f"{source}: {len(overlap)} patient(s) appear in more than one split, e.g. {some}")
    have = Counter((r.split, r.label) for r in records)
    for s in SPLITS:
        missing = [c for c in classes if have[(s, c)] == 0]
        if missing:
            raise SplitError(
                f"{source}: split {s!r} has no images of {missing} "
                f"(too few patients for a patient-disjoint 60/20/20 split, or the given split lacks them)"
            )
