"""The SemID MONAI Label app, exercised through a real `monailabel start_server` (see conftest.py).

One server serves the whole module; each test that de-identifies runs one inference on the small
2 mm sample head, through MONAI Label's own client or plain HTTP, and checks the volume that comes
back against the input and against the library run locally.
"""

from __future__ import annotations

import json
import re
import time
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import SimpleITK as sitk

pytestmark = pytest.mark.server

LEVEL_PRESETS = {"off": 0.0, "low": 0.25, "medium": 0.5, "high": 0.75, "max": 1.0}
INFER_TIMEOUT_S = 300
RESULTS: dict[float, dict[str, Any]] = {}  # level -> record, for the cross-level checks


# --------------------------------------------------------------------------------------------- helpers


@cache
def _local_mask(sample: Path, level: float) -> np.ndarray:
    """The blocked region B_p the library computes for the sample head here, as a bool array."""
    from semid.io import read_volume
    from semid.pipeline import Deidentifier

    result = Deidentifier(level=level).run(read_volume(sample))
    return sitk.GetArrayFromImage(result.mask).astype(bool)


def _assert_same_geometry(out: sitk.Image, ref: sitk.Image) -> None:
    assert out.GetSize() == ref.GetSize()
    assert out.GetPixelID() == ref.GetPixelID(), (out.GetPixelIDTypeAsString(), ref.GetPixelIDTypeAsString())
    # NIfTI stores geometry in float32: allow its rounding, nothing more.
    np.testing.assert_allclose(out.GetSpacing(), ref.GetSpacing(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(out.GetOrigin(), ref.GetOrigin(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(out.GetDirection(), ref.GetDirection(), rtol=0, atol=1e-5)


def _check_result(out_path: Path, record: dict[str, Any], sample: Path, level: float) -> None:
    """The returned volume is the input outside a blocked region that the record describes."""
    ref = sitk.ReadImage(str(sample))
    out = sitk.ReadImage(str(out_path))
    _assert_same_geometry(out, ref)

    assert record["level"] == pytest.approx(level)
    preset = next((name for name, value in LEVEL_PRESETS.items() if value == level), None)
    if preset is not None:
        assert record["preset"] == preset
    voxel_ml = float(np.prod(ref.GetSpacing())) / 1000.0
    assert record["blocked_ml"] == pytest.approx(record["blocked_voxels"] * voxel_ml, rel=1e-6, abs=1e-9)

    changed = sitk.GetArrayViewFromImage(out) != sitk.GetArrayViewFromImage(ref)
    if level == 0.0:
        assert record["blocked_voxels"] == 0 and record["blocked_ml"] == 0.0
        assert not changed.any(), "level off must return the input unchanged"
        return
    assert record["blocked_voxels"] > 0 and record["blocked_ml"] > 0.0
    assert 0 < changed.sum() <= record["blocked_voxels"]
    # Bit-identical outside B_p: every changed voxel lies in the mask the library computes for this head.
    mask = _local_mask(sample, level)
    assert int(mask.sum()) == record["blocked_voxels"]
    assert not (changed & ~mask).any(), f"{int((changed & ~mask).sum())} voxels changed outside the blocked region"
    RESULTS[level] = record


def _multipart(response: requests.Response) -> tuple[dict[str, Any], bytes, str]:
    """Split MONAI Label's multipart infer answer into (record, image bytes, image file name)."""
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    record: dict[str, Any] | None = None
    image: tuple[bytes, str] | None = None
    for part in MultipartDecoder.from_response(response).parts:
        disposition = part.headers[b"Content-Disposition"].decode()
        name = re.search(r'name="([^"]+)"', disposition).group(1)
        if name == "params":
            record = json.loads(part.content)
        elif name == "image":
            image = (part.content, re.search(r'filename="([^"]+)"', disposition).group(1))
    assert record is not None and image is not None, "multipart answer lacks params or image"
    return record, image[0], image[1]


def _assert_clear_error(response: requests.Response) -> str:
    """A 4xx whose body is one user-facing sentence, no traceback."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail.strip()
    assert "Traceback" not in response.text and 'File "' not in response.text
    assert len(re.findall(r"[.!?](\s|$)", detail.strip())) == 1, detail
    return detail


def _infer_http(server, infer_params: dict[str, Any], **kwargs: Any) -> requests.Response:
    """POST /infer/deidentify with `infer_params` in the `params` form field (MONAI Label's convention)."""
    return requests.post(
        f"{server.url}/infer/deidentify",
        data={"params": json.dumps(infer_params)},
        timeout=INFER_TIMEOUT_S,
        **kwargs,
    )


# ----------------------------------------------------------------------------------------------- tests


def test_info_publishes_deidentify_with_level(monailabel_server) -> None:
    from monailabel.client import MONAILabelClient

    info = requests.get(f"{monailabel_server.url}/info/", timeout=30).json()
    assert info["name"] == "SemID"
    model = info["models"]["deidentify"]
    assert model["type"] == "others"
    assert model["dimension"] == 3
    config = model["config"]
    assert config["level"] == "high"
    assert config["level_presets"] == LEVEL_PRESETS
    assert config["level_range"] == [0.0, 1.0]
    # MONAI Label's own client sees the same, and the datastore holds the sample under its neutral id.
    assert MONAILabelClient(monailabel_server.url).info()["models"]["deidentify"] == model
    datastore = requests.get(f"{monailabel_server.url}/datastore/?output=all", timeout=30).json()
    assert monailabel_server.image_id in datastore["objects"]


def test_infer_by_id_with_monailabel_client(monailabel_server, sample_head, tmp_path) -> None:
    from monailabel.client import MONAILabelClient

    client = MONAILabelClient(monailabel_server.url, tmpdir=str(tmp_path))
    out_path, record = client.infer("deidentify", monailabel_server.image_id, {"level": "high"})
    assert out_path is not None and out_path.endswith(".nii.gz")
    _check_result(Path(out_path), record, sample_head, 0.75)


def test_infer_by_id_with_plain_http(monailabel_server, sample_head, tmp_path) -> None:
    response = _infer_http(monailabel_server, {"level": 0.6}, params={"image": monailabel_server.image_id})
    assert response.status_code == 200, response.text[:500]
    assert response.headers["content-type"].startswith("multipart/form-data")
    record, data, filename = _multipart(response)
    assert filename.endswith(".nii.gz")
    out_path = tmp_path / filename
    out_path.write_bytes(data)
    assert record["preset"] is None
    _check_result(out_path, record, sample_head, 0.6)


def test_infer_output_image_and_json_at_level_off(monailabel_server, sample_head, tmp_path) -> None:
    base = {"image": monailabel_server.image_id}
    response = _infer_http(monailabel_server, {"level": "off"}, params={**base, "output": "json"})
    assert response.status_code == 200, response.text[:500]
    record = response.json()
    response = _infer_http(monailabel_server, {"level": "off"}, params={**base, "output": "image"})
    assert response.status_code == 200, response.text[:500]
    assert 'filename="' in response.headers["content-disposition"]
    out_path = tmp_path / "off.nii.gz"
    out_path.write_bytes(response.content)
    _check_result(out_path, record, sample_head, 0.0)


def test_upload_then_infer(monailabel_server, sample_head, tmp_path) -> None:
    from monailabel.client import MONAILabelClient

    client = MONAILabelClient(monailabel_server.url, tmpdir=str(tmp_path))
    out_path, record = client.infer("deidentify", "", {"level": "max"}, file=str(sample_head))
    _check_result(Path(out_path), record, sample_head, 1.0)


def test_blocked_volume_grows_with_level(monailabel_server) -> None:
    """B_p ⊆ B_q for p <= q, so the blocked volume never shrinks as the level rises."""
    levels = sorted(RESULTS)
    if len(levels) < 2:
        pytest.skip("needs the results of at least two de-identifying tests above")
    blocked = [RESULTS[level]["blocked_voxels"] for level in levels]
    assert blocked == sorted(blocked), dict(zip(levels, blocked, strict=True))


@pytest.mark.parametrize(
    "level",
    [
        "extreme",
        1.7,
        -0.1,
        "1.7",
        "nan",
        None,
        [0.5],
        True,
    ],
)
def test_unknown_level_is_a_clear_4xx(monailabel_server, level) -> None:
    response = _infer_http(monailabel_server, {"level": level}, params={"image": monailabel_server.image_id})
    detail = _assert_clear_error(response)
    assert "level" in detail.lower()


def test_unknown_level_through_monailabel_client(monailabel_server, tmp_path) -> None:
    from monailabel.client.client import MONAILabelClient, MONAILabelClientException

    client = MONAILabelClient(monailabel_server.url, tmpdir=str(tmp_path))
    with pytest.raises(MONAILabelClientException) as caught:
        client.infer("deidentify", monailabel_server.image_id, {"level": "extreme"})
    assert re.search(r"Status: 4\d\d", caught.value.msg), caught.value.msg
    assert "Traceback" not in caught.value.msg


@pytest.mark.parametrize(
    "filename, content",
    [("notes.txt", b"this is not an image\n"), ("garbage.nii.gz", b"\x1f\x8b not really gzip" * 10)],
)
def test_non_image_upload_is_a_clear_4xx(monailabel_server, tmp_path, filename, content) -> None:
    path = tmp_path / filename
    path.write_bytes(content)
    with open(path, "rb") as f:
        response = _infer_http(monailabel_server, {"level": "high"}, files={"file": (filename, f)})
    _assert_clear_error(response)


def test_unknown_image_id_is_404(monailabel_server) -> None:
    response = _infer_http(monailabel_server, {"level": "high"}, params={"image": "no-such-image"})
    assert response.status_code == 404, response.text[:500]
    _assert_clear_error(response)


def test_results_are_not_left_on_the_server(monailabel_server) -> None:
    """MONAI Label deletes each result file after sending it: no de-identified volume piles up."""
    deadline = time.monotonic() + 10.0
    while (left := sorted(monailabel_server.tmp_dir.glob("semid_deid_*"))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, [p.name for p in left]


def test_server_binds_loopback_only(monailabel_server) -> None:
    """The fixture's server answers on 127.0.0.1 (MONAI Label itself defaults to 0.0.0.0)."""
    log = monailabel_server.log_path.read_text(errors="replace")
    assert "Uvicorn running on http://127.0.0.1:" in log, monailabel_server.log_tail()
