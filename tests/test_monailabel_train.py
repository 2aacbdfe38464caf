"""The identity-region review-and-retrain loop through a real `monailabel start_server`.

The module's server holds four small phantom heads (two MR, two CT) whose identity region is known by
construction, and publishes weights into a temporary model folder (`--conf model_dir`). In order:

1. `/infer/identity` returns the network's identity region as a label map on the input's grid;
2. training with no usable reviewed label is refused with one sentence;
3. a reviewer's labels (the region with a 4 mm margin, a site convention the shipped weights do not
   follow) are saved as `final` labels through `PUT /datastore/label`; `POST /train/identity?run_sync=true`
   (12 steps) fine-tunes, validates on a held-out labelled head, publishes, and the next `/infer/deidentify`
   names the new weights' sha256 in its record;
4. labels saved with a flipped orientation train a model that scores *better* on the (equally flipped)
   held-out label but no longer finds the face of the phantom heads: it is kept out and the published
   model stays in use.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import SimpleITK as sitk
from servers import MONAILABEL, REPO_ROOT, MonaiLabelServer, monailabel_server

pytestmark = pytest.mark.server

TIMEOUT_S = 300
BUNDLED_WEIGHTS = REPO_ROOT / "core" / "semid" / "data" / "models" / "identity_unet.pt"
#: Phantom population of this module's heads: not the benchmark's (2026), A2's (4242), U1's (1) or the
#: identity network's training seed (5).
SEED = 606
HEADS = [("ph0", "MR"), ("ph1", "CT"), ("ph2", "MR"), ("ph3", "CT")]
TRAIN_PARAMS = {"max_steps": 12, "lr": 0.001}
STATE: dict[str, Any] = {}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def heads(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Per head: the image file (in the studies folder) and its identity-region label variants (arrays)."""
    from semid.identity.network import REGION_LABELS
    from semid.phantoms import Population

    root = tmp_path_factory.mktemp("monailabel_train")
    studies = root / "studies"
    studies.mkdir()
    pop = Population(len(HEADS), seed=SEED, base="small")
    out: dict[str, dict[str, Any]] = {"_root": {"root": root, "studies": studies}}
    for i, (image_id, modality) in enumerate(HEADS):
        visit = pop.subject(i).visit(0, modality)
        path = studies / f"{image_id}.nii.gz"
        sitk.WriteImage(visit.image, str(path))
        truth = np.isin(sitk.GetArrayViewFromImage(visit.labels), REGION_LABELS).astype(np.uint8)
        truth_img = sitk.GetImageFromArray(truth)
        truth_img.CopyInformation(visit.image)
        out[image_id] = {
            "path": path,
            "truth": truth,
            # the reviewer's convention: the region with a 2-voxel (4 mm) margin
            "margin": sitk.GetArrayFromImage(sitk.BinaryDilate(truth_img, [2, 2, 2])),
            # the same labels saved with the anterior-posterior axis flipped
            "flipped": truth[:, ::-1, :].copy(),
            "empty": np.zeros_like(truth),
        }
    return out


@pytest.fixture(scope="module")
def server(heads) -> Iterator[MonaiLabelServer]:
    if not MONAILABEL.exists():
        pytest.skip(f"MONAI Label is not installed next to {sys.executable}: pip install -e '.[server]'")
    root, studies = heads["_root"]["root"], heads["_root"]["studies"]
    conf = {"models": "deidentify,identity", "model_dir": str(root / "model")}
    try:
        with monailabel_server(root, studies, conf) as srv:
            yield srv
    except RuntimeError as error:
        pytest.fail(str(error), pytrace=False)


def _model_file(heads) -> Path:
    return heads["_root"]["root"] / "model" / "identity_unet.pt"


