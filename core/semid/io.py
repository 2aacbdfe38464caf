"""Volume I/O: NIfTI, NRRD, MHA/MHD and DICOM series folders in and out, geometry kept exactly.

One obvious way: ``read_volume(path) -> SimpleITK.Image`` and ``write_volume(image, path)``. The image
keeps its size, spacing, origin, direction cosines (ITK's LPS world), pixel type and intensity units
(DICOM is read with its rescale slope/intercept applied, so CT stays in Hounsfield units). Nothing is
reoriented on the way out. Writes go to a temporary name beside the target and are renamed when
complete, so an interrupted run never leaves a partial file.

SimpleITK (ITK) does the reading and the NIfTI/NRRD/MHA writing; DICOM series are written with
pydicom because SemID decides every header attribute itself (no source header is copied, so no PHI
can ride along).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from semid.errors import InputError

#: File suffixes read and written by SimpleITK; a path with no suffix (or a folder) means DICOM.
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Metadata key under which the modality ("MR", "CT" or "") travels with an image.
MODALITY_KEY = "semid:modality"

_DICOM_INT_TYPES = {
    sitk.sitkUInt8: np.uint8,
    sitk.sitkInt8: np.int16,
    sitk.sitkUInt16: np.uint16,
    sitk.sitkInt16: np.int16,
}


def volume_suffix(path: str | Path) -> str:
    """The volume suffix of ``path`` (``.nii.gz`` counts as one), or ``""`` for DICOM/folders."""
    name = Path(path).name.lower()
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


def read_volume(path: str | Path) -> sitk.Image:
    """Read a 3D volume from a NIfTI/NRRD/MHA file or a folder holding one DICOM series.

    Returns a SimpleITK image with the file's geometry and pixel type. The modality, when the file
    says it (DICOM), is kept under the ``semid:modality`` metadata key.

    Raises:
        InputError: the path is missing, not a readable image, cut short or inconsistent with its header
            (``semid.integrity``), or not a single 3D scalar volume.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("The input does not exist: check the path and try again.")
    if path.is_dir():
        image = _read_dicom_series(path)
    else:
        if not os.access(path, os.R_OK):
            raise InputError("The input file cannot be read (permission denied): check its permissions.")
        # a file cut short reads in ITK as a volume with zeros where its end should be: refuse it first
        from semid.integrity import verify_complete

        verify_complete(path)
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError:
            raise InputError(
                "The input is not an image SemID can read: give a NIfTI, NRRD or MHA file, "
                "or a folder holding one DICOM series."
            ) from None
        if not image.HasMetaDataKey(MODALITY_KEY):
            modality = image.GetMetaData("0008|0060").strip() if image.HasMetaDataKey("0008|0060") else ""
            image.SetMetaData(MODALITY_KEY, modality)
    return require_3d_scalar(image)


def require_3d_scalar(image: sitk.Image) -> sitk.Image:
    """Return a 3D scalar image or raise ``InputError`` saying why this one is not.

    A 4D image with a single time point is accepted and returned as 3D.
    """
    if image.GetNumberOfComponentsPerPixel() != 1:
        if image.HasMetaDataKey("dim[0]") and image.GetMetaData("dim[0]").strip() in ("4", "5"):
            raise InputError(
                "The image is 4D (a series of volumes); SemID needs one 3D head volume: extract one first."
            )
        raise InputError(
            "The image has colour or vector pixels; SemID needs a grey-scale 3D head volume (CT or MR)."
        )
    dim = image.GetDimension()
    if dim == 4 and image.GetSize()[3] == 1:
        modality = image.GetMetaData(MODALITY_KEY) if image.HasMetaDataKey(MODALITY_KEY) else ""
        image = image[:, :, :, 0]
        image.SetMetaData(MODALITY_KEY, modality)
        dim = 3
    if dim == 2 or (dim == 3 and min(image.GetSize()) < 2):
        raise InputError("The image is 2D (a single slice); SemID needs a 3D head volume.")
    if dim != 3:
        raise InputError(
            f"The image is {dim}D (a series of volumes); SemID needs one 3D head volume: extract one first."
        )
    return image


def _read_dicom_series(folder: Path) -> sitk.Image:
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise InputError(
            "The folder holds no DICOM image series: point to a folder of DICOM files of one series, "
            "or to a NIfTI/NRRD/MHA file."
        )
    if len(series_ids) > 1:
        raise InputError(
            f"The folder holds {len(series_ids)} DICOM series; point to a folder with one series, "
            "or use `semid deidentify-dicom` for whole studies."
        )
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_ids[0])
    if len(files) < 2:
        raise InputError("The DICOM series has a single slice; SemID needs a 3D head volume.")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError:
        raise InputError(
            "The DICOM series cannot be read as one volume (mixed sizes or missing slices): check the files."
        ) from None
    image.SetMetaData(MODALITY_KEY, _dicom_modality(files[0]))
    return image


