"""Burned-in text: OCR finds the header's identifiers in real ultrasound pixels, and blanking removes them.

The real images are deid-data's ultrasounds (fetched by `make data`); their identities are test
identities. Assertions are about identifiers taken from each image's own header, never about strings
written here.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from semid.dicom import burnedin
from semid.dicom.burnedin import UnsupportedPixelData, blank_burned_in_text, find_text, header_identifiers

REPO_ROOT = Path(__file__).resolve().parents[1]
_DATA = Path(os.environ.get("SEMID_DATA_DIR") or REPO_ROOT / ".data") / "dicom" / "deid-data"
_DATE = re.compile(r"\d{1,2}\s?[/.\-]\s?\d{1,2}\s?[/.\-]\s?\d{2,4}|\d{4}-\d{1,2}-\d{1,2}")
_LONG_DIGITS = re.compile(r"\d{5,}")


def _real(name: str) -> Path:
    path = _DATA / name
    if not path.is_file():
        pytest.skip(f"deid-data file {name} not found under the data folder: run `make data` first")
    return path


def _norm(text: str) -> str:
    return "".join(c for c in text.upper() if c.isalnum())


def _frames(ds: pydicom.Dataset) -> np.ndarray:
    pixels = ds.pixel_array
    return pixels if int(ds.get("NumberOfFrames", 1) or 1) > 1 else pixels[np.newaxis]


def _ocr_text(ds: pydicom.Dataset, frame: int = 0) -> str:
    """All text the OCR reads in one frame, normalised (upper case, letters and digits only)."""
    return " ".join(box.text for box in find_text(_frames(ds)[frame]))


def _header_tokens(ds: pydicom.Dataset) -> dict[str, set[str]]:
    """Identifier tokens from the header, normalised: name parts (>= 3 characters), IDs, birth date forms."""
    names = set()
    for keyword in ("PatientName", "OtherPatientNames"):
        for part in re.split(r"[\^\s,]+", str(ds.get(keyword, ""))):
            if len(_norm(part)) >= 3:
                names.add(_norm(part))
    ids = {_norm(str(ds.get(k, ""))) for k in ("PatientID", "AccessionNumber")}
    ids = {v for v in ids if len(v) >= 5}
    dates = set()
    birth = str(ds.get("PatientBirthDate", ""))
    if len(birth) == 8:
        y, m, d = birth[:4], birth[4:6], birth[6:]
        dates = {birth, m + d + y, d + m + y, f"{int(m)}{int(d)}{y}", f"{int(d)}{int(m)}{y}"}
    return {"names": names, "ids": ids, "dates": dates}


def _assert_clean(text: str, tokens: dict[str, set[str]]) -> None:
    """No header identifier, date or long digit run in OCR text (the message names no value: PHI)."""
    norm = _norm(text)
    for kind, values in tokens.items():
        assert not any(v in norm for v in values), f"a header {kind} token is still readable"
    assert not _DATE.search(text), "a date is still readable"
    assert not _LONG_DIGITS.search(text.replace(" ", "")), "a run of 5+ digits is still readable"


def _assert_only_regions_changed(before: np.ndarray, after: np.ndarray, regions) -> None:
    mask = np.zeros(before.shape[1:3], dtype=bool)
    for x0, y0, x1, y1 in regions:
        mask[y0:y1, x0:x1] = True
    assert np.array_equal(before[:, ~mask], after[:, ~mask]), "pixels outside the blanked boxes changed"


def _roundtrip(ds: pydicom.Dataset) -> pydicom.Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, write_like_original=False)
    buffer.seek(0)
    back = pydicom.dcmread(buffer)
    assert back.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    assert (back.BitsAllocated, back.BitsStored, back.PhotometricInterpretation) == (
        ds.BitsAllocated, ds.BitsStored, ds.PhotometricInterpretation,
    )  # fmt: skip
    assert np.array_equal(back.pixel_array, ds.pixel_array)
    return back


@pytest.mark.parametrize("name", ["GREYSCALE_IMAGE.dcm", "RGB_IMAGE.dcm"])
def test_real_ultrasound_identifiers_found_then_blanked(name: str) -> None:
    ds = pydicom.dcmread(_real(f"ultrasounds/{name}"))
    tokens = _header_tokens(ds)
    before = _frames(ds).copy()
    text = _ocr_text(ds)
    norm = _norm(text)
    # The burned-in overlay carries the header's identity: name parts, and its birth date or an ID.
    assert any(v in norm for v in tokens["names"]), "OCR did not read the patient's name in the overlay"
    assert any(v in norm for v in tokens["dates"] | tokens["ids"]), "OCR read no birth date or ID of the header"
    assert _DATE.search(text), "OCR read no date in the overlay"
    assert _LONG_DIGITS.search(text.replace(" ", "")), "OCR read no MRN-like digit run"

    result = blank_burned_in_text(ds, header_identifiers(ds))
    assert result.frames == 1 and result.frames_ocr == 1
    assert result.boxes_blanked >= 3 and result.texts_blanked_count >= 3
    assert result.boxes_found > result.texts_blanked_count  # acquisition settings are kept

    after = _frames(ds)
    _assert_clean(_ocr_text(ds), tokens)
    _assert_only_regions_changed(before, after, result.regions)
    back = _roundtrip(ds)
    _assert_clean(_ocr_text(back), tokens)


def test_real_ultrasound_as_ybr_full() -> None:
    """YBR_FULL colour: OCR reads it converted to RGB; blanked pixels are black (Y=0, neutral chroma)."""
    from pydicom.pixel_data_handlers.util import convert_color_space

    ds = pydicom.dcmread(_real("ultrasounds/RGB_IMAGE.dcm"))
    ds.PixelData = convert_color_space(ds.pixel_array, "RGB", "YBR_FULL").tobytes()
    ds.PhotometricInterpretation = "YBR_FULL"
    before = _frames(ds).copy()
    result = blank_burned_in_text(ds, header_identifiers(ds))
    assert result.boxes_blanked >= 3
    after = _frames(ds)
    _assert_only_regions_changed(before, after, result.regions)
    x0, y0, x1, y1 = result.regions[0]
    assert (after[0, y0:y1, x0:x1] == [0, 128, 128]).all()
    _assert_clean(" ".join(b.text for b in find_text(convert_color_space(after[0], "YBR_FULL", "RGB"))),
                  _header_tokens(ds))  # fmt: skip


def test_real_multiframe_cine_static_overlay() -> None:
    """A 30-frame RGB cine (planar configuration 1): 3 frames are read, the union is blanked in all 30."""
    ds = pydicom.dcmread(_real("ultrasounds/ultrasound-multiframe.dcm"))
    before = _frames(ds).copy()
    assert before.shape[0] == 30
    # Its overlay holds acquisition settings only (the identity is cropped off): nothing identifies.
    result = blank_burned_in_text(ds, header_identifiers(ds))
    assert result.frames_ocr == 3 and result.boxes_found > 0
    assert result.boxes_blanked == 0 and np.array_equal(_frames(ds), before)

    # Policy "all" (Burned In Annotation YES): every box, in every frame, including frames not read.
    result = blank_burned_in_text(ds, header_identifiers(ds), policy="all")
    assert result.boxes_blanked >= 10 and result.texts_blanked_count == result.boxes_found
    after = _frames(ds)
    _assert_only_regions_changed(before, after, result.regions)
    for x0, y0, x1, y1 in result.regions:
        assert not after[:, y0:y1, x0:x1].any(), "a blanked region is not black in every frame"
    unread = 7  # not first, middle or last
    read_before = {b.box for b in find_text(before[unread]) if b.score > 0.5}
    read_after = find_text(after[unread])
    assert read_before and not any(b.score > 0.5 and len(b.text) > 1 for b in read_after)
    _roundtrip(ds)


def _synthetic(lines: list[tuple[str, int]], photometric: str = "MONOCHROME2") -> pydicom.Dataset:
    """A 512x512 16-bit (12 stored) frame with noise and text drawn at the display-white value."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=28)  # Pillow's bundled scalable font (needs FreeType)
    except (TypeError, OSError):
        font = ImageFont.truetype("DejaVuSans.ttf", 28)
    canvas = Image.new("L", (512, 512), 0)
    draw = ImageDraw.Draw(canvas)
    for text, y in lines:
        draw.text((20, y), text, fill=255, font=font)
    ink = np.asarray(canvas, dtype=np.float64) / 255.0
    rng = np.random.default_rng(0)
    pixels = rng.integers(100, 900, size=(512, 512)).astype(np.float64)
    pixels = np.round(pixels * (1 - ink) + 4095 * ink).astype(np.uint16)
    if photometric == "MONOCHROME1":
        pixels = (4095 - pixels).astype(np.uint16)

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = "SMITH^CANARY", "1234567"
    ds.Rows = ds.Columns = 512
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    ds.is_little_endian, ds.is_implicit_VR = True, False
    return ds


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_synthetic_canary_found_and_blanked(photometric: str) -> None:
    ds = _synthetic([("CANARY SMITH 1234567", 100), ("AXIAL T1 SPIN ECHO", 300)], photometric)
    before = _frames(ds).copy()
    texts = [_norm(b.text) for b in find_text(before[0] if photometric == "MONOCHROME2" else 4095 - before[0])]
    assert any("CANARY" in t and "1234567" in t for t in texts), "OCR did not read the canary line"

    result = blank_burned_in_text(ds, header_identifiers(ds))
    assert (result.boxes_found, result.boxes_blanked, result.texts_blanked_count) == (2, 1, 1)
    after = _frames(ds)
    _assert_only_regions_changed(before, after, result.regions)
    dark = before[0].max() if photometric == "MONOCHROME1" else before[0].min()
    x0, y0, x1, y1 = result.regions[0]
    assert (after[0, y0:y1, x0:x1] == dark).all()
    shown = after[0] if photometric == "MONOCHROME2" else 4095 - after[0]
    left = _norm(" ".join(b.text for b in find_text(shown)))
    assert "CANARY" not in left and "SMITH" not in left and "1234567" not in left
    assert "AXIAL" in left  # non-identifying text stays with policy "identifiers"
    _roundtrip(ds)

    result = blank_burned_in_text(ds, [], policy="all")
    assert result.boxes_blanked == 1
    assert not [b for b in find_text(_frames(ds)[0]) if b.score > 0.5 and len(b.text) > 1]


