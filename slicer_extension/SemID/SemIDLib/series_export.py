"""Export a de-identified volume as a NEW DICOM series, with no identity carried over.

Two ways to get the header, depending on where the volume came from:

- From DICOM (the usual case): the source series' header, de-identified by the SemID server's
  `dicomheader` task with the project's PS3.15 profile and pseudonym key (`ServerHeader`), is the base
  of every instance: pseudonymous patient, the profile's keyed Study and Frame of Reference UIDs (the
  series lands in the same pseudonymous study as every other export of that study), kept patient
  characteristics, shifted dates. The client adds what is its own: new Series and SOP Instance UIDs
  (new content), per-instance geometry and the pixel module. `header_upload_copy` writes the
  pixel-less copy of one source instance that is sent. The core profile cannot run here: this package
  runs in 3D Slicer's Python, where `semid` and the key are absent.
- Without a source header (a volume loaded from NIfTI, NRRD...): the header is built from scratch:
  new Study/Series/SOP/Frame of Reference UIDs, a random pseudonymous patient, and only an explicit
  allow-list of non-identifying source attributes (patient characteristics and acquisition
  parameters), each checked for a plausible value.

The allow-list's value checks also serve as a second guard on the server's header: implausible patient
characteristics are dropped and ages of 90 and over capped, and a header that does not say it went
through the profile is refused.

Geometry follows SimpleITK's convention: `spacing` and `origin` in (x, y, z) order, `direction` a
row-major 3x3 whose columns are the image axes, all in LPS millimetres. The array is (z, y, x).
"""

from __future__ import annotations

import copy
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DSfloat

PSEUDONYM_NAME = "SEMID^ANON"
DEIDENTIFICATION_METHOD = "SemID: face blocked and refilled; new series, allow-list header"
#: CID 7050 codes (scheme DCM) of the PS3.15 Annex E profile this header satisfies, as the project's
#: core profile (`semid.dicom.profile`) records them: the header is built from scratch, so the Basic
#: Profile's removals and new UIDs hold by construction, and the allow-list below is the Retain Patient
#: Characteristics option plus Clean Descriptors (no free text is carried at all). The core profile
#: itself cannot be imported here: this package runs in 3D Slicer's Python, where `semid` is absent.
PROFILE_CODES = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113105", "Clean Descriptors Option"),
    ("113108", "Retain Patient Characteristics Option"),
)

SOP_CLASSES = {
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
}

_CODE = re.compile(r"^[A-Z0-9 _]{0,16}$")  # DICOM CS: upper-case code strings
_SHORT = re.compile(r"^[A-Za-z0-9 _.+\-]{0,16}$")  # SH used as a code (kernel, nucleus)
_AGE = re.compile(r"^\d{3}[DWMY]$")

# Allow-list of source attributes, with the kind of value accepted. Patient characteristics are what
# DICOM PS3.15's "Retain Patient Characteristics" option keeps; the rest are acquisition parameters
# that carry medical meaning and no identity. Free-text attributes (descriptions, names, comments,
# institution, device serials, dates) are deliberately absent.
ALLOWED_SOURCE_ATTRIBUTES: dict[str, str] = {
    "PatientSex": "sex",
    "PatientAge": "age",
    "PatientSize": "number",
    "PatientWeight": "number",
    "BodyPartExamined": "code",
    "PatientPosition": "code",
    # MR
    "ScanningSequence": "code",
    "SequenceVariant": "code",
    "ScanOptions": "code",
    "MRAcquisitionType": "code",
    "RepetitionTime": "number",
    "EchoTime": "number",
    "InversionTime": "number",
    "FlipAngle": "number",
    "EchoTrainLength": "number",
    "EchoNumbers": "number",
    "NumberOfAverages": "number",
    "MagneticFieldStrength": "number",
    "ImagingFrequency": "number",
    "ImagedNucleus": "short",
    "PixelBandwidth": "number",
    "PercentSampling": "number",
    "PercentPhaseFieldOfView": "number",
    "InPlanePhaseEncodingDirection": "code",
    # CT
    "KVP": "number",
    "XRayTubeCurrent": "number",
    "ExposureTime": "number",
    "Exposure": "number",
    "CTDIvol": "number",
    "SpiralPitchFactor": "number",
    "GantryDetectorTilt": "number",
    "DataCollectionDiameter": "number",
    "ReconstructionDiameter": "number",
    "ConvolutionKernel": "short",
    "FilterType": "short",
}

