"""The Slicer module's flow without Slicer: SemIDLib's background job against a real SemID server
(deidentify + segcheck), cancellation, time-out and every error the panel shows, the side-by-side
data and renders, the record and segmentation-check text, settings, and the saved series built from a
source DICOM series carrying canary PHI.

One MONAI Label server (tasks deidentify, segcheck and dicomheader, pseudonym key from SEMID_KEY)
serves the whole module.
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from servers import MONAILABEL, SAMPLE_IMAGE_ID
from servers import monailabel_server as start_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "slicer_extension" / "SemID"))

from SemIDLib import (  # noqa: E402  (the module folder is not a package on sys.path by default)
    CANCELLED,
    DONE,
    FAILED,
    OUTLINE_SOURCE,
    PRESETS,
    Geometry,
    InferJob,
    JobCancelledError,
    SegcheckSummary,
    SemIDClient,
    ServerHeader,
    explain_level,
    fetch_server_header,
    format_record,
    header_upload_copy,
    plan_series,
    read_source_attributes,
    record_rows,
    render_pair,
    residual_risk,
    side_by_side,
    validate,
    validate_output_folder,
    validate_server_url,
    write_renders,
    write_series,
)
from SemIDLib.client import BadRequestError, ServerTimeoutError, ServerUnreachableError, TaskMissingError  # noqa: E402
from SemIDLib.jobs import DOWNLOADING, UPLOADING, WORKING  # noqa: E402
from SemIDLib.views import mask_outline  # noqa: E402

JOB_TIMEOUT_S = 300.0
#: The server's pseudonym key (SEMID_KEY in its environment): the test computes the profile with it too.
KEY = "slicer-flow-test-key-0123456789abcdef"
#: The dicomheader task's upload limit in this module's server (MB); a header is a few KiB.
HEADER_MAX_MB = 0.25
CANARIES = [b"CANARY", b"19010101", b"1.2.3.999.424242", b"555-0199"]


def _one_sentence(message: str) -> None:
    assert message and "\n" not in message and "Traceback" not in message, message


def _run(job: InferJob, limit: float = JOB_TIMEOUT_S) -> list[str]:
    """Poll the job as the widget's timer does; returns the phases seen, in order."""
    phases: list[str] = []
    deadline = time.monotonic() + limit
    job.start()
    while not job.done and time.monotonic() < deadline:
        phase = job.progress().phase
        if not phases or phases[-1] != phase:
            phases.append(phase)
        time.sleep(0.02)
    assert job.wait(5), "job did not end"
    phases.append(job.progress().phase)
    return phases


def _geometry(image: sitk.Image) -> Geometry:
    return Geometry(image.GetSpacing(), image.GetOrigin(), image.GetDirection())


@pytest.fixture(scope="module")
def flow_server(sample_head: Path, tmp_path_factory: pytest.TempPathFactory):
    if not MONAILABEL.exists():
        pytest.skip("MONAI Label is not installed next to this Python")
    root = tmp_path_factory.mktemp("slicer-flow")
    studies = root / "studies"
    studies.mkdir()
    (studies / f"{SAMPLE_IMAGE_ID}.nii.gz").write_bytes(sample_head.read_bytes())
    try:
        conf = {"models": "deidentify,segcheck,dicomheader", "dicomheader_max_mb": str(HEADER_MAX_MB)}
        with start_server(root, studies, conf=conf, env_extra={"SEMID_KEY": KEY}) as server:
            yield server
    except RuntimeError as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="module")
def deid(flow_server, sample_head, tmp_path_factory):
    """One de-identification at `high` through the background job: (job, phases seen)."""
    out = tmp_path_factory.mktemp("deid")
    job = InferJob(SemIDClient(flow_server.url, timeout=JOB_TIMEOUT_S), "deidentify", sample_head,
                   {"level": "high"}, output_dir=out)
    phases = _run(job)
    assert job.progress().phase == DONE, job.error
    return job, phases


# ------------------------------------------------------------------------------------ the request


