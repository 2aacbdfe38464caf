"""Where does the learned fill's identity leak come from? A2 on SemID's p = 1 outputs, one input at a time.

Runs attacker A2 (static, and adaptive: fine-tuned 45 steps on the method's outputs of 8 training
subjects, as ``semid bench --quick`` does) on visit 1 of the 10 subjects of seed 2026, against their
visit 0, for one variant of SemID's learned fill:

- ``normal``: as shipped (atlas fit refined on the cranium, region with its tissue margin, drawn face
  mapped back by that fit, the drawing kept only where it departs from the default face like a lesion:
  ``LearnedFill(drawing="gated")``);
- ``full-drawing``: the generator's whole drawing kept (``LearnedFill(drawing="full")``, the previous
  version);
- ``atlas-generator-mask``: the generator is given ``B_p`` joined with the atlas's ``B_1`` on the box (the
  mask it was trained with), so the subject's own outline of the block never reaches it;
- ``zero-features``: the generator gets zeros instead of the decoupled encoder features;
- ``atlas-mask``: ``B_p`` from the registered atlas only (no identity network);
- ``fixed-box``: every subject gets the box the generator drew for the first one (the same face in the
  atlas frame), mapped back by each subject's own fit: what is left is the frame's and the junction's leak;
- ``pose-frame``: the drawn face mapped back by the fit's pose deep inside ``B_p``
  (``LearnedFill(frame="pose")``, the remedy of the previous version);
- ``whole-head-fit``: the atlas fit not refined on the cranium (it follows the face, as before);
- ``no-margin``: the region without its tissue margin (``identity.REGION_MARGIN_MM`` = 0);
- ``block-only``, ``block-only-whole-head-fit``, ``block-only-no-margin``: ``B_p`` filled with air (the
  reference: what the rest of the head and the block's own outline give away), as shipped and with
  each of the two changes undone.

Usage: ``python benchmarks/generator_leak.py MODE [GENERATOR_WEIGHTS]`` (MODE one of ``MODES``; the
weights default to the committed generator). The modes of the previous
version (frames of the whole-head fit: ``similarity-frame``, ``rigid-frame``, ...) are in the git history
of this file, with their results in the README.
"""

from __future__ import annotations

import sys

import torch

from semid import identity as idm
from semid import phantoms as ph
from semid.compensation import LearnedFill
from semid.eval.attack_reid import ReidAttack
from semid.pipeline import Deidentifier

MODES = ("normal", "full-drawing", "atlas-generator-mask", "zero-features", "atlas-mask", "fixed-box", "pose-frame",
         "whole-head-fit", "no-margin", "block-only", "block-only-whole-head-fit", "block-only-no-margin")


def main(mode: str, weights: str | None = None) -> None:
    if mode not in MODES:
        raise SystemExit(f"mode must be one of {', '.join(MODES)}")
    fill = LearnedFill(weights=weights, frame="pose" if mode == "pose-frame" else "fit",
                       drawing="gated" if mode == "normal" else "full")
    if mode == "zero-features":
        semantics = fill.model.semantics
        features = semantics.features
        semantics.features = lambda box: [torch.zeros_like(f) for f in features(box)]
    if mode == "atlas-generator-mask":
        import numpy as np

        from semid.compensation import block_mask

        model, canonical = fill.model, block_mask(1.0)
        draw_subject = model.fill
        model.fill = lambda box, mask, modality, code: draw_subject(box, np.asarray(mask) | canonical, modality, code)
    if mode == "fixed-box":
        model, first = fill.model, []
        draw = model.fill

        def fixed(box, mask, modality, code):  # noqa: ANN001, ANN202
            if not first:
                first.append(draw(box, mask, modality, code))
            return first[0]

        model.fill = fixed
    if mode.endswith("whole-head-fit"):
        whole_head_fit = idm.fit_atlas
        idm.fit_atlas = lambda atlas_mask, subject_mask, features, cranium=None: whole_head_fit(
            atlas_mask, subject_mask, features)
    if mode.endswith("no-margin"):
        idm.blocking_score = lambda score, brain: score
    if mode.startswith("block-only"):
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
    main(sys.argv[1] if len(sys.argv) > 1 else "normal", sys.argv[2] if len(sys.argv) > 2 else None)
