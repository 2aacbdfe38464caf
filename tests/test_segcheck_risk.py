"""The rules of the segmentation check (`semid.eval.segcheck`) and of the residual-risk number
(`semid.risk`), on small synthetic label maps and records; the full path through real models and a
real server is in test_monailabel_loop.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from semid.errors import InputError
from semid.eval import segcheck as sc
from semid.risk import model_version, risk_from_record

VOXEL_ML = 0.008  # 2 mm voxels


def _labels(arr: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(arr.astype(np.uint8))
    image.SetSpacing((2.0, 2.0, 2.0))
    return image


def _pair() -> tuple[np.ndarray, np.ndarray]:
    """Original and de-identified segmentations that differ in known ways."""
    before = np.zeros((30, 30, 30), np.uint8)
    before[5:25, 5:25, 5:25] = 2  # head tissue: 8000 voxels
    before[8:22, 8:22, 8:22] = 1  # brain: 2744 voxels
    before[5:25, 25:30, 5:25] = 3  # identity region (the face)
    before[1, 1, 1:6] = 5  # 5 stray face-lesion voxels (0.04 ml): too small to compare
    after = before.copy()
    after[1, 1, 1:6] = 0
    after[8:22, 8:22, 8:9] = 2  # one brain slab lost: 196 of 2744 voxels
    after[5:25, 27:30, 5:25] = 0  # the face redrawn thinner
    after[2:7, 26:30, 10:15] = 4  # 100 voxels (0.8 ml) of "brain lesion" that the original lacks
    return before, after


def test_dice_per_class_and_which_classes_decide() -> None:
    before, after = _pair()
    check = sc.compare_label_maps(_labels(before), _labels(after), threshold=0.8)
    brain_dice = 2 * 2548 / (2744 + 2548)
    assert check.dice["brain"] == pytest.approx(brain_dice)
    assert check.dice["face_lesion"] == 0.0  # present in one map only
    assert check.dice["brain_lesion"] == 0.0
    assert check.volumes_ml["original"]["brain"] == pytest.approx(2744 * VOXEL_ML)
    # identity: reported, never compared by default; face lesion: 0.04 ml in both maps at most
    assert check.dice["identity"] is not None and check.dice["identity"] < 0.8
    assert set(check.compared) == {"brain", "head", "brain_lesion"}
    assert check.failed == ["brain_lesion"] and check.passed is False
    # the same maps pass when the hallucinated lesion is not among the checked classes
    relaxed = sc.compare_label_maps(_labels(before), _labels(after), 0.8, classes=["brain", "head"])
    assert relaxed.passed is True and relaxed.failed == []
    # the threshold is inclusive, and a stricter one fails the brain
    assert sc.compare_label_maps(_labels(before), _labels(after), brain_dice, ["brain"]).passed is True
    assert sc.compare_label_maps(_labels(before), _labels(after), brain_dice + 1e-6, ["brain"]).failed == ["brain"]


def test_absent_classes_are_not_failures_and_nothing_compared_does_not_pass() -> None:
    before = np.zeros((10, 10, 10), np.uint8)
    before[2:8, 2:8, 2:8] = 1
    check = sc.compare_label_maps(_labels(before), _labels(before))
    assert check.dice["brain"] == 1.0 and check.dice["face_lesion"] is None
    assert check.compared == ["brain"] and check.passed is True
    empty = np.zeros((10, 10, 10), np.uint8)
    assert sc.compare_label_maps(_labels(empty), _labels(empty)).passed is False


@pytest.mark.parametrize("value", [1.5, -0.1, "nan", "high", True, None, [0.8]])
def test_bad_thresholds_are_refused(value) -> None:
    with pytest.raises(InputError, match="threshold"):
        sc.parse_threshold(value)


def test_thresholds_and_classes_parse() -> None:
    assert sc.parse_threshold("0.7") == 0.7 and sc.parse_threshold(1) == 1.0
    assert sc.parse_classes("brain, head") == ("brain", "head")
    for bad in (["spleen"], [], "", [1, 2]):
        with pytest.raises(InputError):
            sc.parse_classes(bad)


def test_check_refuses_other_grids_and_ct_without_ct_weights() -> None:
    head = sitk.Image(20, 20, 20, sitk.sitkInt16)
    shifted = sitk.Image(head)
    shifted.SetOrigin((5.0, 0.0, 0.0))
    with pytest.raises(InputError, match="another grid"):
        sc.check_segmentation(head, shifted)
    ct = sitk.Image(head)
    ct.SetMetaData("semid:modality", "CT")
    with pytest.raises(InputError, match="trained on MR"):
        sc.check_segmentation(ct, ct)
    assert ct.GetMetaData("semid:modality") == "CT"  # the input was not retagged


def test_risk_from_record() -> None:
    base = {"level": 0.5, "blocked_voxels": 100}

    def rec(similarity: float | None) -> dict:
        return {**base, "residual_risk": {"critic_similarity_output_to_input": similarity,
                                          "critic_similarity_block_only": 0.45}}

    assert risk_from_record(rec(0.3)) == pytest.approx(0.65)
    assert risk_from_record(rec(-0.2)) == pytest.approx(0.4)  # pushed away still orders: no clipping at 0
    assert risk_from_record(rec(-1.4)) == 0.0 and risk_from_record(rec(1.4)) == 1.0
    assert risk_from_record({"level": 0.0, "blocked_voxels": 0}) == 1.0  # untouched
    assert risk_from_record({**rec(0.2), "blocked_voxels": 0}) == 1.0
    for record in (base, rec(None), rec(math.nan)):
        with pytest.raises(InputError, match="No residual risk"):
            risk_from_record(record)


def test_model_version_follows_the_weights(tmp_path) -> None:
    weights = tmp_path / "identity_unet.pt"
    missing = model_version([weights])
    weights.write_bytes(b"first weights")
    first = model_version([weights])
    assert first == model_version([weights]) and first != missing
    weights.write_bytes(b"other weights")
    assert model_version([weights]) not in (first, missing)
    assert model_version().count("+") == 2