@pytest.mark.server
def test_job_reports_its_phases_and_returns_the_result(deid, sample_head) -> None:
    job, phases = deid
    assert phases[-1] == DONE and job.error is None
    assert job.history == ["pending", UPLOADING, WORKING, DOWNLOADING, DONE]
    assert set(phases) <= set(job.history)  # what the polling saw is what the job went through
    assert job.bytes_sent > sample_head.stat().st_size  # the whole volume, in a multipart body
    assert job.bytes_received > job.result.volume_path.stat().st_size
    progress = job.progress()
    assert progress.finished and progress.elapsed_s > 0 and "Done" in progress.text()
    ref, out = sitk.ReadImage(str(sample_head)), sitk.ReadImage(str(job.result.volume_path))
    assert out.GetSize() == ref.GetSize()
    np.testing.assert_allclose(out.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(out.GetDirection(), ref.GetDirection(), atol=1e-4)
    changed = sitk.GetArrayFromImage(out) != sitk.GetArrayFromImage(ref)
    assert 0 < changed.mean() < 0.5
    assert not list(job.result.volume_path.parent.glob(".*.part"))

    # The record panel: level, blocked volume, residual risk (or why none), models used.
    rows = dict(record_rows(job.result.record))
    assert rows["Level"] == "high (0.75)"
    assert rows["Blocked volume"].startswith(f"{job.result.record['blocked_ml']:.1f} ml")
    risk = residual_risk(job.result.record)
    if risk is None:
        assert rows["Residual re-identification risk"].startswith("not measured")
    else:
        assert 0.0 <= risk <= 1.0 and rows["Residual re-identification risk"].startswith(f"{risk:.2f}")
    assert rows["Models used"] != "not reported" and "identity region" in rows["Models used"]
    text = format_record(job.result.record)
    assert "/" not in text.split("Models used")[1].split("(")[0], "a file path in the models line"


@pytest.mark.server
def test_side_by_side_slices_outline_and_renders(deid, sample_head, tmp_path) -> None:
    job, _ = deid
    ref = sitk.ReadImage(str(sample_head))
    original = sitk.GetArrayFromImage(ref)
    result = sitk.GetArrayFromImage(sitk.ReadImage(str(job.result.volume_path)))
    view = side_by_side(original, result, axis=2)
    changed = original != result
    # The default slice is the one with the most changed voxels, and its outline lies on them.
    assert view.index == int(np.argmax(changed.sum(axis=(0, 1))))
    assert view.outline.any() and not (view.outline & ~changed[:, :, view.index]).any()
    assert np.array_equal(view.original, original[:, :, view.index])
    assert np.array_equal(view.result, result[:, :, view.index])
    # One window for both, from the original: equal voxels look equal.
    shown_original, shown_result = view.display()
    same = view.original == view.result
    assert np.array_equal(shown_original[same], shown_result[same])
    assert "differ" in OUTLINE_SOURCE
    with pytest.raises(ValueError) as caught:
        side_by_side(original, result[:-1])
    _one_sentence(str(caught.value))

    renders = render_pair(original, result, _geometry(ref))
    for name, image in renders.items():
        assert image.ndim == 2 and 0.0 <= image.min() and image.max() <= 1.0, name
        assert 0.1 < (image > 0).mean() < 0.95, f"{name}: no head-sized surface"
    # The face changed: the frontal and lateral pictures of the result differ from the original's.
    for view_name in ("frontal", "lateral"):
        before, after = getattr(renders, f"original_{view_name}"), getattr(renders, f"result_{view_name}")
        assert before.shape == after.shape
        assert np.abs(before - after).mean() > 0.005, view_name
    # The square-pixel frontal render of a 2 mm head is as wide as the head's left-right extent.
    assert renders.original_frontal.shape[1] in original.shape

    files = write_renders(renders, tmp_path / "renders")
    assert sorted(files) == sorted(name for name, _ in renders.items())
    from PIL import Image

    for name, path in files.items():
        with Image.open(path) as picture:
            back = np.asarray(picture)
        assert back.shape == getattr(renders, name).shape
        np.testing.assert_array_equal(back, np.round(getattr(renders, name) * 255).astype(np.uint8))
    assert not list((tmp_path / "renders").glob(".*"))


@pytest.mark.server
def test_segcheck_result_for_the_panel(flow_server, sample_head, tmp_path) -> None:
    job = InferJob(SemIDClient(flow_server.url, timeout=JOB_TIMEOUT_S), "segcheck", sample_head,
                   {"level": "high"}, output_dir=tmp_path)
    _run(job)
    assert job.progress().phase == DONE, job.error
    summary = SegcheckSummary.from_json(job.result.record)
    assert summary.record.get("level") == pytest.approx(0.75)
    labels = sitk.ReadImage(str(job.result.volume_path))
    ref = sitk.ReadImage(str(sample_head))
    assert labels.GetSize() == ref.GetSize()
    np.testing.assert_allclose(labels.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    values = set(np.unique(sitk.GetArrayFromImage(labels)).tolist())
    assert values <= {0, *summary.labels.values()} and len(values) > 2
    table = summary.table_text()
    for name, value in summary.dice.items():
        line = next(row for row in table.splitlines() if row.startswith(name + " "))
        assert ("-" if value is None else f"{value:.3f}") in line
        assert ("FAIL" in line) == (name in summary.failed)
    assert table.splitlines()[-1] == summary.verdict()
    assert summary.verdict().startswith("Segmentation check passed") == summary.passed
    assert summary.passed == all(summary.dice[c] >= summary.threshold for c in summary.compared)


# ------------------------------------------------------------------------------ errors in the panel


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP listener that accepts connections and never answers (a hung server)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def _small_volume(tmp_path: Path) -> Path:
    path = tmp_path / "CANARY_19010101.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4, 4), np.int16)), str(path))
    return path


def test_job_time_out_is_one_sentence(silent_server, tmp_path) -> None:
    job = InferJob(SemIDClient(silent_server, timeout=1.0), "deidentify", _small_volume(tmp_path), {"level": 0.5},
                   output_dir=tmp_path / "out")
    _run(job, limit=30)
    assert job.progress().phase == FAILED and isinstance(job.error, ServerTimeoutError)
    _one_sentence(str(job.error))
    assert "did not answer within 1 s" in str(job.error) and "try again" in str(job.error)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_job_against_nothing_says_how_to_start_the_server(tmp_path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    job = InferJob(SemIDClient(url, timeout=5), "deidentify", _small_volume(tmp_path), {"level": 0.5})
    _run(job, limit=30)
    assert isinstance(job.error, ServerUnreachableError) and job.result is None
    _one_sentence(str(job.error))
    assert str(job.error).startswith(f"Cannot reach the SemID server at {url}: start it with")


def test_cancel_ends_promptly_and_leaves_nothing(silent_server, tmp_path, monkeypatch) -> None:
    # The default output goes to a new temporary folder: point the temporary area here to see it.
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    volume = _small_volume(tmp_path)
    job = InferJob(SemIDClient(silent_server, timeout=60), "deidentify", volume, {"level": 0.5}).start()
    deadline = time.monotonic() + 10
    while job.progress().phase != WORKING and time.monotonic() < deadline:
        time.sleep(0.01)
    assert job.progress().phase == WORKING
    started = time.monotonic()
    job.cancel()
    assert job.wait(2.0), "cancelled job still running after 2 s"
    assert time.monotonic() - started < 2.0
    assert job.progress().phase == CANCELLED and job.cancelled and job.result is None
    assert isinstance(job.error, JobCancelledError)
    _one_sentence(str(job.error))
    assert sorted(p.name for p in tmp_path.iterdir()) == [volume.name]  # no semid-* folder, no .part


@pytest.mark.server
def test_errors_from_the_real_server(flow_server, sample_head, tmp_path) -> None:
    client = SemIDClient(flow_server.url, timeout=JOB_TIMEOUT_S)
    # A server without the task (an older app, or the task failed to load).
    missing = InferJob(SemIDClient(flow_server.url, timeout=60, task="deidentify"), "nosuchtask", sample_head)
    _run(missing, limit=60)
    assert missing.progress().phase == FAILED
    assert isinstance(missing.error, TaskMissingError) and "no `nosuchtask` task" in str(missing.error)
    _one_sentence(str(missing.error))

    # A volume that is not a head: the server's one sentence, which says what to give instead.
    ball = np.zeros((48, 48, 48), np.int16)
    zz, yy, xx = np.mgrid[:48, :48, :48]
    ball[(zz - 24) ** 2 + (yy - 24) ** 2 + (xx - 24) ** 2 < 20**2] = 800
    path = tmp_path / "phantom.nii.gz"
    image = sitk.GetImageFromArray(ball)
    image.SetSpacing((4.0, 4.0, 4.0))
    sitk.WriteImage(image, str(path))
    job = InferJob(client, "deidentify", path, {"level": "high"}, output_dir=tmp_path / "out")
    _run(job)
    assert job.progress().phase == FAILED and isinstance(job.error, BadRequestError)
    _one_sentence(str(job.error))
    assert "No head found" in str(job.error) and "head CT or MR" in str(job.error), str(job.error)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.server
def test_cancel_against_the_real_server(flow_server, sample_head, tmp_path) -> None:
    # Last in the module: the server finishes the abandoned request on its own.
    job = InferJob(SemIDClient(flow_server.url, timeout=JOB_TIMEOUT_S), "deidentify", sample_head,
                   {"level": "max"}, output_dir=tmp_path / "out").start()
    deadline = time.monotonic() + 30
    while job.progress().phase != WORKING and not job.done and time.monotonic() < deadline:
        time.sleep(0.01)
    assert job.progress().phase == WORKING
    job.cancel()
    assert job.wait(2.0)
    assert job.progress().phase == CANCELLED and job.result is None
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ------------------------------------------------------------------------- the saved DICOM series


def _canary_source_series(array: np.ndarray, folder: Path) -> list[Path]:
    """A source MR series whose header carries canary PHI in identifying attributes."""
    folder.mkdir()
    study, series, frame = "1.2.3.999.424242", "1.2.3.999.424242.1", "1.2.3.999.424242.2"
    paths = []
    for k in range(array.shape[0]):
        ds = Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "MR"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "CANARY^PHI", "CANARY123", "19010101"
        ds.PatientTelephoneNumbers = "555-0199"
        ds.InstitutionName, ds.StudyDate, ds.AccessionNumber = "CANARY HOSPITAL", "19010101", "CANARY-ACC"
        ds.SeriesDescription, ds.ImageComments = "CANARY t1", "canary comment"
        ds.PatientSex, ds.PatientAge, ds.PatientWeight, ds.PatientSize = "F", "047Y", "61.5", "1.68"
        ds.RepetitionTime, ds.EchoTime, ds.MagneticFieldStrength = "2300", "2.98", "3"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 2.0 * k], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [2.0, 2.0], "2.0"
        ds.Rows, ds.Columns = array.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(array[k]).astype("<i2").tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        path = folder / f"CANARY_{k:03d}.dcm"
        if int(pydicom.__version__.split(".")[0]) >= 3:
            ds.save_as(path, enforce_file_format=True)
        else:
            ds.is_little_endian, ds.is_implicit_VR = True, False
            ds.save_as(path, write_like_original=False)
        paths.append(path)
    return paths


@pytest.mark.server
def test_series_without_a_source_header_is_built_from_scratch(deid, sample_head, tmp_path) -> None:
    job, _ = deid
    result = sitk.ReadImage(str(job.result.volume_path))
    array = sitk.GetArrayFromImage(result)
    source_files = _canary_source_series(array, tmp_path / "source")
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in source_files}

    source = read_source_attributes(source_files[0])
    plan = plan_series(array, _geometry(result), str(source.get("Modality")), source)
    files = write_series(plan, tmp_path / "out" / "series")
    assert len(files) == array.shape[0]
    datasets = [pydicom.dcmread(f) for f in files]
    source_ds = pydicom.dcmread(source_files[0])
    for path, ds in zip(files, datasets, strict=True):
        data = path.read_bytes()
        for canary in CANARIES:
            assert canary.lower() not in data.lower(), (path.name, canary)
        assert "canary" not in path.name.lower()
        # pseudonymous patient, kept patient characteristics
        assert str(ds.PatientName) == "SEMID^ANON" and ds.PatientID == plan.patient_id != source_ds.PatientID
        assert (ds.PatientSex, ds.PatientAge) == ("F", "047Y")
        assert float(ds.PatientWeight) == 61.5 and float(ds.PatientSize) == 1.68
        assert ds.PatientIdentityRemoved == "YES"
        assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100", "113105", "113108"]
    # references consistent across instances, new, and different from the source's
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {getattr(ds, keyword) for ds in datasets}
        assert len(values) == 1 and values != {getattr(source_ds, keyword)}, keyword
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    source_sops = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in source_files}
    assert not source_sops & {ds.SOPInstanceUID for ds in datasets}
    # the source series is never modified
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in source_files} == digests


