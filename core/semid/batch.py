"""Archive runs: de-identify every study of an archive on Dask, resumably (``semid batch``).

SOURCE is a folder tree (DICOM files of any layout, grouped per study by Study Instance UID; each
NIfTI/NRRD/MHA file is a study of its own) or a DICOMweb URL; OUT is a folder, or a DICOMweb URL to
store the new series into (STOW-RS; the manifest and staging then live in ``--work``). Each study is one
Dask task: a local cluster (``workers`` processes, one thread each, listening on 127.0.0.1 only) or an
existing scheduler given by address.

The manifest (``OUT/semid_manifest.sqlite``) has one row per study: state (pending, running, done,
failed), reason, attempts, the worker and its pid, output folders, sha256 of every output file, new
series UIDs (DICOMweb) and timings. Its key is a keyed digest (HMAC, `semid.dicom.pseudonyms`) of the
Study Instance UID (DICOM) or of the file's path relative to SOURCE (volumes): source paths are
PHI-prone (folders are often named after patients), so neither they nor patient IDs are stored, logged
or used in a file name. Only the driver writes the manifest; workers report when they start a study
through Dask events.

Exactly once: a worker writes its study into ``OUT/.staging/<key>-<random>/`` and renames the finished
study folders into OUT (an older copy of the same study, left by a run killed before it could record
it, is moved aside first), so OUT never holds a partial study. A rerun of the same command removes
stale staging folders, skips done studies, redoes studies that were running when the run died, and
retries failed ones until they have had ``1 + retries`` attempts. A study whose worker dies is
rescheduled by Dask. Another run on the same OUT at the same time is refused (a file lock).

The QC report (HTML, `semid.eval.bench.write_html_report`, pictures by `semid.render.qc_figure`)
shows a sample of studies and lists every failure. It shows original faces, so it is written beside
OUT (``OUT_qc/``), never inside the de-identified output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import shutil
import sqlite3
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from semid.dicom import pseudonyms as ps
from semid.errors import InputError, TransientError

MANIFEST_NAME = "semid_manifest.sqlite"
STAGING_NAME = ".staging"
LOCK_NAME = ".semid-batch.lock"
#: Suffixes read as one volume per file (everything else is tried as DICOM).
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")
EVENT_TOPIC = "semid-batch-start"
STATES = ("pending", "running", "done", "failed")

Say = Callable[[str], None]


def _is_url(text: str) -> bool:
    return str(text).lower().startswith(("http://", "https://"))


# --------------------------------------------------------------------------------------------- studies


@dataclass(frozen=True)
class Study:
    """One unit of work. ``key`` (a keyed digest, no PHI) names it everywhere; ``files`` (source paths)
    and ``series`` (DICOMweb UIDs) stay in memory, never in the manifest or a log."""

    key: str
    kind: str  # "dicom", "volume", "unreadable" (files that are not readable DICOM), "dicomweb"
    files: tuple[str, ...] = ()
    series: tuple[tuple[str, str], ...] = ()  # (study UID, series UID) on the DICOMweb source
    source_url: str = ""

    @property
    def size(self) -> int:
        return len(self.files) or len(self.series)


def _volume_suffix(name: str) -> str:
    lower = name.lower()
    return next((s for s in VOLUME_SUFFIXES if lower.endswith(s)), "")


def discover_folder(root: Path, key: ps.Key, skip: Path | None = None) -> list[Study]:
    """The studies under ``root``: DICOM files grouped by Study Instance UID (headers only are read),
    one study per volume file, and per folder one "unreadable" study for files that are not readable
    DICOM (so a corrupt study is reported, not lost). Hidden files and ``skip`` (e.g. OUT) are left out.
    Sorted by key, so the order does not depend on the file system."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    dicom: dict[str, list[str]] = {}
    unreadable: dict[str, list[str]] = {}
    volumes: list[Study] = []
    skip_resolved = skip.resolve() if skip is not None else None
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and (skip_resolved is None or (here / d).resolve() != skip_resolved))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = here / name
            rel = path.relative_to(root).as_posix()
            if _volume_suffix(name):
                volumes.append(Study("V-" + ps.pseudonym(key, "batch-volume", rel, 16), "volume", (str(path),)))
                continue
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True,
                                     specific_tags=["StudyInstanceUID", "DirectoryRecordSequence"])
                study_uid = str(ds.get("StudyInstanceUID", "") or "").strip()
                if "DirectoryRecordSequence" in ds:
                    continue  # a DICOMDIR media index, not an instance
            except (InvalidDicomError, Exception):  # noqa: B014, BLE001 - any parse failure: not readable DICOM
                study_uid = ""
            if study_uid:
                dicom.setdefault(study_uid, []).append(str(path))
            else:
                unreadable.setdefault(path.parent.relative_to(root).as_posix(), []).append(str(path))
    studies = [Study(study_key(key, uid), "dicom", tuple(files)) for uid, files in dicom.items()]
    studies += [Study("U-" + ps.pseudonym(key, "batch-folder", rel, 16), "unreadable", tuple(files))
                for rel, files in unreadable.items()]
    return sorted(studies + volumes, key=lambda s: s.key)


