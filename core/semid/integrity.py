"""Is a volume file whole? Truncated or inconsistent NIfTI, NRRD and MetaImage files are refused.

ITK reads a NIfTI whose data stops short, or whose gzip stream is cut, without complaint: the missing
voxels come back as zeros, and a head whose top 48 mm are missing looks like a head to every later
step. ``verify_complete(path)`` reads each format's own header (a few hundred bytes), works out how
many data bytes it promises, and checks that the file holds them: the file size for raw data, the
compressed stream for gzip/zlib data (the gzip trailer's length field when it matches, else the
whole stream decompressed to its end-of-stream marker). It raises ``InputError`` with one sentence.

Written here rather than taken from nibabel or pynrrd because neither checks a gzip stream's end,
and only the data length is needed (ITK still does the reading).
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from semid.errors import InputError

#: NIfTI datatype code -> bytes per voxel (the spec's table; complex and RGB types included).
_NIFTI_BYTES = {2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8,
                1536: 16, 1792: 16, 2048: 32, 2304: 4}
#: NRRD / MetaImage element types -> bytes.
_NRRD_BYTES = {"signed char": 1, "int8": 1, "int8_t": 1, "uchar": 1, "unsigned char": 1, "uint8": 1,
               "uint8_t": 1, "short": 2, "short int": 2, "signed short": 2, "signed short int": 2, "int16": 2,
               "int16_t": 2, "ushort": 2, "unsigned short": 2, "unsigned short int": 2, "uint16": 2,
               "uint16_t": 2, "int": 4, "signed int": 4, "int32": 4, "int32_t": 4, "uint": 4, "unsigned int": 4,
               "uint32": 4, "uint32_t": 4, "longlong": 8, "long long": 8, "long long int": 8,
               "signed long long": 8, "signed long long int": 8, "int64": 8, "int64_t": 8, "ulonglong": 8,
               "unsigned long long": 8, "unsigned long long int": 8, "uint64": 8, "uint64_t": 8,
               "float": 4, "double": 8, "block": 0}
_MET_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
              "MET_DOUBLE": 8}

_CUT = ("The file is incomplete: it holds fewer bytes than its header promises (a cut-off copy or download); "
        "copy or export it again.")
_BAD_GZIP = ("The file's compressed data is cut off or damaged (its compressed stream does not end properly); "
             "copy or export it again.")


def _inconsistent(what: str) -> InputError:
    return InputError(f"The file's header is inconsistent ({what}); export the volume again.")


def verify_complete(path: str | Path) -> None:
    """Raise ``InputError`` unless the NIfTI/NRRD/MHA/MHD file at ``path`` holds all the data its header
    promises and the header's sizes and spacings are usable. Other formats pass unchecked.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        _verify_nifti(path, name.endswith(".gz"))
    elif name.endswith((".nrrd", ".nhdr")):
        _verify_nrrd(path)
    elif name.endswith((".mha", ".mhd")):
        _verify_metaimage(path)


# ---------------------------------------------------------------------------------------------- gzip


def _gzip_length(path: Path, offset: int = 0, promised: int | None = None) -> int:
    """Uncompressed length of the gzip data that starts ``offset`` bytes into ``path``.

    The gzip trailer stores the last member's length modulo 2**32: when it equals ``promised`` (the
    length the header asks for), the stream is whole up to a 1 in 2**32 chance; otherwise the stream is
    decompressed to its end (several members included). Raises ``InputError`` if it is cut or damaged.
    """
    size = path.stat().st_size
    if promised is not None and size - offset >= 18:
        with open(path, "rb") as fh:
            fh.seek(size - 4)
            (isize,) = struct.unpack("<I", fh.read(4))
        if isize == promised % (1 << 32) and promised < (1 << 32):
            return promised
    total = 0
    try:
        with open(path, "rb") as raw:
            raw.seek(offset)
            with gzip.GzipFile(fileobj=raw) as fh:
                while chunk := fh.read(1 << 22):
                    total += len(chunk)
    except (EOFError, OSError, zlib.error):
        raise InputError(_BAD_GZIP) from None
    return total


def _zlib_length(path: Path, offset: int) -> int:
    """Uncompressed length of the zlib stream from ``offset`` (MetaImage's CompressedData); cut: ``InputError``."""
    stream = zlib.decompressobj()
    total = 0
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            while chunk := fh.read(1 << 22):
                total += len(stream.decompress(chunk))
                if stream.eof:
                    break
            total += len(stream.flush())
    except zlib.error:
        raise InputError(_BAD_GZIP) from None
    if not stream.eof:
        raise InputError(_BAD_GZIP)
    return total


# --------------------------------------------------------------------------------------------- NIfTI


def _read_head(path: Path, compressed: bool, n: int) -> bytes:
    try:
        if compressed:
            with gzip.open(path, "rb") as fh:
                return fh.read(n)
        with open(path, "rb") as fh:
            return fh.read(n)
    except (EOFError, OSError, zlib.error):
        raise InputError(_BAD_GZIP) from None


