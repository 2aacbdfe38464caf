"""The benchmark's de-identifiers behind one interface: SemID and the baselines it is compared with.

``get_method(name).run(image, level)`` returns a ``DeidResult(image, mask, record)`` for every method:
the output has the input's geometry and pixel type, ``mask`` (uint8) marks what the method blocked or
removed, and ``record`` holds at least ``method``, ``level`` (None for methods without a level),
``blocked_ml`` and ``timings_s`` (with ``total``).

Levelled methods reuse SemID's identity map and its nested blocked region ``B_p`` (the same region for
every method at a level ``p``) and differ only in what they put there (``semid.pipeline.Fill``):

- ``semid``: SemID's learned compensation (``semid.compensation.LearnedFill``: the generator draws
  SemID's default face with the medicine of the decoupled encoder features in it);
- ``semid-surface``: SemID's plain fill (a featureless head surface, no learned part);
- ``block``: ``B_p`` set to air, no compensation;
- ``blur``: the volume blurred with a Gaussian, copied into ``B_p`` only;
- ``pixelate``: block means of ~8 mm cubes, copied into ``B_p`` only.

Methods without a level (the bench runs them once):

- ``cut``: pydeface-style: pydeface's average head registered to the subject (SemID's atlas fit: the
  atlas is built on that same head, so its transform carries pydeface's face mask) and the voxels
  under its face mask set to zero;
- ``quickshear``: PyPI ``quickshear`` (Schimke & Hale 2011) with the brain mask of SemID's atlas fit;
- ``radveil``: PyPI ``radveil`` (render, detect the face, deface, verify), run in memory, offline.

The head location (head mask and atlas registration, ~3 s on a 2 mm head on 2 cores) does not depend
on the level or the method; it is kept for the last few volumes seen (``locate``), which also makes
every method at a level block exactly the same ``B_p``.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import SimpleITK as sitk

from semid.errors import InputError
from semid.io import MODALITY_KEY, modality_of, require_3d_scalar
from semid.pipeline import (
    Deidentifier,
    DeidResult,
    Fill,
    FillContext,
    Location,
    SurfaceFill,
    _cast_like,
    make_fill,
    parse_level,
)

#: Gaussian sigma (mm) of ``blur``. The features a face is recognised by (nose bridge and tip, eyelids,
#: lips) are 5-15 mm across; sigma 6 mm (FWHM ~14 mm) smooths them away while the head's outline stays,
#: which is what a "blur the face" baseline is meant to do. Much less leaves a recognisable surface.
BLUR_SIGMA_MM = 6.0
#: Edge (mm) of the cubes ``pixelate`` averages over: the scale of the same facial features.
PIXEL_MM = 8.0
#: Air in Hounsfield units (CT background).
CT_AIR_HU = -1000.0
#: quickshear's buffer between the brain mask's hull and the shearing plane, in voxels (its default).
QUICKSHEAR_BUFFER_VOXELS = 10
#: How many volumes' head locations are kept (a few MB each at most: a 2 mm head mask and an affine);
#: enough for a benchmark that runs every case through one method and level before the next.
LOCATION_CACHE_SIZE = 64

__all__ = ["METHODS", "Method", "get_method", "locate", "cached_location", "clear_location_cache", "sitk_to_nifti",
           "nifti_to_sitk", "background_value"]


class Method(Protocol):
    """One de-identifier as the benchmark calls it."""

    name: str
    levelled: bool

    def run(self, image: sitk.Image, level: float) -> DeidResult: ...


# ---------------------------------------------------------------------------------- location cache

_LOCATIONS: OrderedDict[tuple, Location] = OrderedDict()


def _image_key(image: sitk.Image) -> tuple:
    digest = hashlib.blake2b(sitk.GetArrayViewFromImage(image).tobytes(), digest_size=16).hexdigest()
    return (digest, image.GetPixelIDValue(), image.GetSize(), image.GetSpacing(), image.GetOrigin(),
            image.GetDirection(), modality_of(image))


def locate(image: sitk.Image, atlas_dir: Path | None = None) -> tuple[Location, bool]:
    """SemID's head location (head mask + atlas registration) of ``image``, and whether it was cached.

    Raises:
        InputError: not a head with a face (see ``Deidentifier.locate``).
    """
    key = (_image_key(image), str(atlas_dir))
    if key in _LOCATIONS:
        _LOCATIONS.move_to_end(key)
        return _LOCATIONS[key], True
    location = Deidentifier(1.0, atlas_dir=atlas_dir).locate(image)
    _LOCATIONS[key] = location
    while len(_LOCATIONS) > LOCATION_CACHE_SIZE:
        _LOCATIONS.popitem(last=False)
    return location, False


def cached_location(image: sitk.Image, atlas_dir: Path | None = None) -> Location | None:
    """The kept head location of ``image``, or None (never registers)."""
    return _LOCATIONS.get((_image_key(image), str(atlas_dir)))


def clear_location_cache() -> None:
    """Forget the kept head locations (e.g. to time a method from scratch)."""
    _LOCATIONS.clear()


# ------------------------------------------------------------------------------------------ fills


def background_value(image: sitk.Image, modality: str) -> float:
    """Air: -1000 HU for CT (within the volume's range), the volume's minimum for MR."""
    stats = sitk.StatisticsImageFilter()
    stats.Execute(image)
    if modality == "CT":
        return float(np.clip(CT_AIR_HU, stats.GetMinimum(), stats.GetMaximum()))
    return float(stats.GetMinimum())


@dataclass
class BlockFill:
    """``B_p`` set to air (the background), nothing put back."""

    name: str = "block"
    description: str = "SemID's B_p set to air (background), no compensation"

    def __call__(self, ctx: FillContext) -> np.ndarray:
        value = background_value(ctx.image, ctx.modality)
        return _cast_like(np.full(ctx.roi_arr.shape, value, dtype=np.float64), ctx.roi_arr.dtype)


@dataclass
class BlurFill:
    """The volume blurred with a Gaussian of ``sigma_mm``; only ``B_p`` is taken from it."""

    sigma_mm: float = BLUR_SIGMA_MM
    name: str = "blur"

    @property
    def description(self) -> str:
        return f"SemID's B_p replaced by a Gaussian blur (sigma {self.sigma_mm:g} mm) of the volume"

    def __call__(self, ctx: FillContext) -> np.ndarray:
        # Blur a box 3 sigma larger than the ROI, so the ROI's edges see the real neighbourhood.
        image = ctx.image
        size = np.array(image.GetSize())
        start = np.array([s.start for s in ctx.roi_slices[::-1]])
        stop = np.array([s.stop for s in ctx.roi_slices[::-1]])
        pad = np.ceil(3.0 * self.sigma_mm / np.array(image.GetSpacing())).astype(int)
        lo, hi = np.maximum(start - pad, 0), np.minimum(stop + pad, size)
        box = sitk.RegionOfInterest(image, (hi - lo).tolist(), lo.tolist())
        blurred = sitk.GetArrayFromImage(
            sitk.SmoothingRecursiveGaussian(sitk.Cast(box, sitk.sitkFloat32), self.sigma_mm))
        inner = tuple(slice(a, b) for a, b in zip((start - lo)[::-1], (stop - lo)[::-1], strict=True))
        return _cast_like(blurred[inner], ctx.roi_arr.dtype)


@dataclass
class PixelateFill:
    """Means over cubes of ~``cube_mm`` (coarse downsample, nearest-neighbour upsample); only ``B_p`` taken."""

    cube_mm: float = PIXEL_MM
    name: str = "pixelate"

    @property
    def description(self) -> str:
        return f"SemID's B_p replaced by block means of {self.cube_mm:g} mm cubes (pixelation)"

    def __call__(self, ctx: FillContext) -> np.ndarray:
        spacing_zyx = np.array(ctx.image.GetSpacing())[::-1]
        block = [max(1, int(round(self.cube_mm / s))) for s in spacing_zyx]
        return _cast_like(block_means(ctx.roi_arr, block), ctx.roi_arr.dtype)


def block_means(values: np.ndarray, block: list[int]) -> np.ndarray:
    """Each voxel replaced by the mean of its ``block``-sized cell (cells from index 0; last ones may be
    smaller). A box mean is separable, so it is taken one axis at a time."""
    out = values.astype(np.float64)
    for axis, b in enumerate(block):
        n = out.shape[axis]
        starts = np.arange(0, n, b)
        counts = np.diff(np.append(starts, n))
        shape = [1] * out.ndim
        shape[axis] = -1
        means = np.add.reduceat(out, starts, axis=axis) / counts.reshape(shape)
        out = np.repeat(means, counts, axis=axis)
    return out


# -------------------------------------------------------------------------------------- the methods


def _result(image: sitk.Image, out: np.ndarray, mask: np.ndarray, record: dict) -> DeidResult:
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(image)
    result.SetMetaData(MODALITY_KEY, modality_of(image))
    mask_img = sitk.GetImageFromArray(mask.astype(np.uint8))
    mask_img.CopyInformation(image)
    return DeidResult(result, mask_img, record)


def _outcome(image: sitk.Image, out: np.ndarray, mask: np.ndarray, location: Location | None) -> dict:
    """Volumes and counts every non-levelled method reports (brain from SemID's atlas fit, when known)."""
    arr = sitk.GetArrayViewFromImage(image)
    changed = out != arr
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    extra: dict = {
        "blocked_voxels": int(mask.sum()),
        "blocked_ml": round(float(mask.sum()) * voxel_ml, 3),
        "voxels_changed": int(changed.sum()),
        "voxels_changed_outside_block": int((changed & (mask == 0)).sum()),
        "pixel_type": image.GetPixelIDTypeAsString(),
        "brain_voxels_changed": None,
    }
    if location is not None:
        brain = _atlas_brain(image, location)
        extra["brain_voxels_changed"] = int((changed & brain).sum())
    return extra


def _atlas_brain(image: sitk.Image, location: Location) -> np.ndarray:
    """SemID's atlas brain (MNI152 grey + white matter) on the subject's grid, through the atlas fit."""
    brain = sitk.Resample(location.atlas.brain, image, location.to_atlas, sitk.sitkNearestNeighbor, 0,
                          sitk.sitkUInt8)
    return sitk.GetArrayFromImage(brain) > 0


@dataclass
class LevelledMethod:
    """SemID's identity map and nested ``B_p``, with ``fill`` deciding what goes into ``B_p``."""

    name: str
    fill: Fill = field(default_factory=SurfaceFill)
    levelled: bool = True
    atlas_dir: Path | None = None
    seed: int = 0

    def run(self, image: sitk.Image, level: float | str) -> DeidResult:
        start = time.perf_counter()
        level = parse_level(level)
        image = require_3d_scalar(image)
        location, cached = (None, False) if level == 0.0 else locate(image, self.atlas_dir)
        deid = Deidentifier(level, atlas_dir=self.atlas_dir, seed=self.seed, fill=self.fill)
        result = deid.run(image, location=location)
        record = dict(result.record)
        record["method_description"] = record.get("method")
        record["method"] = self.name
        timings = dict(record.get("timings_s", {}))
        timings["total"] = round(time.perf_counter() - start, 3)
        record["timings_s"] = timings
        record["location_cached"] = cached
        return DeidResult(result.image, result.mask, record)


@dataclass
class CutMethod:
    """pydeface-style cut: pydeface's face mask brought onto the subject and the voxels under it zeroed.

    pydeface registers its average head to the subject and multiplies the volume by its face mask
    (1 = kept, 0 = face). SemID's atlas is built on that same average head, so the atlas fit carries the
    face mask (``templates/mean_head_facemask.nii.gz``) onto the subject. Like pydeface, removed voxels
    are set to 0 (on CT that is water, not air: pydeface's behaviour, kept). ``mask`` = removed voxels.
    """

    name: str = "cut"
    levelled: bool = False
    atlas_dir: Path | None = None

    def run(self, image: sitk.Image, level: float | None = None) -> DeidResult:
        start = time.perf_counter()
        image = require_3d_scalar(image)
        location, cached = locate(image, self.atlas_dir)
        keep = sitk.Resample(_facemask(), image, location.to_atlas, sitk.sitkNearestNeighbor, 1.0,
                             sitk.sitkUInt8)
        removed = sitk.GetArrayFromImage(keep) == 0
        out = np.array(sitk.GetArrayViewFromImage(image), copy=True)
        out[removed] = 0
        total = round(time.perf_counter() - start, 3)
        record = {"method": self.name, "level": None,
                  "method_description": "pydeface face mask through SemID's atlas fit, face set to 0",
                  **_outcome(image, out, removed, location),
                  "timings_s": {**location.timings, "total": total}, "location_cached": cached}
        return _result(image, out, removed, record)


_FACEMASK: dict[str, sitk.Image] = {}


def _facemask() -> sitk.Image:
    from semid.data import data_file

    path = str(data_file("templates/mean_head_facemask.nii.gz"))
    if path not in _FACEMASK:
        _FACEMASK[path] = sitk.ReadImage(path, sitk.sitkFloat32)
    return _FACEMASK[path]


@dataclass
class QuickshearMethod:
    """PyPI ``quickshear`` 1.2.0: everything on the face's side of a plane tangent to the brain mask's hull
    (shifted ``buffer`` voxels away) is set to 0.

    Brain mask: SemID's atlas brain (MNI152 grey + white matter, as used by the pipeline) resampled onto
    the subject through SemID's affine atlas fit; not a skull-stripping of the subject. ``mask`` = the
    sheared region (the voxels quickshear sets to 0).
    """

    name: str = "quickshear"
    levelled: bool = False
    atlas_dir: Path | None = None
    buffer: int = QUICKSHEAR_BUFFER_VOXELS

    def run(self, image: sitk.Image, level: float | None = None) -> DeidResult:
        import quickshear

        start = time.perf_counter()
        image = require_3d_scalar(image)
        location, cached = locate(image, self.atlas_dir)
        brain = sitk.Resample(location.atlas.brain, image, location.to_atlas, sitk.sitkNearestNeighbor, 0,
                              sitk.sitkUInt8)
        brain_nii = sitk_to_nifti(brain)
        out_img = nifti_to_sitk(quickshear.quickshear(sitk_to_nifti(image), brain_nii, buff=self.buffer), image)
        # the sheared region itself: quickshear applied to a volume of ones
        ones = sitk.Cast(sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1, sitk.sitkUInt8)
        ones.CopyInformation(image)
        kept = nifti_to_sitk(quickshear.quickshear(sitk_to_nifti(ones), brain_nii, buff=self.buffer), image)
        removed = sitk.GetArrayFromImage(kept) == 0
        out = sitk.GetArrayFromImage(out_img)
        total = round(time.perf_counter() - start, 3)
        record = {"method": self.name, "level": None,
                  "method_description": f"quickshear 1.2.0 (buffer {self.buffer} voxels), brain mask from "
                                        "SemID's atlas fit",
                  **_outcome(image, out, removed, location),
                  "timings_s": {**location.timings, "total": total}, "location_cached": cached}
        return _result(image, out, removed, record)


@dataclass
class RadVeilMethod:
    """PyPI ``radveil`` 0.1.1, in memory: render the head, find the face with its built-in MediaPipe
    models (embedded in its Rust library: nothing is downloaded), deface ``region`` with ``mode``,
    re-render and verify. ``mask`` = voxels it changed. It refuses (``RuntimeError``) a volume in which
    it finds no face; that is re-raised as an ``InputError`` naming radveil. ``brain_voxels_changed``
    is counted against SemID's atlas brain only when SemID has located the volume already (``locate``),
    else None: radveil's own run registers nothing.
    """

    name: str = "radveil"
    levelled: bool = False
    mode: str = "adaptive"
    region: str = "face+ears"

    def run(self, image: sitk.Image, level: float | None = None) -> DeidResult:
        import nibabel as nib
        import radveil

        start = time.perf_counter()
        image = require_3d_scalar(image)
        vol = radveil.Volume.from_bytes(sitk_to_nifti(image).to_bytes())
        try:
            report = radveil.deface_volume(vol, mode=self.mode, region=self.region, detector="mediapipe",
                                           return_mask=True)
        except RuntimeError as error:
            raise InputError(f"radveil refused the volume: {error}") from error
        out_img = nifti_to_sitk(nib.Nifti1Image.from_bytes(vol.to_bytes(gzip_level=None)), image)
        out = sitk.GetArrayFromImage(out_img)
        changed = out != sitk.GetArrayViewFromImage(image)
        total = round(time.perf_counter() - start, 3)
        region_mask = report.get("mask")
        # radveil needs no registration: the atlas brain is counted only if SemID located this volume already
        location = cached_location(image)
        record = {"method": self.name, "level": None,
                  "method_description": f"radveil {radveil.__version__} deface_volume(mode={self.mode!r}, "
                                        f"region={self.region!r}), built-in MediaPipe detector",
                  **_outcome(image, out, changed, location),
                  "radveil_region_voxels": None if region_mask is None else int(np.count_nonzero(region_mask)),
                  "radveil_residual_detections": report.get("residual_detections"),
                  "radveil_escalated_to_block": report.get("escalated_to_block"),
                  "timings_s": {"total": total}}
        return _result(image, out, changed, record)


# ------------------------------------------------------------------------------- NIfTI <-> SimpleITK

_LPS_RAS = np.diag([-1.0, -1.0, 1.0])


def sitk_to_nifti(image: sitk.Image):
    """A nibabel ``Nifti1Image`` with the same voxels and world geometry (ITK's LPS -> NIfTI's RAS).

    The array is transposed from SimpleITK's (z, y, x) to NIfTI's (i, j, k); the pixel type is kept.
    """
    import nibabel as nib

    arr = np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0))
    direction = np.array(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _LPS_RAS @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = _LPS_RAS @ np.array(image.GetOrigin())
    nii = nib.Nifti1Image(arr, affine)
    nii.set_sform(affine, code=1)
    nii.set_qform(affine, code=1)
    nii.header.set_xyzt_units("mm")
    return nii


def nifti_to_sitk(nii, reference: sitk.Image | None = None, atol_mm: float = 1e-3) -> sitk.Image:
    """A nibabel image as SimpleITK (NIfTI's RAS -> ITK's LPS), voxels cast to ``reference``'s pixel type.

    With ``reference``, the geometry must match it (within ``atol_mm``: NIfTI headers store it in
    float32) and is then copied from it exactly.
    """
    arr = np.asanyarray(nii.dataobj)
    affine = np.asarray(nii.affine, dtype=np.float64)
    lps = _LPS_RAS @ affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    direction = lps / spacing
    origin = _LPS_RAS @ affine[:3, 3]
    if reference is not None:
        ref_dtype = sitk.GetArrayViewFromImage(reference).dtype
        if arr.dtype != ref_dtype:
            arr = _cast_like(arr, ref_dtype)
    image = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
    if reference is None:
        image.SetSpacing(spacing.tolist())
        image.SetDirection(direction.ravel().tolist())
        image.SetOrigin(origin.tolist())
        return image
    ok = (image.GetSize() == reference.GetSize()
          and np.allclose(spacing, reference.GetSpacing(), atol=atol_mm)
          and np.allclose(origin, reference.GetOrigin(), atol=atol_mm)
          and np.allclose(direction.ravel(), reference.GetDirection(), atol=atol_mm))
    if not ok:
        raise ValueError("the NIfTI image's grid does not match the reference volume's")
    image.CopyInformation(reference)
    return image


# ----------------------------------------------------------------------------------------- registry


def _radveil() -> Method:
    try:
        import radveil  # noqa: F401
    except ImportError as error:
        raise RuntimeError("radveil is not installed: pip install radveil==0.1.1 (see the Makefile)") from error
    return RadVeilMethod()


def _quickshear() -> Method:
    try:
        import quickshear  # noqa: F401
    except ImportError as error:
        raise RuntimeError("quickshear is not installed: pip install quickshear==1.2.0 (see the Makefile)") from error
    return QuickshearMethod()


METHODS: dict[str, Callable[[], Method]] = {
    "semid": lambda: LevelledMethod("semid", make_fill("learned")),
    "semid-surface": lambda: LevelledMethod("semid-surface", SurfaceFill()),
    "block": lambda: LevelledMethod("block", BlockFill()),
    "blur": lambda: LevelledMethod("blur", BlurFill()),
    "pixelate": lambda: LevelledMethod("pixelate", PixelateFill()),
    "cut": CutMethod,
    "quickshear": _quickshear,
    "radveil": _radveil,
}


def get_method(name: str) -> Method:
    """The method registered as ``name`` (see ``METHODS``).

    Raises:
        ValueError: unknown name (the message lists the known ones).
        RuntimeError: the method's package is not installed.
    """
    factory = METHODS.get(name)
    if factory is None:
        raise ValueError(f"Unknown de-identification method {name!r}: choose one of {', '.join(METHODS)}.")
    return factory()