def _save_labels(server: MonaiLabelServer, heads, variant: str, tmp_path: Path) -> None:
    """PUT each head's `variant` label as its `final` label, as Slicer does after a review."""
    for image_id, _ in HEADS:
        image = sitk.ReadImage(str(heads[image_id]["path"]))
        label = sitk.GetImageFromArray(heads[image_id][variant].astype(np.uint8))
        label.CopyInformation(image)
        path = tmp_path / f"{image_id}_{variant}.nii.gz"
        sitk.WriteImage(label, str(path))
        with open(path, "rb") as f:
            response = requests.put(f"{server.url}/datastore/label", params={"image": image_id, "tag": "final"},
                                    files={"label": (path.name, f)}, timeout=60)
        assert response.status_code == 200, response.text[:300]


def _train(server: MonaiLabelServer, params: dict[str, Any]) -> requests.Response:
    return requests.post(f"{server.url}/train/identity", params={"run_sync": "true"}, json=params, timeout=TIMEOUT_S)


def _multipart(response: requests.Response) -> tuple[dict[str, Any], bytes]:
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    record, image = None, None
    for part in MultipartDecoder.from_response(response).parts:
        name = re.search(r'name="([^"]+)"', part.headers[b"Content-Disposition"].decode()).group(1)
        if name == "params":
            record = json.loads(part.content)
        elif name == "image":
            image = part.content
    assert record is not None and image is not None, "multipart answer lacks params or image"
    return record, image