def study_key(key: ps.Key, study_uid: str) -> str:
    """The manifest key of a DICOM study: the name `semid.dicom.tree` gives its output folder."""
    return "ST-" + ps.pseudonym(key, "study", study_uid)


def discover_dicomweb(url: str, key: ps.Key) -> list[Study]:
    """The CT/MR studies on a DICOMweb server (SemID's own outputs left out), grouped per study."""
    from semid.dicom import web

    client = web.connect(url, **_web_credentials())
    grouped: dict[str, list[tuple[str, str]]] = {}
    for ref in web.list_series(client):
        grouped.setdefault(ref.study_uid, []).append((ref.study_uid, ref.series_uid))
    return sorted((Study(study_key(key, uid), "dicomweb", series=tuple(refs), source_url=url)
                   for uid, refs in grouped.items()), key=lambda s: s.key)


def _web_credentials() -> dict[str, str | None]:
    """HTTP basic credentials for DICOMweb, from the environment only (never the command line)."""
    return {"username": os.environ.get("SEMID_DICOMWEB_USER"), "password": os.environ.get("SEMID_DICOMWEB_PASSWORD")}


# --------------------------------------------------------------------------------------------- manifest


class Manifest:
    """The SQLite manifest of an archive run (one writer: the driver). See the module docstring."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a recorded "done" survives a power cut
        self.db.executescript("""
            CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS studies (
                key TEXT PRIMARY KEY, kind TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'pending',
                attempts INTEGER NOT NULL DEFAULT 0, reason TEXT, outputs TEXT, checksums TEXT,
                series_uids TEXT, files_in INTEGER, files_out INTEGER, worker TEXT, pid INTEGER,
                started REAL, finished REAL, seconds REAL, record TEXT);
            CREATE TABLE IF NOT EXISTS runs (
                id INTEGER PRIMARY KEY AUTOINCREMENT, started REAL, finished REAL, workers TEXT,
                studies INTEGER, done INTEGER, failed INTEGER, skipped INTEGER);
        """)
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(studies)")}
        if "permanent" not in columns:  # manifests begun before permanent failures were told apart
            self.db.execute("ALTER TABLE studies ADD COLUMN permanent INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        self.db.close()

    def meta(self, name: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def set_meta(self, name: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))

    def sync(self, studies: list[Study]) -> None:
        """Add new studies as pending; a study left "running" by a dead run becomes pending (redone)."""
        with self.db:
            self.db.executemany("INSERT OR IGNORE INTO studies (key, kind, files_in) VALUES (?, ?, ?)",
                                [(s.key, s.kind, s.size) for s in studies])
            self.db.execute("UPDATE studies SET state = 'pending', worker = NULL, pid = NULL, "
                            "reason = 'interrupted: redone from scratch' WHERE state = 'running'")

    def rows(self) -> dict[str, dict[str, Any]]:
        cur = self.db.execute("SELECT * FROM studies ORDER BY key")
        names = [d[0] for d in cur.description]
        return {r[0]: dict(zip(names, r, strict=True)) for r in cur.fetchall()}

    def started(self, key: str, worker: str, pid: int, when: float) -> None:
        self.db.execute("UPDATE studies SET state = 'running', attempts = attempts + 1, worker = ?, pid = ?, "
                        "started = ? WHERE key = ? AND state != 'done'", (worker, pid, when, key))

    def finished(self, key: str, result: dict[str, Any]) -> None:
        if result.get("ok"):
            self.db.execute(
                "UPDATE studies SET state = 'done', reason = ?, outputs = ?, checksums = ?, series_uids = ?, "
                "files_out = ?, finished = ?, seconds = ?, record = ? WHERE key = ?",
                (result.get("note"), json.dumps(result.get("outputs", [])), json.dumps(result.get("checksums", {})),
                 json.dumps(result.get("series_uids", [])), len(result.get("checksums", {})) or
                 result.get("files_out", 0), time.time(), result.get("seconds"),
                 json.dumps(result.get("record", {})), key))
        else:
            self.db.execute("UPDATE studies SET state = 'failed', reason = ?, finished = ?, seconds = ?, "
                            "attempts = MAX(attempts, 1), permanent = ? WHERE key = ?",
                            (result.get("reason") or "failed", time.time(), result.get("seconds"),
                             int(bool(result.get("permanent"))), key))


# --------------------------------------------------------------------------------------------- worker side


@dataclass(frozen=True)
class WorkerConfig:
    """What every task needs (pickled to the workers): where to write and how to de-identify."""

    level: float
    key: ps.Key
    out: str  # OUT folder, or "" when OUT is a DICOMweb URL
    staging: str
    out_url: str = ""
    options: tuple[str, ...] = ()
    ocr: bool = True
    fill: str = "auto"
    report_dir: str = ""
    threads: int = 1  # studies in flight per worker process; their model calls are batched together


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _announce(study: Study) -> None:
    """Tell the driver (through a Dask event) which worker process started the study."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return  # run outside Dask (e.g. a direct call)
    worker.log_event(EVENT_TOPIC, {"key": study.key, "pid": os.getpid(), "worker": str(worker.address),
                                   "time": time.time()})


