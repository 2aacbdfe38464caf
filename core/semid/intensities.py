"""How a volume's values read: modality, units, and the levels of air, tissue and bone in this image.

Every later step asks the same questions of the values: which voxels are the head (above the air),
what the head's soft tissue looks like, and, for CT, which voxels are bone. The answers come from the
image itself (``read_values``), never from a fixed MR or CT scale alone:

- **CT in Hounsfield units** (it holds air near -1000 HU): head above -300 HU, bone from 250 HU;
- **CT stored windowed or rescaled** (the header says CT, but there is no air near -1000: an 8-bit
  brain window, values with an offset): head above half the Otsu level between air and tissue, bone
  half way from the head's median tissue value to its brightest values;
- **MR** of any weighting, in any units: head above half the Otsu level (a dark skin and a fat-poor
  face stay inside, the noise floor stays out); no bone level (bone is dark on MR, like air).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

#: Head/air threshold for CT in Hounsfield units (between air and foam pads, and skin).
CT_HEAD_HU = -300.0
#: Bone threshold for CT in Hounsfield units (cortical and most cancellous bone, not calcified vessels).
CT_BONE_HU = 250.0
#: Tissue threshold for the intracranial space in HU: brain, CSF and blood are above, fat and air below.
CT_TISSUE_HU = -50.0
#: A CT holds Hounsfield units when at least this share of it lies at or below -500 (the air around the head).
HU_AIR_SHARE = 0.01


@dataclass(frozen=True)
class Values:
    """The levels of one volume (``read_values``).

    Attributes:
        modality: "MR" or "CT".
        units: "HU" (CT in Hounsfield units), "windowed" (CT without Hounsfield air: windowed or
            rescaled values), or "MR" (MR's arbitrary units).
        threshold: the head/air threshold.
        tissue: the median of the head's voxels (above ``threshold``).
        bone: CT: values at or above are bone; None for MR.
        soft: CT: values at or above are soft tissue, fluid or brain (not air, not fat); None for MR.
        low, high: the 0.5th and 99.5th percentiles of the whole volume.
    """

    modality: str
    units: str
    threshold: float
    tissue: float
    bone: float | None
    soft: float | None
    low: float
    high: float

    def describe(self) -> dict:
        """JSON-ready levels for the record (rounded)."""
        return {"modality": self.modality, "units": self.units, "head_threshold": round(self.threshold, 3),
                "tissue_median": round(self.tissue, 3),
                **({"bone_threshold": round(self.bone, 3)} if self.bone is not None else {})}


def otsu_half(arr: np.ndarray) -> float:
    """Half the Otsu level of ``arr`` clipped to its 99.5th percentile: between air and a dark skin."""
    hi = float(np.percentile(arr, 99.5))
    lo = float(arr.min())
    if hi <= lo:
        return lo
    # ITK's Otsu filter on a (1, n) image of the values: 128 bins, as on the volume itself
    img = sitk.GetImageFromArray(np.clip(arr, lo, hi).astype(np.float32).reshape(1, -1))
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.SetInsideValue(0)
    otsu.SetOutsideValue(1)
    otsu.Execute(img)
    return lo + 0.5 * (float(otsu.GetThreshold()) - lo)


def read_values(coarse: sitk.Image, declared: str = "") -> Values:
    """The levels of a volume from a coarse (a few mm) copy of it.

    Args:
        coarse: the volume on a coarse grid (any pixel type).
        declared: the modality the file declared ("MR", "CT" or "").

    Returns:
        ``Values``; an undeclared volume is CT when it holds Hounsfield air, else MR.
    """
    arr = sitk.GetArrayViewFromImage(coarse).astype(np.float32, copy=False)
    flat = arr.ravel()
    sample = flat[:: max(1, flat.size // 400_000)]
    low, high = (float(v) for v in np.percentile(sample, (0.5, 99.5)))
    hu_air = float(np.mean(sample <= -500.0)) >= HU_AIR_SHARE
    modality = declared if declared in ("MR", "CT") else ("CT" if hu_air else "MR")
    if modality == "CT" and hu_air:
        head = sample[sample >= CT_HEAD_HU]
        tissue = float(np.median(head)) if head.size else 0.0
        return Values("CT", "HU", CT_HEAD_HU, tissue, CT_BONE_HU, CT_TISSUE_HU, low, high)
    threshold = otsu_half(sample)
    head = sample[sample >= threshold]
    tissue = float(np.median(head)) if head.size else threshold
    if modality == "MR":
        return Values("MR", "MR", threshold, tissue, None, None, low, high)
    top = float(np.percentile(head, 99.5)) if head.size else tissue
    # windowed CT: bone is the head's brightest class (saturated at the window's top in a brain window)
    bone = tissue + 0.5 * (top - tissue) if top > tissue else None
    soft = threshold + 0.5 * (tissue - threshold)
    return Values("CT", "windowed", threshold, tissue, bone, soft, low, high)
