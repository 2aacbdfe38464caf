"""`semid batch` reliability on a small phantom archive with canary PHI (issue 8).

One archive (2 DICOM studies and 2 NIfTI volumes of 2 mm phantom heads, PHI in headers, folder and file
names, plus one study whose pixel data is truncated and one NIfTI volume with no head) is de-identified by
`semid batch` run as a real subprocess in its own process group on a local Dask cluster (127.0.0.1):

1. the batch is killed (SIGKILL to its process group, by id) at seeded random moments, several times;
   after every kill and resume the manifest and OUT agree, no partial file exists, nothing is duplicated;
2. in the final resume a Dask worker process is killed mid-study (by the pid the manifest recorded);
   the run finishes and the study is redone;
3. the corrupt study and the headless volume end failed with their reasons after one attempt (the input is
   the problem: not retried, by this run or the next), and the operator's private failures list beside OUT
   names their sources; the others are done exactly once;
4. no canary is anywhere in OUT, in the manifest, or in anything the runs printed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_studies import corrupt_study, head_study
from servers import stop_process_group

CANARIES = (b"QXDOE", b"QXJOHN", b"QXID4711", b"19610312", b"QXHOSPITAL", b"QXROE", b"QXID0815")
KEY = "batch-test-key-0123456789abcdef"
SEMID = [sys.executable, "-m", "semid.cli"]
MANIFEST = "semid_manifest.sqlite"


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, dict]:
    from semid.io import write_volume
    from semid.phantoms import Population

    root = tmp_path_factory.mktemp("batch")
    src = root / "archive"
    pop = Population(4, seed=11)
    for i, (name, pid) in enumerate((("QXDOE^QXJOHN", "QXID4711"), ("QXDOE^QXJANE", "QXID4712"))):
        head_study(pop.subject(i).visit(0, "MR").image, src / f"{name.replace('^', '_')}" / "MR", name, pid)
    for i in (2, 3):
        write_volume(pop.subject(i).visit(0, "MR").image, src / "nifti" / f"QXDOE_QXID47{i}_19610312.nii.gz")
    corrupt_study(src / "QXROE_QXID0815", file_prefix="QXROE_")  # PHI in file names too
    noise = np.random.default_rng(5).normal(100.0, 20.0, size=(40, 48, 48)).astype(np.float32)  # no head at all
    write_volume(_image(noise), src / "nifti" / "QXROE_QXID0816_noise.nii.gz")
    expected = {"dicom_instances": sum(1 for p in src.rglob("*") if p.is_file() and "QXROE" not in str(p)
                                       and not p.name.endswith(".nii.gz")),
                "studies": 6, "good": 4}
    return root, expected


def _image(arr):  # noqa: ANN001, ANN202 - numpy in, SimpleITK out
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((4.0, 4.0, 4.0))
    return image


def _start(src: Path, out: Path, log: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "SEMID_KEY": KEY, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with open(log, "ab") as fh:
        return subprocess.Popen([*SEMID, "batch", str(src), str(out), "--level", "high", "--qc-sample", "1", *extra],
                                stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _manifest(out: Path) -> dict[str, dict]:
    path = out / MANIFEST
    if not path.exists():
        return {}
    db = sqlite3.connect(path, timeout=30)
    try:
        try:
            cur = db.execute("SELECT * FROM studies")
        except sqlite3.OperationalError:  # the run is creating it this moment
            return {}
        names = [d[0] for d in cur.description]
        return {r[0]: dict(zip(names, r, strict=True)) for r in cur.fetchall()}
    finally:
        db.close()


def _check_consistent(out: Path, expected: dict) -> dict[str, dict]:
    """OUT and the manifest agree: every done study is in OUT with the recorded checksums, OUT holds no
    study folder the manifest does not know, no partial or temporary file lies outside the staging
    folder, and no output exists twice."""
    rows = _manifest(out)
    done = {k: r for k, r in rows.items() if r["state"] == "done"}
    recorded: dict[str, str] = {}
    for r in done.values():
        recorded.update(json.loads(r["checksums"]))
    for rel, digest in recorded.items():
        path = out / rel
        assert path.is_file(), "a study recorded as done is missing from OUT"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, "an output differs from its checksum"
    files = [p for p in out.rglob("*") if p.is_file() and ".staging" not in p.relative_to(out).parts
             and p.name not in (MANIFEST, f"{MANIFEST}-wal", f"{MANIFEST}-shm", ".semid-batch.lock")]
    assert not [p for p in files if p.name.startswith(".")], "a temporary file lies in OUT"
    study_dirs = {p.relative_to(out).parts[0] for p in files}
    # every study folder in OUT is complete: either recorded done, or the whole study (a run killed between
    # its rename and its record; the resume redoes and replaces it)
    for rel_top in study_dirs:
        owned = [f for f in files if f.relative_to(out).parts[0] == rel_top]
        if rel_top.startswith("V-"):
            assert sorted(p.suffix for p in owned) == [".gz", ".json"], "a partial volume study in OUT"
        else:
            count = len([p for p in owned if p.suffix == ".dcm"])
            assert count in (0, expected["dicom_instances"] // 2), "a partial DICOM study in OUT"
    uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files if p.suffix == ".dcm"]
    assert len(uids) == len(set(uids)), "an instance was written twice"
    return rows


def _wait(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process_group(proc)
        raise


@pytest.fixture(scope="module")
def runs(archive) -> dict:
    """Kill/resume cycles, then a resume during which a worker is killed; what each step saw."""
    root, expected = archive
    src, out, log = root / "archive", root / "out", root / "batch.log"
    rng = random.Random(8)
    seen: dict = {"kills": [], "states_after_kill": []}
    # kill points: once the manifest shows a seeded number of done studies (0 or 1), a seeded random
    # moment later; tied to progress rather than the clock so that work is left for the last run on
    # fast and slow machines alike
    for target in sorted(rng.choice((0, 1)) for _ in range(3)):
        # two studies in flight on one worker's threads, their generator calls batched (`--threads`)
        proc = _start(src, out, log, "--workers", "1", "--threads", "2")
        delay = rng.uniform(0.5, 3.0)
        deadline = time.monotonic() + 180
        while proc.poll() is None and time.monotonic() < deadline and not (
                _manifest(out) and sum(r["state"] == "done" for r in _manifest(out).values()) >= target):
            time.sleep(0.2)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the batch and its Dask workers: one process group
            proc.wait()
        seen["kills"].append((target, round(delay, 1)))
        rows = _check_consistent(out, expected)
        seen["states_after_kill"].append(sorted(r["state"] for r in rows.values()))
    # the final resume on 2 workers: kill a worker process while it holds a study
    proc = _start(src, out, log, "--workers", "2")
    killed = None
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline and killed is None:
        running = [r for r in _manifest(out).values() if r["state"] == "running" and r["pid"]]
        if running:
            victim = running[0]
            time.sleep(1.0)  # inside the study's work, if it is still running (the corrupt study ends at once)
            now = _manifest(out)[victim["key"]]
            if now["state"] != "running" or now["pid"] != victim["pid"]:
                continue
            try:
                os.kill(int(victim["pid"]), signal.SIGKILL)
                killed = {"key": victim["key"], "pid": victim["pid"], "attempts": victim["attempts"]}
            except ProcessLookupError:
                pass
        time.sleep(0.3)
    seen["returncode"] = _wait(proc, max(1.0, deadline - time.monotonic()))
    seen["killed_worker"] = killed
    seen["rows"] = _check_consistent(out, expected)
    # one more run: nothing left to do
    proc = _start(src, out, log, "--workers", "1")
    seen["rerun_returncode"] = _wait(proc, 120)
    seen["rerun_rows"] = _manifest(out)
    seen["log"] = log.read_bytes()
    return seen


def test_resume_after_kills_leaves_every_study_done_exactly_once(archive, runs) -> None:
    root, expected = archive
    rows = runs["rows"]
    assert len(rows) == expected["studies"]
    done = [r for r in rows.values() if r["state"] == "done"]
    assert len(done) == expected["good"], runs["log"][-2000:]
    out = root / "out"
    outputs = [o for r in done for o in json.loads(r["outputs"])]
    assert len(outputs) == len(set(outputs)) == expected["good"]
    dicom = [p for p in out.rglob("*.dcm") if ".staging" not in p.parts]
    assert len(dicom) == expected["dicom_instances"]  # each instance exactly once
    assert len(list(out.rglob("*.nii.gz"))) == 2
    assert not (out / ".staging").exists() or not any((out / ".staging").iterdir())
    # the rerun skipped everything and changed nothing
    assert runs["rerun_returncode"] == 3  # the corrupt study is still failed
    assert {k: r["finished"] for k, r in runs["rerun_rows"].items() if r["state"] == "done"} == \
           {k: r["finished"] for k, r in rows.items() if r["state"] == "done"}
    # the kills really interrupted work: some kill left a study not done
    assert any(s.count("done") < expected["good"] for s in runs["states_after_kill"]), runs["kills"]


def test_a_killed_worker_does_not_stop_the_run_and_its_study_is_redone(runs) -> None:
    killed = runs["killed_worker"]
    assert killed is not None, "no study was seen running on a worker"
    row = runs["rows"][killed["key"]]
    assert row["state"] == "done"
    assert row["attempts"] > killed["attempts"]  # started again after the kill
    assert row["pid"] != killed["pid"]
    assert runs["returncode"] == 3  # finished (with the corrupt study failed), not crashed


def test_corrupt_and_faceless_studies_fail_once_with_their_reasons_and_sources(archive, runs) -> None:
    root, _ = archive
    failed = {r["kind"]: r for r in runs["rows"].values() if r["state"] == "failed"}
    assert sorted(failed) == ["dicom", "volume"]
    assert "truncated or corrupt" in failed["dicom"]["reason"]
    assert "No head found" in failed["volume"]["reason"]
    # the input itself is the problem: not retried by the rerun (attempts here also count runs that were killed
    # while the study ran; tests/test_batch_dicomweb.py counts one attempt where nothing is killed)
    for row in failed.values():
        assert row["permanent"] == 1
        assert runs["rerun_rows"][row["key"]]["attempts"] == row["attempts"]
    assert b"truncated or corrupt" in runs["log"] and b"not retried" in runs["log"]  # the summary lists them
    # the operator's list maps each failed key to its source; private, beside OUT, never inside it
    listing = root / "out_qc" / "failures.tsv"
    assert (listing.stat().st_mode & 0o777) == 0o600
    lines = listing.read_text().splitlines()
    assert lines[0].split("\t") == ["key", "attempts", "retried", "reason", "source"]
    sources = {line.split("\t")[0]: line.split("\t")[4] for line in lines[1:]}
    assert sources[failed["volume"]["key"]] == "nifti/QXROE_QXID0816_noise.nii.gz"
    assert "QXROE_QXID0815" in sources[failed["dicom"]["key"]]
    assert b"failures.tsv" in runs["log"]


def test_no_canary_in_out_manifest_or_logs(archive, runs) -> None:
    root, _ = archive
    blobs = [runs["log"]]
    for path in (root / "out").rglob("*"):
        blobs.append(str(path.relative_to(root)).encode())
        if path.is_file():
            blobs.append(path.read_bytes())
    for path in (root / "out_qc").rglob("*"):
        blobs.append(str(path.relative_to(root)).encode())
    leaks = {c.decode() for c in CANARIES for b in blobs if c in b}
    assert not leaks, f"canary PHI found: {sorted(leaks)}"
    assert b"studies/min" in runs["log"]  # the progress bar was there to be searched
    report = (root / "out_qc" / "report.html").read_text()
    assert "Failures" in report and "<img" in report


@pytest.mark.parametrize("case", ["missing", "inside", "level", "threads", "scheduler", "dicomweb"])
def test_bad_input_is_one_sentence(archive, tmp_path, case) -> None:
    root, _ = archive
    src = root / "archive"
    args = {"missing": [str(tmp_path / "nope"), str(tmp_path / "o")],
            "inside": [str(src), str(src / "out")],
            "level": [str(src), str(tmp_path / "o"), "--level", "extreme"],
            "threads": [str(src), str(tmp_path / "o"), "--threads", "0"],
            "scheduler": [str(src), str(tmp_path / "o"), "--scheduler", "tcp://127.0.0.1:9"],
            "dicomweb": ["http://127.0.0.1:9/dicom-web", str(tmp_path / "o")]}[case]
    env = {**os.environ, "SEMID_KEY": KEY, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([*SEMID, "batch", *args, "-q"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("semid: error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert not (src / "out").exists()


def test_summary_counts_volumes_passed_through(sample_head, tmp_path) -> None:
    """A skull-stripped volume is written unchanged and counted apart from the de-identified head."""
    import numpy as np
    import SimpleITK as sitk

    from semid.brain import find_brain
    from semid.intensities import read_values
    from semid.triage import coarse_copy

    head = sitk.ReadImage(str(sample_head))
    arr = sitk.GetArrayFromImage(head)
    brain = find_brain(head, read_values(coarse_copy(head), "MR")).on(head)
    stripped = sitk.GetImageFromArray(np.where(brain, arr, 0).astype(arr.dtype))
    stripped.CopyInformation(head)
    (tmp_path / "src").mkdir()
    sitk.WriteImage(head, str(tmp_path / "src" / "head.nii.gz"))
    sitk.WriteImage(stripped, str(tmp_path / "src" / "brain.nii.gz"))
    proc = subprocess.run([sys.executable, "-m", "semid.cli", "batch", str(tmp_path / "src"), str(tmp_path / "out"),
                           "--workers", "1", "-q"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "SEMID_KEY": "k" * 32})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-500:]
    assert "volumes: 1 de-identified (0 already defaced), 1 passed through unchanged" in proc.stdout, proc.stdout
    assert "Skull-stripped" in proc.stdout  # the reason, on the study's line
    outputs = sorted((tmp_path / "out").rglob("*.nii.gz"))
    assert len(outputs) == 2
    want = sitk.GetArrayFromImage(stripped)
    kept = [o for o in outputs if np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(o))), want)]
    assert len(kept) == 1