def _profile_answer(upload: Path) -> dict:
    """What the core profile gives for the uploaded header, locally, with the server's key."""
    from semid.dicom import pseudonyms as ps
    from semid.dicom.profile import CID7050, Profile

    ds = pydicom.dcmread(upload)
    profile = Profile(ps.Key(KEY.encode(), "test"))
    profile.apply(ds, profile.context_for(ds))
    code, meaning = CID7050["clean_pixel_data"]
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code, "DCM", meaning
    ds.DeidentificationMethodCodeSequence.append(item)
    return ds.to_json_dict()


@pytest.mark.server
def test_dicomheader_answer_is_the_core_profiles(flow_server, tmp_path) -> None:
    from semid.dicom import pseudonyms as ps

    source_files = _canary_source_series(np.zeros((3, 8, 8), np.int16), tmp_path / "source")
    upload = header_upload_copy(source_files[0], tmp_path / "header.dcm")
    assert "PixelData" not in pydicom.dcmread(upload) and upload.stat().st_size < 4096
    client = SemIDClient(flow_server.url, timeout=60)
    job = InferJob(client, "dicomheader", upload, {}, output="json")
    _run(job, limit=60)
    assert job.progress().phase == DONE, job.error
    answer = job.result.record
    assert job.result.volume_path is None
    assert answer["header"] == _profile_answer(upload)
    text = json.dumps(answer).encode()
    for canary in CANARIES:
        assert canary.lower() not in text.lower(), canary
    assert "7FE00010" not in answer["header"]  # no pixel data
    key = ps.Key(KEY.encode(), "test")
    assert answer["patient_id"] == "SEMID-" + ps.pseudonym(key, "patient", "CANARY123")
    assert answer["study_uid"] == ps.remap_uid(key, "1.2.3.999.424242")
    assert answer["frame_of_reference_uid"] == ps.remap_uid(key, "1.2.3.999.424242.2")
    # stable: another instance of the same study gives the same pseudonymous patient and study
    again = fetch_server_header(client, source_files[2])
    assert (again.patient_id, again.study_uid) == (answer["patient_id"], answer["study_uid"])
    assert not list(tmp_path.glob(".*.part"))