# Type 1 attributes of the MR Image module that the series needs even without a source header.
_MR_DEFAULTS = {
    "ScanningSequence": "RM",
    "SequenceVariant": "NONE",
    "ScanOptions": "",
    "MRAcquisitionType": "",
}


class SeriesExportError(ValueError):
    """The volume cannot be exported as asked: the message is one sentence for the user."""


#: The server task that de-identifies a source header (monailabel_app/lib/infers/dicomheader.py).
HEADER_TASK = "dicomheader"
#: Binary values longer than this (bytes) are bulk data: never sent to the server, nor kept from it.
BULK_DATA_BYTES = 1024
_BINARY_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "UN"}
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData", "IconImageSequence")
#: Patient characteristics (PS3.15 Retain Patient Characteristics) re-checked on the server's header.
_CHARACTERISTICS = ("PatientSex", "PatientAge", "PatientSize", "PatientWeight")
#: Attributes of the server's header that describe the SOURCE instance, its pixels or its series, and are
#: therefore removed from the base before the client sets its own (new series, new pixels, geometry).
INSTANCE_KEYWORDS = (
    "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "InstanceNumber",
    "ImageType", "ImagePositionPatient", "ImageOrientationPatient", "SliceLocation", "SliceThickness",
    "SpacingBetweenSlices", "PixelSpacing", "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "PlanarConfiguration", "PixelAspectRatio",
    "NumberOfFrames", "FrameIncrementPointer", "PerFrameFunctionalGroupsSequence",
    "SharedFunctionalGroupsSequence", "DimensionIndexSequence", "DimensionOrganizationSequence",
    "InStackPositionNumber", "LargestImagePixelValue", "SmallestImagePixelValue", "LargestPixelValueInSeries",
    "SmallestPixelValueInSeries", "PixelPaddingValue", "PixelPaddingRangeLimit", "RescaleSlope",
    "RescaleIntercept", "RescaleType", "ModalityLUTSequence", "WindowCenter", "WindowWidth",
    "WindowCenterWidthExplanation", "VOILUTFunction", "VOILUTSequence", "ReferencedImageSequence",
    "SourceImageSequence", "BurnedInAnnotation", *_PIXEL_KEYWORDS,
)


def _drop_bulk_data(ds: Dataset) -> None:
    """Remove pixel data and every binary value over BULK_DATA_BYTES, at any depth (in place)."""
    for keyword in _PIXEL_KEYWORDS:
        if keyword in ds:
            del ds[keyword]
    for elem in list(ds):
        if elem.VR == "SQ":
            for item in elem.value or []:
                _drop_bulk_data(item)
        elif elem.VR in _BINARY_VRS and elem.value is not None and len(elem.value) > BULK_DATA_BYTES:
            del ds[elem.tag]


