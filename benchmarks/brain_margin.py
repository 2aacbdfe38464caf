"""Where ``B_1`` meets the phantoms' true brain, and what each brain keep-out does.

``B_p`` keeps off the registered atlas brain (``BRAIN_MARGIN_MM``) and off the identity network's own
brain (``NETWORK_BRAIN_MARGIN_MM``, its largest piece, distance on the network's 4 mm grid). For visit 1 of
the first N subjects of seed 2026 (the benchmark's population), with SemID's blocking at p = 1
(block-only: the fill does not change ``B_p``), it prints per subject:

- the ground-truth brain voxels inside ``B_1`` with the atlas keep-out only and with both (U2's "brain
  voxels changed" for every method using ``B_p``);
- the ground-truth brain voxels farther than ``BRAIN_MARGIN_MM`` from the registered atlas brain (where
  the atlas keep-out alone cannot protect it);
- what the network's keep-out takes from ``B_1`` at 4, 5, 6 and 8 mm, in voxels, and how many of them are
  the phantom's identity region (labels 3 and 5).

Then the same for visit 0 of the first M subjects with the atlas fits moved 12 mm back (posterior, into
the head: a registration that is off), where the atlas's region reaches into the frontal brain.

Usage: ``python benchmarks/brain_margin.py [N] [M]`` (defaults 16, the full benchmark's population, and 4).
"""

from __future__ import annotations

import sys

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from semid import identity as idm
from semid import phantoms as ph
from semid import pipeline as pl
from semid.eval.baselines import BlockFill
from semid.identity import network as idnet

MARGINS_MM = (4.0, 5.0, 6.0, 8.0)
SHIFT_MM = (0.0, 12.0, 0.0)  # LPS: +y is posterior


class _ContextOf(BlockFill):
    """Block-only, keeping the pipeline's context (the registered atlas brain on the region's box)."""

    def __call__(self, ctx: pl.FillContext):  # noqa: ANN204
        self.ctx = ctx
        return super().__call__(ctx)


def _row(visit: ph.Visit, shift: tuple[float, float, float] | None) -> list[str]:
    location = pl.Deidentifier(1.0).locate(visit.image)
    if shift is not None:
        location = location.moved(shift)
    fill = _ContextOf()
    margin_in_use = pl.NETWORK_BRAIN_MARGIN_MM
    pl.NETWORK_BRAIN_MARGIN_MM = -idnet.FAR_MM  # B_1 with the atlas keep-out only
    try:
        pl.Deidentifier(1.0, fill=fill).run(visit.image, location=location)
    finally:
        pl.NETWORK_BRAIN_MARGIN_MM = margin_in_use
    ctx = fill.ctx
    labels = sitk.GetArrayFromImage(visit.labels)[ctx.roi_slices]
    brain = np.isin(labels, (ph.BRAIN, ph.BRAIN_LESION))
    region = np.isin(labels, (ph.IDENTITY, ph.FACE_LESION))
    # scipy's exact distance on the region's box (about a million voxels): a one-off analysis
    far = ndimage.distance_transform_edt(~ctx.brain, sampling=ctx.roi.GetSpacing()[::-1]) > idm.BRAIN_MARGIN_MM
    maps = idnet.load_cached().predict_maps(visit.image, visit.modality, reference=ctx.roi,
                                            outputs=("brain_distance_mm",))
    net_brain_mm = sitk.GetArrayFromImage(maps["brain_distance_mm"])
    cells = [str(int((ctx.blocked & brain).sum())), str(int((brain & far).sum()))]
    for margin in MARGINS_MM:
        taken = ctx.blocked & (net_brain_mm < margin)
        cells.append(f"{int((ctx.blocked & ~taken & brain).sum())} / {int(taken.sum())} / "
                     f"{int((taken & region).sum())}")
    return [str(int(ctx.blocked.sum())), *cells]


def main(n: int, m: int) -> None:
    pop = ph.Population(max(n, m), 2026)
    head = ("| subject | B_1 voxels | brain voxels in B_1, atlas keep-out only | brain voxels > "
            f"{idm.BRAIN_MARGIN_MM:g} mm from the atlas brain | "
            + " | ".join(f"network keep-out {g:g} mm: brain left / B_1 taken / identity taken" for g in MARGINS_MM)
            + " |")
    rule = "|---|" + "---:|" * (3 + len(MARGINS_MM))
    print(f"Fitted as the pipeline fits (visit 1); the pipeline uses {pl.NETWORK_BRAIN_MARGIN_MM:g} mm\n")
    print(head)
    print(rule)
    for i in range(n):
        print(f"| {i} | " + " | ".join(_row(pop.subject(i).visit(1), None)) + " |")
    print(f"\nAtlas fits moved {SHIFT_MM[1]:g} mm back (visit 0)\n")
    print(head)
    print(rule)
    for i in range(m):
        print(f"| {i} | " + " | ".join(_row(pop.subject(i).visit(0), SHIFT_MM)) + " |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 16, int(sys.argv[2]) if len(sys.argv) > 2 else 4)
