"""Burned-in text in DICOM pixel data: find it with OCR, blank what identifies.

OCR is ``rapidocr-onnxruntime`` (PP-OCRv4 detection and recognition on ONNX Runtime, CPU). Its
models ship inside the wheel, so nothing is downloaded at run time. The engine is created once per
process, on first use.

Blanking writes a uniform value (the frame's darkest pixel; black for colour) over each padded text
box, directly into the dataset's own pixel buffer: every other byte of Pixel Data is left as it was,
and bits, photometric interpretation, planar configuration and transfer syntax do not change. Only
uncompressed (native) pixel data is handled: compressed pixel data raises ``UnsupportedPixelData``
(pydicom 2.4 cannot re-encode it, and decoding it to native would change the transfer syntax).

Multi-frame (cine) images: OCR costs about a second per frame, so only a few frames are read (first,
middle and last by default) and the union of their boxes is blanked in *every* frame. This assumes
the overlay is static, as burned-in annotations (name, ID, dates, acquisition settings) are on
ultrasound and angiography cines; pass ``ocr_frames=None`` to read every frame when it may not be.

Nothing here logs or raises with the text it read (it is PHI): results hold counts and boxes only,
and ``TextBox``'s repr leaves its text out.
"""

from __future__ import annotations

import calendar
import re
import threading
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import pydicom
from pydicom.multival import MultiValue

from semid.errors import InputError

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels; x1, y1 exclusive (numpy slice bounds)
Policy = Literal["identifiers", "all"]

#: Pixels added on each side of an OCR box before blanking: the detector's box hugs the glyphs and
#: anti-aliased edges just outside it could otherwise stay readable.
BOX_PAD = 4
#: Frames of a multi-frame image that are OCR'd (evenly spaced, first and last included).
OCR_FRAMES = 3
#: Recognition confidence below which a box is still returned (its text may be garbled): with
#: policy "all" a detected box is blanked whatever its text reads as.
MIN_TEXT_SCORE = 0.0

_SUPPORTED_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL")


class UnsupportedPixelData(InputError):
    """Pixel data that cannot be checked for burned-in text here (compressed, packed bits, palette...)."""


@dataclass(frozen=True)
class TextBox:
    """One line of text found by OCR. ``text`` is PHI-bearing: it is kept out of the repr."""

    text: str = field(repr=False)
    box: Box
    score: float


@dataclass(frozen=True)
class BurnedInResult:
    """What ``blank_burned_in_text`` did: counts and regions, never the text it read."""

    boxes_found: int  # text boxes found, summed over the frames that were OCR'd
    boxes_blanked: int  # distinct regions blanked in each frame
    frames: int  # frames in the image (all of them get the regions blanked)
    texts_blanked_count: int  # of boxes_found, those whose text was identifier-like (or all, policy "all")
    frames_ocr: int = 1  # frames that were OCR'd
    regions: tuple[Box, ...] = ()  # the padded regions that were blanked

    @property
    def changed(self) -> bool:
        """Whether any pixel was overwritten."""
        return self.boxes_blanked > 0


# --------------------------------------------------------------------------------------------- OCR

_ENGINE: Any = None
_ENGINE_LOCK = threading.Lock()


def _engine() -> Any:
    """The OCR engine, created once (loading its three ONNX models takes a fraction of a second)."""
    global _ENGINE
    with _ENGINE_LOCK:
        if _ENGINE is None:
            from rapidocr_onnxruntime import RapidOCR

            _ENGINE = RapidOCR(text_score=MIN_TEXT_SCORE)
        return _ENGINE