def _identity_infer(server: MonaiLabelServer, image_id: str, tmp_path: Path) -> tuple[dict[str, Any], sitk.Image]:
    response = requests.post(f"{server.url}/infer/identity", params={"image": image_id}, timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text[:300]
    record, data = _multipart(response)
    path = tmp_path / f"{image_id}_identity.nii.gz"
    path.write_bytes(data)
    return record, sitk.ReadImage(str(path))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


# ----------------------------------------------------------------------------------------------- tests


def test_info_lists_identity_infer_and_train(server) -> None:
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    model = info["models"]["identity"]
    assert model["type"] == "segmentation"
    assert model["labels"] == {"identity": 1}
    config = info["trainers"]["identity"]["config"]
    assert {"max_steps", "max_epochs", "lr", "batch", "device", "validation"} <= set(config)


@pytest.mark.parametrize("image_id", ["ph0", "ph1"])
def test_infer_identity_returns_a_label_map_on_the_input_grid(server, heads, image_id, tmp_path) -> None:
    record, label = _identity_infer(server, image_id, tmp_path)
    image = sitk.ReadImage(str(heads[image_id]["path"]))
    assert label.GetSize() == image.GetSize()
    np.testing.assert_allclose(label.GetSpacing(), image.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(label.GetDirection(), image.GetDirection(), atol=1e-5)
    arr = sitk.GetArrayFromImage(label)
    assert set(np.unique(arr).tolist()) == {0, 1}
    assert _dice(arr, heads[image_id]["truth"]) > 0.8  # the shipped weights: about 0.87 on unseen phantoms
    assert record["labels"] == {"identity": 1}
    assert record["identity_network"]["sha256"] == _sha256(BUNDLED_WEIGHTS)  # nothing published yet


def test_training_without_usable_labels_is_refused(server, heads, tmp_path) -> None:
    for labels in (None, "empty"):  # no final label at all, then empty ones
        if labels:
            _save_labels(server, heads, labels, tmp_path)
        response = _train(server, TRAIN_PARAMS)
        assert response.status_code == 422, response.text[:300]
        detail = response.json()["detail"]
        assert "final label" in detail and len(re.findall(r"[.!?](\s|$)", detail.strip())) == 1, detail
    assert not _model_file(heads).exists()


def test_bad_training_parameters_are_refused(server) -> None:
    for params in ({"max_steps": -1}, {"lr": "fast"}, {"device": "tpu"}, {"validation": "everything"}):
        response = _train(server, params)
        assert response.status_code == 422, (params, response.text[:300])
        assert "Traceback" not in response.text


def test_training_on_reviewed_labels_publishes_and_inference_picks_it_up(server, heads, tmp_path) -> None:
    _save_labels(server, heads, "margin", tmp_path)
    response = _train(server, TRAIN_PARAMS)
    assert response.status_code == 200, response.text[:500]
    result = response.json()
    assert result["validation"]["source"] == "datastore" and result["validation"]["volumes"] == 1
    assert result["training"]["volumes"] == 3 and result["training"]["steps"] == TRAIN_PARAMS["max_steps"]
    assert result["dice_candidate"] >= result["dice_current"], result
    assert result["validation"]["phantom_check"]["dice_candidate"] >= result["validation"]["phantom_check"]["floor"]
    assert result["published"] is True, result
    published = _model_file(heads)
    assert published.is_file()
    sha = _sha256(published)
    assert result["weights"]["sha256"] == sha != _sha256(BUNDLED_WEIGHTS)
    STATE["published_sha"], STATE["published_mtime"] = sha, published.stat().st_mtime_ns

    # the next inferences load the published file (on an MR phantom: the phantoms' CTs, whose skull is drawn
    # from T1w's broken dark band, leave the triage no brain enclosed by bone, and are refused)
    response = requests.post(f"{server.url}/infer/deidentify", params={"image": "ph0", "output": "json"},
                             data={"params": json.dumps({"level": "high"})}, timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text[:300]
    network = response.json()["identity_network"]
    assert network["sha256"] == sha
    assert network["finetuned"]["dice_after"] == pytest.approx(result["dice_candidate"], abs=1e-4)
    record, label = _identity_infer(server, "ph2", tmp_path)
    assert record["identity_network"]["sha256"] == sha
    # and the region it draws follows the reviewer's margin: closer to it than the margin-less region is
    margin = heads["ph2"]["margin"]
    assert _dice(sitk.GetArrayFromImage(label), margin) > _dice(heads["ph2"]["truth"], margin)
    # the reviewed labels hold no brain: the brain output (the pipeline's keep-out) is held to the weights in
    # use while fine-tuning (measured: Dice 0.970 to the bundled weights' brain; 0.957 without that term)
    from semid.identity.network import IdentityNetwork

    image = sitk.ReadImage(str(heads["ph2"]["path"]))
    brains = [sitk.GetArrayFromImage(IdentityNetwork.load(w).predict_maps(image)["brain"]) > 0.5
              for w in (BUNDLED_WEIGHTS, published)]
    assert _dice(*brains) > 0.965


def test_corrupted_labels_do_not_replace_the_published_model(server, heads, tmp_path) -> None:
    if "published_sha" not in STATE:
        pytest.skip("needs the model published by the test above")
    _save_labels(server, heads, "flipped", tmp_path)
    response = _train(server, TRAIN_PARAMS)
    assert response.status_code == 200, response.text[:500]
    result = response.json()
    check = result["validation"]["phantom_check"]
    assert check["dice_candidate"] < check["floor"] <= check["dice_current"], result
    assert result["published"] is False, result
    assert "kept out" in result["message"]
    assert result["weights"]["sha256"] == STATE["published_sha"]
    published = _model_file(heads)
    assert _sha256(published) == STATE["published_sha"]
    assert published.stat().st_mtime_ns == STATE["published_mtime"]
    record, _ = _identity_infer(server, "ph0", tmp_path)
    assert record["identity_network"]["sha256"] == STATE["published_sha"]


def test_library_reloads_weights_when_the_file_changes(tmp_path) -> None:
    """`load_cached` reads a weights file once per version: unchanged, the same network; replaced, the new one."""
    import os

    import torch

    from semid.identity.network import load_cached

    path = tmp_path / "identity_unet.pt"
    path.write_bytes(BUNDLED_WEIGHTS.read_bytes())
    first = load_cached(path)
    assert load_cached(path) is first
    blob = torch.load(path, map_location="cpu", weights_only=True)
    blob["note"] = "republished"
    staged = tmp_path / "staged.pt"
    torch.save(blob, staged)
    os.replace(staged, path)  # how the train task publishes
    second = load_cached(path)
    assert second is not first
    assert second.sha256 == _sha256(path) != first.sha256 == _sha256(BUNDLED_WEIGHTS)
