"""How much of the phantoms' identity tissue and face lesions ``B_1`` leaves in place.

For visit 1 of the first N subjects of seed 2026 (the benchmark's population), runs SemID at p = 1 and
prints, per subject, the ground-truth identity-region voxels and face-lesion voxels outside ``B_1``
(the voxels a block cannot protect, and the lesions any method keeps by not touching them), and the
ground-truth brain voxels inside it.

Usage: ``python benchmarks/identity_coverage.py [N]`` (default 10).
"""

from __future__ import annotations

import sys

import numpy as np
import SimpleITK as sitk

from semid import phantoms as ph
from semid.eval.baselines import BlockFill
from semid.pipeline import Deidentifier


def main(n: int) -> None:
    pop = ph.Population(n, 2026)
    print("| subject | identity voxels | outside B_1 | face-lesion voxels | outside B_1 | brain voxels in B_1 |")
    print("|---|---:|---:|---:|---:|---:|")
    shares = []
    for i in range(n):
        visit = pop.subject(i).visit(1)
        blocked = sitk.GetArrayFromImage(Deidentifier(1.0, fill=BlockFill()).run(visit.image).mask) > 0
        labels = sitk.GetArrayFromImage(visit.labels)
        identity, lesion = labels == ph.IDENTITY, labels == ph.FACE_LESION
        brain = np.isin(labels, (ph.BRAIN, ph.BRAIN_LESION))
        out_identity = int((identity & ~blocked).sum())
        shares.append(out_identity / max(int(identity.sum()), 1))
        print(f"| {i} | {int(identity.sum())} | {out_identity} ({100 * shares[-1]:.1f} %) | {int(lesion.sum())} | "
              f"{int((lesion & ~blocked).sum())} | {int((brain & blocked).sum())} |")
    print(f"identity tissue outside B_1: {100 * min(shares):.1f}-{100 * max(shares):.1f} % "
          f"(mean {100 * float(np.mean(shares)):.1f} %)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
