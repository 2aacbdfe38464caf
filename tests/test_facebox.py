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


def test_pose_frame_joins_the_fit_at_the_tissue_and_keeps_the_atlas_proportions_inside() -> None:
    """The drawn face is mapped back by the fit outside ``B_p`` and where it meets the subject's tissue,
    and by the fit's rotation alone deep inside ``B_p`` (so it does not take on the subject's shape)."""
    ref = sitk.Image([60, 50, 40], sitk.sitkUInt8)
    ref.SetSpacing([1.5, 1.5, 2.0])
    ref.SetOrigin([-40.0, -30.0, -35.0])
    fit = sitk.AffineTransform(3)  # a stretched, sheared, turned head
    turn = sitk.Euler3DTransform((0, 0, 0), 0.1, -0.05, 0.2)
    fit.SetMatrix((np.array(turn.GetMatrix()).reshape(3, 3) @ np.diag([1.15, 0.9, 1.05])
                   + np.array([[0, 0.05, 0], [0, 0, 0], [0.04, 0, 0]])).ravel().tolist())
    fit.SetCenter((1.0, 2.0, 3.0))
    fit.SetTranslation((4.0, -3.0, 2.0))
    zz, yy, xx = np.indices(ref.GetSize()[::-1])
    head = np.ones(zz.shape, bool)
    blocked = (xx > 25) & (yy > 10) & (yy < 40) & (zz > 5) & (zz < 35)
    head[:, :, 45:] = False  # air in front of the face: part of B_p, no tissue to join there
    back = fb.pose_frame(ref, fit, blocked, head, blend_mm=10.0)
    to_template, rigid = fit.GetInverse(), fb.rigid_part(fit).GetInverse()

    def point(index):
        return ref.TransformIndexToPhysicalPoint([int(v) for v in index])

    outside = point((5, 5, 5))  # (x, y, z): far from B_p
    np.testing.assert_allclose(back.TransformPoint(outside), to_template.TransformPoint(outside), atol=1e-6)
    deep = point((55, 25, 20))  # in the air margin of B_p, > 10 mm from any tissue outside it
    np.testing.assert_allclose(back.TransformPoint(deep), rigid.TransformPoint(deep), atol=1e-3)
    # the rigid part keeps the fit's pose: rotation only, the box centre lands in the same place
    matrix = np.array(fb.rigid_part(fit).GetMatrix()).reshape(3, 3)
    np.testing.assert_allclose(matrix @ matrix.T, np.eye(3), atol=1e-9)
    assert np.allclose(fb.rigid_part(fit).TransformPoint(fit.GetCenter()), fit.TransformPoint(fit.GetCenter()))
    # and the frame changes smoothly: neighbouring voxels across B_p's tissue edge move < 1 voxel apart
    edge = [back.TransformPoint(point((x, 25, 20))) for x in range(24, 30)]
    steps = np.linalg.norm(np.diff(np.array(edge), axis=0), axis=1)
    assert steps.max() < 2.5
