"""Utility measures U1 and U2 (DESIGN.md §6) on real phantoms with the committed segmentation weights.

The validity check of issue 4: a face-region lesion is segmented on originals (Dice >= 0.7 on
held-out visits of the benchmark's population, seed 2026, which training never saw), and a
de-identifier that sets the face to air loses it (Dice < 0.2) while the brain keeps its Dice.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from semid import phantoms as ph
from semid.eval import utility as ut
from semid.io import MODALITY_KEY

#: Held-out visits: (subject, visit) of Population(4, seed=2026).
HELD_OUT = ((0, 0), (1, 1))


@pytest.fixture(scope="module")
def model() -> ut.SegmentationModel:
    torch.set_num_threads(1)
    return ut.SegmentationModel.load()


@pytest.fixture(scope="module")
def held_out(sample_head, model: ut.SegmentationModel) -> list[dict]:
    """Each held-out visit with U1 on the original and on the face set to air (computed once)."""
    pop = ph.Population(4, seed=ut.BENCHMARK_SEED, modalities=("MR",))
    rows = []
    for i, j in HELD_OUT:
        v = pop.subject(i).visit(j, "MR")
        region = np.isin(sitk.GetArrayFromImage(v.labels), (ph.IDENTITY, ph.FACE_LESION))
        rows.append({"visit": v, "original": ut.u1(model, v.image, v.labels, region),
                     "air": ut.u1(model, ut.face_to_air(v.image, v.labels), v.labels, region)})
    return rows


def test_weights_load_with_weights_only() -> None:
    blob = torch.load(ut.DEFAULT_WEIGHTS, map_location="cpu", weights_only=True)
    assert blob["format"] == ut.FORMAT
    assert blob["labels"] == list(ut.LABEL_NAMES)
    assert blob["training"]["population_seed"] != ut.BENCHMARK_SEED
    assert blob["training"]["steps"] > 0 and blob["modalities"] == ["MR"]
    assert all(isinstance(t, torch.Tensor) for t in blob["state_dict"].values())
    assert ut.DEFAULT_WEIGHTS.stat().st_size < 10e6


def test_predict_keeps_geometry(model: ut.SegmentationModel, held_out: list[dict]) -> None:
    image = held_out[0]["visit"].image[20:84, 30:94, 40:100]  # a sub-volume: its own origin and size
    pred = model.predict(image)
    assert pred.GetPixelID() == sitk.sitkUInt8
    assert pred.GetSize() == image.GetSize() == (64, 64, 60)
    assert pred.GetSpacing() == image.GetSpacing() and pred.GetOrigin() == image.GetOrigin()
    assert pred.GetDirection() == image.GetDirection()
    assert set(np.unique(sitk.GetArrayViewFromImage(pred))) <= set(range(6))


def test_face_lesion_segmented_on_originals(held_out: list[dict]) -> None:
    """Validity: the face-region lesion, inside the identity region, is found on originals (Dice >= 0.7)."""
    face = [r["original"]["all"]["face_lesion"] for r in held_out]
    assert np.mean(face) >= 0.7, face


def test_tissue_classes_segmented_on_originals(held_out: list[dict]) -> None:
    for r in held_out:
        assert r["original"]["all"]["brain"] >= 0.9, r["original"]["all"]
        assert r["original"]["all"]["head"] >= 0.85
        assert r["original"]["inside"]["identity"] >= 0.9
        assert r["original"]["outside"]["face_lesion"] == 0.0 or math.isnan(r["original"]["outside"]["face_lesion"])


def test_face_to_air_loses_the_face_lesion_keeps_the_brain(held_out: list[dict]) -> None:
    for r in held_out:
        assert r["air"]["all"]["face_lesion"] < 0.2, r["air"]["all"]
        assert r["air"]["inside"]["identity"] < 0.2
        assert r["air"]["all"]["brain"] >= 0.9, r["air"]["all"]


def test_u1_reports_inside_outside_all(held_out: list[dict]) -> None:
    r = held_out[0]["original"]
    assert set(r) == {"inside", "outside", "all"}
    for part in r.values():
        assert set(part) == set(ut.DICE_CLASSES)
    assert r["outside"]["identity"] == 0.0 or math.isnan(r["outside"]["identity"])  # no identity voxel outside


def test_normalisation_barely_moves_when_the_face_goes(held_out: list[dict]) -> None:
    v = held_out[0]["visit"]
    brain = sitk.GetArrayFromImage(v.labels) == ph.BRAIN
    before = np.median(ut.normalise(v.image)[brain])
    after = np.median(ut.normalise(ut.face_to_air(v.image, v.labels))[brain])
    assert 0.8 < before < 1.2
    assert abs(after / before - 1.0) < 0.1


def test_predict_refuses_ct_with_mr_weights(model: ut.SegmentationModel) -> None:
    image = sitk.Image(8, 8, 8, sitk.sitkInt16)
    image.SetMetaData(MODALITY_KEY, "CT")
    with pytest.raises(ValueError, match="trained on"):
        model.predict(image)


def test_u2_identical_and_changed_voxels() -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 1000, (10, 12, 14)).astype(np.int16)
    original = sitk.GetImageFromArray(arr)
    block = np.zeros(arr.shape, np.uint8)
    block[:, :, :4] = 1
    mask = sitk.GetImageFromArray(block)
    brain = np.zeros(arr.shape, bool)
    brain[4:8, 4:8, 6:10] = True

    same = ut.u2(original, sitk.GetImageFromArray(arr.copy()), mask, brain)
    assert same["unchanged_fraction_outside_block"] == 1.0 and same["brain_voxels_changed"] == 0
    assert same["pixel_type_kept"]

    inside_block = arr.copy()
    inside_block[:, :, :4] = 0  # changes only where blocking is allowed, no brain there
    r = ut.u2(original, sitk.GetImageFromArray(inside_block), mask, brain)
    assert r["unchanged_fraction_outside_block"] == 1.0 and r["brain_voxels_changed"] == 0

    one_brain = arr.copy()
    one_brain[5, 5, 7] += 1
    r = ut.u2(original, sitk.GetImageFromArray(one_brain), mask, brain)
    assert r["brain_voxels_changed"] == 1
    assert r["unchanged_fraction_outside_block"] == pytest.approx(1.0 - 1.0 / int((block == 0).sum()))

    with pytest.raises(ValueError):
        ut.u2(original, sitk.GetImageFromArray(arr[:-1].copy()), mask, brain)


def test_dice_per_class_hand_made() -> None:
    truth = np.zeros((4, 4, 4), np.uint8)
    truth[:2] = 1  # brain: 32 voxels
    truth[2, :2] = 5  # face lesion: 8 voxels
    pred = truth.copy()
    pred[2, :2, :1] = 3  # 2 of the 8 face-lesion voxels predicted as identity

    d = ut.dice_per_class(pred, truth)
    assert d["brain"] == 1.0
    assert d["face_lesion"] == pytest.approx(2 * 6 / (6 + 8))
    assert d["identity"] == 0.0  # predicted, never true
    # absent from both prediction and truth: undefined, reported as nan (skipped by np.nanmean)
    assert math.isnan(d["head"]) and math.isnan(d["brain_lesion"])
    assert set(d) == {"brain", "head", "identity", "brain_lesion", "face_lesion"}

    region = np.zeros(truth.shape, bool)
    region[2:] = True
    r = ut.dice_per_class(pred, truth, region)
    assert math.isnan(r["brain"])  # no brain in the region, none predicted there
    assert r["face_lesion"] == pytest.approx(2 * 6 / (6 + 8))

    with pytest.raises(ValueError):
        ut.dice_per_class(pred, truth[:3])
