"""The face box (``semid.facebox``): the atlas-frame grid of the learned parts, and its samples."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from semid import facebox as fb
from semid import phantoms as ph
from semid.pipeline import Deidentifier


def test_box_grid_and_atlas(sample_head) -> None:
    ref = fb.box_reference()
    assert tuple(ref.GetSize()[::-1]) == fb.BOX_SHAPE and ref.GetSpacing() == (fb.BOX_SPACING,) * 3
    box = fb.box_atlas()
    assert box["score"].shape == fb.BOX_SHAPE
    # the box holds the whole identity region of the atlas (nothing of it is cut off)
    from semid.pipeline import _cached_atlas

    atlas_region_ml = float((sitk.GetArrayViewFromImage(_cached_atlas(None).score) > 0.02).sum()) * 8 / 1000
    box_region_ml = float((box["score"] > 0.02).sum()) * 8 / 1000
    assert box_region_ml > 0.97 * atlas_region_ml
    assert not (box["region"] & box["brain"]).any()


def test_round_trip_through_the_box(sample_head) -> None:
    """A phantom visit into the box and back: the face region comes back where it was."""
    visit = ph.Population(1, seed=11).subject(0).visit(0, "MR")
    location = Deidentifier().locate(visit.image)
    labels_box = fb.to_box(visit.labels, location.fit.transform, sitk.sitkNearestNeighbor)
    face_box = (labels_box == ph.IDENTITY).astype(np.float32)
    back = fb.from_box(face_box, visit.labels, location.to_atlas) > 0.5
    face = sitk.GetArrayFromImage(visit.labels) == ph.IDENTITY
    inside = fb.from_box(np.ones(fb.BOX_SHAPE, np.float32), visit.labels, location.to_atlas) > 0.99
    dice = 2 * (back & face & inside).sum() / ((back & inside).sum() + (face & inside).sum())
    assert dice > 0.9
    scale = fb.intensity_scale(visit.image, "MR")
    norm = scale.normalise(sitk.GetArrayFromImage(visit.image))
    assert 0.0 <= norm.min() and norm.max() <= fb.CLIP_MAX
    assert 0.6 < float(np.median(norm[face])) < 2.0  # soft tissue about 1
    ct = fb.intensity_scale(visit.image, "CT")
    assert np.allclose(ct.restore(ct.normalise(np.array([-1000.0, 40.0]))), [-1000.0, 40.0])