@pytest.mark.server
def test_saved_series_has_the_profiles_header_and_leaves_the_source_alone(deid, flow_server, tmp_path) -> None:
    from semid.dicom import pseudonyms as ps

    job, _ = deid
    result = sitk.ReadImage(str(job.result.volume_path))
    array = sitk.GetArrayFromImage(result)
    source_files = _canary_source_series(array, tmp_path / "source")
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in source_files}

    header = fetch_server_header(SemIDClient(flow_server.url, timeout=60), source_files[0])
    plan = plan_series(array, _geometry(result), "CT", header=header)  # the header's modality wins
    assert plan.header_source == "server"
    files = write_series(plan, tmp_path / "out" / "series")
    datasets = [pydicom.dcmread(f) for f in files]
    key = ps.Key(KEY.encode(), "test")
    source_ds = pydicom.dcmread(source_files[0])
    for path, ds in zip(files, datasets, strict=True):
        data = path.read_bytes()
        for canary in CANARIES:
            assert canary.lower() not in data.lower(), (path.name, canary)
        assert ds.Modality == "MR" and ds.SOPClassUID == source_ds.SOPClassUID
        assert ds.PatientID == "SEMID-" + ps.pseudonym(key, "patient", "CANARY123") == header.patient_id
        assert ds.PatientIdentityRemoved == "YES"
        # patient characteristics as the profile keeps them; dates moved, not removed
        assert (ds.PatientSex, ds.PatientAge) == ("F", "047Y")
        assert float(ds.PatientWeight) == 61.5 and float(ds.PatientSize) == 1.68
        assert ds.StudyDate and ds.StudyDate != source_ds.StudyDate
        codes = [c.CodeValue for c in ds.DeidentificationMethodCodeSequence]
        assert "113100" in codes and "113101" in codes and "113108" in codes
        assert float(ds.RepetitionTime) == 2300.0  # acquisition parameters kept by the profile
    # one study (the profile's keyed UID), one new series, one frame of reference, new instances
    for keyword, expected in (("StudyInstanceUID", ps.remap_uid(key, "1.2.3.999.424242")),
                              ("FrameOfReferenceUID", ps.remap_uid(key, "1.2.3.999.424242.2"))):
        assert {getattr(ds, keyword) for ds in datasets} == {expected}, keyword
    series = {ds.SeriesInstanceUID for ds in datasets}
    assert series == {plan.series_uid} and not series & {"1.2.3.999.424242.1",
                                                         ps.remap_uid(key, "1.2.3.999.424242.1")}
    sops = [ds.SOPInstanceUID for ds in datasets]
    source_sops = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in source_files]
    assert len(set(sops)) == len(sops)
    assert not set(sops) & ({*source_sops} | {ps.remap_uid(key, uid) for uid in source_sops})
    # the pixels are the de-identified volume's, where it lies
    back = sitk.ReadImage([str(f) for f in files])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array)
    np.testing.assert_allclose(back.GetOrigin(), result.GetOrigin(), atol=1e-3)
    # the source series is never modified
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in source_files} == digests


