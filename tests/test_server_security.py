"""Security defaults of the SemID MONAI Label app, against a real `monailabel start_server`.

One server serves the module, started with a 1 MB upload limit (`--conf max_upload_mb 1`), so the small
sample head (1.4 MB) is an oversized upload and a tiny volume is not. Every check here is cheap: refused
requests never reach a task, and the accepted upload is de-identified at level `off`.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import SimpleITK as sitk
from servers import APP_DIR, MONAILABEL, SAMPLE_IMAGE_ID, MonaiLabelServer, monailabel_server

pytestmark = pytest.mark.server

TIMEOUT_S = 120
#: Canary PHI: a patient name and id that must never reach the server log.
CANARY_NAME = "Qzxwv^Canarya"
CANARY_ID = "PID-7731-CANARY"
#: The one web application the module's server lets call it (app conf ``cors_origins``).
ALLOWED_ORIGIN = "http://viewer.example:3000"
HOSTILE_ORIGIN = "http://evil.example"
#: One route of every family MONAI Label serves.
ROUTE_FAMILIES = ("/info/", "/infer/deidentify", "/datastore/?output=all", "/datastore/image?image=sample_head",
                  "/batch/infer/deidentify", "/train/", "/scoring/", "/activelearning/first", "/model/",
                  "/proxy/dicom/studies")


@pytest.fixture(scope="module")
def server(sample_head: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MonaiLabelServer]:
    """A server with a 1 MB upload limit and the `deidentify` and `identity` tasks."""
    if not MONAILABEL.exists():
        pytest.skip(f"MONAI Label is not installed next to {sys.executable}: pip install -e '.[server]'")
    root = tmp_path_factory.mktemp("monailabel_security")
    studies = root / "studies"
    studies.mkdir()
    shutil.copyfile(sample_head, studies / f"{SAMPLE_IMAGE_ID}.nii.gz")
    conf = {"models": "deidentify,identity", "max_upload_mb": "1", "model_dir": str(root / "model"),
            "cors_origins": ALLOWED_ORIGIN}
    try:
        with monailabel_server(root, studies, conf) as srv:
            yield srv
    except RuntimeError as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="module")
def tiny_volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40^3 int16 volume (about 130 kB): well under the limit."""
    arr = np.random.default_rng(0).integers(0, 1000, size=(40, 40, 40), dtype=np.int16)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((2.0, 2.0, 2.0))
    path = tmp_path_factory.mktemp("tiny") / "tiny.nii.gz"
    sitk.WriteImage(image, str(path))
    return path


def _one_sentence_4xx(response: requests.Response, status: int | None = None) -> str:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    if status is not None:
        assert response.status_code == status, (response.status_code, response.text[:300])
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail.strip()
    assert "Traceback" not in response.text and 'File "' not in response.text
    assert len(re.findall(r"[.!?](\s|$)", detail.strip())) == 1, detail
    return detail


def _infer(server: MonaiLabelServer, model: str, query: dict[str, Any], params: dict[str, Any] | None = None,
           **kwargs: Any) -> requests.Response:
    return requests.post(f"{server.url}/infer/{model}", params=query, data={"params": json.dumps(params or {})},
                         timeout=TIMEOUT_S, **kwargs)


def _uploads_left(server: MonaiLabelServer, expected: set[str] | None = None) -> set[str]:
    """Every file under the server's temporary folder (uploads, results, records); with ``expected``, waited
    for a few seconds to become that (the server cleans up just after it has answered)."""
    deadline = time.monotonic() + 10.0
    while True:
        left = {str(p.relative_to(server.tmp_dir)) for p in server.tmp_dir.rglob("*") if p.is_file()}
        if expected is None or left == expected or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def _infer_models(server: MonaiLabelServer) -> list[str]:
    return sorted(requests.get(f"{server.url}/info/", timeout=30).json()["models"])


# ------------------------------------------------------------------------------------------ upload limit


@pytest.mark.parametrize("endpoint", ["/infer/deidentify", "/datastore/image?image=big001"])
def test_oversized_upload_is_413_and_not_stored(server, sample_head, endpoint) -> None:
    assert sample_head.stat().st_size > 2**20  # the premise: the sample head is over the 1 MB limit
    before = _uploads_left(server)
    method = requests.put if endpoint.startswith("/datastore") else requests.post
    with open(sample_head, "rb") as f:
        response = method(f"{server.url}{endpoint}", files={"file": ("head.nii.gz", f)},
                          data={"params": "{}"}, timeout=TIMEOUT_S)
    detail = _one_sentence_4xx(response, 413)
    assert "1 MB" in detail and "max_upload_mb" in detail
    assert _uploads_left(server, before) == before, "the refused upload was written to the server's temporary folder"
    datastore = requests.get(f"{server.url}/datastore/?output=all", timeout=30).json()
    assert "big001" not in datastore["objects"]


