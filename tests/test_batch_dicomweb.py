"""`semid batch` with a real Orthanc as its DICOMweb source and as its DICOMweb destination (issue 8).

One Orthanc (Debian's, DICOMweb plugin, loopback port, temporary storage) serves the module. It holds
two 2 mm phantom head studies (MR) with canary PHI in their headers and a corrupt CT study whose
instances are cut short. `semid batch` runs as a real subprocess in its own process group, on a Dask
scheduler and one worker that the module starts on 127.0.0.1 (``--scheduler``, each in its own
process group, stopped by id): both archive runs share the worker, so its models load once.

1. SOURCE = the Orthanc URL, OUT = a folder: the two heads are done and de-identified (no canary byte in
   OUT, the manifest or the printed output), Orthanc's originals are byte-identical afterwards, the
   corrupt study is failed with its reason while the others finish, and a rerun is a no-op;
2. SOURCE = the folder the heads were uploaded from, OUT = the Orthanc URL with ``--work``: the new
   series appear in Orthanc with no canary byte and the source's geometry, the manifest records their
   series UIDs, and a rerun stores nothing twice; SemID's stored outputs are not taken as new studies
   of the Orthanc source afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_studies import corrupt_study, head_study
from servers import (
    OrthancServer,
    free_loopback_port,
    orthanc_holding,
    orthanc_missing,
    stop_process_group,
    tail,
)

from semid.batch import study_key
from semid.dicom import pseudonyms as ps

pytestmark = pytest.mark.server

KEY = "batch-dicomweb-key-0123456789abcdef"
SEMID = [sys.executable, "-m", "semid.cli"]
MANIFEST = "semid_manifest.sqlite"
RUN_TIMEOUT_S = 300
DASK_START_TIMEOUT_S = 60.0
#: The patients of the archive (name, ID); every byte of these must disappear from the outputs.
PATIENTS = (("QXDOE^QXJOHN", "QXID4711"), ("QXDOE^QXJANE", "QXID4712"))
CANARIES = (b"QXDOE", b"QXJOHN", b"QXJANE", b"QXID4711", b"QXID4712", b"19610312", b"QXHOSPITAL", b"QXDRWHO",
            b"QXACC99", b"QXROE", b"QXID0815")


@dataclass
class Pacs:
    orthanc: OrthancServer
    root: Path
    heads: Path  # folder with one subfolder per head study (the files uploaded to Orthanc)
    study_uids: dict[str, str]  # "head0", "head1", "corrupt" -> Study Instance UID
    before: dict[str, str]  # Orthanc instance id -> sha256 of its stored file, before any batch ran


# ------------------------------------------------------------------------------------------- helpers


def _read_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _batch(scheduler: str, source: str, out: str, *extra: str) -> subprocess.CompletedProcess:
    """Run `semid batch` in its own process group (stopped by its id if it overruns); stdout and stderr."""
    proc = subprocess.Popen([*SEMID, "batch", source, out, "--level", "high", "--scheduler", scheduler,
                             "--qc-sample", "0", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**_env(), "SEMID_KEY": KEY}, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        stop_process_group(proc)  # a no-op when it ended by itself
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _manifest(home: Path) -> dict[str, dict]:
    db = sqlite3.connect(home / MANIFEST, timeout=30)
    try:
        cur = db.execute("SELECT * FROM studies")
        names = [d[0] for d in cur.description]
        return {r[0]: dict(zip(names, r, strict=True)) for r in cur.fetchall()}
    finally:
        db.close()


def _leaks(blobs: list[bytes]) -> set[str]:
    return {c.decode() for c in CANARIES for b in blobs if c in b}


def _tree_blobs(folder: Path) -> list[bytes]:
    """Every file's bytes and every path name under ``folder``."""
    blobs = []
    for path in folder.rglob("*"):
        blobs.append(str(path.relative_to(folder)).encode())
        if path.is_file():
            blobs.append(path.read_bytes())
    return blobs


# ------------------------------------------------------------------------------------------ fixtures