def test_compressed_pixel_data_is_refused_without_phi() -> None:
    ds = pydicom.dcmread(_real("humans/ctbrain1.dcm"))
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    data = ds.PixelData
    with pytest.raises(UnsupportedPixelData) as info:
        blank_burned_in_text(ds, header_identifiers(ds))
    message = _norm(str(info.value))
    assert "COMPRESSED" in message
    assert not any(v in message for values in _header_tokens(ds).values() for v in values)
    assert ds.PixelData == data


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ZZZ DOE^JANE 0012", True),  # the header's name (parts), OCR spacing aside
        ("JANEDOE", True),
        ("Smith, John", True),  # "Last, First" shape
        ("DOB:08/29/1951", True),
        ("29-Aug-1951", True),
        ("Aug 29, 1951", True),
        ("1951-08-29", True),
        ("03/02/201705:24:57PM", True),
        ("8:48:26 AM", True),
        ("00079241539", True),  # MRN-like digit run
        ("MRN A12", True),
        ("ID: X7", True),
        ("Name: Q", True),
        ("K9", True),  # a short ID matches as a whole word only
        ("Adv Breast", False),
        ("TIS0.0 MI 0.6", False),
        ("3850Hz", False),
        ("20dB/DR60", False),
        ("75 bpm", False),
        ("K90", False),
        ("Sag Liver L-M", False),
    ],
)
def test_identifier_like(text: str, expected: bool) -> None:
    identifiers = ["DOE^JANE", "K9", "19510829"]
    assert burnedin.identifier_like(text, identifiers) is expected


def test_textbox_repr_hides_text() -> None:
    box = burnedin.TextBox(text="DOE^JANE", box=(0, 0, 1, 1), score=1.0)
    assert "DOE" not in repr(box)


def test_ocr_runs_offline() -> None:
    """The OCR models ship in the wheel: creating the engine and reading a frame opens no socket."""
    script = textwrap.dedent(
        """
        import socket
        def refuse(*args, **kwargs):
            raise RuntimeError("network access attempted")
        socket.socket.connect = refuse
        socket.socket.connect_ex = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        import numpy as np
        from semid.dicom.burnedin import find_text
        frame = np.zeros((64, 256), np.uint8)
        print(len(find_text(frame)))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
