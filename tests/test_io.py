"""Volume I/O: geometry, pixel type and values survive every format, DICOM included."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from semid.errors import InputError
from semid.io import geometry, read_volume, same_geometry, write_volume


def _oblique_image(pixel=sitk.sitkInt16) -> sitk.Image:
    rng = np.random.default_rng(1)
    arr = rng.integers(-1000, 2000, size=(7, 9, 11)).astype(np.int16)
    image = sitk.Cast(sitk.GetImageFromArray(arr), pixel)
    image.SetSpacing((0.7, 1.3, 2.9))
    image.SetOrigin((-12.5, 40.25, 3.0))
    rot = sitk.VersorTransform((0.3, -0.5, 0.8), 0.35)  # an oblique, non-axis-aligned direction
    image.SetDirection(rot.GetMatrix())
    return image


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ""])
def test_round_trip_keeps_geometry_dtype_and_values(tmp_path, suffix):
    image = _oblique_image()
    out = write_volume(image, tmp_path / f"vol{suffix}")
    back = read_volume(out)
    assert same_geometry(image, back, tol=1e-4), (geometry(image), geometry(back))
    assert back.GetPixelID() == image.GetPixelID()
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))


def test_nifti_gz_is_the_same_bytes_every_time_and_leaves_no_temporary_file(tmp_path):
    image = _oblique_image()
    a = write_volume(image, tmp_path / "a" / "vol.nii.gz").read_bytes()
    b = write_volume(image, tmp_path / "b" / "vol.nii.gz").read_bytes()
    assert a[:2] == b"\x1f\x8b" and a == b  # gzip, with no time or temporary name in its header
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["vol.nii.gz"]


def test_float_volume_keeps_float32(tmp_path):
    image = sitk.Cast(_oblique_image(), sitk.sitkFloat32) * 0.25
    back = read_volume(write_volume(image, tmp_path / "f.nrrd"))
    assert back.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))


def test_fractional_volume_is_refused_as_dicom(tmp_path):
    image = sitk.Cast(_oblique_image(), sitk.sitkFloat32) * 0.25
    with pytest.raises(InputError, match="integer pixels"):
        write_volume(image, tmp_path / "dicom_out")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_lps_stored_copy_reads_back_as_the_same_head(sample_head):
    head = read_volume(sample_head)
    lps = sitk.DICOMOrient(head, "LPS")
    assert lps.GetDirection() != head.GetDirection()
    # the same physical point has the same value in both layouts
    point = head.TransformIndexToPhysicalPoint((50, 60, 70))
    assert head[head.TransformPhysicalPointToIndex(point)] == lps[lps.TransformPhysicalPointToIndex(point)]


def test_read_refuses_with_one_sentence(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_volume(tmp_path / "missing.nii.gz")
    text = tmp_path / "notes.nii.gz"
    text.write_text("not an image")
    with pytest.raises(InputError, match="not an image"):
        read_volume(text)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(InputError, match="no DICOM"):
        read_volume(empty_dir)
