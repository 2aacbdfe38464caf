"""The brain, found in the image itself (DESIGN.md §4 step 1b): what blocking keeps off and the record
counts against.

An atlas brain moved by a registration is the template's brain, not the subject's; on a skull-stripped
volume it said "0 brain voxels changed" while a drawn face covered the frontal lobes. Here the brain
comes from the subject's own voxels:

- **MR** (any weighting): ``deepbet`` (Fisch et al., Comput Biol Med 2024; PyPI, MIT), a brain
  extraction network trained on thousands of real T1w scans, whose TorchScript weights ship inside its
  wheel (nothing is downloaded). Its first network segments the brain on a 128-voxel cube of the whole
  volume (about 2 mm); it is run here on a world-aligned RAS cube of the volume's extent
  (``grids.processing_grid``), so any orientation, voxel size or cropped field of view is seen
  undistorted. deepbet's second, full-resolution network is not run: it costs 3-4 s on two CPU cores,
  and on the real sample head the first network alone agreed with HD-BET (Isensee 2019) at Dice 0.97,
  which a keep-out margin of a few millimetres covers (``benchmarks/real_heads.py`` checks every case of
  the robustness suite against ROBEX or the template's own brain mask). The model file is read straight
  from the wheel with torch: importing the ``deepbet`` package would import pandas and nibabel (1 s).
- **CT** (Hounsfield units, or windowed/rescaled values read by ``semid.intensities``): the intracranial
  space inside the inner table of the skull: tissue voxels (not air, not fat, not bone) from which bone
  lies ahead in all six axis directions, their largest connected part, holes filled. Where the field of
  view cuts the head, its edge counts as bone (what lies beyond it is not known).

``find_brain`` returns a ``Brain`` on its processing grid with the numbers that judge it; whether to
trust it (its volume, its agreement with the atlas brain) is decided by ``semid.triage``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from semid.errors import InputError
from semid.grids import array_image, physical_box, processing_grid, to_grid
from semid.intensities import Values

#: deepbet's first network takes a cube of this many voxels.
DEEPBET_CUBE = 128
#: Spacing (mm) of that cube: the volume's largest extent / 128, kept within these bounds (deepbet saw
#: whole heads of about 256 mm, 1.4-2 mm per voxel, in training).
DEEPBET_SPACING_MM = (1.5, 2.4)
DEEPBET_VERSION = "1.0.2"
#: Spacing (mm) of the CT processing grid.
CT_GRID_MM = 2.0
#: Probability above which a voxel is brain.
BRAIN_PROBABILITY = 0.5


@dataclass
class Brain:
    """The brain found in one volume.

    Attributes:
        mask: uint8 image (1 = brain) on the processing grid (world-aligned RAS, ``spacing_mm``).
        method: which tool found it, in words.
        volume_ml: the brain's volume in ml.
        evidence: measured numbers (JSON-ready).
    """

    mask: sitk.Image
    method: str
    volume_ml: float
    evidence: dict = field(default_factory=dict)
    _distance: sitk.Image | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def spacing_mm(self) -> float:
        return float(self.mask.GetSpacing()[0])

    def array(self) -> np.ndarray:
        """The mask as bool (z, y, x) on its grid."""
        return sitk.GetArrayViewFromImage(self.mask) > 0

    def distance_mm(self) -> sitk.Image:
        """Signed distance (float32 mm, negative inside) to the brain's surface, on the mask's grid.

        ITK measures from voxel centres (0 on the brain's outermost voxels, one spacing on the first voxels
        outside): half a spacing is taken off, so that 0 lies on the surface between them.
        """
        if self._distance is None:  # made once: the triage and the run ask for it several times
            dist = sitk.SignedMaurerDistanceMap(self.mask, insideIsPositive=False, squaredDistance=False,
                                                useImageSpacing=True)
            self._distance = sitk.Cast(dist - 0.5 * self.spacing_mm, sitk.sitkFloat32)
        return self._distance

    def on(self, reference: sitk.Image, margin_mm: float = 0.0) -> np.ndarray:
        """Bool (z, y, x) on ``reference``'s grid: within ``margin_mm`` of the brain (0: the brain itself)."""
        return self.within(reference, (margin_mm,))[0]

    def within(self, reference: sitk.Image, margins_mm: Sequence[float]) -> list[np.ndarray]:
        """``on`` for several margins, from one resampling of the distance."""
        dist = sitk.Resample(self.distance_mm(), reference, sitk.Transform(), sitk.sitkLinear, 1e4,
                             sitk.sitkFloat32)
        return [sitk.GetArrayFromImage(sitk.Less(dist, float(m))).view(bool) for m in margins_mm]


def find_brain(image: sitk.Image, values: Values) -> Brain:
    """The brain of a head volume (MR or CT), or of a skull-stripped one, from its own voxels.

    Raises:
        InputError: MR and deepbet is not installed.
    """
    if values.modality == "CT":
        return ct_brain(image, values)
    return mr_brain(image)


# ------------------------------------------------------------------------------------------------- MR


