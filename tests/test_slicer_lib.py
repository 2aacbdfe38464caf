"""SemIDLib, the Slicer-independent half of the Slicer module: the client against a real SemID
MONAI Label server (conftest.py), and the DICOM series export read back with SimpleITK and pydicom.
"""

from __future__ import annotations

import http.server
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "slicer_extension" / "SemID"))

from SemIDLib import (  # noqa: E402  (the module folder is not a package on sys.path by default)
    PRESETS,
    BadRequestError,
    Geometry,
    SemIDClient,
    SeriesExportError,
    ServerError,
    ServerTimeoutError,
    ServerUnreachableError,
    TaskMissingError,
    explain_level,
    format_level,
    parse_level,
    plan_series,
    read_source_attributes,
    series_export,
    summarize_record,
    write_series,
)
from SemIDLib.client import _encode_multipart, parse_multipart  # noqa: E402

INFER_TIMEOUT_S = 300.0
CANARIES = [b"CANARY", b"19010101", b"1.2.3.999.424242", b"555-0199", b"canary"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _assert_same_geometry(out: sitk.Image, ref: sitk.Image) -> None:
    assert out.GetSize() == ref.GetSize()
    np.testing.assert_allclose(out.GetSpacing(), ref.GetSpacing(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(out.GetOrigin(), ref.GetOrigin(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(out.GetDirection(), ref.GetDirection(), rtol=0, atol=1e-4)


def _one_sentence(message: str) -> None:
    assert message and "\n" not in message and "Traceback" not in message, message


# ------------------------------------------------------------------------------------ real server


@pytest.mark.server
def test_info_publishes_the_level_parameter(monailabel_server) -> None:
    info = SemIDClient(monailabel_server.url, timeout=30).info()
    assert info.task == "deidentify" and "deidentify" in info.models
    assert info.name == "SemID" and info.version
    assert "level" in info.config
    # The published default is itself a valid level, and the presets agree with the module's.
    assert 0.0 <= parse_level(info.level_parameter) <= 1.0
    assert info.config.get("level_presets", PRESETS) == PRESETS


@pytest.mark.server
def test_deidentify_returns_the_input_geometry_and_a_record(monailabel_server, sample_head, tmp_path) -> None:
    client = SemIDClient(monailabel_server.url, timeout=INFER_TIMEOUT_S)
    started = time.perf_counter()
    result = client.deidentify(sample_head, "high", output_path=tmp_path / "deid.nii.gz")
    elapsed = time.perf_counter() - started
    assert result.volume_path == tmp_path / "deid.nii.gz"
    assert not list(tmp_path.glob(".*.part")), "partial download left behind"

    ref = sitk.ReadImage(str(sample_head))
    out = sitk.ReadImage(str(result.volume_path))
    _assert_same_geometry(out, ref)
    assert out.GetPixelID() == ref.GetPixelID()
    before, after = sitk.GetArrayFromImage(ref), sitk.GetArrayFromImage(out)
    changed = before != after
    assert changed.any(), "level high changed nothing"
    assert changed.mean() < 0.5, "more than half of the head changed"

    assert result.record["level"] == pytest.approx(0.75)
    assert result.record.get("blocked_ml", 1.0) > 0
    status = summarize_record(result.record)
    assert status.startswith("De-identified at level high (0.75): "), status
    print(f"deidentify round trip over HTTP: {elapsed:.2f} s")


@pytest.mark.server
def test_deidentify_accepts_nrrd_and_a_float_level(monailabel_server, sample_head, tmp_path) -> None:
    # The Slicer module sends NRRD (Slicer's native format) and whatever the slider says. The file
    # name carries PHI, as clinical file names often do: the client must not send it (MONAI Label
    # would keep its dotted parts as the upload's suffix, which its request log shows).
    nrrd = tmp_path / "CANARY.PATIENT_19010101.nrrd"
    ref = sitk.ReadImage(str(sample_head))
    sitk.WriteImage(ref, str(nrrd))
    result = SemIDClient(monailabel_server.url, timeout=INFER_TIMEOUT_S).deidentify(nrrd, 0.6)
    try:
        out = sitk.ReadImage(str(result.volume_path))
        _assert_same_geometry(out, ref)
        assert result.record["level"] == pytest.approx(0.6)
        assert result.volume_path.name == "deidentified.nii.gz"
        log = monailabel_server.log_path.read_text(errors="replace")
        assert "CANARY" not in log and "19010101" not in log
    finally:
        # With no output path the client writes into a new temporary folder that the caller owns.
        for path in result.volume_path.parent.iterdir():
            path.unlink()
        result.volume_path.parent.rmdir()


@pytest.mark.server
@pytest.mark.parametrize("level", ["extreme", 1.5])
def test_bad_level_gives_the_servers_sentence(monailabel_server, sample_head, level) -> None:
    client = SemIDClient(monailabel_server.url, timeout=INFER_TIMEOUT_S)
    with pytest.raises(BadRequestError) as caught:
        client.deidentify(sample_head, level)
    message = str(caught.value)
    _one_sentence(message)
    assert str(level) in message and "0 to 1" in message, message


@pytest.mark.server
def test_missing_task_is_named(monailabel_server, sample_head) -> None:
    client = SemIDClient(monailabel_server.url, timeout=60, task="nosuchtask")
    with pytest.raises(TaskMissingError) as caught:
        client.info()
    _one_sentence(str(caught.value))
    assert "no `nosuchtask` task" in str(caught.value)
    # MONAI Label answers an unknown task with a bare 500; the client still names the cause.
    with pytest.raises(TaskMissingError):
        client.deidentify(sample_head, "low")


# --------------------------------------------------------------------------- servers that fail


def test_unreachable_server_says_how_to_start_it(tmp_path) -> None:
    volume = tmp_path / "volume.nii.gz"
    volume.write_bytes(b"not sent anywhere")
    url = f"http://127.0.0.1:{_free_port()}"
    client = SemIDClient(url, timeout=5)
    for call in (client.info, lambda: client.deidentify(volume, "high")):
        with pytest.raises(ServerUnreachableError) as caught:
            call()
        message = str(caught.value)
        _one_sentence(message)
        assert message.startswith(f"Cannot reach the SemID server at {url}: start it with `monailabel start_server")
        assert message.endswith("or check the URL.")


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP listener that accepts connections and never answers."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def test_timeout_is_reported(silent_server) -> None:
    with pytest.raises(ServerTimeoutError) as caught:
        SemIDClient(silent_server, timeout=0.5).info()
    _one_sentence(str(caught.value))
    assert "did not answer within 0.5 s" in str(caught.value)


@pytest.fixture
def web_page_server() -> Iterator[str]:
    """An HTTP server that is not MONAI Label: an HTML page for every GET, 404 for every POST."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            body = b"<html><body>hello</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_error(404, "Not Found")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_that_is_not_monailabel_is_reported(web_page_server, tmp_path) -> None:
    volume = tmp_path / "volume.nii.gz"
    volume.write_bytes(b"some bytes")
    client = SemIDClient(web_page_server, timeout=10)
    with pytest.raises(ServerError) as caught:
        client.info()
    _one_sentence(str(caught.value))
    assert "is it a SemID server?" in str(caught.value)
    with pytest.raises(ServerError):
        client.deidentify(volume, "high")


def test_bad_urls_are_refused_before_any_request() -> None:
    for url in ("", "ftp://host", "http://"):
        with pytest.raises(Exception) as caught:
            SemIDClient(url)
        _one_sentence(str(caught.value))
    assert SemIDClient("127.0.0.1:8000/").server_url == "http://127.0.0.1:8000"


# ------------------------------------------------------------------------------------- multipart


def test_multipart_reader_keeps_binary_parts_intact() -> None:
    # Bytes that a line-oriented parser would damage: CR/LF runs, a fake boundary, trailing CRLF.
    blob = bytes(range(256)) * 64 + b"\r\n--not-a-boundary\r\n\r\n\n\r" + b"\r\n"
    body, content_type = _encode_multipart({"params": json.dumps({"a": 1})}, {"file": ("v.nii.gz", blob)})
    parts = parse_multipart(body, content_type)
    assert parts["params"] == (None, b'{"a": 1}')
    assert parts["file"] == ("v.nii.gz", blob)


def test_multipart_reader_reads_monailabels_encoder() -> None:
    # MONAI Label builds its answer with requests_toolbelt's MultipartEncoder (endpoints/infer.py).
    toolbelt = pytest.importorskip("requests_toolbelt")
    blob = np.random.default_rng(1).integers(0, 256, 50_000, dtype=np.uint8).tobytes() + b"\r\n"
    encoder = toolbelt.MultipartEncoder(
        fields={
            "params": (None, json.dumps({"level": 0.75}), "application/json"),
            "image": ("semid_deid_x.nii.gz", blob, "application/gzip"),
        }
    )
    parts = parse_multipart(encoder.to_string(), encoder.content_type)
    assert json.loads(parts["params"][1]) == {"level": 0.75}
    assert parts["image"] == ("semid_deid_x.nii.gz", blob)


# ---------------------------------------------------------------------------------------- levels


def test_levels_parse_presets_and_numbers() -> None:
    assert [parse_level(name) for name in PRESETS] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_level(" High ") == 0.75
    assert parse_level("0.6") == parse_level(0.6) == 0.6
    for bad in ("extreme", -0.1, 1.01, float("nan"), True):
        with pytest.raises(ValueError) as caught:
            parse_level(bad)
        _one_sentence(str(caught.value))
    assert format_level(0.75) == "high (0.75)" and format_level(0.6) == "0.60"
    assert "unchanged" in explain_level(0) and "whole identity region" in explain_level("max")
    assert "60 %" in explain_level(0.6)


# --------------------------------------------------------------------------------- series export


def _rotation(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    a, b = np.deg2rad(yaw_deg), np.deg2rad(pitch_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def _read_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(folder))
    reader.SetFileNames(names)
    return reader.Execute()


def _volume(shape: tuple[int, int, int] = (12, 20, 24), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1024, 3000, size=shape).astype(np.int16)


@pytest.mark.parametrize(
    "direction",
    [np.eye(3), _rotation(20, 10), np.diag([-1.0, -1.0, 1.0]) @ _rotation(-35, 25)],
    ids=["axial", "oblique", "oblique-ras-like"],
)
def test_series_geometry_and_values_round_trip(tmp_path, direction) -> None:
    array = _volume()
    geometry = Geometry(spacing=(0.9, 1.1, 2.5), origin=(-100.5, 20.25, 33.0), direction=tuple(direction.ravel()))
    plan = plan_series(array, geometry, "CT")
    files = write_series(plan, tmp_path / "series")
    assert len(files) == array.shape[0]

    back = _read_series(tmp_path / "series")
    assert back.GetSize() == (24, 20, 12)
    np.testing.assert_allclose(back.GetSpacing(), geometry.spacing, atol=1e-4)
    np.testing.assert_allclose(back.GetOrigin(), geometry.origin, atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), geometry.direction, atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array)


def test_left_handed_volume_is_written_in_the_same_physical_place(tmp_path) -> None:
    array = _volume()
    matrix = _rotation(15, -20) @ np.diag([1.0, 1.0, -1.0])  # det = -1
    geometry = Geometry(spacing=(1.0, 1.2, 2.0), origin=(10.0, -5.0, 40.0), direction=tuple(matrix.ravel()))
    write_series(plan_series(array, geometry, "MR"), tmp_path / "series")
    back = _read_series(tmp_path / "series")
    # DICOM slices go along row x column, so the slice order is reversed but every voxel keeps its place.
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array[::-1])
    last = np.asarray(geometry.origin) + matrix[:, 2] * geometry.spacing[2] * (array.shape[0] - 1)
    np.testing.assert_allclose(back.GetOrigin(), last, atol=1e-4)
    expected = matrix.copy()
    expected[:, 2] *= -1
    np.testing.assert_allclose(back.GetDirection(), expected.ravel(), atol=1e-4)


def test_wide_integer_and_float_volumes_keep_their_values(tmp_path) -> None:
    geometry = Geometry(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    wide = np.random.default_rng(2).integers(0, 60000, size=(4, 8, 8)).astype(np.uint16)
    write_series(plan_series(wide, geometry, "MR"), tmp_path / "wide")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(_read_series(tmp_path / "wide")), wide)

    floats = np.random.default_rng(3).normal(100.0, 30.0, size=(4, 8, 8)).astype(np.float32)
    plan = plan_series(floats, geometry, "MR")
    write_series(plan, tmp_path / "float")
    slope = float(plan.datasets[0].RescaleSlope)
    back = sitk.GetArrayFromImage(_read_series(tmp_path / "float"))
    np.testing.assert_allclose(back, floats, atol=slope)  # quantised to 65536 steps over the range

    with pytest.raises(SeriesExportError):
        plan_series(np.full((2, 2, 2), np.nan), geometry)


def _canary_source() -> dict[str, object]:
    return {
        "PatientName": "CANARY^PHI",
        "PatientID": "CANARY123",
        "PatientBirthDate": "19010101",
        "PatientAddress": "1 Canary Street",
        "PatientTelephoneNumbers": "555-0199",
        "OtherPatientIDs": "CANARY-OTHER",
        "InstitutionName": "CANARY HOSPITAL",
        "ReferringPhysicianName": "CANARY^DOCTOR",
        "StudyDate": "19010101",
        "AccessionNumber": "CANARY-ACC",
        "StudyDescription": "CANARY brain study",
        "SeriesDescription": "CANARY t1",
        "StudyInstanceUID": "1.2.3.999.424242",
        "SeriesInstanceUID": "1.2.3.999.424242.1",
        "FrameOfReferenceUID": "1.2.3.999.424242.2",
        "DeviceSerialNumber": "CANARY-SN",
        "ImageComments": "canary comment",
        # Allow-listed attributes with values that cannot be what they claim: dropped too.
        "BodyPartExamined": "canary head",
        "PatientSex": "CANARY",
        "EchoTime": "CANARY",
        # Allow-listed and plausible: kept.
        "Modality": "MR",
        "PatientAge": "095Y",
        "RepetitionTime": "2300",
        "ScanningSequence": ["GR", "IR"],
        "MagneticFieldStrength": 3,
        "FlipAngle": 9.0,
    }


def test_no_source_phi_in_any_output_byte(tmp_path) -> None:
    array = _volume((6, 10, 12))
    geometry = Geometry(spacing=(1.0, 1.0, 1.5), origin=(1.0, 2.0, 3.0), direction=tuple(_rotation(5, 5).ravel()))
    plan = plan_series(array, geometry, "MR", _canary_source())
    assert plan.kept_source_keywords == [
        "FlipAngle",
        "MagneticFieldStrength",
        "PatientAge",
        "RepetitionTime",
        "ScanningSequence",
    ]
    assert "PatientName" in plan.dropped_source_keywords and "EchoTime" in plan.dropped_source_keywords
    files = write_series(plan, tmp_path / "series")
    for path in files:
        data = path.read_bytes()
        for canary in CANARIES:
            assert canary.lower() not in data.lower(), (path.name, canary)
        ds = pydicom.dcmread(path)
        assert str(ds.PatientName) == "SEMID^ANON"
        assert ds.PatientID.startswith("SEMID-") and ds.PatientID == plan.patient_id
        assert ds.PatientAge == "090Y"  # 90 and over is identifying (HIPAA Safe Harbor)
        assert ds.PatientIdentityRemoved == "YES"
        assert list(ds.ScanningSequence) == ["GR", "IR"] and float(ds.RepetitionTime) == 2300.0
        assert "PatientBirthDate" not in ds or ds.PatientBirthDate == ""
        assert ds.StudyDate == "" and "InstitutionName" not in ds


def test_real_dicom_header_is_reduced_to_the_allow_list(tmp_path) -> None:
    # pydicom's own MR test file: a real header with a patient name, ID, dates and an institution.
    source_path = Path(pydicom.data.get_testdata_file("MR_small.dcm"))
    source = pydicom.dcmread(source_path)
    attributes = read_source_attributes(source_path)
    assert "PatientName" not in attributes and attributes["Modality"] == "MR"
    plan = plan_series(_volume((3, 8, 8)), Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0)), "MR", attributes)
    files = write_series(plan, tmp_path / "series")
    secrets = [str(source.PatientName), source.PatientID, source.StudyInstanceUID, source.SeriesInstanceUID]
    secrets += [source.get("StudyDate", ""), source.get("InstitutionName", "")]
    for path in files:
        data = path.read_bytes()
        for secret in filter(None, secrets):
            assert secret.encode() not in data, secret


def test_uids_are_new_and_consistent(tmp_path) -> None:
    array = _volume((5, 6, 7))
    geometry = Geometry(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    plan = plan_series(array, geometry, "MR", _canary_source())
    files = write_series(plan, tmp_path / "series")
    datasets = [pydicom.dcmread(f) for f in files]
    assert {ds.StudyInstanceUID for ds in datasets} == {plan.study_uid}
    assert {ds.SeriesInstanceUID for ds in datasets} == {plan.series_uid}
    assert {ds.FrameOfReferenceUID for ds in datasets} == {plan.frame_of_reference_uid}
    sops = [ds.SOPInstanceUID for ds in datasets]
    assert len(set(sops)) == len(sops)
    assert all(ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID for ds in datasets)
    assert sorted(int(ds.InstanceNumber) for ds in datasets) == [1, 2, 3, 4, 5]
    every_uid = {plan.study_uid, plan.series_uid, plan.frame_of_reference_uid, *sops}
    assert len(every_uid) == 3 + len(sops)
    # A second export of the same volume is a different study of a different pseudonymous patient.
    again = plan_series(array, geometry, "MR")
    assert again.study_uid != plan.study_uid and again.patient_id != plan.patient_id


def test_write_series_is_all_or_nothing(tmp_path, monkeypatch) -> None:
    plan = plan_series(_volume((3, 4, 4)), Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0)), "CT")
    target = tmp_path / "out" / "series"
    files = write_series(plan, target)
    assert [f.name for f in files] == ["IM00001.dcm", "IM00002.dcm", "IM00003.dcm"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["series"]  # no staging left behind
    with pytest.raises(SeriesExportError) as caught:
        write_series(plan, target)  # not empty
    _one_sentence(str(caught.value))

    # A failure mid-series (disk full, say) leaves nothing behind, not even the staging folder.
    real_save = series_export._save
    calls = []

    def failing_save(ds, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_save(ds, path)

    monkeypatch.setattr(series_export, "_save", failing_save)
    with pytest.raises(OSError):
        write_series(plan, tmp_path / "out" / "broken")
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["series"]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(write_series(plan, empty)) == 3


def test_geometry_from_slicer_ijk_to_ras_matches_simpleitk() -> None:
    image = sitk.Image(8, 9, 10, sitk.sitkInt16)
    image.SetSpacing((0.8, 1.2, 3.0))
    image.SetOrigin((12.0, -30.0, 7.5))
    image.SetDirection(tuple(_rotation(30, -15).ravel()))
    # Slicer's IJK-to-RAS: the LPS mapping with the first two rows negated.
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    ijk_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    geometry = Geometry.from_ijk_to_ras(ijk_to_ras.tolist())
    np.testing.assert_allclose(geometry.spacing, image.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(geometry.origin, image.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(geometry.direction, image.GetDirection(), atol=1e-9)

    with pytest.raises(SeriesExportError):
        Geometry(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=(1, 1, 0, 0, 1, 0, 0, 0, 1))
