"""The benchmark's methods (SemID and its baselines) on the real 2 mm head, behind one interface.

The head is located (atlas registration) once and shared by every method through
``semid.eval.baselines.locate``; the peers (quickshear, radveil) run for real.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import SimpleITK as sitk

from semid.eval import baselines as bl
from semid.identity import _signed_distance, head_mask, head_threshold
from semid.io import read_volume, same_geometry

LEVELLED = ("semid", "semid-surface", "block", "blur", "pixelate")
UNLEVELLED = ("cut", "quickshear", "radveil")
LEVELS = (0.5, 1.0)


def _digest(image: sitk.Image) -> str:
    return hashlib.sha1(sitk.GetArrayViewFromImage(image).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def head(sample_head) -> sitk.Image:
    return read_volume(sample_head)


@pytest.fixture(scope="module")
def runs(head) -> dict:
    """{(method, level): DeidResult}; level None for methods without one. Also checks the input is kept."""
    before = _digest(head)
    bl.locate(head)
    out = {}
    for name in LEVELLED:
        method = bl.get_method(name)
        for p in LEVELS:
            out[name, p] = method.run(head, p)
    for name in UNLEVELLED:
        out[name, None] = bl.get_method(name).run(head, None)
    assert _digest(head) == before, "a method modified its input"
    return out


@pytest.fixture(scope="module")
def face_and_tip(head, runs) -> tuple[np.ndarray, tuple[int, int, int]]:
    """SemID's B_1 inside the head (the face), and the nose tip (most anterior head voxel)."""
    mask = sitk.GetArrayViewFromImage(head_mask(head, head_threshold(head, "MR"))) > 0
    face = (sitk.GetArrayFromImage(runs["semid", 1.0].mask) > 0) & mask
    zyx = np.argwhere(mask)
    direction = np.array(head.GetDirection()).reshape(3, 3)
    y_lps = (np.array(head.GetOrigin()) + (zyx[:, ::-1] * head.GetSpacing()) @ direction.T)[:, 1]
    return face, tuple(int(v) for v in zyx[np.argmin(y_lps)])  # anterior = -y in LPS


def test_registry_and_unknown_name():
    assert set(bl.METHODS) == set(LEVELLED) | set(UNLEVELLED)
    for name in bl.METHODS:
        method = bl.get_method(name)
        assert method.name == name and method.levelled == (name in LEVELLED)
    with pytest.raises(ValueError, match="semid, semid-surface, block, blur, pixelate, cut, quickshear, radveil"):
        bl.get_method("pydeface")


@pytest.mark.parametrize("key", [(n, p) for n in LEVELLED for p in LEVELS] + [(n, None) for n in UNLEVELLED],
                         ids=lambda k: f"{k[0]}-{k[1]}")
def test_geometry_type_record_and_untouched_outside_the_mask(head, runs, key):
    result = runs[key]
    assert same_geometry(head, result.image, tol=0.0) and same_geometry(head, result.mask, tol=0.0)
    assert result.image.GetPixelID() == head.GetPixelID()
    assert result.mask.GetPixelID() == sitk.sitkUInt8
    mask = sitk.GetArrayViewFromImage(result.mask)
    assert set(np.unique(mask)) <= {0, 1} and mask.any()
    before, after = sitk.GetArrayViewFromImage(head), sitk.GetArrayViewFromImage(result.image)
    assert np.array_equal(before[mask == 0], after[mask == 0]), "voxels outside the mask changed"
    record = result.record
    assert record["method"] == key[0] and record["level"] == key[1]
    voxel_ml = float(np.prod(head.GetSpacing())) / 1000.0
    assert record["blocked_ml"] == pytest.approx(int(mask.sum()) * voxel_ml, abs=1e-3)
    assert record["timings_s"]["total"] > 0
    assert record["voxels_changed_outside_block"] == 0


@pytest.mark.parametrize("key", [(n, 1.0) for n in LEVELLED] + [(n, None) for n in UNLEVELLED],
                         ids=lambda k: k[0])
def test_the_face_is_changed(head, runs, face_and_tip, key):
    face, (z, y, x) = face_and_tip
    changed = sitk.GetArrayViewFromImage(runs[key].image) != sitk.GetArrayViewFromImage(head)
    # the nose tip's 3x3x3 neighbourhood changes where it is tissue (air next to it may be filled with air,
    # and an air voxel can get the same noise value by chance)
    tip = (slice(z - 1, z + 2), slice(y - 1, y + 2), slice(x - 1, x + 2))
    assert changed[tip][face[tip]].mean() >= 0.9, "the nose tip is untouched"
    # radveil is skin-deep (~4.5 mm), cut and quickshear remove the front of the face, the others all of B_1
    assert changed[face].mean() > (0.9 if key[0] in LEVELLED else 0.05)


