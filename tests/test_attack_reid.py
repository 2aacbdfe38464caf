"""Attacker A2 (semid.eval.attack_reid): committed weights, crop, validity at p = 0, splits, adaptation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from semid.eval import attack_reid as ar
from semid.phantoms import IDENTITY, Population

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def attack() -> ar.ReidAttack:
    return ar.ReidAttack.load()


@pytest.fixture(scope="module")
def visits() -> dict[int, list]:
    """The benchmark's population (seed 2026, never trained on): 6 subjects x visits 0 and 1, MR."""
    pop = Population(6, seed=2026, modalities=("MR",))
    return {s.index: [s.visit(0, "MR"), s.visit(1, "MR")] for s in pop}


def test_committed_weights_load_with_weights_only() -> None:
    blob = torch.load(ar.MODELS_DIR / ar.WEIGHTS_FILE, map_location="cpu", weights_only=True)
    assert set(blob) == {"state_dict", "meta"}
    assert all(isinstance(v, torch.Tensor) for v in blob["state_dict"].values())
    meta = blob["meta"]
    assert meta["split"]["seed"] != 2026
    assert meta["metrics"]["test"]["roc_auc"] >= 0.95
    assert (ar.MODELS_DIR / ar.WEIGHTS_FILE).stat().st_size < 5 * 2**20


def test_crop_box_is_fixed(attack: ar.ReidAttack, visits: dict[int, list]) -> None:
    assert attack.spec.box == ar.identity_box()  # the saved box is the one derived from the base head
    image = visits[0][0].image
    a = attack.crop(image)
    b = attack.crop(sitk.Image(image))
    assert a.shape == tuple(attack.spec.shape) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    # the box holds the whole identity region of every visit
    (z0, z1), (y0, y1), (x0, x1) = attack.spec.box
    for pair in visits.values():
        for v in pair:
            lab = sitk.GetArrayViewFromImage(v.labels) == IDENTITY
            assert lab[z0:z1, y0:y1, x0:x1].sum() == lab.sum()


def test_embeddings_deterministic(attack: ar.ReidAttack, visits: dict[int, list]) -> None:
    images = [visits[0][0].image, visits[1][1].image]
    e1, e2 = attack.embed(images), attack.embed(images)
    assert e1.shape == (2, attack.meta["network"]["dim"])
    np.testing.assert_array_equal(e1, e2)
    np.testing.assert_allclose(np.linalg.norm(e1, axis=1), 1.0, atol=1e-5)


def test_validity_at_p0(attack: ar.ReidAttack, visits: dict[int, list]) -> None:
    gallery = {s: [pair[0].image] for s, pair in visits.items()}
    probes = [(s, pair[1].image) for s, pair in visits.items()]
    r = attack.evaluate(gallery, probes)
    assert r["n_probes"] == 6 and r["n_gallery_ids"] == 6
    assert r["roc_auc"] >= 0.95, r
    assert r["rank1"] >= 0.8, r


def test_pair_lists_patient_disjoint(attack: ar.ReidAttack) -> None:
    info = json.loads((ar.MODELS_DIR / ar.PAIRS_FILE).read_text())
    assert info["population"]["seed"] != 2026
    splits = {k: set(v["subjects"]) for k, v in info["splits"].items()}
    assert not splits["train"] & splits["test"]
    assert not splits["train"] & splits["val"]
    assert not splits["val"] & splits["test"]
    for name in ("val", "test"):
        pairs = info["pairs"][name]
        assert {p for _, _, p, _, _ in pairs} <= splits[name] and {g for g, *_ in pairs} <= splits[name]
        assert all(t == int(g == p) for g, _, p, _, t in pairs)
        assert 0 < sum(t for *_, t in pairs) < len(pairs)
    assert attack.meta["split"]["train_subjects"] == info["splits"]["train"]["subjects"]


def test_adapt_returns_a_new_model(attack: ar.ReidAttack, visits: dict[int, list]) -> None:
    calls = []

    def deidentify(image: sitk.Image) -> sitk.Image:  # a stand-in de-identifier: blur everything
        calls.append(1)
        out = sitk.Cast(sitk.SmoothingRecursiveGaussian(image, 4.0), image.GetPixelID())
        out.CopyInformation(image)
        return out

    cache: dict = {}
    adapted = attack.adapt(deidentify, steps=2, n_subjects=2, deid_visits=(1,), anchor_visits=(0,), cache=cache)
    assert len(calls) == 2 and len(cache) == 2
    assert adapted is not attack and adapted.meta["adapted"]["steps"] == 2
    images = [visits[0][0].image, visits[2][1].image]
    assert not np.allclose(adapted.embed(images), attack.embed(images))
    again = attack.adapt(deidentify, steps=1, n_subjects=2, deid_visits=(1,), anchor_visits=(0,), cache=cache)
    assert len(calls) == 2 and again.embed(images[:1]).shape == (1, attack.meta["network"]["dim"])
