"""The learned identity map: identity-region network, re-identification saliency, ranking and checks."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from semid.errors import InputError
from semid.identity import network as nw
from semid.identity import ranking
from semid.identity import saliency as sal

#: Dice of the committed network on the benchmark's people (seed 2026, never trained on), measured when
#: the weights were made (``training.benchmark_population`` in the file: MR 0.865, CT 0.876 on 4 subjects)
#: minus a margin for other visits and other machines.
MIN_DICE = 0.83
#: The same on an oblique, LPS-stored, anisotropic copy of the volume (interpolated twice; 0.856 measured).
MIN_DICE_OBLIQUE = 0.82
#: Dice of the network's brain output on the same people (held-out seed-5 people: see ``brain_dice`` in the file).
MIN_BRAIN_DICE = 0.90


@pytest.fixture(scope="module")
def visits():
    """Visit 0 of subject 0 of the benchmark population (seed 2026), MR and CT."""
    from semid.data import data_dir

    if not (data_dir() / "samples" / "t1w_small.nii.gz").is_file():
        pytest.skip("phantom base head not found: run `make data` first")
    from semid.phantoms import Population

    subject = Population(1, seed=2026).subject(0)
    return {m: subject.visit(0, m) for m in ("MR", "CT")}


@pytest.fixture(scope="module")
def network():
    return nw.IdentityNetwork.load()


def _truth(visit) -> np.ndarray:
    return np.isin(sitk.GetArrayViewFromImage(visit.labels), nw.REGION_LABELS)


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing() and a.GetOrigin() == b.GetOrigin()
            and a.GetDirection() == b.GetDirection())


@pytest.mark.parametrize("modality", ["MR", "CT"])
def test_network_finds_the_identity_region_of_unseen_people(network, visits, modality):
    visit = visits[modality]
    prob = network.predict(visit.image, modality)
    assert prob.GetPixelID() == sitk.sitkFloat32
    assert _same_grid(prob, visit.image)
    arr = sitk.GetArrayViewFromImage(prob)
    assert 0.0 <= float(arr.min()) and float(arr.max()) <= 1.0
    assert nw.dice(arr > 0.5, _truth(visit)) >= MIN_DICE
    # the modality tag on the phantom is enough
    assert nw.dice(sitk.GetArrayFromImage(network.predict(visit.image)) > 0.5, arr > 0.5) > 0.999


@pytest.mark.parametrize("modality", ["MR", "CT"])
def test_network_finds_the_brain_in_the_same_pass(network, visits, modality):
    visit = visits[modality]
    maps = network.predict_maps(visit.image, modality)
    assert set(maps) == {"identity", "brain"} and network.outputs == ("identity", "brain")
    assert all(_same_grid(m, visit.image) for m in maps.values())
    brain = sitk.GetArrayViewFromImage(maps["brain"]) > 0.5
    truth = np.isin(sitk.GetArrayViewFromImage(visit.labels), nw.BRAIN_LABELS)
    assert nw.dice(brain, truth) >= MIN_BRAIN_DICE
    identity = sitk.GetArrayViewFromImage(maps["identity"])
    assert np.array_equal(identity, sitk.GetArrayFromImage(network.predict(visit.image, modality)))


def test_brain_distance_is_to_the_largest_piece_on_any_grid():
    """A 40 mm ball (the brain) and a small cube far from it (an island) on the 4 mm grid; the distance
    on a 1 mm grid that is oblique to it follows the ball's exact distance and ignores the island."""
    grid = sitk.Image([40, 40, 40], sitk.sitkFloat32)
    grid.SetSpacing([4.0] * 3)
    centre = np.array([80.0, 80.0, 80.0])
    pts = np.stack(np.meshgrid(*[np.arange(40) * 4.0] * 3, indexing="ij"), axis=-1)[..., ::-1]  # (z, y, x) -> xyz
    prob = (np.linalg.norm(pts - centre, axis=-1) < 40.0).astype(np.float32)
    prob[2:5, 2:5, 2:5] = 1.0  # the island, about 100 mm from the ball
    target = sitk.Image([61, 61, 61], sitk.sitkFloat32)
    target.SetOrigin([50.0, 50.0, 20.0])
    c, s_ = np.cos(0.3), np.sin(0.3)
    target.SetDirection([c, -s_, 0.0, s_, c, 0.0, 0.0, 0.0, 1.0])
    dist = sitk.GetArrayFromImage(nw._brain_distance(prob, grid, target))
    assert dist.shape == (61, 61, 61)
    idx = np.stack(np.meshgrid(*[np.arange(61)] * 3, indexing="ij"), axis=-1)[..., ::-1].reshape(-1, 3)
    world = np.array([target.TransformIndexToPhysicalPoint([int(v) for v in i]) for i in idx[::97]])
    exact = np.linalg.norm(world - centre, axis=-1) - 40.0
    got = dist.reshape(-1)[::97]
    # outside the brain, where the keep-out is decided: measured median error 0.6-0.9 mm, largest 2.5 mm
    near = (exact > 0.0) & (exact < 20.0)
    assert np.median(np.abs(got - exact)[near]) < 1.2 and np.abs(got - exact)[near].max() < 3.0
    assert (got[exact < -5.0] < 0.0).all()  # inside it is only negative
    far_from_ball = sitk.GetArrayFromImage(nw._brain_distance(prob, grid, grid))[3, 3, 3]
    assert far_from_ball > 60.0  # the island is not the brain
    empty = sitk.GetArrayFromImage(nw._brain_distance(np.zeros_like(prob), grid, target))
    assert float(empty.min()) == nw.FAR_MM