def test_levelled_methods_share_nested_blocked_regions(runs):
    masks = {key: sitk.GetArrayFromImage(r.mask) > 0 for key, r in runs.items() if key[0] in LEVELLED}
    for name in LEVELLED:
        small, large = masks[name, 0.5], masks[name, 1.0]
        assert small.sum() < large.sum() and not np.any(small & ~large), f"{name}: B_0.5 is not inside B_1"
        for p in LEVELS:  # one B_p for every method at a level
            assert np.array_equal(masks[name, p], masks["semid", p])


def test_brain_untouched_by_block_blur_pixelate(head, runs):
    deep = sitk.GetArrayFromImage(_signed_distance(head_mask(head, head_threshold(head, "MR")))) < -35.0
    for name in ("block", "blur", "pixelate"):
        for p in LEVELS:
            result = runs[name, p]
            changed = sitk.GetArrayViewFromImage(result.image) != sitk.GetArrayViewFromImage(head)
            assert result.record["brain_voxels_changed"] == 0
            assert not np.any(changed & deep), f"{name} changed deep brain voxels at p={p}"


def test_what_each_baseline_puts_in_the_block(head, runs):
    before = sitk.GetArrayViewFromImage(head)
    block = runs["block", 1.0]
    inside = sitk.GetArrayViewFromImage(block.mask) > 0
    assert np.all(sitk.GetArrayViewFromImage(block.image)[inside] == before.min())  # MR air = the minimum
    blur = sitk.GetArrayViewFromImage(runs["blur", 1.0].image)[inside].astype(float)
    assert blur.std() < before[inside].astype(float).std()  # smoother than the face it replaces
    pixelated = sitk.GetArrayViewFromImage(runs["pixelate", 1.0].image)
    both = inside[:, :, 1:] & inside[:, :, :-1]  # neighbours along x, both in the block: 8 mm = 4 voxels per cube

    def same_as_neighbour(arr: np.ndarray) -> float:
        return float((arr[:, :, 1:] == arr[:, :, :-1])[both].mean())

    assert same_as_neighbour(pixelated) > 0.7 and same_as_neighbour(pixelated) > 3 * same_as_neighbour(before)
    for name in ("cut", "quickshear"):
        removed = sitk.GetArrayViewFromImage(runs[name, None].mask) > 0
        assert np.all(sitk.GetArrayViewFromImage(runs[name, None].image)[removed] == 0)


def test_level_zero_changes_nothing(head):
    result = bl.get_method("blur").run(head, 0.0)
    assert result.record["level"] == 0.0 and result.record["blocked_ml"] == 0.0
    assert _digest(result.image) == _digest(head) and not sitk.GetArrayViewFromImage(result.mask).any()


def test_block_fill_of_ct_is_air(sample_head):
    ct = read_volume(sample_head.with_name("ct_small.nii.gz"))
    assert bl.background_value(ct, "CT") == -1000.0


def test_block_means_are_cube_means():
    values = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    means = bl.block_means(values, [2, 4, 3])
    assert means.shape == values.shape
    assert means[0, 0, 0] == values[:2, :4, :3].mean() and means[4, 5, 6] == values[4:, 4:, 6:].mean()


@pytest.mark.parametrize("variant", ["as_read", "lps_stored", "oblique_anisotropic"])
def test_nifti_round_trip_keeps_geometry(sample_head, head, variant):
    import nibabel as nib

    image = head
    if variant == "lps_stored":
        image = sitk.DICOMOrient(head, "LPS")
    elif variant == "oblique_anisotropic":
        image = sitk.Image([20, 30, 40], sitk.sitkFloat32) + 3.5
        image.SetSpacing((0.9, 1.7, 3.1))
        image.SetOrigin((-12.5, 40.0, 7.25))
        image.SetDirection(sitk.VersorTransform((0.3, -1.0, 0.5), 0.6).GetMatrix())
    nii = bl.sitk_to_nifti(image)
    if variant == "as_read":  # the same world as nibabel's own reading of the file
        ref = nib.load(str(sample_head))
        assert np.allclose(nii.affine, ref.affine, atol=1e-4)
        assert np.array_equal(np.asanyarray(nii.dataobj), np.asanyarray(ref.dataobj))
    for back in (bl.nifti_to_sitk(nii), bl.nifti_to_sitk(nib.Nifti1Image.from_bytes(nii.to_bytes()), image)):
        assert back.GetSize() == image.GetSize() and back.GetPixelID() == image.GetPixelID()
        assert np.allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-5)
        assert np.allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-4)
        assert np.allclose(back.GetDirection(), image.GetDirection(), atol=1e-5)
        assert _digest(back) == _digest(image)