def process_study(study: Study, cfg: WorkerConfig, qc: bool = False) -> dict[str, Any]:
    """De-identify one study into OUT (run on a Dask worker). Never raises: a failure comes back as
    ``{"ok": False, "reason": one sentence}`` (a raised error would put the task's arguments, which
    hold source paths, in Dask's logs)."""
    _announce(study)
    if cfg.threads > 1:
        _batch_model_calls(cfg.threads)
    started = time.perf_counter()
    staging = Path(cfg.staging) / f"{study.key}-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir(parents=True)
        if study.kind == "volume":
            result = _volume_study(study, cfg, staging, qc)
        elif study.kind == "unreadable":
            result = {"ok": False, "permanent": True,
                      "reason": f"none of its {study.size} files is readable DICOM or a volume (truncated, corrupt "
                                "or another format): repair or remove them."}
        else:
            result = _dicom_study(study, cfg, staging, qc)
    except InputError as exc:  # what the input is (not an image, no head): the same every time, not retried
        result = {"ok": False, "reason": str(exc), "permanent": not isinstance(exc, TransientError)}
    except MemoryError:
        result = {"ok": False, "reason": "out of memory: give the workers more memory (or fewer threads)."}
    except Exception as exc:  # noqa: BLE001 - reported as one sentence, the traceback never leaves the worker
        result = {"ok": False, "reason": f"internal failure ({type(exc).__name__}); rerun this study with "
                                         "`semid deidentify-dicom` and SEMID_DEBUG=1 to see why."}
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result["seconds"] = round(time.perf_counter() - started, 3)
    result["pid"] = os.getpid()
    return result


def _batch_model_calls(threads: int) -> None:
    """Studies running on ``threads`` threads of this worker share the generator's forward passes."""
    try:
        from semid import compensation
    except ImportError:  # no torch: only the plain fill, nothing to batch
        return
    compensation.set_call_batching(threads)