def test_oversized_chunked_upload_is_413(server, sample_head) -> None:
    """A body without Content-Length is counted as it streams and cut off at the limit."""
    from requests_toolbelt import MultipartEncoder

    encoder = MultipartEncoder(fields={"params": "{}", "file": ("head.nii.gz", sample_head.read_bytes())})
    chunks = iter(lambda: encoder.read(64 * 1024), b"")  # a generator: requests sends it chunked
    response = requests.post(f"{server.url}/infer/deidentify", data=chunks,
                             headers={"Content-Type": encoder.content_type}, timeout=TIMEOUT_S)
    assert "content-length" not in {k.lower() for k in response.request.headers}
    _one_sentence_4xx(response, 413)


def test_upload_under_the_limit_is_served(server, tiny_volume) -> None:
    with open(tiny_volume, "rb") as f:
        response = _infer(server, "deidentify", {"output": "json"}, {"level": "off"},
                          files={"file": ("tiny.nii.gz", f)})
    assert response.status_code == 200, response.text[:300]
    assert response.json()["level"] == 0.0


def test_uploads_live_in_a_private_folder_and_nothing_is_left_after_any_outcome(server, tiny_volume,
                                                                                 tmp_path) -> None:
    folders = [p for p in server.tmp_dir.iterdir() if p.name.startswith("semid-uploads-")]
    assert len(folders) == 1 and (folders[0].stat().st_mode & 0o777) == 0o700
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b this is not a volume")
    noise = tmp_path / "noise.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(3).normal(size=(48, 48, 48)).astype(np.float32)),
                    str(noise))
    before = _uploads_left(server)
    for upload, params, status in ((corrupt, {}, 422), (noise, {}, 422), (tiny_volume, {"level": "off"}, 200),
                                   (tiny_volume, {"level": "extreme"}, 422)):
        with open(upload, "rb") as f:
            response = _infer(server, "deidentify", {"output": "json"}, params, files={"file": ("x.nii.gz", f)})
        assert response.status_code == status, (upload.name, params, response.text[:300])
        left = _uploads_left(server, before)
        assert left == before, (upload.name, params, left - before)
    with open(tiny_volume, "rb") as f:  # a label upload refused by the datastore
        requests.put(f"{server.url}/datastore/label", params={"image": "no-such-image", "tag": "final"},
                     files={"label": ("l.nii.gz", f)}, timeout=30)
    assert _uploads_left(server, before) == before


# ---------------------------------------------------------------------------- images outside the datastore


@pytest.mark.parametrize("image", ["/etc/passwd", "../../something", "../../../../etc/hostname", "~/.bashrc",
                                   "file:///etc/passwd", "SAMPLE"])
def test_server_paths_are_refused_by_every_infer_task(server, sample_head, image) -> None:
    image = str(sample_head.resolve()) if image == "SAMPLE" else image  # a real NIfTI outside the datastore
    models = _infer_models(server)
    assert {"deidentify", "identity"} <= set(models)
    for model in models:
        detail = _one_sentence_4xx(_infer(server, model, {"image": image, "output": "json"}), 400)
        assert "datastore id" in detail


def test_path_in_params_is_refused(server) -> None:
    """MONAI Label lets the `params` form field override the query's image: that path is refused too."""
    response = _infer(server, "deidentify", {"image": server.image_id, "output": "json"}, {"image": "/etc/passwd"})
    _one_sentence_4xx(response, 400)


def test_existing_server_file_without_path_looks_like_an_unknown_id(server) -> None:
    """`logging.json` exists in the server's working folder: it is answered like any unknown id (404), so the
    reply does not tell which files the server has."""
    assert (server.log_path.parent / "logging.json").is_file()
    known = _one_sentence_4xx(_infer(server, "deidentify", {"image": "logging.json", "output": "json"}), 404)
    unknown = _one_sentence_4xx(_infer(server, "deidentify", {"image": "no-such-file", "output": "json"}), 404)
    assert known == unknown


@pytest.mark.parametrize("path", ["/proxy/dicom/qido/studies", "/proxy/dicom/wado/studies/1.2.3", "/proxy/dicom/x"])
def test_pass_through_to_the_pacs_is_refused(server, path) -> None:
    """MONAI Label's DICOMweb proxy would hand any client the identified originals: 403 by default."""
    for method in (requests.get, requests.post):
        response = method(f"{server.url}{path}", timeout=30)
        assert "dicom_proxy" in _one_sentence_4xx(response, 403)


def test_datastore_ids_still_work(server) -> None:
    response = _infer(server, "deidentify", {"image": server.image_id, "output": "json"}, {"level": "off"})
    assert response.status_code == 200, response.text[:300]


