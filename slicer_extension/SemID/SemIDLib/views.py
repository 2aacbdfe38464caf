"""What the panel shows beside the original: slices at the same place, one window/level for both, the
outline of the changed region, and frontal/lateral surface renders. numpy only.

Why numpy and not `semid.render`: this package runs inside 3D Slicer's Python, where the `semid`
library (SimpleITK resampling, the atlas) is not installed, and asking the server for pictures would
add a request per result. A depth-shaded projection of the skin isosurface along the volume's nearest
anatomical axis is enough to see whether the face is still there; for oblique volumes the view is
that of the nearest axis (up to 45 degrees off), which is fine for a visual check.

Arrays are (z, y, x) as `slicer.util.arrayFromVolume` returns them; `Geometry` (series_export) maps
them to LPS millimetres.
"""

from __future__ import annotations

import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .series_export import Geometry

#: The changed-voxel mask is the outline source: the server's answer carries no mask (the record has
#: only counts), and every voxel the de-identification changed is, by construction, in the blocked region.
OUTLINE_SOURCE = "voxels that differ between the original and the de-identified volume"


@dataclass(frozen=True)
class SideBySide:
    """One slice of each volume at the same position, ready to display with the same window."""

    axis: int  # array axis the slice is taken across (0 = z, 1 = y, 2 = x)
    index: int
    original: np.ndarray  # 2D, raw values
    result: np.ndarray  # 2D, raw values
    outline: np.ndarray  # 2D bool: the rim of the changed region in this slice
    window: float
    level: float

    def display(self) -> tuple[np.ndarray, np.ndarray]:
        """Both slices as uint8 grey levels under the ORIGINAL's window/level."""
        return apply_window(self.original, self.window, self.level), apply_window(self.result, self.window, self.level)


def _same_grid(original: np.ndarray, result: np.ndarray) -> None:
    if original.shape != result.shape:
        raise ValueError(
            f"The de-identified volume {result.shape} is not on the original's grid {original.shape}: "
            "de-identify the selected volume again."
        )