@pytest.mark.server
def test_dicomheader_refuses_bad_uploads_in_one_sentence(flow_server, tmp_path) -> None:
    url = f"{flow_server.url}/infer/dicomheader"
    not_dicom = tmp_path / "CANARY_note.dcm"
    not_dicom.write_bytes(b"CANARY^PHI 19010101 " * 20)
    empty_header = tmp_path / "empty.dcm"
    ds = Dataset()
    ds.PatientName, ds.PatientID = "CANARY^PHI", "CANARY123"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.4", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.save_as(empty_header, write_like_original=False)
    with_pixels = _canary_source_series(np.ones((1, 400, 400), np.int16), tmp_path / "big")[0]
    assert with_pixels.stat().st_size > HEADER_MAX_MB * 2**20
    cases = [(not_dicom, 422, "is not a DICOM instance"), (empty_header, 422, "has no instance header"),
             (with_pixels, 413, "larger than this task's limit")]
    for path, status, words in cases:
        answer = requests.post(url, params={"output": "json"}, timeout=60,
                               files={"file": ("upload.dcm", path.read_bytes())}, data={"params": "{}"})
        assert answer.status_code == status, (path.name, answer.text)
        _one_sentence(answer.json()["detail"])
        assert words in answer.json()["detail"] and "canary" not in answer.text.lower()
    # a datastore image (a NIfTI volume) is no header either
    answer = requests.post(url, params={"output": "json", "image": SAMPLE_IMAGE_ID}, data={"params": "{}"},
                           timeout=60)
    assert answer.status_code == 422 and "is not a DICOM instance" in answer.json()["detail"]
    # what the panel shows: the server's sentence
    job = InferJob(SemIDClient(flow_server.url, timeout=60), "dicomheader", not_dicom, {}, output="json")
    _run(job, limit=60)
    assert job.progress().phase == FAILED and isinstance(job.error, BadRequestError)
    _one_sentence(str(job.error))
    with pytest.raises(ValueError):
        ServerHeader.from_answer({"header": {}})
    # nothing of any uploaded header reached the server log
    log = flow_server.log_path.read_bytes().lower()
    assert b"dicomheader" in log
    for canary in CANARIES:
        assert canary.lower() not in log, canary


