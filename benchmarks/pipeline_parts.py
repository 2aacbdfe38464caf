"""The pipeline's fast parts against the computations they replace, on the real 1 mm T1w head.

Each row times one part of ``Deidentifier.run`` at ``max`` (best of ``--repeats`` calls, after one
warm-up call) in its fast form and in the form it replaced, on the same input, and says whether the two
give the same result:

- hole filling of the head in the identity box: ``identity.fill_holes`` against ITK's ``BinaryFillhole``
  and scipy's ``binary_fill_holes``;
- the voxels within ``BRAIN_MARGIN_MM`` of the brain: ``ranking.distance_near`` against ITK's Maurer
  distance on the whole identity box;
- the air within 10 mm of the identity region: ``ranking.with_air_margin`` on 2 mm cells against the
  exact distance (not the same voxels: the row says how many differ);
- the voxels within ``NETWORK_BRAIN_MARGIN_MM`` of the identity network's brain: its distance on 2 mm
  cells spread over the voxels by ITK against the numpy spread it replaced;
- the generator's fill of the face box in bfloat16 against float32 (``compensation.fill_precision``),
  and what it changes in the de-identified head: the filled voxels' difference in intensity units.

The head is resampled onto the issue's 256×256×176 grid like ``volume_speed.py``. Run it alone with the
project's Python after ``make data``: ``python benchmarks/pipeline_parts.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time
from collections.abc import Callable
from typing import Any

from tables import write_table
from volume_speed import resample_to_size


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """``fn()``'s result and its fastest wall time (s) over ``repeats`` calls after one warm-up."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/pipeline_parts.md")
    args = parser.parse_args(argv)

    import numpy as np
    import SimpleITK as sitk
    import torch
    from scipy import ndimage

    import semid.identity as idm
    from semid import compensation as comp
    from semid import facebox as fb
    from semid import phantoms as ph
    from semid import pipeline as pl
    from semid.data import data_file
    from semid.identity import network as idnet
    from semid.identity import ranking
    from semid.io import read_volume

    image = resample_to_size(read_volume(str(data_file("heads/t1w_real.nii.gz"))), [176, 256, 256])
    fill = comp.LearnedFill()
    deid = pl.Deidentifier("max", fill=fill)
    location = deid.locate(image)
    index, size = pl._roi_of(location.atlas.blocking_score, [location.fit.transform, location.fit.whole_head],
                             image)
    roi = sitk.RegionOfInterest(image, size, index)
    spacing = image.GetSpacing()
    rows: list[dict[str, Any]] = []

    def row(part: str, fast: str, fast_s: float, old: str, old_s: float, same: str) -> None:
        rows.append({"part": part, "fast": fast, "fast_s": fast_s, "replaced": old, "replaced_s": old_s,
                     "ratio": old_s / fast_s, "same_result": same})

    # hole filling: the head mask of the identity box before its holes are filled (as in _head_in_roi)
    near = sitk.BinaryDilate(location.head_coarse, [2, 2, 2])
    near_roi = sitk.GetArrayFromImage(sitk.Resample(near, roi, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    head = (sitk.GetArrayViewFromImage(roi) >= location.threshold) & (near_roi > 0)
    filled, fast_s = best_of(lambda: idm.fill_holes(head), args.repeats)
    itk, itk_s = best_of(lambda: sitk.GetArrayFromImage(sitk.BinaryFillhole(sitk.GetImageFromArray(
        head.astype(np.uint8)), fullyConnected=False)) > 0, args.repeats)
    scipy_filled, scipy_s = best_of(lambda: ndimage.binary_fill_holes(head), args.repeats)
    same = np.array_equal(filled, itk) and np.array_equal(filled, scipy_filled)
    row("hole filling, head in the identity box", "identity.fill_holes", fast_s, "ITK BinaryFillhole", itk_s,
        "yes" if same else "NO")
    row("hole filling, head in the identity box", "identity.fill_holes", fast_s, "scipy binary_fill_holes", scipy_s,
        "yes" if same else "NO")

    # the voxels near the brain (the atlas brain placed in the identity box)
    brain = sitk.GetArrayFromImage(sitk.Resample(location.atlas.brain, roi, location.to_atlas,
                                                 sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)) > 0
    margin = idm.BRAIN_MARGIN_MM
    near_fast, fast_s = best_of(lambda: ranking.distance_near(brain, spacing, margin) < margin, args.repeats)

    def whole_box() -> np.ndarray:
        img = sitk.GetImageFromArray(brain.astype(np.uint8))
        img.SetSpacing(spacing)
        return sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
            img, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)) < margin

    near_full, full_s = best_of(whole_box, args.repeats)
    row(f"voxels within {margin:g} mm of the brain", "ranking.distance_near", fast_s,
        "Maurer distance, whole box", full_s, "yes" if np.array_equal(near_fast, near_full) else "NO")

    # the air margin around the region (``ranking.with_air_margin``, on 2 mm cells), against the exact
    # distance over the identity box that it replaced; the atlas's region stands in for the network's
    region = sitk.GetArrayFromImage(sitk.Resample(location.atlas.score, roi, location.to_atlas,
                                                  sitk.sitkNearestNeighbor, 0.0, sitk.sitkFloat32)) > 0.02
    region &= ~brain

    def exact_margin() -> np.ndarray:
        near_region = ranking.distance_near(region, spacing, 11.0) <= 10.0 + 1e-4
        return region | (near_region & ~filled)

    on_cells, fast_s = best_of(lambda: ranking.with_air_margin(region, filled, spacing), args.repeats)
    exact, exact_s = best_of(exact_margin, args.repeats)
    differ = int((on_cells != exact).sum())
    row("air within 10 mm of the identity region", "ranking.with_air_margin (2 mm cells)", fast_s,
        "exact distance, identity box", exact_s,
        f"no: {differ} of {int(exact.sum())} voxels differ (the margin's edge moves by up to a cell)")

    # the voxels near the identity network's brain: its distance at 2 mm cells spread over the identity
    # box by ITK, against the numpy spread it replaced (repeats along each axis, then a float copy)
    net = idnet.load_cached()
    x, grid = idnet.prepare(image, "MR")
    brain_prob = net.predict_maps_array(x)[net.outputs.index("brain")]
    keep = pl.NETWORK_BRAIN_MARGIN_MM

    def spread_in_itk() -> np.ndarray:
        near_net = sitk.Less(idnet._brain_distance(brain_prob, grid, roi), keep)
        return sitk.GetArrayFromImage(near_net).view(bool)

    def spread_in_numpy() -> np.ndarray:
        cells = sitk.GetArrayFromImage(idnet._brain_distance_cells(brain_prob, grid, roi))
        stride = np.maximum(1, np.round(idnet.DISTANCE_CELL_MM / np.array(spacing))).astype(int)[::-1]
        for axis, k in enumerate(stride):
            cells = np.repeat(cells, k, axis=axis)
        z, y, x_ = roi.GetSize()[::-1]
        dist = sitk.GetImageFromArray(np.ascontiguousarray(cells[:z, :y, :x_]))
        return sitk.GetArrayFromImage(dist) < keep

    near_itk, fast_s = best_of(spread_in_itk, args.repeats)
    near_numpy, numpy_s = best_of(spread_in_numpy, args.repeats)
    row(f"voxels within {keep:g} mm of the identity network's brain", "ITK nearest-neighbour spread", fast_s,
        "numpy repeat", numpy_s, "yes" if np.array_equal(near_itk, near_numpy) else "NO")

    # the generator's fill of the face box, and of the whole head, in both precisions
    model = fill.model
    blocked = deid.run(image, location=location).mask
    fit = location.fit.transform
    box = fb.intensity_scale(image, "MR").normalise(fb.to_box(image, fit, default=0.0))
    mask = fb.to_box(blocked, fit, sitk.sitkNearestNeighbor) > 0
    code = ph.default_face_code()
    models = {p: dataclasses.replace(model, precision=p) for p in (torch.float32, torch.bfloat16)}
    _, fp32_s = best_of(lambda: models[torch.float32].fill(box, mask, 0, code), args.repeats)
    _, bf16_s = best_of(lambda: models[torch.bfloat16].fill(box, mask, 0, code), args.repeats)
    outputs = {}
    for precision, variant in models.items():
        fill._model = variant
        result = deid.run(image, location=location)
        outputs[precision] = (sitk.GetArrayFromImage(result.image).astype(np.float64),
                              sitk.GetArrayFromImage(result.mask) > 0)
    fill._model = model
    (a, blocked_a), (b, blocked_b) = outputs[torch.float32], outputs[torch.bfloat16]
    diff = np.abs(a - b)[blocked_a]
    same = (f"block the same: {'yes' if np.array_equal(blocked_a, blocked_b) else 'NO'}; filled voxels differ "
            f"by {diff.mean():.2f} on average, at most {diff.max():.0f} (their mean {a[blocked_a].mean():.0f}); "
            f"outside the block: {'identical' if np.array_equal(a[~blocked_a], b[~blocked_a]) else 'DIFFERENT'}")
    row("generator fill of the 80×96×96 face box", "bfloat16", bf16_s, "float32", fp32_s, same)
    native = comp.fill_precision(torch.device("cpu"))

    lines = [f"Parts of `Deidentifier.run` at `max` on the real T1w head resampled to "
             f"{'×'.join(str(v) for v in image.GetSize())} voxels (identity box "
             f"{'×'.join(str(v) for v in size)}), best of {args.repeats} after a warm-up; {platform.machine()}, "
             f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; the "
             f"pipeline's precision on this CPU: {str(native).removeprefix('torch.')}.",
             "",
             "| part | fast | s | replaced | s | replaced / fast | same result |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['part']} | {r['fast']} | {r['fast_s']:.3f} | {r['replaced']} | {r['replaced_s']:.3f} | "
              f"{r['ratio']:.2f} | {r['same_result']} |" for r in rows]
    write_table(lines, rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
