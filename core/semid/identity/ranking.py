"""The identity map ``s(x)`` from the learned sources, the nested blocks ``B_p``, and the atlas check.

DESIGN.md §4 step 2-3: ``s(x)`` in [0, 1] combines the identity network's region probability
(``semid.identity.network``) and the re-identification saliency (``semid.identity.saliency``);
``B_p`` is the top fraction ``p`` of the identity region ranked by ``s``.

The rule (``combine``): the region is ``prob > threshold`` (0.5); inside it
``s = weight * prob + (1 - weight) * saliency`` (floored at a tiny positive value, so ``s > 0`` exactly
on the region), and ``s = 0`` outside. ``prob`` is close to 1 across most of the region, so the
saliency decides the order there (what the re-identification network looks at goes first) while
``prob`` pushes the uncertain rim of the region to the end. Any [0, 1] map can stand in for the
saliency, e.g. the atlas score resampled onto the volume (superficial, central face first).

All arrays are numpy (z, y, x) on one grid (the input volume's); nothing here depends on the grid's
geometry except the millilitre volumes and the air margin, which take the voxel spacing in mm.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk

from semid.grids import index_box

#: Default share of the region probability in ``s`` (the rest is saliency).
WEIGHT = 0.5
#: Probability above which a voxel is in the identity region.
THRESHOLD = 0.5
#: Smallest ``s`` inside the region, so that ``s > 0`` is exactly the region.
S_FLOOR = 1e-6


def region_from_prob(prob: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """The identity region: boolean, ``prob > threshold``."""
    return np.asarray(prob) > threshold


def combine(prob: np.ndarray, saliency: np.ndarray | None = None, weight: float = WEIGHT,
            threshold: float = THRESHOLD) -> np.ndarray:
    """``s(x)`` in [0, 1] (float32, shape of ``prob``) from the region probability and the saliency.

    Args:
        prob: identity-region probability in [0, 1] (``IdentityNetwork.predict``), any shape.
        saliency: a [0, 1] map of the same shape (``identity_saliency``, or the atlas score), or None:
            then ``s = prob`` inside the region (where ``prob`` is flat, ties are broken by voxel index in
            ``nested_block``, i.e. arbitrarily: give a saliency or a prior for a meaningful order).
        weight: share of ``prob`` in ``s`` (0..1).
        threshold: region threshold on ``prob``.

    Returns:
        ``weight * prob + (1 - weight) * saliency`` inside ``prob > threshold`` (at least ``S_FLOOR``),
        0 outside.
    """
    prob = np.asarray(prob, dtype=np.float32)
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], not {weight}")
    if saliency is not None:
        saliency = np.asarray(saliency, dtype=np.float32)
        if saliency.shape != prob.shape:
            raise ValueError(f"saliency shape {saliency.shape} differs from prob shape {prob.shape}")
    region = region_from_prob(prob, threshold)
    # computed on the region's voxels only (a tenth of an identity box): the same values, 5x faster
    s = prob[region]
    if saliency is not None:
        s = weight * s + (1.0 - weight) * np.clip(saliency[region], 0.0, 1.0)
    out = np.zeros(prob.shape, np.float32)
    out[region] = np.clip(s, S_FLOOR, 1.0)
    return out


def nested_block(score: np.ndarray, region: np.ndarray, level: float) -> np.ndarray:
    """``B_p``: the top ``level`` fraction of ``region``'s voxels ranked by ``score`` (boolean, like ``score``).

    The pipeline's ``B_p`` (``semid.pipeline`` imports it; ``tests/test_identity_net.py`` checks it
    against ``nested_masks``, which sorts): rank by score descending, then voxel index; the ranking
    does not depend on ``level``, so ``B_p`` is a subset of ``B_q`` for ``p <= q``; ``B_0`` is empty
    and ``B_1`` is the region.
    """
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"level must be in [0, 1], not {level}")
    score = np.asarray(score)
    idx = np.flatnonzero(np.asarray(region, bool))
    count = int(round(level * idx.size))
    blocked = np.zeros(score.shape, dtype=bool)
    if count == 0:
        return blocked
    if count == idx.size:  # B_1 is the region: no ranking needed
        blocked.ravel()[idx] = True
        return blocked
    # The top ``count`` by (score descending, index ascending) without sorting every voxel of the region
    # (a 1 mm head's region holds millions): every voxel above the count-th score, then the voxels at
    # exactly that score in index order. The same set as a full lexsort, in O(n).
    values = score.ravel()[idx]
    cut = np.partition(values, idx.size - count)[idx.size - count]
    above = values > cut
    ties = np.flatnonzero(values == cut)[:count - int(above.sum())]
    blocked.ravel()[idx[above]] = True
    blocked.ravel()[idx[ties]] = True
    return blocked


def nested_masks(score: np.ndarray, region: np.ndarray, levels: Iterable[float]) -> dict[float, np.ndarray]:
    """``{p: B_p}`` for several levels at once (one ranking; the masks are nested)."""
    score = np.asarray(score)
    idx = np.flatnonzero(np.asarray(region, bool))
    order = idx[np.lexsort((idx, -score.ravel()[idx]))]
    out = {}
    for level in levels:
        if not 0.0 <= level <= 1.0:
            raise ValueError(f"level must be in [0, 1], not {level}")
        mask = np.zeros(score.shape, dtype=bool)
        mask.ravel()[order[:int(round(level * idx.size))]] = True
        out[float(level)] = mask
    return out


def _voxel_ml(spacing: Sequence[float] | None, *images: Any) -> float:
    for im in images:
        if isinstance(im, sitk.Image):
            return float(np.prod(im.GetSpacing())) / 1000.0
    if spacing is None:
        raise ValueError("give the voxel spacing (mm) or SimpleITK images")
    return float(np.prod(spacing)) / 1000.0


def _as_bool(mask: np.ndarray | sitk.Image) -> np.ndarray:
    arr = sitk.GetArrayViewFromImage(mask) if isinstance(mask, sitk.Image) else np.asarray(mask)
    return arr > 0 if arr.dtype != bool else arr


def agreement(network_region: np.ndarray | sitk.Image, atlas_region: np.ndarray | sitk.Image,
              spacing: Sequence[float] | None = None) -> dict[str, float]:
    """How well the network's identity region agrees with the registration-based (atlas) one.

    Args:
        network_region, atlas_region: masks on one grid (numpy (z, y, x) or SimpleITK images; non-zero =
            inside).
        spacing: voxel spacing in mm (any order), needed when both masks are numpy arrays.

    Returns:
        JSON-ready ``{"dice", "network_ml", "atlas_ml", "both_ml", "network_only_ml", "atlas_only_ml"}``
        (Dice is 1.0 when both are empty).
    """
    a, b = _as_bool(network_region), _as_bool(atlas_region)
    if a.shape != b.shape:
        raise ValueError(f"region shapes differ: {a.shape} vs {b.shape}")
    ml = _voxel_ml(spacing, network_region, atlas_region)
    na, nb, both = int(a.sum()), int(b.sum()), int((a & b).sum())
    return {"dice": round(2.0 * both / (na + nb), 4) if na + nb else 1.0,
            "network_ml": round(na * ml, 3), "atlas_ml": round(nb * ml, 3), "both_ml": round(both * ml, 3),
            "network_only_ml": round((na - both) * ml, 3), "atlas_only_ml": round((nb - both) * ml, 3)}


def with_air_margin(region: np.ndarray, head: np.ndarray, spacing: Sequence[float], margin_mm: float = 10.0,
                    cell_mm: float = 2.0) -> np.ndarray:
    """``region`` plus the air (outside ``head``) within ``margin_mm`` of it, like the atlas region's margin.

    The network segments tissue only (the phantom label); the atlas region also holds a margin of air in
    front of the face (14 mm deep, face zones only) so that a fill may build a face that sticks out
    further than the original. Grown in every direction, 10 mm gives the atlas region's volume on the
    real T1w head (1560 vs 1594 ml; Dice 0.82 with it, against 0.62 for the tissue-only region; measured with the
    exact distance).

    The distance is measured between cells of about ``cell_mm`` (blocks of whole voxels; a voxel that
    size or larger is its own cell, and the distance is then exact): a cell within ``margin_mm`` of a
    cell that holds some of ``region`` joins with its air. The margin's edge moves by up to a cell's
    diagonal, which does not matter for room left in front of a face, and on a 1 mm head this is a
    tenth of the time of the exact distance over the identity box.

    Args:
        region, head: boolean (z, y, x) masks on one grid.
        spacing: voxel spacing (x, y, z) in mm, SimpleITK order.
    """
    region = np.asarray(region, bool)
    step = np.maximum(1, np.round(cell_mm / np.asarray(spacing, float))).astype(int)[::-1]  # (z, y, x)
    shape = region.shape
    padded = np.pad(region, [(0, -n % k) for n, k in zip(shape, step, strict=True)])
    cells = padded.reshape(padded.shape[0] // step[0], step[0], padded.shape[1] // step[1], step[1],
                           padded.shape[2] // step[2], step[2]).any(axis=(1, 3, 5))
    cell_spacing = (np.asarray(spacing, float) * step[::-1]).tolist()
    # the float32 distances are compared with a hair of tolerance: exactly-10 mm cells stay in
    near = distance_near(cells, cell_spacing, margin_mm + max(cell_spacing)) <= margin_mm + 1e-4
    near = np.broadcast_to(near[:, None, :, None, :, None], (*near.shape[:1], step[0], near.shape[1], step[1],
                                                              near.shape[2], step[2])).reshape(padded.shape)
    return region | (near[:shape[0], :shape[1], :shape[2]] & ~np.asarray(head, bool))


def distance_near(mask: np.ndarray, spacing: Sequence[float], reach_mm: float) -> np.ndarray:
    """Distance (mm, float32, like ``mask``) from each voxel to the nearest voxel of ``mask``, exact up to
    ``reach_mm``; farther voxels may read ``inf``. Voxels of ``mask`` read 0 or less.

    The distance is computed on ``mask``'s bounding box grown by ``reach_mm``: every voxel nearer than
    that to ``mask`` lies in it, and the rest of the grid is not visited (the brain's part of a 1 mm
    head's identity box: ``benchmarks/pipeline_parts.py``).

    Args:
        mask: boolean (z, y, x).
        spacing: voxel spacing (x, y, z) in mm, SimpleITK order.
    """
    mask = np.asarray(mask, bool)
    out = np.full(mask.shape, np.inf, np.float32)
    extent = index_box(mask)
    if extent is None:
        return out
    grow = [int(np.ceil(reach_mm / float(s))) + 1 for s in spacing][::-1]  # (z, y, x)
    box = tuple(slice(max(int(lo) - g, 0), min(int(hi) + g + 1, n))
                for lo, hi, g, n in zip(*extent, grow, mask.shape, strict=True))
    # ITK's Maurer distance (multi-threaded) rather than scipy's EDT: the same distances (to 1e-5 mm),
    # 4x faster on a 1 mm head's identity box
    img = sitk.GetImageFromArray(mask[box].astype(np.uint8))
    img.SetSpacing([float(s) for s in spacing])
    dist = sitk.SignedMaurerDistanceMap(img, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    out[box] = sitk.GetArrayViewFromImage(dist)  # (the view needs ``dist`` alive)
    return out
