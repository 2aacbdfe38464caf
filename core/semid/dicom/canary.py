"""A canary corpus: real DICOM files with a distinct marker in every attribute the profile does not keep.

Used by the tests and by the DICOM benchmark to count what a de-identifier leaks (SemID's or a peer's).

For every Table E.1-1 attribute whose action under the chosen options is not K, a marker value valid
for its VR is planted at top level and nested two and three sequences deep (inside public sequences
the table does not name, so only the planted attribute's own rule can remove it), plus private tags
(top level and inside sequences), free text mixing identifiers with medical terms, and OB/UN values.
Markers are unique strings (text VRs), unique UIDs, dates decades apart (so a shifted date can never
equal another marker) and unique times. Kept attributes get known values that must survive.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from semid.dicom.profile import ActionTable, Options, effective_code, resolve

_TEXT = {"LO", "SH", "ST", "LT", "UT", "UC", "PN", "CS", "AE", "UR"}
PATIENT_NAME = "QXPATNAME^QXGIVEN"
#: Attributes the corpus sets itself for every file (identity, references, kept values).
_SET_PER_FILE = {"PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID", "SeriesInstanceUID",
                 "SOPInstanceUID", "FrameOfReferenceUID", "StudyDescription", "ReferencedImageSequence",
                 "PatientSex", "PatientAge", "PatientWeight", "PatientSize", "Modality"}
PATIENT_ID = "QXPATID0001"


@dataclass
class Canary:
    """The planted markers (bytes to search for in the output) and the values that must be kept."""

    markers: dict[bytes, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    #: (file, text) of identifiers burned into pixels: searched for by OCR, not in the bytes
    burned_in: list[tuple[Path, str]] = field(default_factory=list)


def _carrier_sequences(table: ActionTable) -> list[int]:
    """Public sequence tags the table does not name: they carry nested markers."""
    out = []
    for tag in (0x00082218, 0x00089215, 0x00400260, 0x00082228, 0x0040A043, 0x00089121):
        if table.rule_for(pydicom.tag.Tag(tag)) is None and dictionary_VR(tag) == "SQ":
            out.append(tag)
    return out


_EPOCH = dt.date(1000, 1, 1)
#: Dates in one dataset lie further apart than the largest date shift, so a shifted marker date can
#: never equal another marker.
_DATE_STEP = dt.timedelta(days=3700)


class _Markers:
    def __init__(self) -> None:
        self.n = 0
        self.dates = 0
        self.canary = Canary()

    def reset_dates(self) -> None:
        self.dates = 0

    def _next_date(self) -> str:
        self.dates += 1
        return (_EPOCH + self.dates * _DATE_STEP).strftime("%Y%m%d")

    def value(self, vr: str, where: str):
        """A marker value valid for ``vr``; None where a VR cannot carry a searchable marker."""
        self.n += 1
        n = self.n
        if vr in _TEXT:
            text = f"QX{n:05d}Z"
            value = f"{text}^QXG{n:05d}" if vr == "PN" else text
            self.canary.markers[text.encode()] = where
            return value
        if vr == "UI":
            uid = f"1.2.826.0.1.3680043.10.999.{n}.{n * 7919}"
            self.canary.markers[uid.encode()] = where
            return uid
        if vr == "DA":
            date = self._next_date()
            self.canary.markers[date.encode()] = where
            return date
        if vr == "TM":
            time = f"{n % 24:02d}{(n * 7) % 60:02d}{(n * 13) % 60:02d}.{n:06d}"
            self.canary.markers[time.encode()] = where
            return time
        if vr == "DT":
            value = f"{self._next_date()}{n % 24:02d}{(n * 7) % 60:02d}00.{n:06d}"
            self.canary.markers[value.encode()] = where
            return value
        if vr in ("DS", "IS"):  # the "+" keeps remapped UIDs' random digits from matching by chance
            number = f"+{7000000 + n}"
            self.canary.markers[number.encode()] = where
            return number
        if vr == "AS":
            return None  # ages are 4 characters: no room for a distinct marker
        if vr in ("OB", "UN"):
            data = f"QXBIN{n:05d}Z".encode()
            data += b"\0" * (len(data) % 2)
            self.canary.markers[data.rstrip(b"\0")] = where
            return data
        return None


def canary_dataset(table: ActionTable, options: Options, marks: _Markers, depth_items: bool = True) -> Dataset:
    """A dataset with a marker in every attribute the options do not keep (and its nested copies)."""
    ds = Dataset()
    carriers = _carrier_sequences(table)
    for tag_int, rule in sorted(table.exact.items()):
        tag = pydicom.tag.Tag(tag_int)
        if tag.group in (0x0000, 0x0002, 0x7FE0) or tag.element == 0:
            continue  # command, file meta and pixel groups are not part of a stored instance's data set
        if depth_items and keyword_for_tag(tag) in _SET_PER_FILE:
            continue
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            continue
        vr = vr.split(" or ")[0]
        code = resolve(effective_code(rule, options), vr)
        if code == "K":
            continue
        keyword = keyword_for_tag(tag) or f"{tag}"
        if vr == "SQ":
            item = Dataset()
            item.PatientName = marks.value("PN", f"{keyword}>PatientName")
            ds.add_new(tag, "SQ", Sequence([item]))
            continue
        value = marks.value(vr, keyword)
        if value is None:
            continue
        if code == "C" and vr in ("LO", "SH", "ST", "LT", "UT", "UC"):
            value = f"glioma {value} QXPATNAME"[: 16 if vr == "SH" else 1024]  # free text: identifier + medicine
        ds.add_new(tag, vr, value)
    if depth_items and carriers:
        # the same attributes two and three sequences deep
        inner = canary_dataset(table, options, marks, depth_items=False)
        level2 = Dataset()
        level2.add_new(carriers[0], "SQ", Sequence([inner]))
        deeper = canary_dataset(table, options, marks, depth_items=False)
        level3_item = Dataset()
        level3_item.add_new(carriers[-1], "SQ", Sequence([deeper]))
        level2b = Dataset()
        level2b.add_new(carriers[0], "SQ", Sequence([level3_item]))
        ds.add_new(carriers[-1], "SQ", Sequence([level2, level2b]))
    # private tags, top level and inside a private sequence and a public carrier sequence
    block = ds.private_block(0x0031, "QX CANARY CORP", create=True)
    block.add_new(0x10, "LO", marks.value("LO", "private LO"))
    block.add_new(0x11, "UN", marks.value("UN", "private UN"))
    nested = Dataset()
    nested_block = nested.private_block(0x0033, "QX CANARY NESTED", create=True)
    nested_block.add_new(0x01, "SH", marks.value("SH", "private in private SQ"))
    block.add_new(0x12, "SQ", Sequence([nested]))
    return ds


def burned_in_capture(path: Path, patient_name: str, patient_id: str, text: str) -> Path:
    """A secondary-capture image with ``text`` (an identifier) burned into its pixels."""
    from PIL import Image, ImageDraw, ImageFont

    picture = Image.new("L", (640, 240), 0)
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=34)
    draw.text((20, 30), text, fill=255, font=font)
    draw.text((20, 140), "AXIAL HEAD", fill=200, font=font)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.10.999.77.1"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.999.77"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.999.77.0"
    ds.Modality, ds.ConversionType = "OT", "WSD"
    ds.PatientName, ds.PatientID = patient_name, patient_id
    ds.Rows, ds.Columns = picture.height, picture.width
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.asarray(picture, dtype=np.uint8).tobytes()
    ds.is_little_endian, ds.is_implicit_VR = True, False
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, write_like_original=False)
    return path


def make_corpus(folder: Path, options: Options | None = None, patients: int = 2, series_per_patient: int = 2,
                slices: int = 3, burned_in: bool = False) -> Canary:
    """Write a small canary corpus of CT slices (and, if asked, one secondary capture with the patient's
    name and ID burned into its pixels) under ``folder``."""
    options = options or Options()
    table = ActionTable.load()
    marks = _Markers()
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for p in range(patients):
        study_uid = f"1.2.826.0.1.3680043.10.999.9{p}"
        frame_uid = f"1.2.826.0.1.3680043.10.999.8{p}"
        for s in range(series_per_patient):
            series_uid = f"{study_uid}.{s + 1}"
            for k in range(slices):
                marks.reset_dates()
                ds = canary_dataset(table, options, marks)
                sop_uid = f"{series_uid}.{k + 1}"
                meta = FileMetaDataset()
                meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
                meta.MediaStorageSOPInstanceUID = sop_uid
                meta.TransferSyntaxUID = ExplicitVRLittleEndian
                meta.SourceApplicationEntityTitle = marks.value("AE", "file meta source AE")
                out = FileDataset(None, ds, file_meta=meta, preamble=b"\0" * 128)
                out.SOPClassUID = meta.MediaStorageSOPClassUID
                out.SOPInstanceUID, out.StudyInstanceUID, out.SeriesInstanceUID = sop_uid, study_uid, series_uid
                out.FrameOfReferenceUID = frame_uid
                out.PatientName = PATIENT_NAME.replace("0001", f"{p:04d}")
                out.PatientID = f"{PATIENT_ID}{p}"
                out.PatientBirthDate = "19610312"
                # references that must still resolve after remapping
                ref = Dataset()
                ref.ReferencedSOPClassUID = meta.MediaStorageSOPClassUID
                ref.ReferencedSOPInstanceUID = f"{series_uid}.{(k + 1) % slices + 1}"
                out.ReferencedImageSequence = Sequence([ref])
                # kept attributes (patient characteristics, modality, geometry) with known values
                out.Modality, out.PatientSex, out.PatientAge = "CT", "F", "045Y"
                out.PatientWeight, out.PatientSize = "61.5", "1.68"
                out.StudyDescription = f"glioma follow-up {out.PatientName.family_name} MRN {out.PatientID}"
                out.Rows = out.Columns = 16
                out.SamplesPerPixel, out.PhotometricInterpretation = 1, "MONOCHROME2"
                out.BitsAllocated, out.BitsStored, out.HighBit, out.PixelRepresentation = 16, 16, 15, 1
                out.PixelData = rng.integers(-100, 100, (16, 16)).astype(np.int16).tobytes()
                out.ImagePositionPatient = [0, 0, float(k)]
                out.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
                out.PixelSpacing = [1, 1]
                out.is_little_endian, out.is_implicit_VR = True, False
                path = folder / f"p{p}" / f"s{s}" / f"{k}.dcm"
                path.parent.mkdir(parents=True, exist_ok=True)
                out.save_as(path, write_like_original=False)
                marks.canary.files.append(path)
        for keyword in ("PatientName", "PatientID"):
            marks.canary.markers[str(getattr(out, keyword)).encode()] = keyword
        marks.canary.markers[b"QXPATNAME"] = "PatientName family name in free text"
    marks.canary.markers[b"19610312"] = "PatientBirthDate"
    if burned_in:
        text = "QXBURNED DOE 31415926"
        path = burned_in_capture(folder / "capture" / "sc.dcm", "QXBURNED^JANE", "31415926", text)
        marks.canary.files.append(path)
        marks.canary.burned_in.append((path, text))
        marks.canary.markers[b"QXBURNED"] = "PatientName of the burned-in capture"
        marks.canary.markers[b"31415926"] = "PatientID of the burned-in capture"
    marks.canary.kept.update({"Modality": "CT", "PatientSex": "F", "PatientAge": "045Y", "PatientWeight": "61.5",
                              "PatientSize": "1.68"})
    return marks.canary
