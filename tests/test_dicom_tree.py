"""`semid deidentify-dicom` end to end: canary corpus, references, keys, head series, bad files, dciodvfy."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from semid.dicom import pseudonyms as ps
from semid.dicom.canary import make_corpus
from semid.dicom.profile import Options
from semid.dicom.tree import deidentify_tree
from semid.io import MODALITY_KEY, read_volume, same_geometry, write_volume

KEY = ps.Key(b"test-key-" * 4, "test")
OTHER_KEY = ps.Key(b"other-key" * 4, "test")
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _tree_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def _tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            digest.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def canary(tmp_path_factory):
    root = tmp_path_factory.mktemp("canary")
    corpus = make_corpus(root / "in", burned_in=True)
    before = _tree_digest(root / "in")
    report = deidentify_tree(root / "in", root / "out", "high", key=KEY)
    return root, corpus, report, before


def test_no_canary_survives_anywhere_in_the_output(canary):
    root, corpus, report, _ = canary
    source = _tree_bytes(root / "in")
    missing = [m for m in corpus.markers if m not in source]
    assert not missing, f"the corpus itself lacks markers: {missing[:5]}"  # the search can find them
    assert report.files_written == len(corpus.files) and not report.quarantined
    blob = _tree_bytes(root / "out")
    leaks = {m.decode(errors="replace"): where for m, where in corpus.markers.items() if m in blob}
    assert not leaks, f"{len(leaks)} markers leaked, e.g. {list(leaks.items())[:10]}"


def test_burned_in_canary_is_unreadable(canary):
    from semid.dicom import burnedin

    root, corpus, report, _ = canary
    assert corpus.burned_in and report.burned_in_boxes_blanked >= 1
    (captured,) = [p for p in (root / "out").rglob("*.dcm") if pydicom.dcmread(p).Modality == "OT"]
    ds = pydicom.dcmread(captured)
    texts = " ".join(box.text for box in burnedin.find_text(ds.pixel_array))
    assert "QXBURNED" not in texts.upper() and "31415926" not in texts.replace(" ", "")
    assert "AXIAL" in texts.upper()  # the medical annotation stays
    assert ds.BurnedInAnnotation == "NO"


def test_input_tree_is_untouched(canary):
    root, _, _, before = canary
    assert _tree_digest(root / "in") == before


def test_kept_attributes_and_the_record_of_what_was_done(canary):
    root, corpus, report, _ = canary
    files = sorted((root / "out").rglob("*.dcm"))
    assert len(files) == len(corpus.files)
    for path in files:
        ds = pydicom.dcmread(path)
        if ds.Modality == "OT":
            continue  # the burned-in capture has its own test
        for keyword, value in corpus.kept.items():
            assert str(ds.get(keyword)) == value, keyword
        assert ds.PatientIdentityRemoved == "YES"
        codes = {item.CodeValue for item in ds.DeidentificationMethodCodeSequence}
        assert {"113100", "113105", "113107", "113108"} <= codes
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
        assert ds.PatientID.startswith("SEMID-") and "glioma" in str(ds.StudyDescription)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert report.actions["X"] > 0 and report.actions["U"] > 0 and report.actions["C"] > 0
    assert not list((root / "out").rglob(".semid-*")), "temporary files left behind"


def test_references_resolve_and_layout_is_pseudonymous(canary):
    root, corpus, _, _ = canary
    by_sop = {}
    for path in (root / "out").rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        by_sop[ds.SOPInstanceUID] = ds
        assert path.name == f"{ds.SOPInstanceUID}.dcm"
        patient, study, series = path.parts[-4:-1]
        assert patient == ds.PatientID and study.startswith("ST-") and series.startswith("SE-")
    for ds in by_sop.values():
        if ds.Modality == "OT":
            continue
        ref = ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID
        target = by_sop[ref]  # the referenced instance exists under its new UID
        assert target.SeriesInstanceUID == ds.SeriesInstanceUID
        assert target.FrameOfReferenceUID == ds.FrameOfReferenceUID
    assert len({ds.PatientID for ds in by_sop.values()}) == 3  # two CT patients and the capture's


def test_same_key_same_uids_other_key_other_uids(canary, tmp_path):
    root, _, _, _ = canary
    again = deidentify_tree(root / "in", tmp_path / "again", "high", key=KEY)
    other = deidentify_tree(root / "in", tmp_path / "other", "high", key=OTHER_KEY)
    assert again.files_written == other.files_written

    def uids(folder: Path) -> set[str]:
        return {pydicom.dcmread(p).SOPInstanceUID for p in folder.rglob("*.dcm")}

    first = uids(root / "out")
    assert uids(tmp_path / "again") == first
    assert not (uids(tmp_path / "other") & first)


def test_volume_series_are_deidentified_passed_through_or_quarantined(sample_head, tmp_path):
    """A head series is de-identified; a skull-stripped one is written with its pixels unchanged and counted
    as passed through; a volume series that is no head is quarantined with its reason (never written as if
    it were de-identified) and the CLI ends with exit 3, unless told to keep its pixels."""
    head = read_volume(sample_head)
    head.SetMetaData(MODALITY_KEY, "MR")
    write_volume(head, tmp_path / "in" / "head")
    arr = sitk.GetArrayFromImage(head)
    from semid.brain import find_brain
    from semid.intensities import read_values
    from semid.triage import coarse_copy

    brain = find_brain(head, read_values(coarse_copy(head), "MR")).on(head)
    stripped = sitk.GetImageFromArray(np.where(brain, arr, 0).astype(arr.dtype))
    stripped.CopyInformation(head)
    stripped.SetMetaData(MODALITY_KEY, "MR")
    write_volume(stripped, tmp_path / "in" / "stripped")
    zz, yy, xx = np.mgrid[:60, :60, :60]
    ball = sitk.GetImageFromArray((((zz - 30) ** 2 + (yy - 30) ** 2 + (xx - 30) ** 2 < 26**2) * 300).astype(np.int16))
    ball.SetSpacing((3.0, 3.0, 3.0))
    ball.SetMetaData(MODALITY_KEY, "MR")
    write_volume(ball, tmp_path / "in" / "ball")

    report = deidentify_tree(tmp_path / "in", tmp_path / "out", "high", key=KEY)
    assert (report.image_series_deidentified, report.image_series_passed_through,
            report.image_series_quarantined) == (1, 1, 1), (report.image_series_passed, report.image_series_problems)
    assert report.image_series_passed[0]["class"] == "skull-stripped"
    problem = report.image_series_problems[0]
    assert problem["outcome"] == "quarantined" and "No head found" in problem["reason"] and problem["files"] == 60
    assert sum(1 for _ in (tmp_path / "out").rglob("*.dcm")) == head.GetSize()[2] + stripped.GetSize()[2]
    # the stripped series' pixels are as they were
    out_series = [p for p in (tmp_path / "out").rglob("*") if p.is_dir() and any(p.glob("*.dcm"))]
    unchanged = [d for d in out_series if np.array_equal(sitk.GetArrayFromImage(read_volume(d)),
                                                          sitk.GetArrayFromImage(stripped))]
    assert len(unchanged) == 1

    # the command line, on the series that is no head (refused at once)
    shutil.copytree(tmp_path / "in" / "ball", tmp_path / "only_ball" / "ball")
    env = {**os.environ, "SEMID_KEY": "k" * 32}
    cli = [sys.executable, "-m", "semid.cli", "deidentify-dicom", str(tmp_path / "only_ball")]
    proc = subprocess.run(cli + [str(tmp_path / "cli"), "-q"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3 and not list((tmp_path / "cli").rglob("*.dcm")), proc.stderr[-500:]
    kept = subprocess.run(cli + [str(tmp_path / "kept"), "--keep-undeidentified-pixels"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert kept.returncode == 3 and "written with its pixels unchanged" in kept.stdout, kept.stdout[-800:]
    assert sum(1 for _ in (tmp_path / "kept").rglob("*.dcm")) == 60


def test_options_change_what_is_kept(tmp_path):
    corpus_dir = tmp_path / "in"
    make_corpus(corpus_dir, patients=1, series_per_patient=1, slices=1)
    opts = Options.from_names(["retain_uids", "retain_full_dates", "no-clean_descriptors"])
    deidentify_tree(corpus_dir, tmp_path / "out", "high", options=opts, key=KEY)
    src = pydicom.dcmread(next(corpus_dir.rglob("*.dcm")))
    out = pydicom.dcmread(next((tmp_path / "out").rglob("*.dcm")))
    assert out.SOPInstanceUID == src.SOPInstanceUID and out.LongitudinalTemporalInformationModified == "UNMODIFIED"
    assert "StudyDescription" not in out  # without Clean Descriptors, the basic profile removes it
    codes = {item.CodeValue for item in out.DeidentificationMethodCodeSequence}
    assert {"113110", "113106"} <= codes and "113105" not in codes


def test_head_series_goes_through_the_image_pipeline(sample_head, tmp_path):
    head = read_volume(sample_head)
    head.SetMetaData(MODALITY_KEY, "MR")
    series = write_volume(head, tmp_path / "in" / "head")
    report = deidentify_tree(tmp_path / "in", tmp_path / "out", "high", key=KEY)
    assert report.image_series_deidentified == 1 and report.files_written == len(list(series.iterdir()))
    out_series = next(p.parent for p in (tmp_path / "out").rglob("*.dcm"))
    original, result = read_volume(series), read_volume(out_series)
    assert same_geometry(original, result, tol=1e-4) and result.GetPixelID() == original.GetPixelID()
    changed = sitk.GetArrayViewFromImage(original) != sitk.GetArrayViewFromImage(result)
    assert 0.005 < changed.mean() < 0.2
    ds = pydicom.dcmread(next(out_series.iterdir()))
    assert "113101" in {item.CodeValue for item in ds.DeidentificationMethodCodeSequence}


def test_bad_files_are_quarantined_and_the_run_goes_on(tmp_path):
    src = tmp_path / "in"
    (src / "a").mkdir(parents=True)
    for name in ("CT_small.dcm", "MR_small.dcm", "MR_truncated.dcm", "rtplan_truncated.dcm", "README.txt"):
        shutil.copy(PYDICOM_FILES / name, src / "a" / name)
    shutil.copytree(PYDICOM_FILES / "dicomdirtests", src / "media")
    (src / "a" / "corrupt.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff")
    report = deidentify_tree(src, tmp_path / "out", "high", key=KEY)
    reasons = {q["file"]: q["reason"] for q in report.quarantined}
    assert reasons["a/README.txt"] == "not a DICOM file"
    assert "truncated" in reasons["a/MR_truncated.dcm"]
    assert reasons["a/corrupt.dcm"] in ("truncated or corrupt DICOM", "no SOP Instance UID")
    assert reasons["media/DICOMDIR"].startswith("DICOMDIR")
    written = list((tmp_path / "out").rglob("*.dcm"))
    assert report.files_written == len(written) >= 2  # CT_small, MR_small and the media's instances
    assert not any(f.name in ("MR_truncated.dcm", "README.txt") for f in written)


def test_mixed_geometry_and_undecodable_pixels_are_quarantined(sample_head, tmp_path):
    part = read_volume(sample_head)[:, :, 40:60]
    part.SetMetaData(MODALITY_KEY, "MR")
    series = write_volume(part, tmp_path / "in" / "mixed")
    odd = sorted(series.iterdir())[5]
    ds = pydicom.dcmread(odd)
    ds.Rows, ds.Columns = 64, 64
    ds.PixelData = np.zeros((64, 64), np.int16).tobytes()
    ds.save_as(odd)
    jpeg = pydicom.dcmread(PYDICOM_FILES / "SC_rgb_jpeg_dcmtk.dcm")
    jpeg.BurnedInAnnotation = "YES"  # so its pixels must be checked, and they cannot be decoded here
    jpeg.save_as(tmp_path / "in" / "capture.dcm")
    report = deidentify_tree(tmp_path / "in", tmp_path / "out", "high", key=KEY)
    reasons = {q["file"]: q["reason"] for q in report.quarantined}
    assert len([r for r in reasons.values() if r.startswith("series with mixed geometry")]) == 20
    assert reasons["capture.dcm"].startswith("pixel data in a transfer syntax")
    assert report.files_written == 0 and not list((tmp_path / "out").rglob("*.dcm"))


def test_a_killed_run_leaves_no_partial_file(tmp_path):
    import signal
    import time

    make_corpus(tmp_path / "in", patients=2, series_per_patient=2, slices=25)
    env = {"SEMID_KEY": "k" * 32, "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen([sys.executable, "-m", "semid.cli", "deidentify-dicom", str(tmp_path / "in"),
                             str(tmp_path / "out"), "-q", "--keep-undeidentified-pixels"],  # the corpus has no heads
                            env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((tmp_path / "out").rglob("*.dcm")):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # by process id, mid-run
    proc.wait(timeout=30)
    written = list((tmp_path / "out").rglob("*"))
    files = [p for p in written if p.is_file()]
    assert files, "the run was killed before it wrote anything: make the corpus bigger"
    assert len(files) < 100, "the run finished before it was killed: make the corpus bigger"
    for path in files:
        assert path.suffix == ".dcm" and not path.name.startswith(".")
        assert pydicom.dcmread(path).PatientIdentityRemoved == "YES"  # complete and readable


def _dciodvfy_errors(path: Path) -> set[str]:
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    # values (UIDs, names) differ after de-identification: compare the kind of error only
    return {re.sub(r"\d+(\.\d+)+", "UID", line) for line in lines if line.startswith("Error")}


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian dicom3tools) is not installed")
@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "test-SR.dcm"])
def test_output_validates_no_worse_than_input(tmp_path, name):
    (tmp_path / "in").mkdir()
    shutil.copy(PYDICOM_FILES / name, tmp_path / "in" / name)
    report = deidentify_tree(tmp_path / "in", tmp_path / "out", "high", key=KEY)
    assert report.files_written == 1, report.quarantined
    out = next((tmp_path / "out").rglob("*.dcm"))
    new_errors = _dciodvfy_errors(out) - _dciodvfy_errors(tmp_path / "in" / name)
    assert not new_errors, new_errors


def test_cli_report_mapping_and_key_notice(tmp_path):
    make_corpus(tmp_path / "in", patients=1, series_per_patient=1, slices=2)
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "semid.cli", "deidentify-dicom", str(tmp_path / "in"),
                           str(tmp_path / "out"), "--mapping", str(tmp_path / "map.json")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    key_file = tmp_path / "config" / "semid" / "key"
    assert str(key_file) in proc.stderr and key_file.read_text().strip() not in proc.stderr + proc.stdout
    report = json.loads((tmp_path / "out_report.json").read_text())
    assert report["files_written"] == 2 and report["key_origin"] == "a new key file"
    mapping = json.loads((tmp_path / "map.json").read_text())
    assert mapping[0]["patient_id"].startswith("QXPATID") and mapping[0]["pseudonym"].startswith("SEMID-")
    assert key_file.read_bytes().strip() not in _tree_bytes(tmp_path / "out")
    bad = subprocess.run([sys.executable, "-m", "semid.cli", "deidentify-dicom", str(tmp_path / "in"),
                          str(tmp_path / "out2"), "--mapping", str(tmp_path / "out2" / "map.json")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "mapping table" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "out2").exists()


def test_real_ultrasounds_lose_their_burned_in_identity(tmp_path):
    from semid.data import data_dir
    from semid.dicom import burnedin

    folder = data_dir() / "dicom" / "deid-data" / "ultrasounds"
    files = [folder / n for n in ("GREYSCALE_IMAGE.dcm", "RGB_IMAGE.dcm")]
    if not all(f.exists() for f in files):
        pytest.skip("deid-data ultrasounds not fetched: run `make data`")
    (tmp_path / "in").mkdir()
    identifiers = {}
    for f in files:
        shutil.copy(f, tmp_path / "in" / f.name)
        identifiers[f.name] = burnedin.header_identifiers(pydicom.dcmread(f))
    report = deidentify_tree(tmp_path / "in", tmp_path / "out", "high", key=KEY)
    assert report.files_written == 2 and report.burned_in_boxes_blanked >= 6
    for out in (tmp_path / "out").rglob("*.dcm"):
        ds = pydicom.dcmread(out)
        frame = ds.pixel_array
        texts = [box.text for box in burnedin.find_text(np.asarray(frame))]
        all_ids = [i for ids in identifiers.values() for i in ids]
        assert not any(burnedin.identifier_like(t, all_ids) for t in texts), "identity still readable"
        assert ds.BurnedInAnnotation == "NO"


def _sr_with_text(tmp_path: Path) -> Path:
    ds = pydicom.dcmread(PYDICOM_FILES / "test-SR.dcm")
    ds.PatientName = "QXSRNAME^ANNA"
    item = pydicom.Dataset()
    item.RelationshipType, item.ValueType = "CONTAINS", "TEXT"
    concept = pydicom.Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "121071", "DCM", "Finding"
    item.ConceptNameCodeSequence = pydicom.Sequence([concept])
    item.TextValue = "Small meningioma, discussed with QXSRNAME on the phone"
    ds.ContentSequence.append(item)
    (tmp_path / "in").mkdir(exist_ok=True)
    ds.save_as(tmp_path / "in" / "sr.dcm")
    return tmp_path / "in"


@pytest.mark.parametrize("options,expect_text", [
    ([], None),  # ContentSequence is D: the structure stays, free text becomes a dummy
    (["clean_structured_content"], "meningioma"),  # C: free text is cleaned, the finding stays
])
def test_structured_content_dummied_or_cleaned(tmp_path, options, expect_text):
    src = _sr_with_text(tmp_path)
    deidentify_tree(src, tmp_path / "out", "high", options=Options.from_names(options), key=KEY)
    out = pydicom.dcmread(next((tmp_path / "out").rglob("*.dcm")))
    item = out.ContentSequence[-1]
    assert item.ConceptNameCodeSequence[0].CodeValue == "121071" and item.ValueType == "TEXT"
    assert b"QXSRNAME" not in (next((tmp_path / "out").rglob("*.dcm"))).read_bytes()
    if expect_text:
        assert expect_text in item.TextValue
    else:
        assert item.TextValue == "ANONYMOUS"


def test_safe_private_kept_only_with_its_option(tmp_path):
    from semid.dicom.profile import ActionTable

    table = ActionTable.load()
    creator, group, element = sorted(table.safe_private)[0]
    src = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    block = src.private_block(group, creator, create=True)
    block.add_new(element, "DS", "1.5")
    other = src.private_block(0x0041, "QX UNSAFE", create=True)
    other.add_new(0x10, "LO", "QXPRIVATE")
    (tmp_path / "in").mkdir()
    src.save_as(tmp_path / "in" / "ct.dcm")
    for name, opts in (("basic", []), ("safe", ["retain_safe_private"])):
        deidentify_tree(tmp_path / "in", tmp_path / name, "high", options=Options.from_names(opts), key=KEY)
        out = pydicom.dcmread(next((tmp_path / name).rglob("*.dcm")))
        kept = [e for e in out if e.tag.is_private and not 0x10 <= e.tag.element <= 0xFF]
        assert b"QXPRIVATE" not in next((tmp_path / name).rglob("*.dcm")).read_bytes()
        if name == "basic":
            assert not kept
        else:
            creators = {(e.tag.group, e.tag.element): str(e.value) for e in out if e.tag.is_private
                        and 0x10 <= e.tag.element <= 0xFF}
            assert any(e.tag.group == group and e.tag.element & 0xFF == element for e in kept)
            assert all(table.is_safe_private(creators[(e.tag.group, e.tag.element >> 8)], e.tag) for e in kept)