def display_window(array: np.ndarray) -> tuple[float, float]:
    """(window, level) from the 1st-99.5th percentile of the voxels above the lowest value (the air).

    Computed on the original and applied to both volumes, so a difference seen is in the data.
    """
    sample = np.asarray(array).ravel()[:: max(1, array.size // 500_000)].astype(np.float64)
    body = sample[sample > sample.min()]
    if body.size == 0:
        body = sample
    lo, hi = np.percentile(body, [1.0, 99.5])
    width = max(float(hi - lo), 1.0)
    return width, float(lo) + width / 2.0


def apply_window(values: np.ndarray, window: float, level: float) -> np.ndarray:
    """Map values to uint8 with the display window (level = centre)."""
    lo = level - window / 2.0
    scaled = (np.asarray(values, dtype=np.float64) - lo) / max(window, 1e-9)
    return np.clip(np.round(scaled * 255.0), 0, 255).astype(np.uint8)


def changed_mask(original: np.ndarray, result: np.ndarray) -> np.ndarray:
    """Voxels the de-identification changed (bool, same shape)."""
    original, result = np.asarray(original), np.asarray(result)
    _same_grid(original, result)
    return original != result


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """The rim of a 2D mask: mask pixels with a 4-neighbour outside it (or on the image border)."""
    mask = np.asarray(mask, dtype=bool)
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def most_changed_slice(mask: np.ndarray, axis: int) -> int:
    """Index along `axis` of the slice with the most changed voxels (the middle one when none changed)."""
    other = tuple(a for a in range(3) if a != axis)
    counts = np.asarray(mask).sum(axis=other)
    return int(np.argmax(counts)) if counts.any() else int(mask.shape[axis] // 2)


def side_by_side(
    original: np.ndarray, result: np.ndarray, axis: int = 2, index: int | None = None,
    mask: np.ndarray | None = None,
) -> SideBySide:
    """Slices of both volumes at `index` along array `axis` (default: where most voxels changed).

    `mask` is the blocked region if the caller has it; else the changed-voxel mask is used.
    """
    original, result = np.asarray(original), np.asarray(result)
    _same_grid(original, result)
    if axis not in (0, 1, 2):
        raise ValueError("The slice axis must be 0, 1 or 2.")
    region = changed_mask(original, result) if mask is None else np.asarray(mask, dtype=bool)
    if index is None:
        index = most_changed_slice(region, axis)
    if not 0 <= index < original.shape[axis]:
        raise ValueError(f"Slice {index} is outside the volume (0-{original.shape[axis] - 1}).")
    window, level = display_window(original)
    take = lambda a: np.take(a, index, axis=axis)  # noqa: E731
    return SideBySide(axis, int(index), take(original), take(result), mask_outline(take(region)), window, level)


# ------------------------------------------------------------------------------------------ renders


def otsu_threshold(array: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold on a subsample: separates the head from the air in CT and MR alike."""
    sample = np.asarray(array).ravel()[:: max(1, array.size // 1_000_000)].astype(np.float64)
    hist, edges = np.histogram(sample, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2.0
    weight = np.cumsum(hist)
    total = weight[-1]
    mean = np.cumsum(hist * centres)
    w0, w1 = weight[:-1], total - weight[:-1]
    valid = (w0 > 0) & (w1 > 0)
    m0 = np.divide(mean[:-1], w0, out=np.zeros_like(mean[:-1]), where=valid)
    m1 = np.divide(mean[-1] - mean[:-1], w1, out=np.zeros_like(mean[:-1]), where=valid)
    between = np.where(valid, w0 * w1 * (m0 - m1) ** 2, -1.0)
    return float(edges[int(np.argmax(between)) + 1])


def anatomical_view(array: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The volume re-indexed as (S, P, L): axis 0 runs inferior -> superior, axis 1 anterior ->
    posterior, axis 2 right -> left, each from the array axis nearest to it; returns it and its spacing."""
    matrix = geometry.matrix  # column k: LPS direction of array axis x, y, z (k = 0, 1, 2)
    array_axis_of_column = {0: 2, 1: 1, 2: 0}  # column k (x, y, z) is array axis 2, 1, 0
    order: list[int] = []
    signs: list[float] = []
    spacing: list[float] = []
    free = [0, 1, 2]
    for lps in (2, 1, 0):  # S, P, L
        column = max(free, key=lambda k: abs(matrix[lps, k]))
        free.remove(column)
        order.append(array_axis_of_column[column])
        signs.append(np.sign(matrix[lps, column]) or 1.0)
        spacing.append(geometry.spacing[column])
    view = np.transpose(np.asarray(array), order)
    for axis, sign in enumerate(signs):
        if sign < 0:
            view = np.flip(view, axis=axis)
    return view, (spacing[0], spacing[1], spacing[2])


def _first_hit(mask: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(index of the first True along `axis`, whether there is one) for a 3D bool array."""
    hit = mask.any(axis=axis)
    return np.argmax(mask, axis=axis), hit


def _shade(depth_mm: np.ndarray, hit: np.ndarray, pixel_mm: tuple[float, float]) -> np.ndarray:
    """Lambert shading of a depth map (light from the viewer, a little from above): values in [0, 1]."""
    depth = np.where(hit, depth_mm, np.nan)
    filled = np.where(hit, depth_mm, np.nanmax(depth) if hit.any() else 0.0)
    gy, gx = np.gradient(filled, pixel_mm[0], pixel_mm[1])
    normal = np.stack([-gx, -gy, np.ones_like(gx)])
    normal /= np.linalg.norm(normal, axis=0)
    light = np.array([0.0, -0.35, 1.0])
    light /= np.linalg.norm(light)
    lambert = np.clip(np.tensordot(light, normal, axes=1), 0.0, 1.0)
    return np.where(hit, 0.15 + 0.85 * lambert, 0.0)


def _square_pixels(image: np.ndarray, row_mm: float, col_mm: float) -> np.ndarray:
    """Nearest-neighbour resample so that a pixel is as tall as it is wide (the finer spacing)."""
    step = min(row_mm, col_mm)
    rows = np.clip((np.arange(int(round(image.shape[0] * row_mm / step))) * step / row_mm).astype(int), 0,
                   image.shape[0] - 1)
    cols = np.clip((np.arange(int(round(image.shape[1] * col_mm / step))) * step / col_mm).astype(int), 0,
                   image.shape[1] - 1)
    return image[np.ix_(rows, cols)]


def surface_render(array: np.ndarray, geometry: Geometry, view: str = "frontal",
                   threshold: float | None = None) -> np.ndarray:
    """Depth-shaded skin surface seen from the front (`frontal`) or the patient's left (`lateral`).

    Returns a 2D float image in [0, 1] (0 = no surface), superior at the top, square pixels; in the
    frontal view the patient's right is on the viewer's left, in the lateral view the face looks left.
    `threshold` separates the head from the air (default: Otsu's on this volume; pass the original's
    to render the de-identified volume with the same isosurface).
    """
    if view not in ("frontal", "lateral"):
        raise ValueError(f"Unknown view {view!r}: use frontal or lateral.")
    spl, (s_mm, p_mm, l_mm) = anatomical_view(np.asarray(array), geometry)
    level = otsu_threshold(spl) if threshold is None else float(threshold)
    fg = spl > level
    # A surface needs three voxels in a row along the ray: lone noise voxels in the air are not skin.
    solid = fg.copy()
    ray_axis = 1 if view == "frontal" else 2
    for shift in (1, 2):
        ahead = np.zeros_like(fg)
        src = [slice(None)] * 3
        dst = [slice(None)] * 3
        src[ray_axis], dst[ray_axis] = slice(shift, None), slice(None, -shift)
        ahead[tuple(dst)] = fg[tuple(src)]
        solid &= ahead
    if view == "frontal":
        first, hit = _first_hit(solid, axis=1)  # rays from anterior to posterior
        depth, pixel = first * p_mm, (s_mm, l_mm)
    else:
        flipped = solid[:, :, ::-1]  # rays from the patient's left
        first, hit = _first_hit(flipped, axis=2)
        depth, pixel = first * l_mm, (s_mm, p_mm)
    shaded = _shade(depth.astype(np.float64), hit, pixel)[::-1]  # superior at the top
    return _square_pixels(shaded, pixel[0], pixel[1])


@dataclass(frozen=True)
class Renders:
    """Frontal and lateral renders of the original and the de-identified volume (float 0-1 images)."""

    original_frontal: np.ndarray
    result_frontal: np.ndarray
    original_lateral: np.ndarray
    result_lateral: np.ndarray
    threshold: float

    def items(self) -> list[tuple[str, np.ndarray]]:
        return [("original_frontal", self.original_frontal), ("result_frontal", self.result_frontal),
                ("original_lateral", self.original_lateral), ("result_lateral", self.result_lateral)]


def render_pair(original: np.ndarray, result: np.ndarray, geometry: Geometry) -> Renders:
    """The four renders, both volumes cut at the original's head/air threshold."""
    _same_grid(np.asarray(original), np.asarray(result))
    threshold = otsu_threshold(original)
    return Renders(
        surface_render(original, geometry, "frontal", threshold),
        surface_render(result, geometry, "frontal", threshold),
        surface_render(original, geometry, "lateral", threshold),
        surface_render(result, geometry, "lateral", threshold),
        threshold,
    )


def write_png(path: str | os.PathLike[str], image: np.ndarray) -> Path:
    """Write a 2D image (uint8, or float in [0, 1]) as a greyscale PNG (zlib + struct, no imaging
    library); written under a temporary name and renamed."""
    image = np.asarray(image)
    if image.ndim != 2 or min(image.shape) < 1:
        raise ValueError("Only 2D images can be written as PNG.")
    if image.dtype != np.uint8:
        image = np.clip(np.round(np.asarray(image, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
    height, width = image.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + image[r].tobytes() for r in range(height))  # filter type 0 per row
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows, 6)) + chunk(b"IEND", b""))
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".semid-", suffix=".png.part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(png)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def write_renders(renders: Renders, folder: str | os.PathLike[str]) -> dict[str, Path]:
    """The four renders as PNG files in `folder` (for the panel's picture labels)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    return {name: write_png(out / f"{name}.png", image) for name, image in renders.items()}
