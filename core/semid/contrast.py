"""A drawn face in the input's own contrast.

SemID's drawn face comes from a T1w (MR) or Hounsfield (CT) canvas. On a T2, PD or FLAIR head, or a CT
stored windowed to 8 bits, those values are foreign: fat, muscle, fluid and air do not relate in them as
they do in the canvas. ``own_contrast`` maps each drawn value to the value the *same tissue* has in this
image: over the identity region (where the drawing and the person's face overlap, both faces placed by
the atlas fit), the drawn values are cut into ``BINS`` quantile bins and each bin takes the median of the
person's values at the same voxels. Drawn skin then reads as this image's skin, drawn fat as its fat, air
as its air. Only these ``BINS`` medians pass from the person to the output: tissue levels, not shapes.

Where the map stays within ``KEEP_BELOW`` of the drawn values (a T1w head, a CT in Hounsfield units: the
canvas's own contrast) the drawing is kept as it is, as benchmarked.
"""

from __future__ import annotations

import numpy as np

#: Quantile bins of the drawn values.
BINS = 16
#: Mean departure of the map from the drawn values, as a share of the person's value range (1st to 99th
#: percentile over the region), below which the drawing is already in this image's contrast. Measured at
#: "high" (``semid deidentify``'s record, ``fill_contrast_departure``): the real T1w head 0.015, a T1w phantom
#: 0.01, the CT windowed to 8 bits 0.036; its T2-, FLAIR- and PD-like versions 0.055, 0.063, 0.146, the ICBM
#: T2w head 0.095 (``semid.eval.real_heads``).
KEEP_BELOW = 0.04
#: Fewest voxels the map is learnt from.
MIN_VOXELS = 2000
#: Voxels mapped at a time (``own_contrast``).
SLAB_VOXELS = 1 << 20


def tissue_map(drawn: np.ndarray, person: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bin centres of ``drawn`` and the median of ``person`` in each bin (1-D float arrays of the same
    voxels; increasing centres, for ``np.interp``)."""
    edges = np.unique(np.quantile(drawn, np.linspace(0.0, 1.0, BINS + 1)))
    which = np.clip(np.searchsorted(edges, drawn, side="right") - 1, 0, len(edges) - 2)
    centres, levels = [], []
    for k in range(len(edges) - 1):
        here = which == k
        if here.sum() >= 10:
            centres.append(float(np.median(drawn[here])))
            levels.append(float(np.median(person[here])))
    centres_arr, levels_arr = np.array(centres), np.array(levels)
    order = np.argsort(centres_arr, kind="stable")
    centres_arr, keep = np.unique(centres_arr[order], return_index=True)
    return centres_arr, levels_arr[order][keep]


def own_contrast(values: np.ndarray, person: np.ndarray, learn: np.ndarray) -> tuple[np.ndarray, dict]:
    """``values`` (the drawn fill, float, any shape) in the contrast of ``person`` (the input's values on
    the same grid), learnt over ``learn`` (bool, same shape). Returns the values (a new array, or
    ``values`` itself when kept) and the record's ``fill_contrast``."""
    drawn, own = values[learn].astype(np.float64), person[learn].astype(np.float64)
    if drawn.size < MIN_VOXELS:
        return values, {"fill_contrast": "canvas (too few voxels to learn this image's tissue levels)"}
    centres, levels = tissue_map(drawn, own)
    if centres.size < 2:
        return values, {"fill_contrast": "canvas (the drawing has one level)"}
    lo, hi = np.percentile(own, [1.0, 99.0])
    departure = float(np.mean(np.abs(np.interp(drawn, centres, levels) - drawn)) / max(hi - lo, 1e-6))
    if departure < KEEP_BELOW:
        return values, {"fill_contrast": "canvas (already this image's contrast)",
                        "fill_contrast_departure": round(departure, 3)}
    # slab by slab: np.interp returns float64, and a whole 1 mm head's ROI of it is ~90 MB at the run's peak
    mapped = np.empty(values.shape, np.float32)
    flat_in, flat_out = values.reshape(-1), mapped.reshape(-1)
    for start in range(0, flat_in.size, SLAB_VOXELS):
        flat_out[start:start + SLAB_VOXELS] = np.interp(flat_in[start:start + SLAB_VOXELS], centres, levels)
    return mapped, {"fill_contrast": f"this image's tissue levels ({len(centres)} levels learnt over the region)",
                    "fill_contrast_departure": round(departure, 3)}


__all__ = ["BINS", "KEEP_BELOW", "own_contrast", "tissue_map"]