@dataclass
class Dask:
    address: str  # tcp://127.0.0.1:PORT
    logs: list[Path]  # scheduler's, worker's
    procs: list[subprocess.Popen]

    def wait(self) -> None:
        """Until the worker has registered with the scheduler (a failed test, with its log, if it does not)."""
        deadline = time.monotonic() + DASK_START_TIMEOUT_S
        while b"Registered to" not in self.logs[1].read_bytes():
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                pytest.fail("the Dask scheduler or worker did not come up; worker log:\n" + tail(self.logs[1], 3000),
                            pytrace=False)
            time.sleep(0.2)


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A Dask scheduler and one single-threaded worker on 127.0.0.1, no dashboard, each in its own process
    group (killed by group id at the end). Started first, so they come up while the studies are made."""
    root = tmp_path_factory.mktemp("dask")
    address = f"tcp://127.0.0.1:{free_loopback_port()}"
    commands = {"scheduler": ["scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                              "--no-dashboard"],
                "worker": ["worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--nworkers", "1",
                           "--no-nanny", "--no-dashboard", "--local-directory", str(root / "space")]}
    procs: list[subprocess.Popen] = []
    logs = [root / f"{name}.log" for name in commands]
    try:
        for log_path, args in zip(logs, commands.values(), strict=True):
            with open(log_path, "wb") as log:
                procs.append(subprocess.Popen([sys.executable, "-m", "dask", *args], stdout=log,
                                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_env(),
                                              cwd=root, start_new_session=True))
        yield Dask(address, logs, procs)
    finally:
        for proc in procs:  # no state worth a graceful close: SIGKILL to each group, by its id
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def pacs(dask_cluster: Dask, tmp_path_factory: pytest.TempPathFactory):
    missing = orthanc_missing()
    if missing:
        pytest.skip(missing)
    from semid.phantoms import Population

    root = tmp_path_factory.mktemp("batch_dicomweb")
    pop = Population(2, seed=21)
    files = {f"head{i}": head_study(pop.subject(i).visit(0, "MR").image, root / "heads" / f"study{i}" / "MR",
                                     name, pid) for i, (name, pid) in enumerate(PATIENTS)}
    files["corrupt"] = corrupt_study(root / "corrupt")
    uids = {name: str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
            for name, paths in files.items()}
    with orthanc_holding(root / "orthanc", list(files.values())) as (orthanc, before):
        yield Pacs(orthanc, root, root / "heads", uids, before)


@pytest.fixture(scope="module")
def from_orthanc(pacs: Pacs, dask_cluster: Dask) -> dict:
    """SOURCE = Orthanc, OUT = a folder: the run, a rerun, and what Orthanc held afterwards."""
    out = pacs.root / "out"
    dask_cluster.wait()
    first = _batch(dask_cluster.address, pacs.orthanc.dicomweb_url, str(out))
    rows = _manifest(out)
    outputs = {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in out.rglob("*.dcm")}
    after = pacs.orthanc.stored()
    again = _batch(dask_cluster.address, pacs.orthanc.dicomweb_url, str(out))
    return {"out": out, "first": first, "rows": rows, "outputs": outputs, "after": after, "again": again,
            "rows_again": _manifest(out),
            "outputs_again": {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                              for p in out.rglob("*.dcm")}}


@pytest.fixture(scope="module")
def to_orthanc(pacs: Pacs, dask_cluster: Dask, from_orthanc) -> dict:
    """SOURCE = the heads' folder, OUT = Orthanc with --work: the run, a rerun, and Orthanc's state."""
    work = pacs.root / "work"
    series_before = pacs.orthanc.series_uids()
    first = _batch(dask_cluster.address, str(pacs.heads), pacs.orthanc.dicomweb_url, "--work", str(work))
    rows = _manifest(work)
    stored = pacs.orthanc.stored()
    again = _batch(dask_cluster.address, str(pacs.heads), pacs.orthanc.dicomweb_url, "--work", str(work))
    return {"work": work, "first": first, "rows": rows, "series_before": series_before,
            "series_after": pacs.orthanc.series_uids(), "stored": stored, "again": again,
            "rows_again": _manifest(work), "stored_again": pacs.orthanc.stored()}


# --------------------------------------------------------------------------------------------- tests


def test_orthanc_source_every_study_done_and_deidentified(pacs: Pacs, from_orthanc) -> None:
    first, rows, out = from_orthanc["first"], from_orthanc["rows"], from_orthanc["out"]
    assert first.returncode == 3, first.stderr[-3000:]  # done, with the corrupt study failed
    key = ps.Key(KEY.encode(), "test")
    heads = {study_key(key, pacs.study_uids[n]) for n in ("head0", "head1")}
    assert set(rows) == heads | {study_key(key, pacs.study_uids["corrupt"])}
    assert {k for k, r in rows.items() if r["state"] == "done"} == heads
    # each head is one study folder in OUT with every instance, recorded with its checksums
    source_counts = sorted(len(list(p.rglob("*.dcm"))) for p in pacs.heads.iterdir())
    counts = []
    for k in heads:
        outputs = json.loads(rows[k]["outputs"])
        checksums = json.loads(rows[k]["checksums"])
        assert len(outputs) == 1 and outputs[0].split("/")[1] == k
        files = sorted((out / outputs[0]).rglob("*.dcm"))
        counts.append(len(files))
        assert {f"{outputs[0]}/{p.relative_to(out / outputs[0]).as_posix()}" for p in files} == set(checksums)
        for p in files:
            assert hashlib.sha256(p.read_bytes()).hexdigest() == checksums[
                f"{outputs[0]}/{p.relative_to(out / outputs[0]).as_posix()}"]
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        assert ds.PatientID.startswith("SEMID-") and ds.PatientIdentityRemoved == "YES"
        assert ds.StudyInstanceUID not in pacs.study_uids.values()
    assert sorted(counts) == source_counts
    assert not (out / ".staging").exists() or not any((out / ".staging").iterdir())
    # no canary anywhere: OUT (names and bytes, the manifest included) and everything the run printed;
    # the search itself works (the sources hold them)
    assert _leaks([p.read_bytes() for p in pacs.heads.rglob("*.dcm")]) >= {"QXDOE", "QXID4711", "QXHOSPITAL"}
    leaks = _leaks([*_tree_blobs(out), first.stdout, first.stderr])
    assert not leaks, f"canary PHI found: {sorted(leaks)}"
    assert b"2 processed in this run" in first.stdout, first.stdout


def test_orthanc_originals_are_byte_identical(pacs: Pacs, from_orthanc) -> None:
    assert from_orthanc["after"] == pacs.before, "an original instance in Orthanc changed, appeared or disappeared"


def test_corrupt_study_in_orthanc_is_failed_with_its_reason(pacs: Pacs, from_orthanc) -> None:
    key = study_key(ps.Key(KEY.encode(), "test"), pacs.study_uids["corrupt"])
    row = from_orthanc["rows"][key]
    assert row["state"] == "failed" and row["kind"] == "dicomweb"
    assert "damaged" in row["reason"] and row["reason"].endswith("."), row["reason"]
    assert row["attempts"] == 1 and row["permanent"] == 1  # damaged on the server: the same every time
    assert f"failed {key}".encode() in from_orthanc["first"].stdout  # the summary lists it
    # the operator's private list names the source study on the PACS (nothing else does)
    listing = from_orthanc["out"].parent / "out_qc" / "failures.tsv"
    assert (listing.stat().st_mode & 0o777) == 0o600
    (line,) = [ln for ln in listing.read_text().splitlines() if ln.startswith(key)]
    assert f"study {pacs.study_uids['corrupt']}" in line.split("\t")[4]


def test_orthanc_source_rerun_is_a_no_op(from_orthanc) -> None:
    again, rows, rows_again = from_orthanc["again"], from_orthanc["rows"], from_orthanc["rows_again"]
    assert again.returncode == 3, again.stderr[-3000:]
    assert b"0 processed in this run, 2 already done, 1 failed" in again.stdout, again.stdout
    # nothing redone: the same rows (finish times, attempts, checksums) and the same files in OUT
    assert rows_again == rows
    assert from_orthanc["outputs_again"] == from_orthanc["outputs"]


def test_orthanc_destination_gets_new_clean_series_with_the_source_geometry(pacs: Pacs, to_orthanc,
                                                                           tmp_path: Path) -> None:
    first, rows = to_orthanc["first"], to_orthanc["rows"]
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(rows) == 2 and all(r["state"] == "done" for r in rows.values())
    recorded = [uid for r in rows.values() for uid in json.loads(r["series_uids"])]
    new = to_orthanc["series_after"] - to_orthanc["series_before"]
    assert len(recorded) == len(set(recorded)) == 2 and set(recorded) == new
    assert all(not json.loads(r["outputs"]) for r in rows.values())  # nothing written as a folder study
    assert not [p for p in to_orthanc["work"].rglob("*.dcm")], "de-identified files left in --work"
    # the originals are still there, byte for byte, and only the new series were added
    stored = to_orthanc["stored"]
    assert {i: stored.get(i) for i in pacs.before} == pacs.before
    key = ps.Key(KEY.encode(), "test")
    added = 0
    for i in range(len(PATIENTS)):
        source = pacs.heads / f"study{i}" / "MR"
        (uid,) = json.loads(rows[study_key(key, pacs.study_uids[f"head{i}"])]["series_uids"])
        files = pacs.orthanc.series_files(uid, tmp_path / f"s{i}")
        added += len(files)
        assert len(files) == len(list(source.iterdir()))
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
        assert {str(d.SeriesInstanceUID) for d in headers} == {uid}
        assert all(d.PatientID.startswith("SEMID-") and d.PatientIdentityRemoved == "YES" for d in headers)
        leaks = _leaks([p.read_bytes() for p in files])
        assert not leaks, f"canary PHI in a stored series: {sorted(leaks)}"
        # the same geometry as its source series, read by SimpleITK; the face changed, not the whole head
        original, result = _read_series(source), _read_series(tmp_path / f"s{i}")
        assert result.GetSize() == original.GetSize()
        np.testing.assert_allclose(result.GetSpacing(), original.GetSpacing(), atol=1e-4)
        np.testing.assert_allclose(result.GetOrigin(), original.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(result.GetDirection(), original.GetDirection(), atol=1e-5)
        changed = sitk.GetArrayViewFromImage(result) != sitk.GetArrayViewFromImage(original)
        assert 0.0 < changed.mean() < 0.3, f"{changed.mean():.4f} of the voxels changed"
    assert len(stored) == len(pacs.before) + added
    leaks = _leaks([*_tree_blobs(to_orthanc["work"]), first.stdout, first.stderr])
    assert not leaks, f"canary PHI in --work or the printed output: {sorted(leaks)}"


def test_orthanc_destination_rerun_stores_nothing_twice(to_orthanc) -> None:
    again = to_orthanc["again"]
    assert again.returncode == 0, again.stderr[-3000:]
    assert b"0 processed in this run, 2 already done" in again.stdout, again.stdout
    assert to_orthanc["stored_again"] == to_orthanc["stored"]  # same instances, same bytes
    assert to_orthanc["rows_again"] == to_orthanc["rows"]


def test_stored_outputs_are_not_new_studies_of_the_orthanc_source(pacs: Pacs, dask_cluster: Dask, from_orthanc,
                                                                  to_orthanc) -> None:
    """After SemID stored its series into Orthanc, a batch from Orthanc still sees only the 3 studies."""
    run = _batch(dask_cluster.address, pacs.orthanc.dicomweb_url, str(from_orthanc["out"]))
    assert run.returncode == 3, run.stderr[-3000:]
    assert b"3 studies: 0 processed in this run, 2 already done, 1 failed" in run.stdout, run.stdout
    assert _manifest(from_orthanc["out"]) == from_orthanc["rows"]


def test_no_canary_in_the_dask_logs(dask_cluster: Dask, from_orthanc, to_orthanc) -> None:
    logs = [path.read_bytes() for path in dask_cluster.logs]
    assert b"Registered to" in logs[1]  # the worker's log, written
    leaks = _leaks(logs)
    assert not leaks, f"canary PHI in the Dask logs: {sorted(leaks)}"