def _checksums(folder: Path, prefix: str) -> dict[str, str]:
    return {f"{prefix}/{p.relative_to(folder).as_posix()}": _sha256(p)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _place(folder: Path, target: Path, staging: Path) -> None:
    """Rename a finished study folder into OUT; a copy already there (left by a run that died before it
    recorded the study) is moved aside first, so the study exists exactly once."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        os.replace(target, staging / f"old-{uuid.uuid4().hex[:8]}")
    os.replace(folder, target)


def _volume_study(study: Study, cfg: WorkerConfig, staging: Path, qc: bool) -> dict[str, Any]:
    from semid.io import read_volume, write_json, write_volume
    from semid.pipeline import Deidentifier, make_fill

    if cfg.out_url:
        raise InputError("NIfTI/NRRD/MHA studies cannot be stored into DICOMweb: give an OUT folder for them.")
    source = Path(study.files[0])
    image = read_volume(source)
    result = Deidentifier(cfg.level, fill=make_fill(cfg.fill)).run(image)
    folder = staging / study.key
    suffix = _volume_suffix(source.name)
    passed = result.record.get("no_face_present")
    # a volume with nothing identifying (skull-stripped, no face part in view) is written unchanged, and counted
    write_volume(result.image, folder / f"{study.key}{suffix}")
    write_json(result.record, folder / f"{study.key}.json")
    checksums = _checksums(folder, study.key)
    if qc:
        _qc_picture(cfg, study.key, image, result.image, result.mask, result.record)
    _place(folder, Path(cfg.out) / study.key, staging)
    counts = {"volumes_passed_through" if passed else "volumes_deidentified": 1,
              "volumes_already_defaced": int(bool(result.record.get("already_defaced")))}
    return {"ok": True, "outputs": [study.key], "checksums": checksums, "counts": counts,
            "note": result.record["triage"]["finding"] if passed else None,
            "record": {k: result.record.get(k) for k in ("level", "no_face_present", "already_defaced", "blocked_ml",
                                                          "residual_risk", "voxels_changed_outside_block")}}


def _dicom_study(study: Study, cfg: WorkerConfig, staging: Path, qc: bool) -> dict[str, Any]:
    from semid.dicom.profile import Options
    from semid.dicom.tree import deidentify_tree

    inp = staging / "in"
    inp.mkdir()
    if study.kind == "dicomweb":
        from semid.dicom import web

        client = web.connect(study.source_url, **_web_credentials())
        for k, (study_uid, series_uid) in enumerate(study.series):
            web.download_series(client, series_uid, inp / f"{k:04d}", study_uid=study_uid)
    else:
        # links named by position (source names may carry PHI), so the tree run sees this study only
        for k, path in enumerate(study.files):
            os.symlink(os.path.abspath(path), inp / f"{k:06d}.dcm")
    tree_out = staging / "out"
    report = deidentify_tree(inp, tree_out, cfg.level, Options.from_names(list(cfg.options)), cfg.key,
                             ocr=cfg.ocr)
    if report.files_written == 0:
        reasons = Counter(q["reason"] for q in report.quarantined)
        why = "; ".join(f"{n} {r}" for r, n in reasons.most_common(2)) or "no instances"
        raise InputError(f"no file of the study could be de-identified ({why}): repair or remove it in the archive.")
    studies = [s for p in sorted(tree_out.iterdir()) if p.is_dir() and not p.name.startswith(".")
               for s in sorted(p.iterdir()) if s.is_dir()]
    outputs = [f"{s.parent.name}/{s.name}" for s in studies]
    checksums: dict[str, str] = {}
    for folder, rel in zip(studies, outputs, strict=True):
        checksums.update(_checksums(folder, rel))
    if qc and report.image_series_deidentified:
        with contextlib.suppress(Exception):  # a QC picture never fails the study
            _dicom_qc(cfg, study.key, inp, studies)
    series_uids: list[str] = []
    if cfg.out_url:
        from semid.dicom import web

        client = web.connect(cfg.out_url, **_web_credentials())
        for folder in studies:
            for series in sorted(p for p in folder.iterdir() if p.is_dir()):
                # keyed UIDs: storing the same study again replaces its instances, never duplicates them
                series_uids.append(web.store_series(client, series).series_uid)
    else:
        for folder, rel in zip(studies, outputs, strict=True):
            _place(folder, Path(cfg.out) / rel, staging)
    notes = [f"{p['outcome']} ({p['files']} files): {p['reason']}" for p in report.image_series_problems]
    notes += [f"passed through ({p['files']} files): {p['reason']}" for p in report.image_series_passed]
    if report.quarantined:
        reasons = Counter(q["reason"] for q in report.quarantined)
        notes.append("quarantined files: " + "; ".join(f"{n} {r}" for r, n in reasons.most_common(3)))
    counts = {"series_deidentified": report.image_series_deidentified,
              "series_already_defaced": report.image_series_already_defaced,
              "series_passed_through": report.image_series_passed_through,
              "series_quarantined": report.image_series_quarantined}
    return {"ok": True, "outputs": outputs if not cfg.out_url else [], "checksums": checksums,
            "series_uids": series_uids, "note": " · ".join(notes) or None, "counts": counts,
            "record": {"level": cfg.level, "files_written": report.files_written, **counts,
                       "quarantined": len(report.quarantined)}}


def _qc_picture(cfg: WorkerConfig, key: str, original: Any, output: Any, mask: Any, record: dict | None) -> None:
    if not cfg.report_dir:
        return
    from semid.render import qc_figure

    qc_figure(original, output, mask, Path(cfg.report_dir) / "report" / f"{key}.png", record, size=256,
              title=f"{key} · level {cfg.level:g}")


def _dicom_qc(cfg: WorkerConfig, key: str, inp: Path, studies: list[Path]) -> None:
    """QC picture of a DICOM study's largest de-identified series beside its source series."""
    import numpy as np
    import pydicom
    import SimpleITK as sitk

    from semid.io import read_volume

    out_series = max((s for st in studies for s in st.iterdir() if s.is_dir()), key=lambda s: len(list(s.iterdir())))
    by_series: dict[str, list[Path]] = {}
    for path in sorted(p for p in inp.rglob("*") if p.is_file() or p.is_symlink()):
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        by_series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(path)
    source = max(by_series.values(), key=len)
    series_in = inp.parent / "qc-in"
    series_in.mkdir()
    for k, path in enumerate(source):
        os.symlink(os.path.realpath(path), series_in / f"{k:06d}.dcm")
    original, output = read_volume(series_in), read_volume(out_series)
    if original.GetSize() != output.GetSize():
        return
    changed = np.asarray(sitk.GetArrayViewFromImage(original)) != np.asarray(sitk.GetArrayViewFromImage(output))
    mask = sitk.GetImageFromArray(changed.astype(np.uint8))
    mask.CopyInformation(output)
    _qc_picture(cfg, key, original, output, mask, None)


# --------------------------------------------------------------------------------------------- driver


@dataclass
class BatchSummary:
    """What a run did (no PHI): counts, rate, where the manifest and report are, the failures."""

    studies: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    elapsed_s: float = 0.0
    studies_per_hour: float = 0.0
    manifest: str = ""
    report: str = ""
    failures: list[dict[str, Any]] = field(default_factory=list)
    #: this run's volumes and CT/MR series by outcome (``COUNTS``): de-identified, passed through with nothing
    #: identifying (skull-stripped, no face part in view), quarantined (a head series that could not be)
    counts: Counter = field(default_factory=Counter)
    #: studies of this run with a series passed through or quarantined: key and reasons
    notes: list[dict[str, Any]] = field(default_factory=list)
    #: the operator's list of failed studies with their sources (``write_failures_list``), "" when none failed
    failures_list: str = ""

    def text(self) -> str:
        c = self.counts
        lines = [f"{self.studies} studies: {self.done} processed in this run, {self.skipped} already done, "
                 f"{self.failed} failed; {self.elapsed_s:.0f} s ({self.studies_per_hour:.0f} studies/hour)",
                 f"volumes: {c['volumes_deidentified']} de-identified ({c['volumes_already_defaced']} already "
                 f"defaced), {c['volumes_passed_through']} passed through unchanged (nothing identifying)",
                 f"DICOM CT/MR series: {c['series_deidentified']} de-identified ({c['series_already_defaced']} already "
                 f"defaced), {c['series_passed_through']} passed through (nothing identifying), "
                 f"{c['series_quarantined']} quarantined (not written)",
                 f"manifest: {self.manifest}"]
        if self.report:
            lines.append(f"QC report: {self.report}")
        if self.failures_list:
            lines.append(f"failed studies and their sources (for the operator only, outside OUT): {self.failures_list}")
        for f in self.failures:
            again = "not retried: the input itself is the problem" if f.get("permanent") else "retried by a rerun"
            lines.append(f"failed {f['key']} (attempts {f['attempts']}; {again}): {f['reason']}")
        for n in self.notes:
            lines.append(f"{n['key']}: {n['note']}")
        return "\n".join(lines)

    @property
    def needs_attention(self) -> bool:
        """A study failed or a head series was quarantined: the run must not end as if all went well."""
        return bool(self.failed or self.counts["series_quarantined"])


@dataclass
class BatchOptions:
    """The command line of ``semid batch`` (see `run_batch`)."""

    source: str
    out: str
    level: float | str = "high"
    workers: int = 1
    scheduler: str | None = None
    threads: int = 1
    retries: int = 2
    key_file: str | None = None
    options: tuple[str, ...] = ()
    ocr: bool = True
    fill: str = "auto"
    qc_sample: int = 6
    report_dir: str | None = None
    work: str | None = None
    quiet: bool = False


def _check_paths(opts: BatchOptions) -> tuple[Path | None, Path, Path]:
    """(source folder or None for a URL, OUT folder (or the work folder for a URL OUT), report folder)."""
    source = None
    if not _is_url(opts.source):
        source = Path(opts.source)
        if not source.exists():
            raise InputError("SOURCE does not exist: give the archive's folder or a DICOMweb URL.")
        if not source.is_dir():
            raise InputError("SOURCE is not a folder: give the archive's folder (or a DICOMweb URL); for one "
                             "volume use `semid deidentify`.")
    if _is_url(opts.out):
        if not opts.work:
            raise InputError("OUT is a DICOMweb URL, so the manifest needs a folder: give one with --work.")
        home = Path(opts.work)
    else:
        if opts.work:
            raise InputError("--work is only for a DICOMweb OUT (the manifest otherwise lives in OUT): drop it.")
        home = Path(opts.out)
    if home.exists() and not home.is_dir():
        raise InputError("OUT exists and is not a folder: give a folder for the de-identified archive.")
    if source is not None:
        src, dst = source.resolve(), home.resolve()
        if dst == src or src in dst.parents:
            raise InputError("OUT must not be inside SOURCE (the outputs would be read as inputs): choose a "
                             "folder outside the archive.")
        if dst in src.parents:
            raise InputError("OUT must not contain SOURCE: choose a folder outside the archive.")
    report = Path(opts.report_dir) if opts.report_dir else home.resolve().parent / f"{home.resolve().name}_qc"
    if report.resolve() == home.resolve() or home.resolve() in report.resolve().parents:
        raise InputError("The QC report shows original faces, so it must not go inside OUT: choose another "
                         "--report folder.")
    return source, home, report


@contextlib.contextmanager
def _lock(home: Path) -> Iterator[None]:
    import fcntl

    fh = open(home / LOCK_NAME, "w")  # noqa: SIM115 - held for the whole run
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise InputError("Another `semid batch` is running on this OUT: wait for it to finish (or stop it) "
                             "and run again.") from None
        yield
    finally:
        fh.close()


def _key_check(key: ps.Key) -> str:
    """A fingerprint of the key (an HMAC of a fixed text, not the key): resuming with another key would
    give every study new pseudonyms, i.e. a second copy."""
    return ps.pseudonym(key, "batch-key-check", "semid", 16)


@contextlib.contextmanager
def dask_client(workers: int, scheduler: str | None, allowed_failures: int, threads: int = 1) -> Iterator[Any]:
    """A Dask client: to ``scheduler`` if given, else to a local cluster of ``workers`` processes with
    ``threads`` threads each, listening on 127.0.0.1 only, without a dashboard; closed at the end."""
    import dask

    logging.getLogger("distributed").setLevel(logging.ERROR)
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="5s")
        except (OSError, TimeoutError, ValueError):
            raise InputError("The Dask scheduler cannot be reached at that address: check that it is running and "
                             "the address (tcp://HOST:PORT), then try again.") from None
        try:
            yield client
        finally:
            client.close()
        return
    with dask.config.set({"distributed.scheduler.allowed-failures": allowed_failures,
                          "distributed.worker.daemon": True}):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True, host="127.0.0.1",
                               dashboard_address=None, scheduler_port=0, silence_logs=logging.ERROR)
        client = Client(cluster)
        try:
            yield client
        finally:
            client.close()
            cluster.close()


