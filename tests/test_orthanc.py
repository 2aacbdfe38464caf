"""The DICOMweb datastore against a real Orthanc (issue 6, item 5).

One Orthanc (Debian's, DICOMweb plugin, loopback port, temporary storage) and one MONAI Label server
(`--studies http://127.0.0.1:PORT/dicom-web`) serve the whole module. Orthanc holds, each in its own
study: the small 2 mm head as MR and as CT (CT stored as unsigned values with a -1024 intercept), both
with canary PHI in every attribute the DICOM profile does not keep; a 20-slice volume with no head in
it; a head slab with one truncated instance; and a secondary capture (modality OT). The tests check the
listing, the de-identified series the app stores back (no canary byte, same geometry, new UIDs,
pseudonymous patient), that the originals in Orthanc are byte-identical afterwards, the answers to bad
input and to Orthanc going down, and that no canary reaches the server log.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
import SimpleITK as sitk
from servers import (
    MONAILABEL,
    MonaiLabelServer,
    OrthancServer,
    monailabel_server,
    orthanc_holding,
    orthanc_missing,
    orthanc_server,
)

from semid.dicom import pseudonyms as ps
from semid.dicom import web
from semid.dicom.canary import PATIENT_ID, PATIENT_NAME, _Markers, burned_in_capture, canary_dataset
from semid.dicom.profile import ActionTable, Options
from semid.dicom.tree import deidentify_series
from semid.errors import InputError
from semid.io import MODALITY_KEY, read_volume, write_volume

pytestmark = pytest.mark.server

KEY = "orthanc-test-key-0123456789abcdef"
INFER_TIMEOUT_S = 300
BIRTH_DATE = "19610312"
#: Root of the test studies' UIDs (not one of the canary's).
UID_ROOT = "1.2.826.0.1.3680043.10.888"
CANARY_EVERY = 8


@dataclass
class Pacs:
    orthanc: OrthancServer
    server: MonaiLabelServer
    series: dict[str, str]  # name -> SeriesInstanceUID ("MR", "CT", "nohead", "corrupt", "capture")
    inputs: dict[str, Path]  # name -> folder of the files uploaded
    before: dict[str, str]  # Orthanc instance id -> sha256 of its stored file, before the app ran
    markers: list[bytes]  # canary bytes that must not appear in any output


# ------------------------------------------------------------------------------------------- helpers


def _canary() -> tuple[pydicom.Dataset, list[bytes]]:
    """One canary dataset (markers in every attribute the default options do not keep) and its markers."""
    marks = _Markers()
    dataset = canary_dataset(ActionTable.load(), Options(), marks)
    markers = set(marks.canary.markers) | {PATIENT_NAME.encode(), PATIENT_ID.encode(), b"QXPATNAME",
                                           BIRTH_DATE.encode()}
    return dataset, sorted(markers)


def _series(image: sitk.Image, modality: str, folder: Path, number: int,
            canary: pydicom.Dataset | None = None) -> list[Path]:
    """Write ``image`` as a DICOM series in a study of its own, with fixed UIDs (so every run sends the same
    ids through the server and its log) and, if given, the canary attributes and a patient identity
    (write_volume itself writes SemID's anonymous patient)."""
    image.SetMetaData(MODALITY_KEY, modality)
    files = sorted(write_volume(image, folder).iterdir())
    study = f"{UID_ROOT}.{number}"
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, f"{study}.1", f"{study}.9"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{study}.1.{k + 1}"
        # a patient of the hospital's, not SemID's pseudonymous one: else the series counts as SemID's output
        for keyword in ("PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence"):
            if keyword in ds:
                del ds[keyword]
        ds.PatientName, ds.PatientID = f"OTHER^PATIENT{number}", f"H{number:06d}"
        if canary is not None:
            # the whole canary on every 8th slice (the profile takes 0.2 s on such a header), the patient's
            # identity on all of them
            for elem in canary if k % CANARY_EVERY == 0 else ():
                ds[elem.tag] = elem  # add or replace: the canary's value wins
            ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, BIRTH_DATE
        ds.save_as(path, write_like_original=False)
    return files


def _unsigned_ct(files: list[Path]) -> None:
    """Store CT as unsigned values with a -1024 intercept (as many scanners do), HU unchanged."""
    for path in files:
        ds = pydicom.dcmread(path)
        hu = np.frombuffer(ds.PixelData, "<i2").astype(np.int32)
        assert hu.min() >= -1024
        ds.PixelData = (hu + 1024).astype("<u2").tobytes()
        ds.PixelRepresentation, ds.RescaleIntercept = 0, "-1024"
        ds.save_as(path, write_like_original=False)


def _read_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _infer(server: MonaiLabelServer, image_id: str, params: dict[str, Any] | None = None) -> requests.Response:
    params = {"level": "high", "save_label": True, "label_tag": "deid", **(params or {})}
    return requests.post(f"{server.url}/infer/deidentify", params={"image": image_id, "output": "json"},
                         data={"params": json.dumps(params)}, timeout=INFER_TIMEOUT_S)


def _one_sentence(response: requests.Response) -> str:
    """The error detail: one sentence (what is wrong, what to do), no traceback."""
    assert "Traceback" not in response.text and 'File "' not in response.text, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail.endswith(".") and "\n" not in detail and len(detail) < 300, detail
    return detail


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def pacs(sample_head: Path, tmp_path_factory: pytest.TempPathFactory):
    missing = orthanc_missing()
    if missing:
        pytest.skip(missing)
    if not MONAILABEL.exists():
        pytest.skip("MONAI Label is not installed next to this Python: pip install -e '.[server]'")
    ct_path = sample_head.parent / "ct_small.nii.gz"
    if not ct_path.is_file():
        pytest.skip(f"sample CT {ct_path} not found: run `make data` first")
    root = tmp_path_factory.mktemp("orthanc")
    canary, markers = _canary()
    head = read_volume(sample_head)
    files = {
        "MR": _series(read_volume(sample_head), "MR", root / "in" / "mr", 1, canary),
        "CT": _series(read_volume(ct_path), "CT", root / "in" / "ct", 2, canary),
    }
    _unsigned_ct(files["CT"])
    z, y, x = np.mgrid[:20, :48, :48]
    cylinder = sitk.GetImageFromArray((((x - 24) ** 2 + (y - 24) ** 2) < 18**2).astype(np.int16) * 300)
    cylinder.SetSpacing((2.0, 2.0, 2.0))
    files["nohead"] = _series(cylinder, "MR", root / "in" / "nohead", 3)
    files["corrupt"] = _series(head[:, :, 40:60], "MR", root / "in" / "corrupt", 4)
    broken = pydicom.dcmread(files["corrupt"][7])
    broken.PixelData = broken.PixelData[: len(broken.PixelData) // 2]  # a truncated instance
    broken.save_as(files["corrupt"][7], write_like_original=False)
    capture = burned_in_capture(root / "in" / "capture" / "sc.dcm", PATIENT_NAME, PATIENT_ID, "QXBURNED")
    files["capture"] = [capture]
    series = {name: str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
              for name, paths in files.items()}
    with ExitStack() as stack:
        orthanc, before = stack.enter_context(orthanc_holding(root / "orthanc", list(files.values())))
        env = {
            "SEMID_KEY": KEY,
            "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(root / "cache"),
            # a short listing cache, so a server that goes down is noticed at once
            "MONAI_LABEL_DICOMWEB_CACHE_EXPIRY": "1",
        }
        try:
            server = stack.enter_context(monailabel_server(root / "monailabel", orthanc.dicomweb_url, env_extra=env))
        except RuntimeError as error:
            pytest.fail(str(error), pytrace=False)
        yield Pacs(orthanc, server, series, {name: paths[0].parent for name, paths in files.items()}, before,
                   markers)


@pytest.fixture(scope="module")
def deidentified(pacs: Pacs) -> dict[str, dict[str, Any]]:
    """De-identify the MR and the CT through the app (one request each); name -> record and new series UID."""
    out = {}
    for name in ("MR", "CT"):
        response = _infer(pacs.server, pacs.series[name])
        assert response.status_code == 200, (response.status_code, response.text[-2000:], pacs.server.log_tail())
        out[name] = {"record": response.json()}
    objects = requests.get(f"{pacs.server.url}/datastore/", params={"output": "all"}, timeout=60).json()["objects"]
    for name in out:
        info = objects[pacs.series[name]]["labels"]["deid"]["info"]
        out[name]["series_uid"] = info["SeriesInstanceUID"]
        out[name]["label_info"] = info
    return out


# --------------------------------------------------------------------------------------------- tests


def test_datastore_lists_mr_and_ct_without_phi(pacs: Pacs) -> None:
    stats = requests.get(f"{pacs.server.url}/datastore/", timeout=60)
    assert stats.status_code == 200, stats.text
    assert stats.json()["total"] == 4  # MR, CT, no-head, corrupt; not the secondary capture
    listing = requests.get(f"{pacs.server.url}/datastore/", params={"output": "all"}, timeout=60)
    objects = listing.json()["objects"]
    assert set(objects) == {pacs.series[n] for n in ("MR", "CT", "nohead", "corrupt")}
    assert objects[pacs.series["MR"]]["image"]["info"]["Modality"] == "MR"
    assert objects[pacs.series["CT"]]["image"]["info"]["Modality"] == "CT"
    text = listing.content
    assert not [m for m in pacs.markers if m in text], "PHI in the datastore listing"
    for keyword in ("PatientID", "PatientName", "StudyDate"):
        assert keyword.encode() not in text


def test_deidentified_series_is_stored_as_a_new_clean_series(pacs: Pacs, deidentified, tmp_path: Path) -> None:
    source_uids = set(pacs.series.values())
    assert pacs.orthanc.series_uids() == source_uids | {d["series_uid"] for d in deidentified.values()}
    for name in ("MR", "CT"):
        new_uid = deidentified[name]["series_uid"]
        assert new_uid not in source_uids and deidentified[name]["label_info"]["instances"] == 128
        files = pacs.orthanc.series_files(new_uid, tmp_path / name)
        source_files = sorted(pacs.inputs[name].iterdir())
        assert len(files) == len(source_files) == 128

        # (b) no canary in any byte of any instance file (the search itself works: the source has them all)
        source_blob = b"".join(p.read_bytes() for p in source_files[:1])
        assert all(m in source_blob for m in pacs.markers)
        blob = b"".join(p.read_bytes() for p in files)
        leaks = [m.decode(errors="replace") for m in pacs.markers if m in blob]
        assert not leaks, f"{name}: {len(leaks)} canary markers in the stored series, e.g. {leaks[:5]}"

        # pseudonymous patient, new study/series/instance UIDs, de-identification recorded
        src = [pydicom.dcmread(p, stop_before_pixels=True) for p in source_files]
        out = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
        assert {d.SeriesInstanceUID for d in out} == {new_uid}
        assert len({d.StudyInstanceUID for d in out}) == 1 and out[0].StudyInstanceUID != src[0].StudyInstanceUID
        assert not {d.SOPInstanceUID for d in out} & {d.SOPInstanceUID for d in src}
        for d in out:
            assert d.PatientID.startswith("SEMID-") and d.PatientIdentityRemoved == "YES"
            assert d.DeidentificationMethod.startswith("SemID") and d.Modality == name
            assert "113101" in {item.CodeValue for item in d.DeidentificationMethodCodeSequence}  # clean pixels

        # (c) the same geometry as the original, read by SimpleITK; the face changed, not the rest
        original, result = _read_series(pacs.inputs[name]), _read_series(tmp_path / name)
        assert result.GetSize() == original.GetSize()
        np.testing.assert_allclose(result.GetSpacing(), original.GetSpacing(), atol=1e-4)
        np.testing.assert_allclose(result.GetOrigin(), original.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(result.GetDirection(), original.GetDirection(), atol=1e-5)
        changed = sitk.GetArrayViewFromImage(result) != sitk.GetArrayViewFromImage(original)
        assert 0.005 < changed.mean() < 0.2, f"{name}: {changed.mean():.4f} of the voxels changed"
        assert deidentified[name]["record"]["blocked_voxels"] >= int(changed.sum())


def test_semid_outputs_are_not_listed_as_inputs(pacs: Pacs, deidentified) -> None:
    client = web.connect(pacs.orthanc.dicomweb_url)
    listed = {ref.series_uid for ref in web.list_series(client)}
    assert listed == {pacs.series[n] for n in ("MR", "CT", "nohead", "corrupt")}
    everything = {ref.series_uid for ref in web.list_series(client, include_semid=True)}
    assert everything == listed | {d["series_uid"] for d in deidentified.values()}
    # and the app refuses to take one of them as an input
    response = _infer(pacs.server, deidentified["MR"]["series_uid"])
    assert response.status_code == 404 and "/datastore/" in _one_sentence(response)


@pytest.mark.parametrize("image_id", ["1.2.826.0.1.3680043.10.999.424242", "../../etc/passwd", "capture"])
def test_ids_outside_the_listing_are_refused(pacs: Pacs, image_id: str) -> None:
    image_id = pacs.series.get(image_id, image_id)  # "capture": a real series, but not CT or MR
    response = _infer(pacs.server, image_id)
    # a path is refused before it reaches the datastore (400, lib/security.py); ids by the datastore (404)
    assert response.status_code == (400 if "/" in image_id else 404), response.text
    _one_sentence(response)


def test_a_series_with_no_head_gets_a_clear_error(pacs: Pacs) -> None:
    series_before = pacs.orthanc.series_uids()
    response = _infer(pacs.server, pacs.series["nohead"])
    assert response.status_code == 422, response.text
    assert "head" in _one_sentence(response).lower()
    assert pacs.orthanc.series_uids() == series_before


def test_a_corrupt_instance_gets_a_clear_error(pacs: Pacs) -> None:
    series_before = pacs.orthanc.series_uids()
    response = _infer(pacs.server, pacs.series["corrupt"])
    assert response.status_code == 422, response.text
    assert "damaged" in _one_sentence(response)
    assert pacs.orthanc.series_uids() == series_before


def test_dicomweb_errors_are_one_sentence(pacs: Pacs, tmp_path: Path) -> None:
    from servers import free_loopback_port

    closed = web.connect(f"http://127.0.0.1:{free_loopback_port()}/dicom-web")
    with pytest.raises(web.ServerUnreachable) as down:
        web.list_series(closed)
    wrong_root = web.connect(f"{pacs.orthanc.url}/no-such-root")
    with pytest.raises(web.ServerError) as http_error:
        web.list_series(wrong_root)
    client = web.connect(pacs.orthanc.dicomweb_url)
    with pytest.raises(web.SeriesNotFound):
        web.download_series(client, "1.2.826.0.1.3680043.10.999.424242", tmp_path / "missing")
    assert not (tmp_path / "missing").exists()
    for error, status in ((down.value, 503), (http_error.value, 502)):
        assert error.http_status == status and str(error).endswith(".") and "127.0.0.1" not in str(error)
    # a download is complete or absent: the folder holds the whole series
    folder = web.download_series(client, pacs.series["CT"], tmp_path / "ct")
    assert len(list(folder.iterdir())) == 128


def test_batch_goes_on_past_bad_studies(pacs: Pacs, deidentified) -> None:
    series_before = pacs.orthanc.series_uids()
    images = [pacs.series["corrupt"], pacs.series["nohead"], pacs.series["CT"]]
    response = requests.post(f"{pacs.server.url}/batch/infer/deidentify", params={"run_sync": "true"},
                             json={"images": images, "level": "medium"}, timeout=INFER_TIMEOUT_S)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["summary"]["succeeded"] == 1 and answer["summary"]["failed"] == 2, answer["summary"]
    results = answer["images"]
    assert "damaged" in results[pacs.series["corrupt"]]["reason"]
    assert "head" in results[pacs.series["nohead"]]["reason"].lower()
    assert results[pacs.series["CT"]]["status"] == "done"
    # the CT at another level is another de-identified series (its UIDs follow the pixels)
    new = pacs.orthanc.series_uids() - series_before
    assert len(new) == 1 and not new & set(pacs.series.values())
    objects = requests.get(f"{pacs.server.url}/datastore/", params={"output": "all"}, timeout=60).json()["objects"]
    assert objects[pacs.series["CT"]]["labels"]["deid"]["info"]["SeriesInstanceUID"] in new


def test_credentials_are_sent_when_the_server_asks(pacs: Pacs, tmp_path: Path) -> None:
    users = {"AuthenticationEnabled": True, "RegisteredUsers": {"semid": "s3cret-pass"}}
    with orthanc_server(tmp_path / "locked", users) as locked:
        with pytest.raises(web.ServerError) as refused:
            web.list_series(web.connect(locked.dicomweb_url))
        assert "HTTP 401" in str(refused.value) and "password" in str(refused.value)
        client = web.connect(locked.dicomweb_url, username="semid", password="s3cret-pass")
        assert web.list_series(client) == []


def test_series_writer_refuses_a_volume_of_another_geometry(pacs: Pacs, tmp_path: Path) -> None:
    source = pacs.inputs["nohead"]
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    volume = read_volume(source)
    key = ps.Key(KEY.encode(), "test")
    shifted = sitk.Image(volume)
    shifted.SetOrigin(np.add(volume.GetOrigin(), (0.0, 0.0, 1.0)).tolist())
    for wrong in (volume[:, :, 1:], shifted, sitk.PermuteAxes(volume, [1, 0, 2])):
        with pytest.raises(InputError, match="geometry"):
            deidentify_series(source, wrong, tmp_path / "out", key=key)
        assert not (tmp_path / "out").exists()
    written = deidentify_series(source, volume, tmp_path / "out", key=key)
    back = read_volume(written.folder)
    assert written.instances == 20 and written.patient.startswith("SEMID-")
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(volume))
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before, "the source series was modified"


def test_originals_in_orthanc_are_untouched(pacs: Pacs, deidentified) -> None:
    after = pacs.orthanc.stored()
    assert {i: after.get(i) for i in pacs.before} == pacs.before, "an original instance changed or disappeared"
    added = pacs.orthanc.series_uids() - set(pacs.series.values())
    assert len(added) >= 2 and len(after) == len(pacs.before) + 128 * len(added)


def test_orthanc_down_gives_a_clear_error_and_no_phi_reaches_the_log(pacs: Pacs, deidentified) -> None:
    """Runs last in the module: it stops Orthanc."""
    pacs.orthanc.stop()
    listing = requests.get(f"{pacs.server.url}/datastore/", timeout=60)
    assert listing.status_code == 503, listing.text
    assert "cannot be reached" in _one_sentence(listing)
    # the CT is in the server's cache, so it is de-identified; storing the result must fail cleanly
    response = _infer(pacs.server, pacs.series["CT"], {"level": "low"})
    assert response.status_code == 503, response.text
    _one_sentence(response)

    log = pacs.server.log_path.read_bytes()
    assert b"de-identified series stored" in log  # the log is the server's, and it was written
    leaks = [m.decode(errors="replace") for m in pacs.markers if m in log]
    assert not leaks, f"canary PHI in the server log: {leaks[:5]}"
