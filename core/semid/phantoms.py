"""Synthetic heads for tests and the benchmark.

For now: ``ct_from_mr``, a CT-like volume in Hounsfield units made from a T1w MR head by intensity
class (air, soft tissue, fat, bone-like dark shell inside the scalp). The phantom population of the
benchmark issue (subjects, visits, lesions, labels) extends this module.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from semid import identity as idm
from semid.io import MODALITY_KEY


def ct_from_mr(mr: sitk.Image, seed: int = 0) -> sitk.Image:
    """A CT-like int16 head (HU) with the MR head's geometry: air -1000, tissue 20..60, bone ~900.

    Bone is the dark band between scalp and brain in T1w: voxels of the head darker than a third of
    the head's median intensity, within 25 mm of the skin.
    """
    rng = np.random.default_rng(seed)
    arr = sitk.GetArrayFromImage(mr).astype(np.float32)
    head = idm.head_mask(mr, idm.head_threshold(mr, "MR"))
    inside = sitk.GetArrayFromImage(head) > 0
    depth = -sitk.GetArrayFromImage(idm._signed_distance(head))
    median = float(np.median(arr[inside]))
    hu = np.full(arr.shape, -1000.0, dtype=np.float32)
    hu[inside] = 20.0 + 40.0 * np.clip(arr[inside] / (2 * median), 0, 1)
    bone = inside & (arr < median / 3) & (depth > 3) & (depth < 25)
    hu[bone] = 900.0
    hu += rng.normal(0.0, 8.0, size=hu.shape).astype(np.float32)
    ct = sitk.GetImageFromArray(np.clip(np.rint(hu), -1024, 3071).astype(np.int16))
    ct.CopyInformation(mr)
    ct.SetMetaData(MODALITY_KEY, "CT")
    return ct