class _Progress:
    """A tqdm bar on stderr with studies per minute and time left (nothing with ``quiet``)."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.bar = None
        self.started = time.perf_counter()
        self.n = 0
        if not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="study", file=sys.stderr, dynamic_ncols=True, mininterval=1.0,
                            bar_format="{n_fmt}/{total_fmt} studies |{bar}| {desc}")
            self.update(0)

    def update(self, n: int, failed: int = 0) -> None:
        self.n += n
        if self.bar is None:
            return
        minutes = (time.perf_counter() - self.started) / 60.0
        rate = self.n / minutes if minutes > 0 else 0.0
        left = (self.bar.total - self.n) / rate if rate > 0 else float("nan")
        left_text = "?" if left != left else f"{left:.1f} min"
        self.bar.set_description_str(f"{rate:.1f} studies/min, {left_text} left, {failed} failed", refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_batch(opts: BatchOptions, say: Say | None = None) -> BatchSummary:
    """De-identify an archive (see the module docstring); return the run's summary.

    Raises:
        InputError: bad SOURCE/OUT/level/options, an unreachable scheduler or DICOMweb server, a
            concurrent run on OUT, or an OUT begun with another level or key.
    """
    from semid.dicom.profile import Options
    from semid.pipeline import make_fill, parse_level

    say = say or (lambda _m: None)
    level = parse_level(opts.level)
    make_fill(opts.fill)  # an unknown fill fails here, before any work
    Options.from_names(list(opts.options))
    if opts.workers < 1:
        raise InputError("--workers must be at least 1.")
    if opts.threads < 1:
        raise InputError("--threads must be at least 1.")
    if opts.retries < 0:
        raise InputError("--retries must be 0 or more.")
    source, home, report_dir = _check_paths(opts)
    key, notice = ps.load_key(opts.key_file)
    if notice:
        say(notice)
    started = time.perf_counter()
    say("finding the studies")
    # before OUT is touched: an unreachable server or an unreadable SOURCE leaves nothing behind
    studies = discover_dicomweb(opts.source, key) if source is None else discover_folder(source, key, skip=home)
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError:
        raise InputError("OUT cannot be created (read-only or permission denied): choose another place.") from None
    with _lock(home):
        manifest = Manifest(home / MANIFEST_NAME)
        try:
            return _run_locked(opts, level, key, studies, home, report_dir, manifest, say, started)
        finally:
            manifest.close()


def _run_locked(opts: BatchOptions, level: float, key: ps.Key, studies: list[Study], home: Path,
                report_dir: Path, manifest: Manifest, say: Say, started: float) -> BatchSummary:
    for name, value, what in (("level", f"{level:g}", "level"), ("key", _key_check(key), "key")):
        before = manifest.meta(name)
        if before is not None and before != value:
            hint = f"--level {before}" if name == "level" else "the key it was begun with"
            raise InputError(f"OUT was begun with another {what}: rerun with {hint}, or give a new OUT.")
        manifest.set_meta(name, value)
    staging = home / STAGING_NAME
    shutil.rmtree(staging, ignore_errors=True)  # stale staging of a run that died: never a study
    staging.mkdir()
    manifest.sync(studies)
    rows = manifest.rows()
    max_attempts = 1 + opts.retries
    todo = [s for s in studies if rows[s.key]["state"] == "pending"
            or (rows[s.key]["state"] == "failed" and rows[s.key]["attempts"] < max_attempts
                and not rows[s.key]["permanent"])]
    summary = BatchSummary(studies=len(studies), manifest=str(home / MANIFEST_NAME))
    summary.skipped = sum(1 for s in studies if rows[s.key]["state"] == "done")
    with_pictures = {r["key"] for r in rows.values() if r["state"] == "done"
                     and (report_dir / "report" / f"{r['key']}.png").exists()}
    want = max(0, opts.qc_sample - len(with_pictures))
    # studies that already failed (or hold no readable DICOM) make no picture: never give them the sample
    qc_keys = {s.key for s in sorted(todo, key=lambda s: (s.kind == "unreadable",
                                                         rows[s.key]["state"] == "failed"))[:want]}
    cfg = WorkerConfig(level=level, key=key, out="" if _is_url(opts.out) else str(home.resolve()),
                       staging=str(staging.resolve()), out_url=opts.out if _is_url(opts.out) else "",
                       options=tuple(opts.options), ocr=opts.ocr, fill=opts.fill,
                       report_dir=str(report_dir.resolve()) if opts.qc_sample > 0 else "", threads=opts.threads)
    if todo:
        if opts.qc_sample > 0:
            (report_dir / "report").mkdir(parents=True, exist_ok=True)
        say(f"{len(todo)} of {len(studies)} studies to de-identify")
        _execute(opts, todo, cfg, qc_keys, manifest, rows, max_attempts, summary)
    rows = manifest.rows()
    summary.failed = sum(1 for r in rows.values() if r["state"] == "failed")
    summary.failures = [{"key": r["key"], "attempts": r["attempts"], "reason": r["reason"],
                         "permanent": bool(r["permanent"])} for r in rows.values() if r["state"] == "failed"]
    if summary.failures:
        summary.failures_list = str(write_failures_list(summary.failures, studies, opts, report_dir))
    else:  # a list left by an earlier run names sources that no longer failed
        (report_dir / FAILURES_NAME).unlink(missing_ok=True)
    summary.elapsed_s = round(time.perf_counter() - started, 1)
    summary.studies_per_hour = round(3600.0 * summary.done / summary.elapsed_s, 1) if summary.elapsed_s else 0.0
    if opts.qc_sample > 0:
        summary.report = str(write_batch_report(rows, report_dir, summary, level))
    manifest.db.execute("INSERT INTO runs (started, finished, workers, studies, done, failed, skipped) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (time.time() - summary.elapsed_s, time.time(), "scheduler" if opts.scheduler else
                         str(opts.workers), summary.studies, summary.done, summary.failed, summary.skipped))
    shutil.rmtree(staging, ignore_errors=True)
    return summary


def _execute(opts: BatchOptions, todo: list[Study], cfg: WorkerConfig, qc_keys: set[str], manifest: Manifest,
             rows: dict[str, dict[str, Any]], max_attempts: int, summary: BatchSummary) -> None:
    from distributed import as_completed

    events: queue.Queue = queue.Queue()
    progress = _Progress(len(todo), opts.quiet)
    try:
        with dask_client(opts.workers, opts.scheduler, max_attempts, opts.threads) as client:
            client.subscribe_topic(EVENT_TOPIC, events.put)
            by_future: dict[Any, Study] = {}

            def submit(study: Study) -> Any:
                fut = client.submit(process_study, study, cfg, study.key in qc_keys, pure=False,
                                    key=f"semid-{study.key}-{uuid.uuid4().hex[:6]}")
                by_future[fut] = study
                return fut

            tries: Counter = Counter()
            for study in todo:
                tries[study.key] += 1
            pending = as_completed([submit(s) for s in todo])
            failed = 0
            while not pending.is_empty():
                batch = pending.next_batch(block=False) if pending.has_ready() else []
                _drain(events, manifest)
                if not batch:
                    time.sleep(0.25)
                    continue
                for fut in batch:
                    study = by_future.pop(fut)
                    result = _result_of(fut)
                    _drain(events, manifest)
                    # attempts: the workers' start events (worker deaths count), at least this run's submissions
                    recorded = manifest.db.execute("SELECT attempts FROM studies WHERE key = ?",
                                                   (study.key,)).fetchone()[0]
                    attempts = max(recorded, rows[study.key]["attempts"] + tries[study.key])
                    manifest.finished(study.key, result)
                    if result.get("ok"):
                        summary.done += 1
                        summary.counts.update(result.get("counts") or {})
                        if result.get("note"):
                            summary.notes.append({"key": study.key, "note": result["note"]})
                        progress.update(1, failed)
                    elif attempts < max_attempts and not result.get("permanent"):
                        tries[study.key] += 1
                        pending.add(submit(study))  # retried now; the reason stays recorded until then
                    else:
                        failed += 1
                        progress.update(1, failed)
    finally:
        progress.close()


#: Name of the operator's failures list, in the report folder beside OUT (``write_failures_list``).
FAILURES_NAME = "failures.tsv"


def write_failures_list(failures: list[dict[str, Any]], studies: list[Study], opts: BatchOptions,
                        report_dir: Path) -> Path:
    """The operator's list of failed studies: key, attempts, retried or not, reason and *source* (the path
    under SOURCE, or the DICOMweb study and series UIDs), tab-separated, in the report folder beside OUT with
    mode 0600. Sources are PHI-prone (folder names, UIDs): this file is the one place they are written, never
    OUT, the manifest, the summary or a log; it is rewritten at each run (only the studies failed now)."""
    by_key = {s.key: s for s in studies}
    root = None if _is_url(opts.source) else Path(opts.source)

    def source(key: str) -> str:
        study = by_key.get(key)
        if study is None:
            return "(no longer in SOURCE)"
        if study.series:
            return " ".join(f"study {st} series {se}" for st, se in study.series)
        paths = [Path(f) for f in study.files]
        rel = [p.relative_to(root).as_posix() if root is not None else str(p) for p in paths]
        if study.kind == "volume" or len(rel) == 1:
            return rel[0]
        folders = sorted({str(Path(r).parent) for r in rel})
        return f"{len(rel)} files in {', '.join(folders[:5])}" + (" ..." if len(folders) > 5 else "")

    report_dir.mkdir(parents=True, exist_ok=True)
    target = report_dir / FAILURES_NAME
    lines = ["key\tattempts\tretried\treason\tsource"]
    for f in failures:
        cells = [f["key"], str(f["attempts"]), "no" if f.get("permanent") else "yes", f["reason"], source(f["key"])]
        lines.append("\t".join(c.replace("\t", " ").replace("\n", " ") for c in cells))
    tmp = target.with_name(f".{FAILURES_NAME}.{uuid.uuid4().hex[:8]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(tmp, target)
    return target


def _result_of(fut: Any) -> dict[str, Any]:
    """The task's result; a task Dask gave up on (its workers kept dying) becomes one sentence."""
    if fut.status == "finished":
        return fut.result()
    exc = fut.exception() if fut.status == "error" else None
    if exc is not None and type(exc).__name__ == "KilledWorker":
        return {"ok": False, "reason": "the worker running it died every time (out of memory or killed): check the "
                                       "workers' memory, then rerun."}
    return {"ok": False, "reason": f"the task did not finish ({fut.status}): rerun to retry it."}