# ------------------------------------------------------------------------------ without a server


def test_record_rows_for_learned_and_surface_fills() -> None:
    learned = {"level": 0.5, "blocked_voxels": 100, "blocked_ml": 12.345, "blocked_tissue_ml": 8.0,
               "identity_source": "identity-network and atlas (ordered by the atlas score)",
               "compensation": {"generator": "generator.pt", "sha256": "abcdef0123456789"},
               "atlas": "atlas-v3", "residual_risk": {"critic_similarity_output_to_input": -0.2}}
    rows = dict(record_rows(learned))
    assert rows["Level"] == "medium (0.50)" and rows["Blocked volume"] == "12.3 ml (8.0 ml of it tissue)"
    assert rows["Residual re-identification risk"].startswith("0.40 ")  # (1 + s) / 2: cosine -0.2 -> 0.40
    assert "compensation generator generator.pt (abcdef01)" in rows["Models used"]
    assert "atlas atlas-v3" in rows["Models used"]
    surface = {"level": 0.6, "blocked_voxels": 5, "blocked_ml": 1.0, "method": "featureless surface fill"}
    assert residual_risk(surface) is None
    assert dict(record_rows(surface))["Residual re-identification risk"].startswith("not measured")
    assert residual_risk({"level": 0.0, "blocked_voxels": 0}) == 1.0
    measured = {"level": 0.9, "blocked_voxels": 3, "residual_risk": {"critic_similarity_output_to_input": 0.42}}
    assert residual_risk(measured) == pytest.approx(0.71)