def _to_uint8(frame: np.ndarray) -> np.ndarray:
    """Window any bit depth linearly from the frame's minimum to its maximum onto 0..255.

    Min-max (not a tissue window) because burned-in text is drawn at or near an extreme value, and a
    narrower window could clip it into its background.
    """
    if frame.dtype == np.uint8:
        return frame
    values = frame.astype(np.float64)
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(frame.shape, np.uint8)
    return np.round((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def find_text(frame: np.ndarray) -> list[TextBox]:
    """Text lines in one frame: 2D grey of any integer or float type, or ``(rows, cols, 3)`` RGB.

    Boxes are axis-aligned, in the frame's pixel coordinates, clipped to the frame.
    """
    if frame.ndim == 3 and frame.shape[2] == 3:
        # rapidocr takes a 3-channel array as OpenCV's BGR.
        image = np.ascontiguousarray(_to_uint8(frame)[..., ::-1])
    elif frame.ndim == 2:
        image = np.ascontiguousarray(_to_uint8(frame))
    else:
        raise ValueError(f"find_text takes a 2D grey or (rows, cols, 3) RGB frame, not shape {frame.shape}")
    rows, cols = frame.shape[:2]
    result, _ = _engine()(image)
    boxes: list[TextBox] = []
    for quad, text, score in result or ():
        points = np.asarray(quad, dtype=np.float64)
        x0, y0 = np.floor(points.min(axis=0)).astype(int)
        x1, y1 = np.ceil(points.max(axis=0)).astype(int)
        x0, y0, x1, y1 = max(int(x0), 0), max(int(y0), 0), min(int(x1), cols), min(int(y1), rows)
        if x1 > x0 and y1 > y0:
            boxes.append(TextBox(text=str(text), box=(x0, y0, x1, y1), score=float(score)))
    return boxes


# ------------------------------------------------------------------------------ what identifies

_MONTHS = "JAN|FEB|MAR|APR|MAY|JUN|JUL|AUG|SEP|SEPT|OCT|NOV|DEC"
_PATTERNS = [
    re.compile(p, re.IGNORECASE)
    for p in (
        # Numeric dates, one separator kind per date: 08/29/1951, 29.08.51, 4-14-2020; ISO 1951-08-29.
        r"(?<!\d)\d{1,2}\s?([/.\-])\s?\d{1,2}\s?\1\s?\d{2,4}",
        r"(?<!\d)\d{4}([/.\-])\d{1,2}\1\d{1,2}(?!\d)",
        # Dates with a month name: 29 Aug 1951, 29-AUG-51, Aug 29, 1951, August 29th 1951.
        rf"(?<!\d)\d{{1,2}}[\s\-/.]*(?:{_MONTHS})[A-Z]*\.?[\s\-/.,]*\d{{2,4}}",
        rf"(?<![A-Z])(?:{_MONTHS})[A-Z]*\.?[\s\-/.]*\d{{1,2}}(?:ST|ND|RD|TH)?,?[\s\-/.]*\d{{2,4}}",
        # Clock times that go with a date: 05:24:57, 8:48 AM.
        r"(?<!\d)\d{1,2}:\d{2}:\d{2}(?!\d)",
        r"(?<!\d)\d{1,2}:\d{2}\s?[AP]\.?M",
        # Long digit runs (MRNs, accession and phone numbers, compact dates), single hyphens allowed.
        r"\d(?:-?\d){4,}",
        # Labels followed by a value: "MRN 123", "DOB:", "ID: X", "Name: Y", "Acc#12".
        r"(?<![A-Z])(?:MRN|MR\s?#|MR\s?NO|DOB|D\.O\.B\.?|SSN|NHS\s?(?:NO)?)\s*[:#=.]?\s*\w",
        r"(?<![A-Z])(?:P?ID|PAT(?:IENT)?\s*(?:ID|NAME|NO)?|NAME|ACC(?:ESSION)?\s*(?:NO|NUM|#)?|BIRTH\s*DATE"
        r"|DATE\s*OF\s*BIRTH|HOSP(?:ITAL)?\s*(?:NO|#)|CASE\s*(?:NO|#))\s*[:#=]\s*\w",
    )
]
# Name shapes, case-sensitive: DICOM's LAST^FIRST, and "Last, First" with capitals.
_NAME_PATTERNS = [
    re.compile(r"[^\W\d_][\w'\-]*\^[^\W\d_]"),
    re.compile(r"(?<![^\W\d_])[A-Z][A-Za-z'\-]+\s*,\s*[A-Z][A-Za-z'\-]+"),
]
_TOKEN_SPLIT = re.compile(r"[\s,;:/\\^|()\[\]]+")


def _norm(text: str) -> str:
    """Upper case, no accents, letters and digits only: OCR drops and adds spaces and punctuation."""
    folded = unicodedata.normalize("NFKD", text)
    return "".join(c for c in folded.upper() if c.isalnum() and not unicodedata.combining(c))


def _date_forms(value: str) -> set[str]:
    """The common spellings of a DICOM date (YYYYMMDD), normalised like ``_norm``."""
    try:
        day = date(int(value[:4]), int(value[4:6]), int(value[6:8]))
    except ValueError:
        return set()
    y4, y2 = f"{day.year:04d}", f"{day.year % 100:02d}"
    mm, dd, m, d = f"{day.month:02d}", f"{day.day:02d}", str(day.month), str(day.day)
    forms = {y4 + mm + dd, mm + dd + y4, dd + mm + y4, mm + dd + y2, dd + mm + y2, y2 + mm + dd,
             m + d + y4, d + m + y4}  # fmt: skip
    for mon in {calendar.month_abbr[day.month].upper(), calendar.month_name[day.month].upper()}:
        forms |= {dd + mon + y4, d + mon + y4, dd + mon + y2, mon + dd + y4, mon + d + y4, y4 + mon + dd}
    # Short unpadded forms ("8291951" is fine, "8251" is not) would match unrelated numbers.
    return {f for f in forms if len(f) >= 6}


@dataclass(frozen=True)
class _Matcher:
    long: frozenset[str]  # matched as substrings of the normalised text
    short: frozenset[str]  # too short for that: matched as whole tokens only

    def __call__(self, text: str) -> bool:
        norm = _norm(text)
        if any(value in norm for value in self.long):
            return True
        if self.short and any(_norm(tok) in self.short for tok in _TOKEN_SPLIT.split(text)):
            return True
        if any(p.search(text) for p in _PATTERNS):
            return True
        return any(p.search(text) for p in _NAME_PATTERNS)


@lru_cache(maxsize=64)
def _matcher(identifiers: tuple[str, ...]) -> _Matcher:
    long: set[str] = set()
    short: set[str] = set()
    for raw in identifiers:
        value = _norm(str(raw))
        if not value:
            continue
        (long if len(value) >= 3 else short).add(value)
        if value.isdigit():
            stripped = value.lstrip("0")  # an ID shown without its leading zeros
            if len(stripped) >= 5:
                long.add(stripped)
            if len(value) == 8:
                long |= _date_forms(value)
        # Names (and other multi-word values) also match by their parts: overlays truncate and
        # reorder names ("ZZZ TEST PATIENTFI…", "First Last").
        for part in re.split(r"[\^\s,]+", str(raw)):
            part_norm = _norm(part)
            if len(part_norm) >= 3:
                long.add(part_norm)
    return _Matcher(frozenset(long), frozenset(short))


def identifier_like(text: str, identifiers: Iterable[str] = ()) -> bool:
    """Whether ``text`` contains one of the header's identifiers or looks like an identifier.

    Identifiers (patient names, IDs, birth date, accession number...) match case- and
    accent-insensitively, ignoring spaces and punctuation; names also by their parts of three or more
    characters; DICOM dates (YYYYMMDD) in their common spellings; identifiers shorter than three
    characters only as whole words. Patterns: dates in many formats, clock times, runs of five or more
    digits, labels with a value ("MRN", "ID:", "DOB", "Name:"), and names shaped LAST^FIRST or
    "Last, First".
    """
    return _matcher(tuple(str(v) for v in identifiers if v is not None))(text)


def header_identifiers(ds: pydicom.Dataset, institution: bool = True) -> list[str]:
    """The identifying values of a header to look for in its pixels.

    Patient names, IDs, birth date, accession number, the staff names the profile removes and, unless
    ``institution`` is false (Retain Institution Identity), the institution's name.
    """
    keywords = ["PatientName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName", "PatientID",
                "OtherPatientIDs", "PatientBirthDate", "AccessionNumber", "ReferringPhysicianName",
                "PerformingPhysicianName", "OperatorsName", "MedicalRecordLocator"]  # fmt: skip
    if institution:
        keywords.append("InstitutionName")
    values: list[str] = []
    for keyword in keywords:
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        items = value if isinstance(value, (list, tuple, MultiValue)) else [value]
        values.extend(str(item) for item in items if str(item))
    for item in ds.get("OtherPatientIDsSequence", []):
        if item.get("PatientID"):
            values.append(str(item.PatientID))
    return values


# ---------------------------------------------------------------------------------------- pixels


@dataclass(frozen=True)
class _Layout:
    frames: int
    rows: int
    cols: int
    samples: int
    planar: int
    photometric: str
    dtype: np.dtype  # the raw stored word, unsigned, in the transfer syntax's byte order
    nbytes: int  # bytes of pixel data proper (without a trailing pad byte)


def _layout(ds: pydicom.Dataset) -> _Layout:
    """Check the pixel data can be blanked in place here; raise ``UnsupportedPixelData`` if not."""
    if "PixelData" not in ds:
        raise UnsupportedPixelData("the instance has no integer Pixel Data to check for burned-in text")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if (syntax is not None and syntax.is_compressed) or ds["PixelData"].is_undefined_length:
        name = f"{syntax.name} ({syntax})" if syntax is not None else "encapsulated"
        raise UnsupportedPixelData(
            f"pixel data in transfer syntax {name} is compressed: burned-in text can only be blanked in "
            "uncompressed pixel data (decompress it first, e.g. with gdcmconv --raw or dcmdjpeg)"
        )
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in _SUPPORTED_PHOTOMETRIC:
        raise UnsupportedPixelData(
            f"photometric interpretation {photometric or 'missing'} is not handled for burned-in text "
            f"(only {', '.join(_SUPPORTED_PHOTOMETRIC)})"
        )
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if bits not in (8, 16, 32):
        raise UnsupportedPixelData(f"{bits}-bit allocated pixel data is not handled for burned-in text")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != (1 if photometric.startswith("MONOCHROME") else 3):
        raise UnsupportedPixelData(f"{samples} samples per pixel do not fit {photometric}")
    little = syntax.is_little_endian if syntax is not None else ds.is_little_endian is not False
    dtype = np.dtype(f"{'<' if little else '>'}u{bits // 8}")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    rows, cols = int(ds.Rows), int(ds.Columns)
    nbytes = frames * rows * cols * samples * dtype.itemsize
    if len(ds.PixelData) < nbytes:
        raise UnsupportedPixelData("pixel data is shorter than its rows, columns, frames and bits say")
    planar = int(ds.get("PlanarConfiguration", 0) or 0) if samples == 3 else 0
    return _Layout(frames, rows, cols, samples, planar, photometric, dtype, nbytes)


def _decoded_frames(ds: pydicom.Dataset, layout: _Layout) -> np.ndarray:
    """All frames as stored values, ``(frames, rows, cols)`` or ``(frames, rows, cols, 3)``."""
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom's errors name no PHI; the caller quarantines the file
        raise UnsupportedPixelData(f"pixel data could not be decoded ({type(exc).__name__})") from exc
    return pixels[np.newaxis] if layout.frames == 1 else pixels


def _shown(frame: np.ndarray, photometric: str) -> np.ndarray:
    """A frame as a reader sees it, for OCR: RGB for colour, MONOCHROME1 inverted."""
    if photometric == "YBR_FULL":
        from pydicom.pixel_data_handlers.util import convert_color_space

        return convert_color_space(frame, "YBR_FULL", "RGB")
    if photometric == "MONOCHROME1":
        return frame.max() - frame.astype(np.float64)
    return frame


def _ocr_frame_indices(frames: int, count: int | None) -> list[int]:
    if count is None or count >= frames:
        return list(range(frames))
    return sorted({int(round(i)) for i in np.linspace(0, frames - 1, max(count, 1))})


def _pad(box: Box, pad: int, rows: int, cols: int) -> Box:
    x0, y0, x1, y1 = box
    return max(x0 - pad, 0), max(y0 - pad, 0), min(x1 + pad, cols), min(y1 + pad, rows)


def _distinct(regions: Sequence[Box]) -> list[Box]:
    """Drop regions contained in another (the same overlay found again in another frame)."""
    ordered = sorted(set(regions), key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)
    kept: list[Box] = []
    for box in ordered:
        if not any(k[0] <= box[0] and k[1] <= box[1] and k[2] >= box[2] and k[3] >= box[3] for k in kept):
            kept.append(box)
    return sorted(kept, key=lambda b: (b[1], b[0]))


def blank_burned_in_text(
    ds: pydicom.Dataset,
    identifiers: Iterable[str] = (),
    policy: Policy = "identifiers",
    *,
    ocr_frames: int | None = OCR_FRAMES,
    pad: int = BOX_PAD,
) -> BurnedInResult:
    """Find burned-in text in ``ds``'s pixels and blank, in place, the boxes that identify.

    Args:
        ds: an instance with uncompressed Pixel Data (single- or multi-frame; MONOCHROME1/2, RGB or
            YBR_FULL; 8, 16 or 32 bits allocated). Only Pixel Data changes, and only inside the boxes.
        identifiers: this header's identifying values (see ``header_identifiers``).
        policy: ``"identifiers"`` blanks boxes whose text is ``identifier_like``; ``"all"`` blanks every
            box (for instances whose header says Burned In Annotation YES).
        ocr_frames: how many evenly spaced frames of a multi-frame image to OCR (``None``: all); the
            union of their boxes is blanked in every frame (the overlay is taken to be static).
        pad: pixels added around each box.

    Raises:
        UnsupportedPixelData: compressed or otherwise unhandled pixel data (nothing is changed).
    """
    if policy not in ("identifiers", "all"):
        raise ValueError(f"policy must be 'identifiers' or 'all', not {policy!r}")
    layout = _layout(ds)
    matcher = _matcher(tuple(str(v) for v in identifiers if v is not None))
    decoded = _decoded_frames(ds, layout)
    indices = _ocr_frame_indices(layout.frames, ocr_frames)

    found = blanked_texts = 0
    regions: list[Box] = []
    for index in indices:
        for text_box in find_text(_shown(decoded[index], layout.photometric)):
            found += 1
            if policy == "all" or matcher(text_box.text):
                blanked_texts += 1
                regions.append(_pad(text_box.box, pad, layout.rows, layout.cols))
    regions = _distinct(regions)
    if regions:
        _write_regions(ds, layout, decoded, regions)
    return BurnedInResult(
        boxes_found=found, boxes_blanked=len(regions), frames=layout.frames, texts_blanked_count=blanked_texts,
        frames_ocr=len(indices), regions=tuple(regions),
    )  # fmt: skip


def _write_regions(ds: pydicom.Dataset, layout: _Layout, decoded: np.ndarray, regions: Sequence[Box]) -> None:
    """Overwrite the regions in every frame, in the stored words themselves, and store them back.

    Working on the raw words (not a re-encoded ``pixel_array``) keeps every other byte identical,
    including unused high bits and a trailing pad byte, and needs no knowledge of sign or rescale.
    """
    data = bytes(ds.PixelData)
    raw = np.frombuffer(bytearray(data[: layout.nbytes]), dtype=layout.dtype)
    f, r, c = layout.frames, layout.rows, layout.cols
    if layout.samples == 1:
        raw = raw.reshape(f, r, c)
        # The frame's darkest pixel as shown (MONOCHROME1 shows its largest value darkest), copied as
        # stored so that bit depth, sign and unused bits stay as they are.
        pick = np.argmax if layout.photometric == "MONOCHROME1" else np.argmin
        for k in range(f):
            fill = raw[k].reshape(-1)[int(pick(decoded[k]))]
            for x0, y0, x1, y1 in regions:
                raw[k, y0:y1, x0:x1] = fill
    else:
        # Black: RGB (0, 0, 0); YBR_FULL Y=0 with neutral chroma (half the range).
        half = 1 << (int(ds.get("BitsStored", layout.dtype.itemsize * 8)) - 1)
        black = np.array([0, 0, 0] if layout.photometric == "RGB" else [0, half, half], dtype=layout.dtype)
        if layout.planar == 0:
            raw = raw.reshape(f, r, c, 3)
            for x0, y0, x1, y1 in regions:
                raw[:, y0:y1, x0:x1, :] = black
        else:
            raw = raw.reshape(f, 3, r, c)
            for x0, y0, x1, y1 in regions:
                raw[:, :, y0:y1, x0:x1] = black[np.newaxis, :, np.newaxis, np.newaxis]
    ds.PixelData = raw.tobytes() + data[layout.nbytes :]
