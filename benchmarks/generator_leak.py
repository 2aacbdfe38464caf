"""Where does the learned fill's identity leak come from? A2 on SemID's p = 1 outputs, one input at a time.

Runs attacker A2 (static, and adaptive: fine-tuned 45 steps on the method's outputs of 8 training
subjects, as ``semid bench --quick`` does) on visit 1 of the 10 subjects of seed 2026, against their
visit 0, for one variant of SemID's learned fill:

- ``normal``: as shipped (the drawn face mapped back in the fit's pose, ``LearnedFill(frame="pose")``);
- ``fit-frame``: the drawn face mapped back by the subject's full affine fit (``frame="fit"``, the first
  version);
- ``zero-features``: the generator gets zeros instead of the decoupled encoder features;
- ``atlas-mask``: ``B_p`` from the registered atlas only (no identity network);
- ``fixed-box``: every subject gets the box the generator drew for the first one (the same face in the
  atlas frame), mapped back by each subject's own atlas fit: what is left is the frame's leak;
- ``similarity-frame``: the drawn box is mapped back by the nearest similarity (rotation, one scale,
  translation) of the subject's affine fit instead of the fit itself: the face keeps its own proportions;
- ``rigid-frame``: the same with the nearest rotation only (the atlas's size and proportions);
- ``rigid-fixed-box``: ``fixed-box`` mapped back by the nearest rotation (what is left once neither the
  face nor its frame depends on the subject);
- ``pose-fixed-box``: ``fixed-box`` drawn in the pose frame as shipped;
- ``block-only``: ``B_p`` filled with air (the reference: what the rest of the head gives away).

Usage: ``python benchmarks/generator_leak.py MODE`` (one of ``MODES``).
"""

from __future__ import annotations

import sys

import numpy as np
import SimpleITK as sitk
import torch

from semid import compensation as comp
from semid import phantoms as ph
from semid.compensation import LearnedFill
from semid.eval.attack_reid import ReidAttack
from semid.pipeline import Deidentifier

MODES = ("normal", "fit-frame", "zero-features", "atlas-mask", "fixed-box", "similarity-frame", "rigid-frame",
         "rigid-fixed-box", "pose-fixed-box", "block-only")


def nearest_similarity(transform: sitk.Transform, keep_scale: bool = True) -> sitk.AffineTransform:
    """The affine ``transform`` reduced to its pose (``facebox.rigid_part``), times the cube root of its
    determinant with ``keep_scale``."""
    pose = comp.fb.rigid_part(transform)
    if keep_scale:
        scale = abs(np.linalg.det(np.array(sitk.AffineTransform(transform).GetMatrix()).reshape(3, 3))) ** (1 / 3)
        pose.SetMatrix((scale * np.array(pose.GetMatrix())).tolist())
    return pose


def main(mode: str) -> None:
    if mode not in MODES:
        raise SystemExit(f"mode must be one of {', '.join(MODES)}")
    # the experiments below change the first version's drawing (frame "fit") one thing at a time
    fill = LearnedFill(frame="pose" if mode in ("normal", "pose-fixed-box") else "fit")
    if mode == "zero-features":
        semantics = fill.model.semantics
        features = semantics.features
        semantics.features = lambda box: [torch.zeros_like(f) for f in features(box)]
    if mode in ("fixed-box", "rigid-fixed-box", "pose-fixed-box"):
        model, first = fill.model, []
        draw = model.fill

        def fixed(box, mask, modality, code):  # noqa: ANN001, ANN202
            if not first:
                first.append(draw(box, mask, modality, code))
            return first[0]

        model.fill = fixed
    if mode in ("similarity-frame", "rigid-frame", "rigid-fixed-box"):
        back, keep = comp.fb.from_box, mode == "similarity-frame"
        comp.fb.from_box = lambda values, reference, to_template, *a, **k: back(
            values, reference, nearest_similarity(to_template, keep), *a, **k)
    elif mode == "block-only":
        from semid.eval.baselines import BlockFill

        fill = BlockFill()

    def deidentify(image):
        return Deidentifier(1.0, fill=fill, identity="atlas" if mode == "atlas-mask" else "auto").run(image).image

    pop = ph.Population(10, 2026)
    gallery = {i: [pop.subject(i).visit(0).image] for i in range(10)}
    probes = [(i, deidentify(pop.subject(i).visit(1).image)) for i in range(10)]
    attacker = ReidAttack.load()
    static = attacker.evaluate(gallery, probes)
    adaptive = attacker.adapt(deidentify, steps=45, n_subjects=8, deid_visits=(1,), seed=0).evaluate(gallery, probes)
    print(f"{mode}: static AUC {static['roc_auc']:.2f} rank-1 {static['rank1']:.2f}; "
          f"adaptive AUC {adaptive['roc_auc']:.2f} rank-1 {adaptive['rank1']:.2f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "normal")