def test_segcheck_summary_refuses_other_answers() -> None:
    for payload in ({}, {"dice": [], "passed": True}, {"dice": {"brain": 0.9}}):
        with pytest.raises(ValueError) as caught:
            SegcheckSummary.from_json(payload)
        _one_sentence(str(caught.value))
    summary = SegcheckSummary.from_json(
        {"dice": {"brain": 0.95, "identity": 0.3, "face_lesion": None}, "threshold": 0.8, "passed": True,
         "compared_classes": ["brain"], "failed_classes": []})
    assert [r[2] for r in summary.rows()] == ["pass", "not checked", "too small"]


def test_every_preset_explains_what_it_removes() -> None:
    lines = {name: explain_level(name) for name in PRESETS}
    assert len(set(lines.values())) == len(PRESETS)
    for name, value in PRESETS.items():
        if 0 < value < 1:
            assert f"{round(value * 100)} %" in lines[name] and "stay" in lines[name], lines[name]
    assert "unchanged" in lines["off"] and "whole identity region" in lines["max"]


def test_settings_defaults_and_validation(tmp_path) -> None:
    settings, problems = validate({})
    assert settings.server_url == "http://127.0.0.1:8000" and settings.level == 0.75 and not problems
    settings, problems = validate({"server_url": "gpu-box:8000/", "level": "medium",
                                   "output_folder": str(tmp_path / "new")})
    assert settings.server_url == "http://gpu-box:8000" and settings.level == 0.5 and not problems
    settings, problems = validate({"server_url": "ftp://x", "level": "extreme", "output_folder": "relative"})
    assert settings.server_url == "http://127.0.0.1:8000" and settings.level == 0.75 and len(problems) == 3
    for problem in problems:
        _one_sentence(problem)
    assert json.loads(json.dumps(settings.as_strings()))["level"] == "0.7500"
    for bad in ("", "http://", "http://host:notaport"):
        with pytest.raises(ValueError):
            validate_server_url(bad)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError) as caught:
        validate_output_folder(str(a_file))
    _one_sentence(str(caught.value))


def test_outline_is_the_rim_of_the_mask() -> None:
    mask = np.zeros((7, 7), bool)
    mask[2:5, 2:5] = True
    rim = mask_outline(mask)
    assert rim.sum() == 8 and not rim[3, 3] and rim[2, 2]
