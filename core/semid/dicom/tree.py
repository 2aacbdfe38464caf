"""De-identify a whole tree of DICOM files: group by patient / study / series, clean every header with
the PS3.15 profile, send head CT/MR series through the image de-identifier, blank burned-in text, and
write a pseudonymous copy under OUT_DIR/<patient>/<study>/<series>/.

Files that cannot be processed (not DICOM, truncated or corrupt, DICOMDIR indexes, pixel data in a
transfer syntax that cannot be decoded here when it must be, series with mixed geometry) are put on
the report's quarantine list with the reason, never copied to OUT_DIR; the run goes on. The input
tree is never modified; every output file is written under a temporary name and renamed.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from semid import __version__
from semid.dicom import pseudonyms as ps
from semid.dicom.profile import CID7050, Options, Profile
from semid.errors import InputError
from semid.io import atomic_path, write_json

DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
#: Modalities whose pixels are checked for burned-in text even when the header does not say so.
OCR_MODALITIES = {"US", "OT", "SC", "XA", "RF", "ES", "XC", "DX", "CR", "MG", "IO", "PX"}
#: A CT/MR series with at least this many slices is treated as a volume for the image pipeline.
MIN_VOLUME_SLICES = 16
#: Headers kept from the scan so small trees parse each file once; larger trees re-read (memory bound:
#: a parsed header is 50-150 KiB).
MAX_CACHED_HEADERS = 5000

Progress = Callable[[int, int], None]


@dataclass
class Report:
    """What a run did: counts per action, quarantined files with reasons, timings. No PHI."""

    semid_version: str = __version__
    files_seen: int = 0
    files_written: int = 0
    patients: int = 0
    studies: int = 0
    series: int = 0
    image_series_deidentified: int = 0
    image_series_kept: int = 0
    burned_in_files_checked: int = 0
    burned_in_boxes_blanked: int = 0
    actions: dict = field(default_factory=dict)
    quarantined: list = field(default_factory=list)
    level: float = 0.75
    options: list = field(default_factory=list)
    profile_edition: str = ""
    key_origin: str = ""
    elapsed_s: float = 0.0
    files_per_s: float = 0.0


@dataclass
class _Instance:
    path: Path
    rel: str
    patient: str
    study: str
    series: str
    modality: str
    has_pixels: bool
    #: the header read while scanning (large values deferred), so each file is parsed once
    dataset: pydicom.Dataset | None = None


def _check_dirs(in_dir: Path, out_dir: Path) -> None:
    if not in_dir.is_dir():
        raise InputError("The input is not a folder: give the folder that holds the DICOM files.")
    src, dst = in_dir.resolve(), out_dir.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise InputError("The output folder must be outside the input folder (and not contain it).")
    from semid.io import check_output_path

    check_output_path(dst / "probe")


def _scan(in_dir: Path, report: Report) -> list[_Instance]:
    instances = []
    for root, dirs, files in os.walk(in_dir):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            rel = str(path.relative_to(in_dir))
            report.files_seen += 1
            try:
                # defer_size: large values (pixel data) are not loaded, but their presence is known
                ds = pydicom.dcmread(path, defer_size=1024)
            except InvalidDicomError:
                report.quarantined.append({"file": rel, "reason": "not a DICOM file"})
                continue
            except Exception:  # noqa: BLE001 - any parse failure is a damaged file, reported and skipped
                report.quarantined.append({"file": rel, "reason": "truncated or corrupt DICOM"})
                continue
            meta_class = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
            if meta_class == DICOMDIR_CLASS or "DirectoryRecordSequence" in ds:
                report.quarantined.append({"file": rel, "reason": "DICOMDIR (a media index, not an instance)"})
                continue
            if "SOPInstanceUID" not in ds:
                report.quarantined.append({"file": rel, "reason": "no SOP Instance UID"})
                continue
            instances.append(_Instance(
                path, rel, str(ds.get("PatientID", "") or ""), str(ds.get("StudyInstanceUID", "") or ""),
                str(ds.get("SeriesInstanceUID", "") or ""), str(ds.get("Modality", "") or ""),
                "PixelData" in ds, ds if len(instances) < MAX_CACHED_HEADERS else None))
    return instances


def deidentify_tree(in_dir: str | Path, out_dir: str | Path, level: float | str = "high",
                    options: Options | None = None, key: ps.Key | None = None, ocr: bool = True,
                    mapping_path: str | Path | None = None, progress: Progress | None = None) -> Report:
    """De-identify every DICOM instance under ``in_dir`` into ``out_dir``; return the run's report."""
    from semid.pipeline import parse_level

    started = time.perf_counter()
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    _check_dirs(in_dir, out_dir)
    level = parse_level(level)
    if mapping_path is not None:
        mapping = Path(mapping_path).resolve()
        if out_dir.resolve() in mapping.parents or mapping == out_dir.resolve():
            raise InputError("The mapping table must not be written inside the output folder: choose another place.")
    if key is None:
        key, _ = ps.load_key()
    options = options or Options()
    profile = Profile(key, options)
    report = Report(level=level, options=options.enabled(), profile_edition=profile.table.edition,
                    key_origin=key.origin)
    # Files are written in a staging folder beside OUT_DIR and renamed into it when complete, so even
    # a killed run leaves no partial file inside OUT_DIR (only, at worst, the staging folder).
    staging = out_dir.resolve().parent / f".{out_dir.name}.semid-partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        return _run(in_dir, out_dir, staging, level, profile, report, ocr, mapping_path, progress, started)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _run(in_dir: Path, out_dir: Path, staging: Path, level: float, profile: Profile, report: Report,
         ocr: bool, mapping_path: str | Path | None, progress: Progress | None,
         started: float) -> Report:
    instances = _scan(in_dir, report)
    by_series: dict[tuple[str, str, str], list[_Instance]] = defaultdict(list)
    for inst in instances:
        by_series[(inst.patient, inst.study, inst.series)].append(inst)
    report.patients = len({k[0] for k in by_series})
    report.studies = len({k[:2] for k in by_series})
    report.series = len(by_series)
    actions: Counter = Counter()
    mapping_rows: list[dict] = []
    done = 0
    for (patient, study, series), members in by_series.items():
        pixels = _volume_pixels(members, level, report)
        for inst in members:
            if pixels is not None and inst.path not in pixels:
                continue  # quarantined with its series
            try:
                written = _one_file(inst, out_dir, staging, profile, pixels, ocr, report, actions)
            except _Quarantine as q:
                report.quarantined.append({"file": inst.rel, "reason": str(q)})
                written = None
            if written is not None:
                report.files_written += 1
                if mapping_path is not None:
                    mapping_rows.append({"patient_id": patient, "pseudonym": written[0], "study_uid": study,
                                         "series_uid": series})
            done += 1
            if progress:
                progress(done, len(instances))
    report.actions = dict(sorted(actions.items()))
    report.elapsed_s = round(time.perf_counter() - started, 3)
    report.files_per_s = round(report.files_written / report.elapsed_s, 1) if report.elapsed_s else 0.0
    if mapping_path is not None:
        write_json(_unique(mapping_rows), Path(mapping_path))
    return report


