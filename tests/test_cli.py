"""The `semid` command as a user runs it: outputs, record, QC picture, and every bad input."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from semid.io import read_volume, same_geometry, write_volume


def semid(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "semid.cli", *args], capture_output=True, text=True, timeout=300)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_clean_failure(proc: subprocess.CompletedProcess, phrase: str, out_dir: Path | None = None) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("semid: error: ") and phrase in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr
    if out_dir is not None:
        assert not any(out_dir.iterdir()), f"left behind: {list(out_dir.iterdir())}"


def test_deidentify_writes_volume_record_and_qc(sample_head, tmp_path):
    before = _sha(sample_head)
    out = tmp_path / "deid.nrrd"
    proc = semid("deidentify", str(sample_head), str(out), "--level", "0.6", "--qc", str(tmp_path / "qc.png"))
    assert proc.returncode == 0, proc.stderr
    assert _sha(sample_head) == before, "the input was modified"
    original, result = read_volume(sample_head), read_volume(out)
    assert same_geometry(original, result) and result.GetPixelID() == original.GetPixelID()
    record = json.loads((tmp_path / "deid.json").read_text())
    assert record["level"] == 0.6 and record["preset"] is None and record["blocked_ml"] > 0
    changed = sitk.GetArrayViewFromImage(original) != sitk.GetArrayViewFromImage(result)
    assert int(changed.sum()) == record["voxels_changed"] <= record["blocked_voxels"]
    png = (tmp_path / "qc.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deid.json", "deid.nrrd", "qc.png"]


def test_dicom_series_in_and_out(sample_head, tmp_path):
    series = write_volume(read_volume(sample_head), tmp_path / "series_in")
    proc = semid("deidentify", str(series), str(tmp_path / "series_out"), "--level", "max", "-q")
    assert proc.returncode == 0, proc.stderr
    original, result = read_volume(series), read_volume(tmp_path / "series_out")
    assert same_geometry(original, result, tol=1e-4) and result.GetPixelID() == original.GetPixelID()
    assert json.loads((tmp_path / "series_out.json").read_text())["preset"] == "max"


def test_render_and_info(sample_head, tmp_path):
    proc = semid("render", str(sample_head), str(tmp_path / "r.png"))
    assert proc.returncode == 0, proc.stderr
    import matplotlib.image as mpimg

    picture = mpimg.imread(tmp_path / "r.png")
    assert picture.shape[:2] == (512, 1024)
    assert 0.1 < float((picture[..., 0] > 0.05).mean()) < 0.9  # a head, not an empty frame
    info = semid("info", str(sample_head), "--json")
    assert info.returncode == 0 and json.loads(info.stdout)["modality"] == "MR"


def _write(arr: np.ndarray, path: Path, spacing=(2.0, 2.0, 2.0)) -> Path:
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing(spacing[: image.GetDimension()])
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture
def bad_inputs(tmp_path) -> dict[str, Path]:
    z, y, x = np.mgrid[:80, :80, :80]
    return {
        "missing": tmp_path / "nothing_here.nii.gz",
        "text": (tmp_path / "notes.nii.gz"),
        "2d": _write(np.ones((64, 64), np.int16), tmp_path / "slice.nii.gz", (1.0, 1.0)),
        "4d": _write(np.ones((3, 20, 20, 20), np.int16), tmp_path / "series4d.nii.gz", (1.0, 1.0, 1.0, 1.0)),
        "constant": _write(np.full((40, 40, 40), 5, np.int16), tmp_path / "constant.nii.gz"),
        "empty": _write(np.zeros((40, 40, 40), np.int16), tmp_path / "empty.nii.gz"),
        "no_head": _write(((x - 40) ** 2 + (y - 40) ** 2 + (z - 40) ** 2 < 34**2).astype(np.int16) * 300,
                          tmp_path / "ball.nii.gz", (2.5, 2.5, 2.5)),
    }


@pytest.mark.parametrize("case,phrase", [
    ("missing", "does not exist"),
    ("text", "not an image"),
    ("2d", "2D"),
    ("4d", "one 3D head volume"),
    ("constant", "empty or constant"),
    ("empty", "empty or constant"),
    ("no_head", "No head found"),
])
def test_bad_input_is_one_sentence_and_leaves_nothing(bad_inputs, tmp_path, case, phrase):
    bad_inputs["text"].write_text("this is not an image")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    source = bad_inputs[case]
    before = _sha(source) if source.exists() else None
    proc = semid("deidentify", str(source), str(out_dir / "result.nii.gz"))
    _assert_clean_failure(proc, phrase, out_dir)
    assert (_sha(source) if source.exists() else None) == before


def test_unknown_level(sample_head, tmp_path):
    proc = semid("deidentify", str(sample_head), str(tmp_path / "o.nii.gz"), "--level", "extreme")
    _assert_clean_failure(proc, "Unknown privacy level", tmp_path)
    proc = semid("deidentify", str(sample_head), str(tmp_path / "o.nii.gz"), "--level", "1.2")
    _assert_clean_failure(proc, "out of range", tmp_path)


@pytest.mark.parametrize("name", ["out.png", "out.mhd", "out.dcm.txt"])
def test_output_name_that_is_not_a_volume_format_is_refused(sample_head, tmp_path, name):
    # a .png output was once written as a folder of Secondary Capture DICOM files
    out = tmp_path / "out"
    out.mkdir()
    proc = semid("deidentify", str(sample_head), str(out / name))
    _assert_clean_failure(proc, "not supported" if name.endswith(".mhd") else "not a volume format", out)


def test_output_equal_to_input_is_refused(sample_head, tmp_path):
    copy = tmp_path / "head.nii.gz"
    copy.write_bytes(sample_head.read_bytes())
    before = _sha(copy)
    proc = semid("deidentify", str(copy), str(copy))
    _assert_clean_failure(proc, "overwrite the input")
    assert _sha(copy) == before and sorted(p.name for p in tmp_path.iterdir()) == ["head.nii.gz"]


def test_read_only_output_place_is_refused(sample_head, tmp_path):
    # /sys refuses new files even to root, unlike a chmod'ed folder
    proc = semid("deidentify", str(sample_head), "/sys/semid-test/out.nii.gz")
    _assert_clean_failure(proc, "read-only")


def test_train_reaches_a_models_other_steps_and_trains_by_default():
    """`semid train generator canvas` (named in the README) is the generator's canvas step, not `train canvas`;
    flags alone go to the training step."""
    canvas = semid("train", "generator", "canvas", "--help")
    assert canvas.returncode == 0 and "usage: semid train generator canvas" in canvas.stdout, canvas.stderr
    train = semid("train", "generator", "--help")
    assert train.returncode == 0 and "--make-samples" in train.stdout, train.stderr
