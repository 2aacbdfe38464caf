"""Where does the learned fill's identity leak come from? A2 on SemID's p = 1 outputs, one input at a time.

Runs attacker A2 (static, and adaptive: fine-tuned 45 steps on the method's outputs of 8 training
subjects, as ``semid bench --quick`` does) on visit 1 of the 10 subjects of seed 2026, against their
visit 0, for one variant of SemID's learned fill:

- ``normal``: as shipped;
- ``zero-features``: the generator gets zeros instead of the decoupled encoder features;
- ``atlas-mask``: ``B_p`` from the registered atlas only (no identity network).

Usage: ``python benchmarks/generator_leak.py normal|zero-features|atlas-mask``.
"""

from __future__ import annotations

import sys

import torch

from semid import phantoms as ph
from semid.compensation import LearnedFill
from semid.eval.attack_reid import ReidAttack
from semid.pipeline import Deidentifier

MODES = ("normal", "zero-features", "atlas-mask")


def main(mode: str) -> None:
    if mode not in MODES:
        raise SystemExit(f"mode must be one of {', '.join(MODES)}")
    fill = LearnedFill()
    if mode == "zero-features":
        semantics = fill.model.semantics
        features = semantics.features
        semantics.features = lambda box: [torch.zeros_like(f) for f in features(box)]

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
