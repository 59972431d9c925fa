"""Synthetic frontal (PA) chest X-ray phantoms with exact lung and lesion masks.

Real chest radiographs cannot be downloaded here, so the demo, the tests and the benchmarks run on
these phantoms instead. Each image is drawn from a per-patient anatomy (body outline, shoulders,
two lung fields with branching vessel markings, mediastinum and heart shadow, diaphragm domes,
posterior and anterior ribs, clavicles, spine, trachea) seen through a simple attenuation model:
densities are summed, blurred, turned into transmitted photon counts with Poisson noise and shown
as ``1 - transmission`` (dense = bright, air = dark). Several images of one patient share the
anatomy and differ in exposure, noise, a small shift / rotation and (independently) the finding.

Findings, each with an exact binary lesion mask (the pixels whose density the finding changed):

* ``Effusion``: fluid filling the lower part of one or both lung fields, meniscus rising
  laterally, costophrenic angle blunted.
* ``Pneumothorax``: apical / lateral air gap between a collapsed lung and the chest wall, without
  lung markings, bounded by a thin bright visceral pleural line.
* ``Subcutaneous Emphysema``: dark air streaks and bubbles in the lateral chest-wall and shoulder
  soft tissue, outside the columns spanned by the lung fields.
* ``No Finding``: normal, empty lesion mask.

An optional "shortcut" marker (a bright radiographer's letter block in the upper-left corner, over
the background) can be drawn with a label correlation set separately for train+val and test.

Everything is vectorized per image with numpy (no scipy, no torch); matplotlib is imported only by
:func:`montage`. ``python -m trainer.data.phantom --montage docs/phantoms.png`` draws the figure.
"""

from __future__ import annotations

from ...tasks import CLASS_NAMES
from .dataset import CSV_COLUMNS, PhantomSet, generate, synthesize
from .montage import example, montage
from .render import MARKER_BOX

__all__ = [
    "CLASS_NAMES",
    "CSV_COLUMNS",
    "MARKER_BOX",
    "PhantomSet",
    "example",
    "generate",
    "montage",
    "synthesize",
]