def _verify_nifti(path: Path, compressed: bool) -> None:
    with open(path, "rb") as fh:
        if compressed and fh.read(2) != b"\x1f\x8b":
            return  # not gzip at all (a misnamed file): the reader says it is not an image
    head = _read_head(path, compressed, 544)
    if len(head) < 348:
        raise InputError(_CUT)
    # NIfTI-1 (348-byte header) or NIfTI-2 (540), either byte order
    for endian in "<>":
        (sizeof_hdr,) = struct.unpack(endian + "i", head[:4])
        if sizeof_hdr in (348, 540):
            break
    else:
        return  # not a NIfTI header ITK would read as one: ITK's own reader says so
    if sizeof_hdr == 348:
        dims = struct.unpack(endian + "8h", head[40:56])
        datatype, bitpix = struct.unpack(endian + "hh", head[70:74])
        pixdim = struct.unpack(endian + "8f", head[76:108])
        (vox_offset,) = struct.unpack(endian + "f", head[108:112])
    else:
        if len(head) < 540:
            raise InputError(_CUT)
        datatype, bitpix = struct.unpack(endian + "hh", head[12:16])
        dims = struct.unpack(endian + "8q", head[16:80])
        pixdim = struct.unpack(endian + "8d", head[104:168])
        (vox_offset,) = struct.unpack(endian + "q", head[168:176])
    ndim = int(dims[0])
    if not 1 <= ndim <= 7:
        raise _inconsistent(f"{ndim} dimensions")
    sizes = [int(d) for d in dims[1:ndim + 1]]
    if any(s < 1 for s in sizes):
        raise _inconsistent("a dimension of size 0 or less")
    spacing = [float(p) for p in pixdim[1:min(ndim, 3) + 1]]
    if not all(np.isfinite(s) and s != 0.0 for s in spacing):
        raise _inconsistent("a voxel size of 0 or not a number")
    per_voxel = _NIFTI_BYTES.get(int(datatype), max(int(bitpix), 0) // 8)
    if per_voxel <= 0:
        raise _inconsistent("an unknown data type")
    offset = int(vox_offset) if vox_offset >= sizeof_hdr else sizeof_hdr + 4 if sizeof_hdr == 348 else 544
    promised = offset + int(np.prod(sizes, dtype=np.int64)) * per_voxel
    held = _gzip_length(path, 0, promised) if compressed else path.stat().st_size
    if held < promised:
        raise InputError(_CUT)


# ---------------------------------------------------------------------------------------------- NRRD


def _text_header(path: Path, limit: int = 1 << 16) -> tuple[list[str], int]:
    """Header lines of a NRRD/MetaImage file (up to the blank line, or the ``ElementDataFile`` line) and the
    byte offset where the data starts."""
    with open(path, "rb") as fh:
        raw = fh.read(limit)
    lines, offset = [], 0
    for line in raw.split(b"\n"):
        offset += len(line) + 1
        text = line.decode("latin-1").rstrip("\r")
        if not text.strip():
            break
        lines.append(text)
        if text.split("=")[0].strip() == "ElementDataFile":
            break
    return lines, min(offset, path.stat().st_size)


def _verify_nrrd(path: Path) -> None:
    lines, offset = _text_header(path)
    if not lines or not lines[0].startswith("NRRD"):
        return
    fields = {}
    for line in lines[1:]:
        if line.startswith("#") or ":" not in line:
            continue
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.lstrip("=").strip()
    try:
        sizes = [int(v) for v in fields.get("sizes", "").split()]
    except ValueError:
        raise _inconsistent("sizes that are not whole numbers") from None
    if not sizes or any(s < 1 for s in sizes):
        raise _inconsistent("a dimension of size 0 or less")
    per_voxel = _NRRD_BYTES.get(fields.get("type", "").lower())
    encoding = fields.get("encoding", "raw").lower()
    if per_voxel is None or encoding not in ("raw", "gzip", "gz"):
        return  # text, hex, bzip2, block data: ITK checks these while parsing
    promised = int(np.prod(sizes, dtype=np.int64)) * per_voxel
    data_file = fields.get("data file") or fields.get("datafile")
    if data_file:
        if data_file.split()[0].upper() == "LIST" or "%" in data_file:
            return  # several data files: ITK reads and checks each
        data_path = (path.parent / data_file).resolve()
        if not data_path.is_file():
            raise InputError("The header's data file is missing beside it: copy the header together with its data.")
        path, offset = data_path, 0
    skip = int(fields.get("byte skip", "0") or 0)
    if encoding == "raw":
        held = path.stat().st_size - offset - max(skip, 0)
    else:
        held = _gzip_length(path, offset, promised) - max(skip, 0)
    if skip >= 0 and held < promised:
        raise InputError(_CUT)


# ----------------------------------------------------------------------------------------- MetaImage


def _verify_metaimage(path: Path) -> None:
    lines, offset = _text_header(path)
    fields = {}
    for line in lines:
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    if "DimSize" not in fields:
        return
    try:
        sizes = [int(v) for v in fields["DimSize"].split()]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
    except ValueError:
        raise _inconsistent("sizes that are not whole numbers") from None
    if any(s < 1 for s in sizes):
        raise _inconsistent("a dimension of size 0 or less")
    per_voxel = _MET_BYTES.get(fields.get("ElementType", ""))
    data_file = fields.get("ElementDataFile", "LOCAL")
    if per_voxel is None:
        return
    promised = int(np.prod(sizes, dtype=np.int64)) * per_voxel * channels
    if data_file.upper() != "LOCAL":
        if data_file.upper().startswith("LIST") or "%" in data_file:
            return
        data_path = (path.parent / data_file).resolve()
        if not data_path.is_file():
            raise InputError("The header's data file is missing beside it: copy the header together with its data.")
        path, offset = data_path, 0
    compressed = fields.get("CompressedData", "False").lower() == "true"
    held = _zlib_length(path, offset) if compressed else path.stat().st_size - offset
    if held < promised:
        raise InputError(_CUT)