def _unique(rows: list[dict]) -> list[dict]:
    seen, out = set(), []
    for row in rows:
        key = tuple(sorted(row.items()))
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


class _Quarantine(Exception):
    """A file that cannot be processed; the message is the report's reason (no PHI)."""


def _volume_pixels(members: list[_Instance], level: float, report: Report) -> dict[Path, np.ndarray] | None:
    """De-identified stored pixel values per file for a head CT/MR volume series, else None.

    Returns None for series that are not volumes (pixels kept); returns {} and quarantines the files
    of a volume series whose geometry is mixed.
    """
    modality = members[0].modality
    if modality not in ("CT", "MR") or len(members) < MIN_VOLUME_SLICES or not all(m.has_pixels for m in members):
        return None
    import SimpleITK as sitk

    from semid.io import MODALITY_KEY
    from semid.pipeline import Deidentifier, make_fill

    headers = [m.dataset if m.dataset is not None else pydicom.dcmread(m.path, stop_before_pixels=True)
               for m in members]
    if not all("ImagePositionPatient" in h and "ImageOrientationPatient" in h for h in headers):
        return None  # no geometry to stack slices by: header-only processing

    def rounded(values) -> tuple:
        return tuple(round(float(v), 4) for v in values or [])

    geometry = {(h.get("Rows"), h.get("Columns"), rounded(h.get("ImageOrientationPatient")),
                 rounded(h.get("PixelSpacing"))) for h in headers}
    if len(geometry) != 1 or any(int(h.get("NumberOfFrames", 1) or 1) != 1 for h in headers):
        for m in members:
            report.quarantined.append({"file": m.rel, "reason": "series with mixed geometry (sizes, orientations "
                                                                "or spacings differ between slices)"})
        return {}
    # slices in order along the slice normal (GDCM's own sorter rescans the whole folder per series)
    normal = np.cross(*np.array(headers[0].ImageOrientationPatient, float).reshape(2, 3))
    order = np.argsort([float(np.dot(normal, np.array(h.ImagePositionPatient, float))) for h in headers])
    files = [str(members[i].path) for i in order]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError:
        for m in members:
            report.quarantined.append({"file": m.rel, "reason": "pixel data cannot be decoded here"})
        return {}
    image.SetMetaData(MODALITY_KEY, members[0].modality)
    try:
        result = Deidentifier(level, fill=make_fill("auto")).run(image)
    except InputError:
        report.image_series_kept += 1
        return None  # not a head with a face: the header is cleaned, the pixels are kept
    report.image_series_deidentified += 1
    values = sitk.GetArrayViewFromImage(result.image)
    out: dict[Path, np.ndarray] = {}
    for k, file in enumerate(files):
        ds = pydicom.dcmread(file, stop_before_pixels=True)
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        dtype = np.dtype(("<i" if int(ds.PixelRepresentation) else "<u") + str(int(ds.BitsAllocated) // 8))
        stored = np.rint((values[k].astype(np.float64) - intercept) / slope)
        info = np.iinfo(dtype)
        out[Path(file)] = np.clip(stored, info.min, info.max).astype(dtype)
    return out


def _one_file(inst: _Instance, out_dir: Path, staging: Path, profile: Profile,
              pixels: dict[Path, np.ndarray] | None, ocr: bool, report: Report,
              actions: Counter) -> tuple[str, Path] | None:
    try:
        ds = inst.dataset if inst.dataset is not None else pydicom.dcmread(inst.path)
        inst.dataset = None  # the instance is written once; free its header
        if "PixelData" in ds:
            _check_pixel_length(ds)  # forces the read too: a truncated file fails here, not later
    except _Quarantine:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _Quarantine("truncated or corrupt DICOM") from exc
    ctx = profile.context_for(ds)
    clean_pixels = False
    if pixels is not None and inst.path in pixels:
        ds.PixelData = pixels[inst.path].tobytes()
        clean_pixels = True
    elif ocr and "PixelData" in ds and (inst.modality in OCR_MODALITIES
                                        or str(ds.get("BurnedInAnnotation", "")).upper() == "YES"):
        clean_pixels = _blank_text(ds, ctx.raw_identifiers, report)
    profile.apply(ds, ctx)
    if clean_pixels:
        _add_method(ds, "clean_pixel_data")
    actions.update(ctx.counts)
    pseudo_patient = profile.patient_pseudonym(ctx)
    study = "ST-" + ps.pseudonym(profile.key, "study", inst.study)
    series = "SE-" + ps.pseudonym(profile.key, "series", inst.series)
    target = out_dir / pseudo_patient / study / series / f"{ds.SOPInstanceUID}.dcm"
    with atomic_path(target, staging) as tmp:
        ds.save_as(tmp, write_like_original=False)
    return pseudo_patient, target


def _check_pixel_length(ds: pydicom.Dataset) -> None:
    """Uncompressed pixel data must hold the whole image; a shorter one is a truncated file."""
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        return
    expected = (int(ds.get("Rows", 0)) * int(ds.get("Columns", 0)) * int(ds.get("SamplesPerPixel", 1))
                * int(ds.get("NumberOfFrames", 1) or 1) * int(ds.get("BitsAllocated", 16)) // 8)
    if len(ds.PixelData) < expected:
        raise _Quarantine("truncated or corrupt DICOM (pixel data shorter than the image)")


def _blank_text(ds: pydicom.Dataset, identifiers: tuple[str, ...], report: Report) -> bool:
    from semid.dicom import burnedin

    policy = "all" if str(ds.get("BurnedInAnnotation", "")).upper() == "YES" else "identifiers"
    try:
        result = burnedin.blank_burned_in_text(ds, identifiers, policy=policy)
    except burnedin.UnsupportedPixelData as exc:
        raise _Quarantine("pixel data in a transfer syntax that cannot be decoded here") from exc
    report.burned_in_files_checked += 1
    report.burned_in_boxes_blanked += result.boxes_blanked
    ds.BurnedInAnnotation = "NO" if (result.boxes_blanked or policy == "all") else ds.get("BurnedInAnnotation", "NO")
    return result.boxes_blanked > 0


def _add_method(ds: pydicom.Dataset, option: str) -> None:
    code, meaning = CID7050[option]
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code, "DCM", meaning
    ds.DeidentificationMethodCodeSequence.append(item)


def write_report(report: Report, path: Path) -> None:
    """Write the run's JSON report (outside OUT_DIR by default: it names input files)."""
    write_json(asdict(report), path)
