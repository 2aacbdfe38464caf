"""MONAI Label infer task `dicomheader`: the project's DICOM profile applied to one uploaded header.

A client that writes a de-identified volume as a DICOM series (the Slicer module) has the source
series' header but neither the PS3.15 profile (`semid.dicom.profile`) nor the pseudonym key: both live
here. It uploads ONE source instance, pixel data removed (``file`` in the multipart form of
``POST /infer/dicomheader?output=json``), and gets back JSON:

- ``header``: the de-identified header as DICOM JSON (PS3.18 F.2, ``Dataset.to_json_dict``), cleaned
  exactly as `semid.dicom.tree` cleans a file (``Profile.context_for`` + ``Profile.apply`` with the
  server's key), plus the Clean Pixel Data code, since it will carry de-identified pixels; no pixel
  data and no bulk data (binary values over 1 KiB are left out).
- ``study_uid``, ``frame_of_reference_uid``, ``patient_id``, ``patient_name``, ``modality``: what the
  client needs to build a NEW series on it, and ``profile`` (edition, options, key origin, never the key).

Why the study, patient and frame of reference are the profile's keyed values and not new ones: a PACS
files series under their Study Instance UID and Patient ID. A radiologist who saves the de-identified
result of a study twice (another level, another day), or who also sends the study through
``semid deidentify-tree`` with the same key, expects every de-identified series of that study side by
side in ONE pseudonymous study of ONE pseudonymous patient, registered to the same frame of reference
(the volume keeps the source grid). The series itself is new content, so the client gives it new
Series and SOP Instance UIDs: it never shadows or replaces another series in the PACS.

Like `deidentify`, it subclasses the bare `InferTask`: `BasicInferTask` pulls in torchvision.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import pydicom
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from lib.infers.common import INPUT_ERROR_STATUS, request_image_path
from semid.dicom import pseudonyms as ps
from semid.dicom.profile import CID7050, Options, Profile
from semid.errors import InputError

logger = logging.getLogger(__name__)

#: Largest header upload accepted (app conf ``dicomheader_max_mb``): a header is a few KiB to a few
#: hundred KiB; the client removes the pixel data before sending.
DEFAULT_MAX_HEADER_MB = 8.0
#: Binary values longer than this (bytes) are bulk data (pixels, overlays, waveforms, icons): left out.
BULK_DATA_BYTES = 1024
_BINARY_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "UN"}
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData", "IconImageSequence")
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"

NOT_DICOM = ("The uploaded file is not a DICOM instance: upload one instance of the source series (a .dcm file "
             "with the DICM preamble).")
NO_HEADER = ("The uploaded DICOM file has no instance header (Study, Series and SOP Instance UIDs): upload one "
             "image instance of the source series, not a DICOMDIR or an empty file.")
NOT_CONVERTIBLE = ("The uploaded header has a value that cannot be written as DICOM JSON: check the source "
                   "instance with a DICOM validator, or save the series without a source header.")


def parse_max_mb(raw: Any) -> float:
    """The header size limit in MB (2**20 bytes) from app conf; raises ValueError when not positive."""
    try:
        mb = float(raw)
    except (TypeError, ValueError):
        mb = float("nan")
    if not mb > 0 or mb == float("inf"):
        raise ValueError(f"--conf dicomheader_max_mb {str(raw)[:20]!r} is not a positive number of megabytes.")
    return mb


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


def _add_method(ds: Dataset, option: str) -> None:
    code, meaning = CID7050[option]
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code, "DCM", meaning
    ds.DeidentificationMethodCodeSequence.append(item)


def deidentify_header(ds: Dataset, profile: Profile) -> dict[str, Any]:
    """Apply ``profile`` to the header ``ds`` (in place) as `semid.dicom.tree` does for a file; return the
    task's JSON answer (see the module docstring). Pixel and bulk data are removed first."""
    _drop_bulk_data(ds)
    ctx = profile.context_for(ds)
    profile.apply(ds, ctx)
    # the header will carry pixels de-identified by SemID, as `deidentify_series` records it
    _add_method(ds, "clean_pixel_data")
    header = ds.to_json_dict(bulk_data_threshold=BULK_DATA_BYTES)
    return {
        "header": header,
        "study_uid": str(ds.get("StudyInstanceUID", "") or ""),
        "frame_of_reference_uid": str(ds.get("FrameOfReferenceUID", "") or ""),
        "patient_id": str(ds.get("PatientID", "") or ""),
        "patient_name": str(ds.get("PatientName", "") or ""),
        "modality": str(ds.get("Modality", "") or ""),
        "profile": {"edition": profile.table.edition, "options": profile.options.enabled(),
                    "key_origin": profile.key.origin},
        "actions": dict(sorted(ctx.counts.items())),
    }