# -------------------------------------------------------------------------------------------- the log


def test_phi_never_reaches_the_log(server, tiny_volume, tmp_path) -> None:
    phi_name = tmp_path / f"Scan.{CANARY_NAME}.{CANARY_ID}.nii.gz"
    shutil.copyfile(tiny_volume, phi_name)
    phi_params = {"level": "off", "PatientName": CANARY_NAME, "PatientID": CANARY_ID}
    # an upload whose file name and parameters carry the canary
    with open(phi_name, "rb") as f:
        response = _infer(server, "deidentify", {"output": "json"}, phi_params, files={"file": (phi_name.name, f)})
    # (the task takes no such parameters: refused, by their names only, after MONAI Label logged the request)
    assert response.status_code == 422 and "PatientName" in response.text, response.text[:300]
    assert CANARY_ID not in response.text and CANARY_NAME not in response.text
    # the canary as an (unknown) image id in the query string
    assert _infer(server, "deidentify", {"image": CANARY_ID, "output": "json"}).status_code == 404
    # an image and a final label stored with DICOM-like info
    with open(phi_name, "rb") as f:
        response = requests.put(f"{server.url}/datastore/image", params={"image": "canary001"},
                                files={"file": (phi_name.name, f)}, data={"params": json.dumps(phi_params)},
                                timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text[:300]
    with open(phi_name, "rb") as f:
        response = requests.put(f"{server.url}/datastore/label", params={"image": "canary001", "tag": "final"},
                                files={"label": (phi_name.name, f)}, data={"params": json.dumps(phi_params)},
                                timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text[:300]

    log = server.log_path.read_text(errors="replace")
    # MONAI Label did log these requests (so the canary's absence is the scrubber's doing, not silence) ...
    assert "Infer Request: <withheld>" in log, server.log_tail()
    assert "Saving Label for Image: <withheld>" in log, server.log_tail()
    # ... and no part of the canary is in the log or in the server's file names
    for needle in (CANARY_NAME, CANARY_NAME.split("^")[0], CANARY_ID):
        assert needle.lower() not in log.lower(), needle
    names = [p.name for p in server.log_path.parent.rglob("*")]
    assert not [n for n in names if "canary" in n.lower() and "canary001" not in n.lower()], names


def test_log_says_the_server_listens_on_loopback_only(server) -> None:
    log = server.log_path.read_text(errors="replace")
    assert "SemID: the server listens on the loopback address 127.0.0.1 only." in log, server.log_tail()
    assert "which other machines can reach" not in log


def _security_module() -> Any:
    name = "semid_app_security"  # the app's `lib` package is only importable inside the server
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, APP_DIR / "lib" / "security.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_server_without_host_stops_before_listening(sample_head, tmp_path) -> None:
    """MONAI Label's default bind is every interface; the SemID app stops with one sentence instead."""
    if not MONAILABEL.exists():
        pytest.skip("MONAI Label is not installed")
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copyfile(sample_head, studies / f"{SAMPLE_IMAGE_ID}.nii.gz")
    with pytest.raises(RuntimeError, match="exited with code") as caught:
        with monailabel_server(tmp_path / "server", studies, host=None):
            pass
    log = (tmp_path / "server" / "server.log").read_text(errors="replace")
    assert "no --host was given" in log and "--host 127.0.0.1" in log, str(caught.value)[-2000:]
    assert "Traceback" not in log
    assert "Uvicorn running" not in log


def test_default_bind_refusal_reads_the_command_line() -> None:
    security = _security_module()
    base = ["monailabel.main", "start_server", "--app", str(APP_DIR), "--studies", "x"]
    assert security.default_bind_refusal(base) is not None
    for named in (["--host", "127.0.0.1"], ["-i", "0.0.0.0"], ["--host=10.0.0.1"], ["-i127.0.0.1"]):
        assert security.default_bind_refusal(base + named) is None, named
    assert security.default_bind_refusal(["python", "-m", "monailabel.interfaces.utils.app", "-m", "train"]) is None


def test_bind_warning_for_every_non_loopback_address() -> None:
    """The rule behind the log line above (tests never bind a server to a non-loopback address)."""
    security = _security_module()
    base = ["monailabel/main.py", "start_server", "--app", "x", "--studies", "y"]
    assert "0.0.0.0" in security.bind_warning(base, auth_enabled=False)  # MONAI Label's default
    assert "without authentication" in security.bind_warning(base + ["--host", "10.1.2.3"], auth_enabled=False)
    assert "authentication is on" in security.bind_warning(base + ["-i", "0.0.0.0"], auth_enabled=True)
    assert security.bind_warning(base + ["--host=192.168.1.5"], auth_enabled=False) is not None
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert security.bind_warning(base + ["--host", host], auth_enabled=False) is None, host
    assert security.bind_warning(["python", "-m", "monailabel.interfaces.utils.app", "-m", "train"], False) is None


def test_max_upload_mb_must_be_a_positive_number() -> None:
    security = _security_module()
    assert security.max_upload_bytes({}) == 1024 * 2**20
    assert security.max_upload_bytes({"max_upload_mb": "0.5"}) == 2**19
    for bad in ("0", "-3", "lots", "inf", "nan"):
        with pytest.raises(ValueError, match="max_upload_mb"):
            security.max_upload_bytes({"max_upload_mb": bad})


def _cors_headers(response: requests.Response) -> dict[str, str]:
    return {k.lower(): v for k, v in response.headers.items() if k.lower().startswith("access-control-")}


@pytest.mark.parametrize("route", ROUTE_FAMILIES)
def test_hostile_origin_gets_no_cors_grant_on_any_route(server, route) -> None:
    """A web page on another site must not read from the server (it would read originals byte for byte)."""
    for method, extra in (("GET", {}), ("POST", {}), ("OPTIONS", {"Access-Control-Request-Method": "GET"})):
        response = requests.request(method, f"{server.url}{route}", timeout=30,
                                    headers={"Origin": HOSTILE_ORIGIN, **extra})
        assert not _cors_headers(response), (method, route, response.headers)
        assert response.status_code == 403, (method, route, response.status_code)
        assert "Cross-origin" in response.json()["detail"]


def test_dns_rebinding_page_is_not_taken_for_the_server_itself(server) -> None:
    # a site name pointed at 127.0.0.1 makes the browser send that name as both Host and Origin
    port = server.url.rsplit(":", 1)[1]
    response = requests.get(f"{server.url}/info/", timeout=30,
                            headers={"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"})
    assert response.status_code == 403 and not _cors_headers(response)


def test_origin_named_in_the_conf_gets_itself_back_without_credentials(server) -> None:
    response = requests.get(f"{server.url}/info/", headers={"Origin": ALLOWED_ORIGIN}, timeout=30)
    assert response.status_code == 200
    cors = _cors_headers(response)
    assert cors.get("access-control-allow-origin") == ALLOWED_ORIGIN
    assert "access-control-allow-credentials" not in cors


def test_no_origin_and_own_origin_are_served_without_cors_headers(server) -> None:
    for headers in ({}, {"Origin": server.url}):
        response = requests.get(f"{server.url}/info/", headers=headers, timeout=30)
        assert response.status_code == 200 and not _cors_headers(response), response.headers


def test_wildcard_origin_in_the_conf_is_refused() -> None:
    security = _security_module()
    assert security.parse_origins(" http://a.example:3000/, https://b.example ") == ("http://a.example:3000",
                                                                                   "https://b.example")
    for bad in ("*", "http://*.example", "evil.example", "http://a.example/path"):
        with pytest.raises(ValueError, match="not an origin"):
            security.parse_origins(bad)


# ------------------------------------------------------------------------------------------- parameters


def test_json_body_parameters_are_honoured_like_the_params_field(server) -> None:
    url = f"{server.url}/infer/deidentify"
    query = {"image": server.image_id, "output": "json"}
    as_json = requests.post(url, params=query, json={"level": "off"}, timeout=TIMEOUT_S)
    assert as_json.status_code == 200, as_json.text[:300]
    assert as_json.json()["level"] == 0.0  # (the task's default is high)
    bad = requests.post(url, params=query, json={"level": "extreme"}, timeout=TIMEOUT_S)
    assert "Unknown privacy level" in _one_sentence_4xx(bad, 422)
    not_object = requests.post(url, params=query, data="[1, 2]", headers={"Content-Type": "application/json"},
                               timeout=TIMEOUT_S)
    assert "not a JSON object" in _one_sentence_4xx(not_object, 422)
    other = requests.post(url, params=query, data="level=off", headers={"Content-Type": "text/plain"},
                          timeout=TIMEOUT_S)
    _one_sentence_4xx(other, 415)


@pytest.mark.parametrize("body", ["json", "form"])
def test_unknown_parameter_is_refused_not_ignored(server, body) -> None:
    query = {"image": server.image_id, "output": "json"}
    kwargs = ({"json": {"levle": "off"}} if body == "json" else {"data": {"params": json.dumps({"levle": "off"})}})
    response = requests.post(f"{server.url}/infer/deidentify", params=query, timeout=TIMEOUT_S, **kwargs)
    detail = _one_sentence_4xx(response, 422)
    assert "Unknown parameter 'levle'" in detail and "level" in detail
    response = requests.post(f"{server.url}/infer/identity", params=query, json={"level": "high"}, timeout=TIMEOUT_S)
    assert "no parameters" in _one_sentence_4xx(response, 422)