def _drain(events: queue.Queue, manifest: Manifest) -> None:
    while True:
        try:
            _, msg = events.get_nowait()
        except queue.Empty:
            return
        manifest.started(str(msg["key"]), str(msg["worker"]), int(msg["pid"]), float(msg["time"]))


# --------------------------------------------------------------------------------------------- report


def write_batch_report(rows: dict[str, dict[str, Any]], report_dir: Path, summary: BatchSummary,
                       level: float) -> Path:
    """The HTML QC report of an archive run: counts, every failure, and the sample's pictures."""
    import html
    import platform

    from semid.eval.bench import write_html_report

    esc = html.escape
    states = Counter(r["state"] for r in rows.values())
    seconds = [r["seconds"] for r in rows.values() if r["state"] == "done" and r["seconds"]]
    body = [f"<p class='note'>Level {level:g} · {len(rows)} studies: " +
            ", ".join(f"{states.get(s, 0)} {s}" for s in STATES) +
            f" · this run: {summary.done} de-identified in {summary.elapsed_s:.0f} s "
            f"({summary.studies_per_hour:.0f} studies/hour) · mean {sum(seconds) / max(len(seconds), 1):.1f} s per "
            f"study on a worker · {os.cpu_count()} CPUs, {esc(platform.platform(terse=True))}.</p>",
            "<h2>Failures</h2>"]
    failures = [r for r in rows.values() if r["state"] == "failed"]
    if failures:
        body.append("<table><tr><th>study</th><th>attempts</th><th>reason</th></tr>" + "".join(
            f"<tr><td>{esc(r['key'])}</td><td>{r['attempts']}</td><td style='text-align:left'>"
            f"{esc(r['reason'] or '')}</td></tr>" for r in failures) + "</table>")
    else:
        body.append("<p>None.</p>")
    body.append("<h2>Sample</h2><p class='note'>Top row of each picture: the original; bottom: the de-identified "
                "study. Red: what was blocked or changed.</p>")
    for r in rows.values():
        png = report_dir / "report" / f"{r['key']}.png"
        if r["state"] != "done" or not png.exists():
            continue
        record = json.loads(r["record"] or "{}")
        facts = ", ".join(f"{k} {v}" for k, v in record.items() if v is not None)
        body.append(f"<section><h3>{esc(r['key'])}</h3><p class='note'>{esc(facts)}; {r['seconds']} s</p>"
                    f"<img src='report/{esc(png.name)}' alt='{esc(r['key'])}'></section>")
    report_dir.mkdir(parents=True, exist_ok=True)
    return write_html_report("SemID batch report", body, report_dir / "report.html")


__all__ = ["BatchOptions", "BatchSummary", "Manifest", "Study", "WorkerConfig", "dask_client", "discover_dicomweb",
           "discover_folder", "process_study", "run_batch", "study_key", "write_batch_report"]
