"""De-identify a whole tree of DICOM files: group by patient / study / series, clean every header with
the PS3.15 profile, send head CT/MR series through the image de-identifier, blank burned-in text, and
write a pseudonymous copy under OUT_DIR/<patient>/<study>/<series>/.

Files that cannot be processed (not DICOM, truncated or corrupt, DICOMDIR indexes, pixel data in a
transfer syntax that cannot be decoded here when it must be, series with mixed geometry) are put on
the report's quarantine list with the reason, never copied to OUT_DIR; the run goes on. The input
tree is never modified; every output file is written under a temporary name and renamed.

`deidentify_series` does the same for one series whose volume was de-identified elsewhere (e.g. by the
MONAI Label app): the headers by the profile, the pixels from the given volume (`stored_pixels`,
`set_pixels` and the slice helpers are shared with the tree run).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
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
    #: head series whose triage found nothing identifying (skull-stripped, no face part in view), written with
    #: their pixels unchanged; the reasons in ``image_series_passed``
    image_series_passed_through: int = 0
    #: CT/MR volume series whose pixels could not be de-identified: quarantined (never written), or written
    #: with ``keep_undeidentified_pixels``; the reasons in ``image_series_problems``
    image_series_quarantined: int = 0
    image_series_written_undeidentified: int = 0
    #: head series found already defaced (what remained was de-identified)
    image_series_already_defaced: int = 0
    image_series_passed: list = field(default_factory=list)
    image_series_problems: list = field(default_factory=list)
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
                    mapping_path: str | Path | None = None, progress: Progress | None = None,
                    keep_undeidentified_pixels: bool = False) -> Report:
    """De-identify every DICOM instance under ``in_dir`` into ``out_dir``; return the run's report.

    A CT or MR volume series whose pixels cannot be de-identified (the image pipeline refuses it: not a
    head, the brain not found with confidence, ...) may still show a face: it is quarantined with the
    reason, never written as if it were de-identified. With ``keep_undeidentified_pixels`` it is written
    with its headers cleaned and its pixels as they were, and the report names it (the caller should then
    end with a non-zero exit).
    """
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
        return _run(in_dir, out_dir, staging, level, profile, report, ocr, mapping_path, progress, started,
                    keep_undeidentified_pixels)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _run(in_dir: Path, out_dir: Path, staging: Path, level: float, profile: Profile, report: Report,
         ocr: bool, mapping_path: str | Path | None, progress: Progress | None,
         started: float, keep_undeidentified_pixels: bool = False) -> Report:
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
        pixels = _volume_pixels(members, level, report, keep_undeidentified_pixels)
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


def _volume_pixels(members: list[_Instance], level: float, report: Report,
                   keep_undeidentified_pixels: bool = False) -> dict[Path, np.ndarray] | None:
    """De-identified stored pixel values per file for a head CT/MR volume series, else None.

    Returns None for series whose pixels are written as they are: not a volume (too few slices, no
    geometry), nothing identifying in view (the triage's pass-through, with its reason in the report), or
    refused with ``keep_undeidentified_pixels``. Returns {} and quarantines the files of a volume series
    that cannot be read as one volume, or whose pixels could not be de-identified.
    """
    modality = members[0].modality
    if modality not in ("CT", "MR") or len(members) < MIN_VOLUME_SLICES or not all(m.has_pixels for m in members):
        return None
    import SimpleITK as sitk

    from semid.io import MODALITY_KEY
    from semid.pipeline import Deidentifier, make_fill

    headers = [m.dataset if m.dataset is not None else pydicom.dcmread(m.path, stop_before_pixels=True)
               for m in members]
    if not has_slice_geometry(headers):
        return None  # no geometry to stack slices by: header-only processing

    def problem(outcome: str, reason: str) -> None:
        # the input files name the series for the operator (the report is written outside OUT_DIR: it names inputs)
        report.image_series_problems.append({"first_file": members[0].rel, "files": len(members),
                                             "outcome": outcome, "reason": reason})

    def quarantine(reason: str, file_reason: str) -> dict:
        report.image_series_quarantined += 1
        problem("quarantined", reason)
        for m in members:
            report.quarantined.append({"file": m.rel, "reason": file_reason})
        return {}

    if not is_uniform_series(headers):
        return quarantine("mixed geometry", "series with mixed geometry (sizes, orientations or spacings differ "
                                            "between slices)")
    # slices in order along the slice normal (GDCM's own sorter rescans the whole folder per series)
    order = slice_order(headers)
    files = [str(members[i].path) for i in order]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError:
        return quarantine("pixel data cannot be decoded here", "pixel data cannot be decoded here")
    image.SetMetaData(MODALITY_KEY, members[0].modality)
    try:
        result = Deidentifier(level, fill=make_fill("auto")).run(image)
    except InputError as exc:
        # the pixels may show a face that could not be removed: never written as if they were de-identified
        if keep_undeidentified_pixels:
            report.image_series_written_undeidentified += 1
            problem("written with its pixels unchanged", str(exc))
            return None
        return quarantine(str(exc), f"{modality} volume series not de-identified: {exc}")
    passed = result.record.get("no_face_present") or ("level 0 (off)" if level == 0.0 else None)
    if passed:
        report.image_series_passed_through += 1
        finding = result.record.get("triage", {}).get("finding", "level 0: nothing is blocked")
        report.image_series_passed.append({"first_file": members[0].rel, "files": len(members), "class": passed,
                                           "reason": finding})
        return None  # nothing identifying to remove: the header is cleaned, the pixels are kept
    report.image_series_deidentified += 1
    report.image_series_already_defaced += int(bool(result.record.get("already_defaced")))
    stored = stored_pixels([headers[i] for i in order], sitk.GetArrayViewFromImage(result.image))
    return {Path(file): values for file, values in zip(files, stored, strict=True)}


# ------------------------------------------------------------------ series helpers (public, reused)


def has_slice_geometry(headers: Sequence[pydicom.Dataset]) -> bool:
    """Whether every header says where its slice lies (Image Position and Orientation (Patient))."""
    return all("ImagePositionPatient" in h and "ImageOrientationPatient" in h for h in headers)


def is_uniform_series(headers: Sequence[pydicom.Dataset]) -> bool:
    """Whether the slices share rows, columns, orientation and pixel spacing and are single-frame, i.e.
    whether they stack into one volume."""

    def rounded(values) -> tuple:
        return tuple(round(float(v), 4) for v in values or [])

    geometry = {(h.get("Rows"), h.get("Columns"), rounded(h.get("ImageOrientationPatient")),
                 rounded(h.get("PixelSpacing"))) for h in headers}
    return len(geometry) == 1 and all(int(h.get("NumberOfFrames", 1) or 1) == 1 for h in headers)


def slice_order(headers: Sequence[pydicom.Dataset]) -> list[int]:
    """Indices of ``headers`` sorted by slice position along the slice normal (row x column cosines),
    the order in which ITK stacks a series; needs `has_slice_geometry`."""
    normal = np.cross(*np.array(headers[0].ImageOrientationPatient, float).reshape(2, 3))
    return [int(i) for i in np.argsort([float(np.dot(normal, np.array(h.ImagePositionPatient, float)))
                                        for h in headers], kind="stable")]


def stored_pixels(headers: Sequence[pydicom.Dataset], values: np.ndarray) -> list[np.ndarray]:
    """Stored pixel values for each slice of a volume, from its modality values (e.g. HU).

    Args:
        headers: the slices' headers in stacking order (``len(headers) == values.shape[0]``).
        values: the volume as (slices, rows, columns) in the modality's units, i.e. what ITK reads
            with RescaleSlope/RescaleIntercept applied.

    Returns:
        One (rows, columns) array per slice in the slice's own pixel type (BitsAllocated,
        PixelRepresentation), little endian, after undoing its rescale; values out of range are clipped.
    """
    out = []
    for k, ds in enumerate(headers):
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        dtype = np.dtype(("<i" if int(ds.PixelRepresentation) else "<u") + str(int(ds.BitsAllocated) // 8))
        stored = np.rint((np.asarray(values[k], dtype=np.float64) - intercept) / slope)
        info = np.iinfo(dtype)
        out.append(np.clip(stored, info.min, info.max).astype(dtype))
    return out


def set_pixels(ds: pydicom.Dataset, pixels: np.ndarray) -> None:
    """Replace a single-frame dataset's pixel data with ``pixels`` (its stored pixel type, little endian).

    A source in a compressed or big-endian transfer syntax is rewritten as Explicit VR Little Endian,
    since the new pixels are stored uncompressed.
    """
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if syntax not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        if meta is None:
            ds.file_meta = meta = pydicom.dataset.FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.is_little_endian, ds.is_implicit_VR = True, False
    if "PixelData" in ds:
        del ds["PixelData"]  # an encapsulated (compressed) element would keep its undefined length
    ds.add_new(0x7FE00010, "OW" if pixels.dtype.itemsize > 1 else "OB", np.ascontiguousarray(pixels).tobytes())


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
        set_pixels(ds, pixels[inst.path])
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
    if not pixel_data_complete(ds):
        raise _Quarantine("truncated or corrupt DICOM (pixel data shorter than the image)")


def pixel_data_complete(ds: pydicom.Dataset) -> bool:
    """False when uncompressed pixel data is shorter than Rows x Columns x samples x frames x bytes (a
    truncated or damaged instance; readers such as GDCM may pad it silently); True otherwise, also when
    there are no pixels or they are compressed (their length says nothing)."""
    meta = getattr(ds, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if "PixelData" not in ds or (syntax is not None and syntax.is_compressed):
        return True
    expected = (int(ds.get("Rows", 0)) * int(ds.get("Columns", 0)) * int(ds.get("SamplesPerPixel", 1))
                * int(ds.get("NumberOfFrames", 1) or 1) * int(ds.get("BitsAllocated", 16)) // 8)
    return len(ds.PixelData) >= expected


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


@dataclass(frozen=True)
class SeriesOutput:
    """A de-identified series written by `deidentify_series`: where, and its new identifiers (no PHI)."""

    folder: Path
    study_uid: str
    series_uid: str
    instances: int
    patient: str  # the pseudonymous Patient ID


#: How far a volume may sit from its source slices and still be theirs: millimetres (positions,
#: spacings) and direction cosines. A float32 NIfTI round trip stays far inside both.
_MM_TOL = 1e-2
_COS_TOL = 1e-3


def deidentify_series(source_dir: str | Path, volume, out_dir: str | Path, *, key: ps.Key | None = None,
                      options: Options | None = None) -> SeriesOutput:
    """Write the de-identified DICOM series of one source series whose volume is already de-identified.

    The headers are the source's, cleaned by the PS3.15 profile (`Profile`, keyed pseudonyms: the
    pseudonymous patient, study and frame of reference are those `deidentify_tree` gives with the same
    key); the pixels are ``volume``'s, put into each source slice by its position, in the slice's own
    stored pixel type and rescale. Series and SOP Instance UIDs are keyed on the de-identified pixels
    too: the same result stored twice is the same series, a different one (another level, another
    model) is a different series and never shadows the first in a PACS.

    Args:
        source_dir: a folder with the instances of one single-frame CT/MR series (read, never modified).
        volume: a SimpleITK image of that series after de-identification, same geometry (size, spacing,
            origin, direction; LPS mm) as the stacked source slices, in modality units (e.g. HU).
        out_dir: the folder to create (must not exist, or be empty); written under a temporary name and
            renamed when complete.

    Raises:
        InputError: a source file is not readable DICOM, the folder is not one volume series, or the
            volume's geometry is not the series'.
    """
    import SimpleITK as sitk

    source_dir, out_dir = Path(source_dir), Path(out_dir)
    if key is None:
        key, _ = ps.load_key()
    files = sorted(p for p in source_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise InputError("The source series folder holds no files: download the series again.")
    headers = [_read_header(path) for path in files]
    if len({str(h.get("SeriesInstanceUID", "")) for h in headers}) != 1:
        raise InputError("The source folder must hold the instances of exactly one series: give one series.")
    if not (all("PixelData" in h for h in headers) and has_slice_geometry(headers) and is_uniform_series(headers)):
        raise InputError("The source series is not one volume (slices without pixels or position, or with mixed "
                         "sizes, orientations or spacings), so it cannot carry a de-identified volume.")
    order = slice_order(headers)
    files, headers = [files[i] for i in order], [headers[i] for i in order]
    slots = _volume_slices(headers, volume)
    values = sitk.GetArrayViewFromImage(volume)
    stored = stored_pixels(headers, np.stack([values[k] for k in slots]))
    digest = hashlib.sha256()
    for pixels in stored:
        digest.update(pixels.tobytes())
    salt = digest.hexdigest()[:32]

    profile = Profile(key, options or Options())
    datasets = []
    for path, pixels in zip(files, stored, strict=True):
        try:
            ds = pydicom.dcmread(path)
            _check_pixel_length(ds)
        except Exception:  # noqa: BLE001 - any parse failure (or short pixel data) is a damaged file
            raise InputError(_DAMAGED) from None
        ctx = profile.context_for(ds)
        set_pixels(ds, pixels)
        profile.apply(ds, ctx)
        _add_method(ds, "clean_pixel_data")
        datasets.append(ds)
    # the profile's keyed UIDs for this series and its instances, moved once more by the pixel digest;
    # references between the instances follow
    renamed = {uid: ps.remap_uid(key, f"{uid}/{salt}")
               for uid in {str(ds.SeriesInstanceUID) for ds in datasets} | {str(ds.SOPInstanceUID) for ds in datasets}}
    for ds in datasets:
        _rename_uids(ds, renamed)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID

    if out_dir.exists():
        if not out_dir.is_dir() or any(out_dir.iterdir()):
            raise InputError("The output series folder exists and is not empty: choose a new folder.")
        out_dir.rmdir()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".semid-", dir=out_dir.parent))
    try:
        for k, ds in enumerate(datasets):
            ds.save_as(staging / f"IM{k + 1:05d}.dcm", write_like_original=False)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    first = datasets[0]
    return SeriesOutput(out_dir, str(first.StudyInstanceUID), str(first.SeriesInstanceUID), len(datasets),
                        str(first.get("PatientID", "")))


_DAMAGED = ("An instance of the series is not readable DICOM (damaged or truncated): repair or remove it in "
            "the archive and try again.")


def _read_header(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=False, defer_size=1024)
    except Exception:  # noqa: BLE001 - any parse failure is a damaged file
        raise InputError(_DAMAGED) from None


def _volume_slices(headers: Sequence[pydicom.Dataset], volume) -> list[int]:
    """For each source slice (stacking order), the index of the volume slice at its position.

    Raises InputError unless the volume has the slices' size, in-plane spacing and orientation and
    every slice position falls on one of its slices.
    """
    first = headers[0]
    rows, columns = int(first.Rows), int(first.Columns)
    size = volume.GetSize()
    mismatch = InputError("The de-identified volume does not match the source series' geometry (size, spacing, "
                          "origin or orientation): de-identify the volume read from this series.")
    if volume.GetDimension() != 3 or tuple(size) != (columns, rows, len(headers)):
        raise mismatch
    row_cos, col_cos = np.array(first.ImageOrientationPatient, float).reshape(2, 3)
    direction = np.array(volume.GetDirection()).reshape(3, 3)
    spacing = volume.GetSpacing()
    pixel_spacing = [float(v) for v in first.PixelSpacing]  # (between rows, between columns)
    if (not np.allclose(direction[:, 0], row_cos, atol=_COS_TOL) or not np.allclose(direction[:, 1], col_cos,
                                                                                     atol=_COS_TOL)
            or not np.allclose(spacing[:2], pixel_spacing[::-1], atol=_MM_TOL)):
        raise mismatch
    slots = []
    for ds in headers:
        i, j, k = volume.TransformPhysicalPointToContinuousIndex([float(v) for v in ds.ImagePositionPatient])
        slot = int(round(k))
        if (abs(i) * spacing[0] > _MM_TOL or abs(j) * spacing[1] > _MM_TOL or abs(k - slot) * spacing[2] > _MM_TOL
                or not 0 <= slot < size[2]):
            raise mismatch
        slots.append(slot)
    if len(set(slots)) != len(slots):
        raise mismatch
    return slots


def _rename_uids(ds: pydicom.Dataset, renamed: dict[str, str]) -> None:
    """Replace every UI value found in ``renamed``, in ``ds`` and its sequences."""

    def visit(dataset: pydicom.Dataset, elem) -> None:
        if elem.VR != "UI" or elem.value in (None, ""):
            return
        if getattr(elem.value, "is_multi", False) or isinstance(elem.value, (list, tuple)):
            elem.value = [renamed.get(str(v), str(v)) for v in elem.value]
        else:
            elem.value = renamed.get(str(elem.value), elem.value)

    ds.walk(visit)


def write_report(report: Report, path: Path) -> None:
    """Write the run's JSON report (outside OUT_DIR by default: it names input files)."""
    write_json(asdict(report), path)