@functools.lru_cache(maxsize=1)
def _deepbet_first_network():  # noqa: ANN202 - a TorchScript module
    import importlib.metadata

    import torch

    try:
        dist = importlib.metadata.distribution("deepbet")
    except importlib.metadata.PackageNotFoundError:
        raise InputError("Finding the brain in an MR volume needs deepbet: pip install 'semid[server]'.") from None
    path = dist.locate_file("data/models/bbox_model.pt")
    return torch.jit.load(str(path), map_location="cpu").eval(), dist.version


def _deepbet_input(x: np.ndarray) -> np.ndarray:
    """deepbet's input scaling: clipped to the 0.5th-99.5th percentiles, standardised, then mapped to the
    ImageNet-like mean 0.449 and spread 0.226 its networks were trained with."""
    lo, hi = np.percentile(x[::2, ::2, ::2], (0.5, 99.5))
    x = np.clip((x - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0)
    return (0.226 * (x - x.mean()) / max(float(x.std()), 1e-6) + 0.449).astype(np.float32)


def mr_brain(image: sitk.Image) -> Brain:
    """deepbet's first network on a world-aligned RAS cube of the volume (see the module docstring)."""
    import torch

    net, version = _deepbet_first_network()
    oriented = sitk.DICOMOrient(image, "RAS")
    lo, hi = physical_box(oriented)
    spacing = float(np.clip((hi - lo).max() / DEEPBET_CUBE, *DEEPBET_SPACING_MM))
    grid = processing_grid(oriented, spacing, cube=DEEPBET_CUBE)
    low = float(np.percentile(sitk.GetArrayViewFromImage(oriented)[::4, ::4, ::4], 0.5))
    x = sitk.GetArrayFromImage(to_grid(oriented, grid, default=low))
    # deepbet reads RAS arrays indexed (x, y, z) (nibabel's canonical order); SimpleITK's are (z, y, x)
    t = torch.from_numpy(np.ascontiguousarray(_deepbet_input(x).transpose(2, 1, 0)))[None, None]
    with torch.inference_mode():
        prob = net(t)[0, 1].numpy().transpose(2, 1, 0)
    # the cube reaches past the volume (the top of a head alone fills a small part of it): deepbet, shown air there,
    # has been seen calling it brain; a brain is only where the volume was scanned
    ones = sitk.Image(oriented.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(oriented)
    scanned = sitk.GetArrayFromImage(sitk.Resample(ones, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)) > 0
    mask = _largest_filled((prob > BRAIN_PROBABILITY) & scanned)
    voxel_ml = spacing**3 / 1000.0
    evidence = {"grid_mm": round(spacing, 3),
                "mean_probability_inside": round(float(prob[mask].mean()), 4) if mask.any() else 0.0,
                "uncertain_ml": round(float(((prob > 0.2) & (prob < 0.8)).sum()) * voxel_ml, 1)}
    return Brain(array_image(mask, grid), f"deepbet {version} first network ({spacing:.1f} mm)",
                 round(float(mask.sum()) * voxel_ml, 1), evidence)


def _largest_filled(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected part of ``mask``, its holes filled."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return np.zeros_like(mask, bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(labels == int(sizes.argmax()))


# ------------------------------------------------------------------------------------------------- CT


def ct_brain(image: sitk.Image, values: Values) -> Brain:
    """The intracranial space of a CT: tissue enclosed by bone in all six axis directions (module docstring)."""
    oriented = sitk.DICOMOrient(image, "RAS")
    grid = processing_grid(oriented, CT_GRID_MM)
    v = sitk.GetArrayFromImage(to_grid(oriented, grid, default=float(values.low)))
    voxel_ml = CT_GRID_MM**3 / 1000.0
    if values.bone is None:
        return Brain(array_image(np.zeros(v.shape, bool), grid), "inner table of the skull (no bone found)", 0.0,
                     {"bone_ml": 0.0})
    bone = ndimage.binary_closing(v >= values.bone, np.ones((3, 3, 3), bool), border_value=0) | (v >= values.bone)
    tissue = (v >= values.soft) & ~bone
    head = v >= values.threshold
    enclosed = np.ones(v.shape, bool)
    for axis in range(3):
        for reverse in (False, True):
            b = np.flip(bone, axis) if reverse else bone
            # the edge of the field of view counts as bone where the head touches it (unknown beyond)
            edge = np.take(np.flip(head, axis) if reverse else head, 0, axis=axis)
            seen = np.maximum.accumulate(b, axis=axis)
            seen |= np.expand_dims(edge, axis)
            enclosed &= np.flip(seen, axis) if reverse else seen
    inside = ndimage.binary_opening(tissue & enclosed, iterations=1)
    mask = _largest_filled(inside) & ~bone
    evidence = {"grid_mm": CT_GRID_MM, "bone_ml": round(float(bone.sum()) * voxel_ml, 1),
                "bone_threshold": round(float(values.bone), 2)}
    return Brain(array_image(mask, grid), f"inner table of the skull ({values.units} CT, {CT_GRID_MM:g} mm)",
                 round(float(mask.sum()) * voxel_ml, 1), evidence)