class DicomHeaderInfer(InferTask):
    """De-identify one uploaded DICOM header with the project's profile and the server's pseudonym key."""

    #: The request parameters this task reads (``common.check_params`` refuses any other): none.
    params: frozenset[str] = frozenset()

    def __init__(self, key: ps.Key | None = None, options: Options | None = None,
                 max_mb: float = DEFAULT_MAX_HEADER_MB) -> None:
        if key is None:
            # At server start, so a bad key file stops the start-up, not the first request. The notice
            # (a new key was made) names the key file's place, never the key.
            key, notice = ps.load_key()
            if notice:
                logger.warning("dicomheader: %s", notice)
        self.profile = Profile(key, options or Options())
        self.max_bytes = int(parse_max_mb(max_mb) * 2**20)
        super().__init__(
            type=InferType.OTHERS,
            labels=None,
            dimension=3,
            description=(
                "De-identify one DICOM header (an instance of the source series, pixel data removed) with the "
                "project's PS3.15 profile and pseudonym key; answers the header as DICOM JSON for a new series."
            ),
            config={"max_header_mb": self.max_bytes / 2**20, "profile_edition": self.profile.table.edition,
                    "profile_options": self.profile.options.enabled()},
        )

    def is_valid(self) -> bool:
        """Always loadable: no model weights."""
        return True

    def _read(self, path: str) -> Dataset:
        try:
            size = os.path.getsize(path)
        except OSError:
            raise HTTPException(status_code=INPUT_ERROR_STATUS, detail=NOT_DICOM) from None
        if size > self.max_bytes:
            with open(path, "rb") as fh:
                preamble = fh.read(132)
            if preamble[128:132] != b"DICM":
                # e.g. a datastore volume named by id: not a header at all, whatever its size
                raise HTTPException(status_code=INPUT_ERROR_STATUS, detail=NOT_DICOM)
            raise HTTPException(status_code=413, detail=(
                f"The uploaded header is larger than this task's limit of {self.max_bytes / 2**20:g} MB: remove the "
                "pixel data before sending (the SemID module does), or ask the administrator to raise "
                "dicomheader_max_mb."))
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            raise HTTPException(status_code=INPUT_ERROR_STATUS, detail=NOT_DICOM) from None
        except Exception:  # noqa: BLE001 - any parse failure is a damaged or foreign file; no message echoes it
            raise HTTPException(status_code=INPUT_ERROR_STATUS, detail=NOT_DICOM) from None
        meta_class = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
        if (meta_class == DICOMDIR_CLASS or "DirectoryRecordSequence" in ds
                or not all(k in ds for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))):
            raise HTTPException(status_code=INPUT_ERROR_STATUS, detail=NO_HEADER)
        return ds

    def __call__(self, request: dict[str, Any]) -> tuple[None, dict[str, Any]]:
        """De-identify the header in ``request["image"]`` (the upload); return (no file, JSON answer)."""
        started = time.perf_counter()
        ds = self._read(request_image_path(request))
        try:
            answer = deidentify_header(ds, self.profile)
        except InputError as error:
            raise HTTPException(status_code=INPUT_ERROR_STATUS, detail=str(error)) from None
        except (ValueError, TypeError, OverflowError):
            # a malformed value (e.g. a number that is not one) found while writing the JSON
            raise HTTPException(status_code=INPUT_ERROR_STATUS, detail=NOT_CONVERTIBLE) from None
        # Counts and timing only: nothing of the uploaded header (names, ids, UIDs) reaches the log.
        logger.info("dicomheader: %d attributes in the answer, %.2f s", len(answer["header"]),
                    time.perf_counter() - started)
        return None, answer