def _dicom_modality(file: str) -> str:
    import pydicom

    with contextlib.suppress(Exception):
        return str(pydicom.dcmread(file, stop_before_pixels=True, specific_tags=["Modality"]).Modality)
    return ""


def modality_of(image: sitk.Image) -> str:
    """The modality the image's source said ("MR", "CT"), or ``""`` when it did not say."""
    return image.GetMetaData(MODALITY_KEY) if image.HasMetaDataKey(MODALITY_KEY) else ""


def geometry(image: sitk.Image) -> dict:
    """Size, spacing (mm), origin (mm, LPS) and direction cosines (row-major 3x3) of an image."""
    return {
        "size": list(image.GetSize()),
        "spacing": list(image.GetSpacing()),
        "origin": list(image.GetOrigin()),
        "direction": list(image.GetDirection()),
    }


def same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-5) -> bool:
    """True when two images share size and, within ``tol``, spacing, origin and direction."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )


def require_volume_output(path: str | Path) -> None:
    """Refuse an output name SemID would not write as a volume: a file suffix other than .nii.gz, .nii, .nrrd
    or .mha (a name without one, or an existing folder, is a DICOM series folder).

    Raises:
        InputError: with one sentence.
    """
    path = Path(path)
    suffix = volume_suffix(path)
    if suffix in (".mhd", ".nhdr"):  # header + separate raw file: cannot be renamed into place atomically
        raise InputError("Two-file outputs (.mhd, .nhdr) are not supported: write .mha, .nrrd or .nii.gz.")
    if not suffix and path.suffix and not path.is_dir():
        raise InputError(f"The output name ends in {path.suffix!r}, which is not a volume format SemID writes: "
                         "use .nii.gz, .nii, .nrrd or .mha, or a folder name without a suffix for DICOM.")


def check_output_path(out_path: str | Path, in_path: str | Path | None = None) -> Path:
    """Validate an output path before any work is done; return it resolved.

    Raises:
        InputError: OUT equals IN (or lies inside an input DICOM folder), or its folder is not writable.
    """
    out = Path(out_path).expanduser().resolve()
    if in_path is not None:
        src = Path(in_path).expanduser().resolve()
        if out == src or (src.is_dir() and src in out.parents):
            raise InputError(
                "The output would overwrite the input: choose an output path outside the input."
            )
    probe = out.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not _can_create_in(probe):
        raise InputError(
            "The output location is read-only (permission denied): choose a folder you can write to."
        )
    if out.exists() and out.is_dir() and volume_suffix(out):
        raise InputError("The output path is an existing folder: give a file name for the output volume.")
    return out


@contextlib.contextmanager
def atomic_path(target: str | Path, staging: Path | None = None) -> Iterator[Path]:
    """A temporary path to write ``target`` to; renamed onto ``target`` when the block succeeds.

    The temporary file keeps the target's suffix (writers choose the format by it) and lives in
    ``staging`` or, by default, beside the target, on the same file system so the rename is atomic.
    On failure it is removed and the target is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = volume_suffix(target) or target.suffix
    fd, tmp = tempfile.mkstemp(prefix=".semid-", suffix=suffix, dir=staging or target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plain_metadata(obj: Any) -> Any:
    """Metadata as lists, dicts, str and numbers only: what ``torch.load(weights_only=True)`` and JSON read
    (numpy scalars become Python numbers; ``torch.__version__``, a str subclass, becomes a str)."""
    if isinstance(obj, dict):
        return {str(k): plain_metadata(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_metadata(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, str):
        return str(obj)
    return obj


def write_json(data, target: str | Path) -> Path:
    """Write ``data`` as indented JSON to ``target`` atomically."""
    import json

    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    return Path(target)


def _can_create_in(folder: Path) -> bool:
    """Whether a file can be created in ``folder``: tried for real, since ``os.access`` says yes to root
    on read-only mounts and pseudo file systems."""
    if not folder.is_dir():
        return False
    try:
        fd, tmp = tempfile.mkstemp(prefix=".semid-probe-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(tmp)
    return True


def write_volume(image: sitk.Image, path: str | Path, *, series_description: str = "SemID de-identified") -> Path:
    """Write ``image`` to ``path`` atomically: NIfTI/NRRD/MHA by suffix, else a DICOM series folder.

    The file is written under a temporary name in the same folder and renamed when complete.
    DICOM output gets a fresh, PHI-free header (new UIDs, pseudonymous patient) and integer pixels;
    a floating-point volume with non-integer values cannot be stored losslessly as DICOM and is refused.

    Returns:
        The path written.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        raise InputError(
            "The output folder cannot be created (read-only or permission denied): choose another place."
        ) from None
    require_volume_output(path)
    suffix = volume_suffix(path)
    if suffix:
        with atomic_path(path) as tmp:
            if suffix == ".nii.gz":
                _write_nifti_gz(image, tmp)
            else:
                sitk.WriteImage(image, str(tmp), useCompression=suffix in (".nrrd", ".mha"))
        return path
    return _write_dicom_series(image, path, series_description)


#: gzip level of written .nii.gz files: ITK's NIfTI writer ignores the level it is given and compresses at
#: zlib's default (6); level 1 is several times faster for a slightly larger file.
NIFTI_GZIP_LEVEL = 1


def _write_nifti_gz(image: sitk.Image, target: Path) -> None:
    """``image`` as gzip-compressed NIfTI at ``target``: written uncompressed beside it, then gzipped."""
    import gzip

    fd, plain = tempfile.mkstemp(prefix=".semid-", suffix=".nii", dir=target.parent)
    os.close(fd)
    try:
        sitk.WriteImage(image, plain, useCompression=False)
        # no name and no time in the gzip header: the same volume gives the same bytes
        with open(plain, "rb") as src, open(target, "wb") as raw, \
                gzip.GzipFile("", "wb", NIFTI_GZIP_LEVEL, raw, mtime=0) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    finally:
        Path(plain).unlink(missing_ok=True)


def _write_dicom_series(image: sitk.Image, folder: Path, series_description: str) -> Path:
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    arr = sitk.GetArrayViewFromImage(image)  # (z, y, x)
    pixel_id = image.GetPixelID()
    if pixel_id in _DICOM_INT_TYPES:
        stored = np.asarray(arr).astype(_DICOM_INT_TYPES[pixel_id], copy=False)
    else:
        values = np.asarray(arr)
        if not np.all(np.isfinite(values)) or not np.array_equal(values, np.round(values)):
            raise InputError(
                "DICOM stores integer pixels and this volume has fractional values: write NIfTI, NRRD or MHA."
            )
        lo, hi = values.min(), values.max()
        dtype = np.int16 if -32768 <= lo and hi <= 32767 else np.uint16 if lo >= 0 and hi <= 65535 else None
        if dtype is None:
            raise InputError("The volume's values do not fit 16-bit DICOM pixels: write NIfTI, NRRD or MHA.")
        stored = values.astype(dtype)

    modality = modality_of(image) or "OT"
    sop_class = {
        "MR": "1.2.840.10008.5.1.4.1.1.4",
        "CT": "1.2.840.10008.5.1.4.1.1.2",
    }.get(modality, "1.2.840.10008.5.1.4.1.1.7")  # Secondary Capture
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = image.GetSpacing()
    origin = np.array(image.GetOrigin())
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()

    tmp_dir = Path(tempfile.mkdtemp(prefix=".semid-", dir=folder.parent))
    try:
        for k in range(stored.shape[0]):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = sop_class
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
            ds.SOPClassUID = sop_class
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
            ds.Modality = modality
            ds.PatientName, ds.PatientID = "SEMID^ANONYMOUS", "SEMID-ANON"
            ds.PatientIdentityRemoved, ds.DeidentificationMethod = "YES", "SemID"
            ds.SeriesDescription = series_description
            ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
            position = origin + direction @ np.array([0.0, 0.0, k * spacing[2]])
            ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
            ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*direction[:, 0], *direction[:, 1])]
            ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # row spacing, column spacing
            ds.SliceThickness = f"{spacing[2]:.6f}"
            ds.SpacingBetweenSlices = f"{spacing[2]:.6f}"
            ds.Rows, ds.Columns = stored.shape[1], stored.shape[2]
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            bits = stored.dtype.itemsize * 8
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
            ds.PixelRepresentation = 1 if np.issubdtype(stored.dtype, np.signedinteger) else 0
            ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
            ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
            ds.is_little_endian, ds.is_implicit_VR = True, False
            pydicom.dcmwrite(str(tmp_dir / f"IM{k + 1:05d}.dcm"), ds, write_like_original=False)
        if folder.exists():
            if any(folder.iterdir()):
                raise InputError("The output DICOM folder exists and is not empty: choose a new folder.")
            folder.rmdir()
        os.replace(tmp_dir, folder)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return folder