def header_upload_copy(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Write the header of the source instance ``source`` (pixel and bulk data removed) to ``target``.

    This is what the client sends to the `dicomheader` task: the pixels are not needed for the header
    and would make the upload as large as the image. ``target`` holds PHI: put it in a private temporary
    folder and remove it after the request. Written under a temporary name and renamed; the source is
    only read.

    Raises:
        SeriesExportError: ``source`` is not a readable DICOM instance.
    """
    try:
        ds = pydicom.dcmread(os.fspath(source), stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - any parse failure: the source file is damaged or not DICOM
        raise SeriesExportError(
            "The source volume's DICOM file cannot be read: check it in the DICOM module, or save without it."
        ) from None
    _drop_bulk_data(ds)
    target = Path(target)
    partial = target.with_name("." + target.name + ".part")
    try:
        if int(pydicom.__version__.split(".")[0]) >= 3:
            ds.save_as(partial, enforce_file_format=True)
        else:
            ds.save_as(partial, write_like_original=False)
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return target


@dataclass(frozen=True)
class ServerHeader:
    """The source header de-identified by the server's `dicomheader` task (its JSON answer, checked).

    ``dataset`` is the header (no pixel data); the UIDs and patient are the profile's keyed values.
    """

    dataset: Dataset
    study_uid: str
    frame_of_reference_uid: str
    patient_id: str
    patient_name: str
    modality: str
    profile: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any]) -> ServerHeader:
        """Parse and check the task's JSON answer.

        Raises:
            SeriesExportError: the answer is not a de-identified header (wrong server, or a header that
                does not say it went through the profile).
        """
        header = answer.get("header") if isinstance(answer, Mapping) else None
        if not isinstance(header, dict) or not header:
            raise SeriesExportError("The server's answer holds no DICOM header: is it a SemID server with the "
                                    "dicomheader task?")
        try:
            ds = Dataset.from_json(header)
            study_uid = str(ds.get("StudyInstanceUID", "") or "")
            patient_id = str(ds.get("PatientID", "") or "")
            removed = str(ds.get("PatientIdentityRemoved", "") or "").upper()
            codes = {str(item.get("CodeValue", "")) for item in ds.get("DeidentificationMethodCodeSequence", [])}
        except Exception:  # noqa: BLE001 - malformed DICOM JSON in any way
            raise SeriesExportError("The server's header is not valid DICOM JSON: update the SemID server.") from None
        # Second guard: the header must say it went through the profile, and agree with the answer.
        if removed != "YES" or "113100" not in codes:
            raise SeriesExportError("The server's header does not record the de-identification profile: it cannot "
                                    "be used for a de-identified series; update the SemID server.")
        if not study_uid or study_uid != str(answer.get("study_uid", "")) or patient_id != str(
                answer.get("patient_id", "")):
            raise SeriesExportError("The server's header and its study or patient do not agree: update the SemID "
                                    "server.")
        _drop_bulk_data(ds)
        for keyword in _CHARACTERISTICS:
            if keyword in ds and ds[keyword].value not in (None, ""):
                clean = _clean_value(ALLOWED_SOURCE_ATTRIBUTES[keyword], ds[keyword].value)
                if clean is None:
                    del ds[keyword]
                else:
                    ds[keyword].value = _as_vr(keyword, clean) if keyword in ("PatientSize", "PatientWeight") \
                        else clean
        profile = answer.get("profile")
        return cls(
            dataset=ds,
            study_uid=study_uid,
            frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "") or ""),
            patient_id=patient_id,
            patient_name=str(ds.get("PatientName", "") or ""),
            modality=str(ds.get("Modality", "") or "").upper(),
            profile=dict(profile) if isinstance(profile, Mapping) else {},
        )


@dataclass(frozen=True)
class Geometry:
    """Voxel-to-patient mapping in LPS millimetres, SimpleITK style."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self) -> None:
        # Accept any sequence (lists, numpy arrays) but store plain float tuples, so geometries compare.
        for name in ("spacing", "origin", "direction"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        if len(self.spacing) != 3 or len(self.origin) != 3 or len(self.direction) != 9:
            raise SeriesExportError("The volume geometry must have 3 spacings, 3 origin values and 9 directions.")
        if not all(np.isfinite(v) and v > 0 for v in self.spacing):
            raise SeriesExportError("The voxel spacing must be positive in every direction.")
        matrix = self.matrix
        if not np.all(np.isfinite(matrix)) or not np.allclose(matrix.T @ matrix, np.eye(3), atol=1e-3):
            raise SeriesExportError("The volume's direction cosines are not orthonormal; resample it first.")

    @property
    def matrix(self) -> np.ndarray:
        """The 3x3 direction matrix; column k is the direction of array axis x, y, z (k = 0, 1, 2)."""
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    @classmethod
    def from_ijk_to_ras(cls, ijk_to_ras: Sequence[Sequence[float]]) -> Geometry:
        """Geometry from a 4x4 IJK-to-RAS matrix (3D Slicer's volume node), converted to LPS."""
        m = np.asarray(ijk_to_ras, dtype=float)
        if m.shape != (4, 4):
            raise SeriesExportError("The IJK-to-RAS matrix must be 4x4.")
        ras_to_lps = np.diag([-1.0, -1.0, 1.0])
        axes = ras_to_lps @ m[:3, :3]
        spacing = np.linalg.norm(axes, axis=0)
        if np.any(spacing <= 0):
            raise SeriesExportError("The voxel spacing must be positive in every direction.")
        direction = axes / spacing
        origin = ras_to_lps @ m[:3, 3]
        return cls(
            spacing=tuple(float(v) for v in spacing),  # type: ignore[arg-type]
            origin=tuple(float(v) for v in origin),  # type: ignore[arg-type]
            direction=tuple(float(v) for v in direction.ravel()),
        )


@dataclass
class SeriesPlan:
    """The per-slice datasets of a new series, and the identifiers it was given."""

    datasets: list[Dataset]
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    patient_name: str
    patient_id: str
    kept_source_keywords: list[str] = field(default_factory=list)
    # "server": the base is the server's de-identified source header; "scratch": built from scratch.
    header_source: str = "scratch"
    # Keywords only, never values: this list may be logged.
    dropped_source_keywords: list[str] = field(default_factory=list)


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _cap_age(age: str) -> str:
    """Ages of 90 years and over become "090Y": HIPAA Safe Harbor treats higher ages as identifying."""
    days_per_unit = {"D": 1.0, "W": 7.0, "M": 30.44, "Y": 365.25}
    years = int(age[:3]) * days_per_unit[age[3]] / 365.25
    return "090Y" if years >= 90 else age


def _clean_value(kind: str, value: Any) -> Any | None:
    """The value if it is plausible for its kind, else None (the attribute is then dropped)."""
    values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    if not values:
        return None
    cleaned: list[Any] = []
    for item in values:
        if kind == "number":
            number = _number(item)
            if number is None:
                return None
            cleaned.append(number)
            continue
        text = str(item).strip()
        if kind == "sex" and text in ("M", "F", "O"):
            cleaned.append(text)
        elif kind == "age" and _AGE.match(text):
            cleaned.append(_cap_age(text))
        elif kind == "code" and _CODE.match(text):
            cleaned.append(text)
        elif kind == "short" and _SHORT.match(text):
            cleaned.append(text)
        else:
            return None
    return cleaned if len(cleaned) > 1 else cleaned[0]


def _as_vr(keyword: str, value: Any) -> Any:
    """Cast a cleaned number to the attribute's VR, so pydicom writes it without complaint."""
    vr = dictionary_VR(keyword)
    items = value if isinstance(value, list) else [value]
    if vr in ("IS", "US", "SS", "UL", "SL"):
        cast = [int(round(v)) for v in items]
    elif vr == "DS":
        cast = [_ds(v) for v in items]
    elif vr in ("FD", "FL"):
        cast = [float(v) for v in items]
    else:
        return value
    return cast if isinstance(value, list) else cast[0]


def filter_source_attributes(source: Mapping[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """Split source attributes into (kept allow-listed values, dropped keywords)."""
    kept: dict[str, Any] = {}
    dropped: list[str] = []
    for keyword, value in (source or {}).items():
        kind = ALLOWED_SOURCE_ATTRIBUTES.get(keyword)
        clean = _clean_value(kind, value) if kind else None
        if clean is None:
            dropped.append(keyword)
        else:
            kept[keyword] = _as_vr(keyword, clean) if kind == "number" else clean
    return kept, sorted(dropped)


def read_source_attributes(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The allow-listed attributes (plus Modality) of one source DICOM file; nothing else is read."""
    ds = pydicom.dcmread(os.fspath(path), stop_before_pixels=True)
    out: dict[str, Any] = {}
    for keyword in ["Modality", *ALLOWED_SOURCE_ATTRIBUTES]:
        value = getattr(ds, keyword, None)
        if value is not None and value != "":
            out[keyword] = value
    return out


def _code_item(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
    return item


def _ds(value: float) -> DSfloat:
    # DS is limited to 16 characters; auto_format rounds to fit rather than failing on write.
    return DSfloat(float(value), auto_format=True)


def _int16_storage(array: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(stored int16 array, slope, intercept) such that value = stored * slope + intercept.

    Integer-valued data whose range fits 16 bits is stored exactly; wider or fractional data is
    quantised to 65536 steps over its range.
    """
    if array.size == 0:
        raise SeriesExportError("The volume is empty.")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise SeriesExportError("The volume has NaN or infinite voxels; it cannot be stored as DICOM.")
    lo, hi = float(array.min()), float(array.max())
    integral = array.dtype.kind in "iub" or bool(np.array_equal(array, np.round(array)))
    if integral and lo >= -32768 and hi <= 32767:
        return array.astype(np.int16), 1.0, 0.0
    if integral and hi - lo <= 65535:
        intercept = lo + 32768.0  # shift the range into int16; exact for integers
        return (array.astype(np.float64) - intercept).astype(np.int16), 1.0, intercept
    slope = float(_ds((hi - lo) / 65535.0)) if hi > lo else 1.0
    intercept = float(_ds(lo + 32768.0 * slope))
    stored = np.clip(np.round((array.astype(np.float64) - intercept) / slope), -32768, 32767)
    return stored.astype(np.int16), slope, intercept


def _right_handed(array: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, Geometry]:
    """Reverse the slice order of a left-handed volume so that slice normals point along +z.

    DICOM readers order slices along row x column; a left-handed volume would come back mirrored.
    """
    matrix = geometry.matrix
    if np.linalg.det(matrix) > 0:
        return array, geometry
    nz = array.shape[0]
    z_axis = matrix[:, 2] * geometry.spacing[2]
    origin = np.asarray(geometry.origin) + z_axis * (nz - 1)
    matrix = matrix.copy()
    matrix[:, 2] *= -1
    flipped = Geometry(
        spacing=geometry.spacing,
        origin=tuple(float(v) for v in origin),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in matrix.ravel()),
    )
    return array[::-1], flipped


def _window(array: np.ndarray) -> tuple[float, float]:
    """A display window from the 1st-99th percentile of a subsample (fast on large volumes)."""
    sample = array.ravel()[:: max(1, array.size // 200_000)].astype(np.float64)
    lo, hi = np.percentile(sample, [1, 99])
    width = max(float(hi - lo), 1.0)
    return float(lo + hi) / 2.0, width


def plan_series(
    array: np.ndarray,
    geometry: Geometry,
    modality: str = "MR",
    source: Mapping[str, Any] | None = None,
    *,
    header: ServerHeader | None = None,
    patient_name: str = PSEUDONYM_NAME,
    patient_id: str | None = None,
    series_description: str = "De-identified (SemID)",
    series_number: int = 9001,
) -> SeriesPlan:
    """Build the per-slice datasets of a new series for a (z, y, x) array.

    With `header` (the server's de-identified source header, `ServerHeader`), every instance starts from
    it: patient, study, frame of reference, dates and kept characteristics are the profile's, and only
    the instance and pixel attributes (`INSTANCE_KEYWORDS`) are replaced; Series and SOP Instance UIDs
    are new. `source`, `patient_name` and `patient_id` are then ignored.

    Without it (no source header), `source` holds DICOM keyword -> value of the original series; only
    allow-listed attributes with plausible values are kept. `patient_id` defaults to a random pseudonym
    "SEMID-XXXXXXXX": it is random on purpose, so it cannot be traced back to the source ID.
    """
    array = np.asarray(array)
    if array.ndim != 3 or min(array.shape) < 1:
        raise SeriesExportError("Only 3D volumes (slices, rows, columns) can be exported as a DICOM series.")
    if array.dtype.kind not in "iufb":
        raise SeriesExportError("The volume must hold numbers to be exported as a DICOM series.")
    modality = (modality or "").upper()
    if header is not None and header.modality in SOP_CLASSES:
        modality = header.modality
    if modality not in SOP_CLASSES:
        source_modality = str((source or {}).get("Modality", "")).upper()
        modality = source_modality if source_modality in SOP_CLASSES else "MR"
    kept, dropped = filter_source_attributes({k: v for k, v in (source or {}).items() if k != "Modality"})
    patient_id = patient_id or f"SEMID-{secrets.token_hex(4).upper()}"

    array, geometry = _right_handed(array, geometry)
    stored, slope, intercept = _int16_storage(array)
    center, width = _window(array)
    matrix = geometry.matrix
    sx, sy, sz = geometry.spacing
    origin = np.asarray(geometry.origin, dtype=float)
    row_dir, col_dir, normal = matrix[:, 0], matrix[:, 1], matrix[:, 2]

    series_uid = generate_uid()
    if header is not None:
        # the profile's keyed study and frame of reference (same grid as the source), its pseudonym
        study_uid = header.study_uid
        frame_uid = header.frame_of_reference_uid or generate_uid()
        patient_name, patient_id = header.patient_name, header.patient_id
        base = _base_dataset(header.dataset)
        kept = {k: base[k].value for k in ALLOWED_SOURCE_ATTRIBUTES if k in base and base[k].value not in (None, "")}
        dropped = []
        identity: dict[str, Any] = {"StudyInstanceUID": study_uid, "FrameOfReferenceUID": frame_uid}
    else:
        study_uid, frame_uid = generate_uid(), generate_uid()
        base = None
        identity = {
            "StudyInstanceUID": study_uid,
            "FrameOfReferenceUID": frame_uid,
            "PatientName": patient_name,
            "PatientID": patient_id,
            "PatientBirthDate": "",
            "PatientSex": "",
            "PatientIdentityRemoved": "YES",
            "DeidentificationMethod": DEIDENTIFICATION_METHOD,
            # Type 2 study attributes are left empty rather than invented.
            "StudyDate": "",
            "StudyTime": "",
            "ReferringPhysicianName": "",
            "StudyID": "",
            "AccessionNumber": "",
            "StudyDescription": "De-identified (SemID)",
            "PositionReferenceIndicator": "",
        }
    sop_class = SOP_CLASSES[modality]
    common: dict[str, Any] = {
        "SOPClassUID": sop_class,
        **identity,
        "SeriesInstanceUID": series_uid,
        "Modality": modality,
        "SeriesDescription": series_description[:64],
        "SeriesNumber": int(series_number),
        "ImageType": ["DERIVED", "SECONDARY"],
        "BurnedInAnnotation": "NO",
        "ImageOrientationPatient": [_ds(v) for v in (*row_dir, *col_dir)],
        "PixelSpacing": [_ds(sy), _ds(sx)],  # DICOM order: between rows, then between columns
        "SliceThickness": _ds(sz),
        "SpacingBetweenSlices": _ds(sz),
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "Rows": int(array.shape[1]),
        "Columns": int(array.shape[2]),
        "BitsAllocated": 16,
        "BitsStored": 16,
        "HighBit": 15,
        "PixelRepresentation": 1,
        "RescaleSlope": _ds(slope),
        "RescaleIntercept": _ds(intercept),
        "RescaleType": "HU" if modality == "CT" else "US",
        "WindowCenter": _ds(center),
        "WindowWidth": _ds(width),
    }
    if modality == "MR":
        # Type 1 in the MR Image module: the source's own values win when the base header has them
        common.update({k: v for k, v in _MR_DEFAULTS.items() if base is None or k not in base})
    if base is None:
        common.update(kept)

    major = int(pydicom.__version__.split(".")[0])
    datasets: list[Dataset] = []
    for k in range(array.shape[0]):
        ds = copy.deepcopy(base) if base is not None else Dataset()
        for keyword, value in common.items():
            setattr(ds, keyword, value)
        if base is None:
            ds.DeidentificationMethodCodeSequence = [_code_item(value, meaning) for value, meaning in PROFILE_CODES]
        sop_uid = generate_uid()
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = k + 1
        position = origin + normal * sz * k
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.SliceLocation = _ds(float(position @ normal))
        ds.PixelData = np.ascontiguousarray(stored[k]).astype("<i2").tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        if major < 3:
            # pydicom 2 reads the encoding from the dataset; pydicom 3 from the transfer syntax.
            ds.is_little_endian = True
            ds.is_implicit_VR = False
        datasets.append(ds)
    return SeriesPlan(
        datasets=datasets,
        study_uid=study_uid,
        series_uid=series_uid,
        frame_of_reference_uid=frame_uid,
        patient_name=patient_name,
        patient_id=patient_id,
        kept_source_keywords=sorted(kept),
        dropped_source_keywords=dropped,
        header_source="server" if header is not None else "scratch",
    )


def _base_dataset(header: Dataset) -> Dataset:
    """The server's header without what belongs to the source instance, its pixels or its series, and
    without overlays (group 60xx: drawn over the source pixels, they may hold text)."""
    base = copy.deepcopy(header)
    for keyword in INSTANCE_KEYWORDS:
        if keyword in base:
            del base[keyword]
    for elem in list(base):
        if 0x6000 <= elem.tag.group <= 0x60FF and elem.tag.group % 2 == 0:
            del base[elem.tag]
    if "PositionReferenceIndicator" not in base:
        base.PositionReferenceIndicator = ""  # Type 2 in the Frame of Reference module
    return base


def _save(ds: Dataset, path: Path) -> None:
    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.save_as(path, write_like_original=False)


def write_series(plan: SeriesPlan, folder: str | os.PathLike[str]) -> list[Path]:
    """Write the series into `folder` (new, or empty), all or nothing.

    Files are written to a hidden temporary folder beside it, which is then renamed into place, so an
    interrupted export never leaves a partial series where a viewer or an archive would pick it up.
    """
    target = Path(folder)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise SeriesExportError(f"The output folder {target.name!r} already has files: choose a new or empty folder.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".semid-export-", dir=target.parent))
    try:
        names = []
        for index, ds in enumerate(plan.datasets, start=1):
            name = f"IM{index:05d}.dcm"
            _save(ds, staging / name)
            names.append(name)
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [target / name for name in names]