def test_weights_with_one_output_load_and_give_the_identity_region_only(visits, tmp_path):
    import torch

    arch = {**nw.ARCH, "out_channels": 1}
    net = nw._build(arch)
    path = tmp_path / "one_output.pt"
    torch.save({"format": nw.FORMAT, "name": nw.NAME, "arch": arch, "state_dict": net.state_dict()}, path)
    old = nw.IdentityNetwork.load(path)
    assert old.outputs == ("identity",)
    maps = old.predict_maps(visits["MR"].image, "MR")
    assert list(maps) == ["identity"] and _same_grid(maps["identity"], visits["MR"].image)


def test_prediction_keeps_an_oblique_lps_grid_exactly(network, visits):
    visit = visits["MR"]
    # an LPS-stored (x towards the left), 20-degree oblique, anisotropic grid over the same head
    rot = sitk.VersorTransform((0.0, 0.0, 1.0), np.deg2rad(20.0)).GetMatrix()
    direction = list(rot)
    ref = sitk.Image([100, 112, 96], sitk.sitkInt16)
    ref.SetSpacing((2.4, 2.2, 2.6))
    ref.SetDirection(direction)
    centre = np.array(visit.image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in visit.image.GetSize()]))
    half = np.array(direction).reshape(3, 3) @ (0.5 * (np.array(ref.GetSize()) - 1) * np.array(ref.GetSpacing()))
    ref.SetOrigin((centre - half).tolist())
    oblique = sitk.Resample(visit.image, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkInt16)
    labels = sitk.Resample(visit.labels, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(oblique.GetDirection()) != "RAS"
    prob = network.predict(oblique, "MR")
    assert _same_grid(prob, oblique)
    truth = np.isin(sitk.GetArrayViewFromImage(labels), nw.REGION_LABELS)
    assert nw.dice(sitk.GetArrayViewFromImage(prob) > 0.5, truth) >= MIN_DICE_OBLIQUE


def test_torchscript_export_predicts_like_monai_and_loads_without_it(network, visits, tmp_path, monkeypatch):
    """Inference runs the U-Net as TorchScript: the same probabilities as the MONAI network, and once
    the export exists a fresh process loads the weights without importing MONAI (6-10 s here)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "SEMID_DATA_DIR": str(tmp_path)}
    probe = ("import sys; from semid.identity import network as nw; "
             "net = nw.IdentityNetwork.load(scripted=True); "
             "print(type(net.net).__name__, 'monai' in sys.modules, nw.scripted_path(net.sha256).is_file())")
    first = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert first.stdout.split() == ["RecursiveScriptModule", "True", "True"]  # built from MONAI, exported
    second = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert second.stdout.split() == ["RecursiveScriptModule", "False", "True"]  # read back, no MONAI

    monkeypatch.setenv("SEMID_DATA_DIR", str(tmp_path))
    scripted = nw.IdentityNetwork.load(scripted=True)  # the export the subprocesses wrote
    x, _ = nw.prepare(visits["MR"].image, "MR")
    eager, script = network.predict_array(x), scripted.predict_array(x)
    assert float(np.abs(eager - script).max()) < 1e-5


def test_describe_names_the_weights_and_their_training(network):
    info = network.describe()
    assert info["name"] == "identity-unet" and info["file"] == "identity_unet.pt"
    assert len(info["sha256"]) == 64
    assert info["training_data"]["population_seed"] not in (2026, 4242, 1)
    assert nw.DEFAULT_WEIGHTS.stat().st_size < 5e6


def test_nested_masks_are_nested_and_match_the_pipeline_rule():
    rng = np.random.default_rng(0)
    prob = rng.uniform(0.0, 1.0, (12, 14, 16)).astype(np.float32)
    saliency = rng.uniform(0.0, 1.0, prob.shape).astype(np.float32)
    s = ranking.combine(prob, saliency, weight=0.4)
    region = prob > 0.5
    assert s.dtype == np.float32 and float(s.min()) >= 0.0 and float(s.max()) <= 1.0
    assert np.array_equal(s > 0, region)
    np.testing.assert_allclose(s[region], 0.4 * prob[region] + 0.6 * saliency[region], rtol=1e-6)
    levels = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]
    masks = ranking.nested_masks(s, region, levels)
    assert not masks[0.0].any() and np.array_equal(masks[1.0], region)
    for p, q in zip(levels[:-1], levels[1:], strict=True):
        assert not (masks[p] & ~masks[q]).any()
        assert abs(int(masks[q].sum()) - round(q * region.sum())) == 0
    for p in levels:
        assert np.array_equal(ranking.nested_block(s, region, p), masks[p])
    # many equal scores: the partition's ties are broken by voxel index exactly like the full sort
    coarse = np.where(region, np.round(s * 4) / 4, 0.0).astype(np.float32)
    tied = ranking.nested_masks(coarse, region, levels)
    for p in levels:
        assert np.array_equal(ranking.nested_block(coarse, region, p), tied[p])


def test_agreement_reports_dice_and_volumes():
    a = np.zeros((4, 5, 6), bool)
    b = np.zeros_like(a)
    a[:2] = True
    b[1:3] = True
    out = ranking.agreement(a, b, spacing=(2.0, 2.0, 2.0))
    assert out["dice"] == 0.5 and out["network_ml"] == 0.48 and out["both_ml"] == 0.24
    head = np.zeros_like(a)
    grown = ranking.with_air_margin(a, head, (2.0, 2.0, 2.0), margin_mm=2.0)
    assert grown[:3].all() and not grown[3:].any()


def test_distance_near_and_hole_filling_equal_the_whole_grid_computations():
    from scipy import ndimage

    import semid.identity as idm

    rng = np.random.default_rng(3)
    spacing = (0.8, 1.0, 1.5)  # (x, y, z) mm
    for trial in range(6):
        # a few blobs (a face and two ears), holes inside them, and one blob cut by the array's border
        mask = np.zeros((40, 48, 56), bool)
        for _ in range(int(rng.integers(1, 4))):
            c = rng.integers(0, mask.shape, 3)
            r = rng.uniform(3, 9)
            zz, yy, xx = np.ogrid[:40, :48, :56]
            mask |= (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 < r * r
        mask &= rng.uniform(size=mask.shape) > 0.15 * (trial % 2)  # speckled holes in odd trials
        img = sitk.GetImageFromArray(mask.astype(np.uint8))
        img.SetSpacing(spacing)
        full = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(img, insideIsPositive=False,
                                                                    squaredDistance=False, useImageSpacing=True))
        near = ranking.distance_near(mask, spacing, 6.0)
        within = full <= 6.0
        # the same distances up to float32 rounding (the transform's sums run over another extent)
        np.testing.assert_allclose(near[within], full[within], atol=1e-4)
        assert (near[~within] > 6.0 - 1e-4).all()
        assert np.array_equal(idm.fill_holes(mask), ndimage.binary_fill_holes(mask))
    assert np.isinf(ranking.distance_near(np.zeros((3, 4, 5), bool), spacing, 6.0)).all()
    assert not idm.fill_holes(np.zeros((3, 4, 5), bool)).any()


def test_saliency_is_a_map_of_the_face(visits):
    visit = visits["MR"]
    reid = sal.load_reid()
    region = sitk.Cast(visit.labels > 0, sitk.sitkUInt8)  # the whole head: the back of it too
    out = sal.identity_saliency(visit.image, reid, stride_mm=24.0, region=region)
    assert out.GetPixelID() == sitk.sitkFloat32 and _same_grid(out, visit.image)
    arr = sitk.GetArrayViewFromImage(out)
    assert float(arr.min()) >= 0.0 and float(arr.max()) <= 1.0 and float(arr.max()) > 0.5
    lab = sitk.GetArrayViewFromImage(visit.labels)
    face = np.isin(lab, nw.REGION_LABELS)
    # the back of the head: head tissue in the posterior third (LPS y grows towards the back)
    y = np.array([visit.image.TransformIndexToPhysicalPoint((0, int(j), 0))[1] for j in range(lab.shape[1])])
    back = (lab == 2) & (y > np.percentile(y, 67))[None, :, None]
    assert float(arr[face].mean()) > 2.0 * float(arr[back].mean())


def test_saliency_refuses_the_attackers_weights(visits):
    from semid.eval.attack_reid import ReidAttack

    attacker = ReidAttack.load()
    with pytest.raises(ValueError, match="attacker"):
        sal.identity_saliency(visits["MR"].image, attacker)


def _constant() -> sitk.Image:
    img = sitk.Image([32, 32, 32], sitk.sitkInt16)
    img.SetSpacing((2.0, 2.0, 2.0))
    return img + 100


@pytest.mark.parametrize("make", [lambda: sitk.Image([64, 64], sitk.sitkInt16) + 5, _constant],
                         ids=["2d", "constant"])
def test_bad_input_raises_one_clear_sentence(network, make):
    image = make()
    for call in (lambda: network.predict(image, "MR"), lambda: sal.identity_saliency(image)):
        with pytest.raises(InputError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message and message.endswith(".") and message.count(". ") == 0
    with pytest.raises(InputError, match="modality"):
        network.predict(sitk.Image([32, 32, 32], sitk.sitkInt16) + sitk.GaussianSource(sitk.sitkInt16, [32] * 3),
                        "PET")


def test_missing_weights_say_how_to_make_them(tmp_path):
    with pytest.raises(InputError, match="semid train identity"):
        nw.IdentityNetwork.load(tmp_path / "nope.pt")


def test_cli_trains_the_identity_network():
    from semid.cli import TRAINABLE

    assert TRAINABLE["identity"] == "semid.identity.network"
    with pytest.raises(SystemExit):
        nw.main(["train", "--seed", "2026"])
