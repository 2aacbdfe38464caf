"""Where ``B_1`` meets the phantoms' true brain, and what the 8 mm keep-out around the atlas brain does.

For visit 1 of the first N subjects of seed 2026 (the benchmark's population), runs SemID's blocking at
p = 1 (block-only: the fill does not change ``B_p``) and prints, per subject:

- the ground-truth brain voxels inside ``B_1`` (U2's "brain voxels changed" for every method using it);
- the ground-truth brain voxels farther than ``BRAIN_MARGIN_MM`` from the registered atlas brain (where
  the keep-out cannot protect the brain, whatever holds to it);
- the voxels of ``B_1`` within ``BRAIN_MARGIN_MM`` of the registered atlas brain (the identity network's
  and the atlas's regions are held off it; the whole-head fit's face region only off the brain itself,
  so these are what holding that region off too would take from ``B_1``);
- the brain voxels inside ``B_1`` that would stay inside if it did (those beyond the margin).

Usage: ``python benchmarks/brain_margin.py [N]`` (default 16, the full benchmark's population).
"""

from __future__ import annotations

import sys

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from semid import identity as idm
from semid import phantoms as ph
from semid.eval.baselines import BlockFill
from semid.pipeline import Deidentifier, FillContext


class _ContextOf(BlockFill):
    """Block-only, keeping the pipeline's context (the registered atlas brain on the region's box)."""

    def __call__(self, ctx: FillContext):  # noqa: ANN204
        self.ctx = ctx
        return super().__call__(ctx)


def main(n: int) -> None:
    pop = ph.Population(n, 2026)
    margin = idm.BRAIN_MARGIN_MM
    print(f"| subject | brain voxels in B_1 | brain voxels > {margin:g} mm from the atlas brain | "
          f"B_1 voxels < {margin:g} mm from the atlas brain | brain voxels in B_1 beyond the margin |")
    print("|---|---:|---:|---:|---:|")
    for i in range(n):
        visit = pop.subject(i).visit(1)
        fill = _ContextOf()
        Deidentifier(1.0, fill=fill).run(visit.image)
        ctx = fill.ctx
        labels = sitk.GetArrayFromImage(visit.labels)[ctx.roi_slices]
        brain = np.isin(labels, (ph.BRAIN, ph.BRAIN_LESION))
        # scipy's exact distance on the region's box (about a million voxels): a one-off analysis
        dist = ndimage.distance_transform_edt(~ctx.brain, sampling=ctx.roi.GetSpacing()[::-1])
        hits = ctx.blocked & brain
        print(f"| {i} | {int(hits.sum())} | {int((brain & (dist > margin)).sum())} | "
              f"{int((ctx.blocked & (dist < margin)).sum())} | {int((hits & (dist >= margin)).sum())} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 16)
