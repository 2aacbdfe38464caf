"""Surface renders of a head (what a face-recognition attacker sees) and the QC picture.

``render_surface`` ray-casts the skin isosurface: the head mask is resampled onto a grid aligned with
the view (``w`` into the screen), the first crossing along each ray gives a depth map, and Lambert
shading of the depth map's normals gives the picture. Ray casting on a resampled grid is a few numpy
lines and needs no OpenGL or display, which this product must not assume (servers, CI, batch nodes).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from semid import identity as idm
from semid.io import atomic_path, modality_of

#: View name -> (yaw, pitch) in degrees; yaw turns the head to the viewer's left, pitch tilts it down.
VIEWS = {"frontal": (0.0, 0.0), "lateral": (90.0, 0.0)}


def _rotation(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    """Rotation (LPS) about the superior axis by ``yaw`` and then the left-right axis by ``pitch``."""
    y, p = np.deg2rad(yaw_deg), np.deg2rad(pitch_deg)
    yaw = np.array([[np.cos(y), -np.sin(y), 0], [np.sin(y), np.cos(y), 0], [0, 0, 1]])
    pitch = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    return yaw @ pitch


def view_frame(yaw_deg: float = 0.0, pitch_deg: float = 0.0, head_frame: np.ndarray | None = None) -> np.ndarray:
    """3x3 matrix whose columns are the screen-right, screen-down and into-screen directions (LPS).

    The frontal view looks at the face: into the screen is posterior, screen right is the patient's
    left, screen down is inferior. ``head_frame`` (a rotation taking the standard head axes to this
    head's axes, e.g. from the atlas registration) makes views follow a tilted head.
    """
    frontal = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])  # columns: u, v, w
    frame = _rotation(yaw_deg, pitch_deg) @ frontal
    return (head_frame @ frame) if head_frame is not None else frame


#: Gaussian denoising (mm) of the intensities before the skin threshold. Without it MR noise makes the
#: thresholded skin rough, and the roughness alone moves dlib's face embedding as far as another
#: person's face does (measured on the phantoms: 1 % Rician noise, distance 0.5).
DENOISE_MM = 1.5


def surface_mask(image: sitk.Image, threshold: float | None = None,
                 denoise_mm: float = DENOISE_MM) -> tuple[sitk.Image, float]:
    """Smoothed float head mask whose 0.5 level is the skin, and the threshold used.

    The threshold is found on (or given for) the raw intensities; it is applied to the intensities
    smoothed by a Gaussian of ``denoise_mm`` (0: no smoothing).
    """
    if threshold is None:
        threshold = idm.head_threshold(image, idm.guess_modality(image, modality_of(image)))
    smooth = sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), denoise_mm) if denoise_mm > 0 \
        else image
    mask = idm.head_mask(smooth, threshold, fill=False)
    # smooth over at least one voxel, so coarse volumes render without stair steps
    sigma = max(1.0, max(image.GetSpacing()))
    return sitk.SmoothingRecursiveGaussian(sitk.Cast(mask, sitk.sitkFloat32), sigma), threshold


def render_surface(surface: sitk.Image, yaw_deg: float = 0.0, pitch_deg: float = 0.0, size: int = 512,
                   step_mm: float = 1.0, head_frame: np.ndarray | None = None) -> np.ndarray:
    """Shaded render (float image in [0, 1], ``size`` x ``size``) of the 0.5 level of ``surface``.

    Args:
        surface: smoothed head mask from ``surface_mask`` (any geometry).
        yaw_deg, pitch_deg: head rotation relative to the frontal view, degrees.
        size: output pixels per side (the depth map is cast at ``step_mm`` and upsampled).
        head_frame: optional rotation that aligns the standard view axes with this head.
    """
    depth = depth_map(surface, yaw_deg, pitch_deg, step_mm, head_frame)
    return _shade(depth, np.isfinite(depth), size, step_mm)


def depth_map(surface: sitk.Image, yaw_deg: float = 0.0, pitch_deg: float = 0.0, step_mm: float = 1.0,
              head_frame: np.ndarray | None = None) -> np.ndarray:
    """Depth (mm into the screen, NaN where a ray misses) of the 0.5 level of ``surface`` seen as
    ``render_surface`` sees it: square, one ray every ``step_mm``, rows top (superior) to bottom."""
    frame = view_frame(yaw_deg, pitch_deg, head_frame)
    corners = np.array([surface.TransformIndexToPhysicalPoint([int(c) for c in corner]) for corner in
                        np.array(np.meshgrid(*[[0, n - 1] for n in surface.GetSize()],
                                             indexing="ij")).reshape(3, -1).T])
    center = corners.mean(axis=0)
    half = np.abs((corners - center) @ frame).max()  # half extent along any view axis
    n = int(np.ceil(2 * half / step_mm)) + 1
    origin = center - frame @ np.full(3, half)
    ray_grid = sitk.Resample(surface, [n, n, n], sitk.Transform(), sitk.sitkLinear, origin.tolist(),
                             [step_mm] * 3, frame.ravel().tolist(), 0.0, sitk.sitkFloat32)
    vol = sitk.GetArrayViewFromImage(ray_grid)  # (w, v, u)
    inside = vol >= 0.5
    hit = inside.any(axis=0)
    first = np.argmax(inside, axis=0)
    # sub-voxel crossing between the last sample outside and the first inside
    prev = np.clip(first - 1, 0, n - 1)
    v_in = np.take_along_axis(vol, first[None], axis=0)[0]
    v_out = np.take_along_axis(vol, prev[None], axis=0)[0]
    frac = np.where(first > 0, (0.5 - v_out) / np.maximum(v_in - v_out, 1e-6), 0.0)
    depth = (prev + np.clip(frac, 0.0, 1.0)) * step_mm
    return np.where(hit, depth, np.nan)


def _shade(depth: np.ndarray, hit: np.ndarray, size: int, step_mm: float) -> np.ndarray:
    from scipy import ndimage

    zoom = size / depth.shape[0]
    filled = np.where(hit, depth, np.nanmax(depth) if hit.any() else 0.0)
    d = ndimage.zoom(filled, zoom, order=1)
    h = ndimage.zoom(hit.astype(np.float32), zoom, order=1) > 0.5
    d = ndimage.gaussian_filter(d, 0.6)
    gy, gx = np.gradient(d, step_mm / zoom)
    normal = np.stack([-gx, -gy, -np.ones_like(d)], axis=-1)  # towards the viewer (-w)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    light = np.array([-0.35, -0.45, -0.82])
    light /= np.linalg.norm(light)
    lambert = np.clip(normal @ light, 0.0, 1.0)
    image = 0.12 + 0.88 * lambert
    return np.where(h, image, 0.0)[:size, :size]


def render_views(image: sitk.Image, views: Sequence[str] = ("frontal", "lateral"), size: int = 512,
                 threshold: float | None = None, head_frame: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Renders of the named views (see ``VIEWS``) of one volume."""
    surface, _ = surface_mask(image, threshold)
    return {v: render_surface(surface, *VIEWS[v], size=size, head_frame=head_frame) for v in views}


def save_render_png(image: sitk.Image, png: str | Path, views: Sequence[str] = ("frontal", "lateral"),
                    size: int = 512) -> Path:
    """Write the renders of ``views`` side by side as one grey PNG (atomically)."""
    renders = render_views(image, views, size)
    strip = np.concatenate([renders[v] for v in views], axis=1)
    return _save_png(strip, Path(png))


def _save_png(gray: np.ndarray, png: Path) -> Path:
    import matplotlib.image as mpimg

    with atomic_path(png) as tmp:
        mpimg.imsave(tmp, np.clip(gray, 0, 1), cmap="gray", vmin=0, vmax=1)
    return png


def qc_figure(original: sitk.Image, output: sitk.Image, mask: sitk.Image, png: str | Path,
              record: dict | None = None, size: int = 512, region: sitk.Image | None = None,
              title: str | None = None) -> Path:
    """Original (top) beside output (bottom): three orthogonal slices and frontal/lateral renders.

    The slices pass through the centre of the blocked region (or the volume centre if nothing was
    blocked), in radiological display; the blocked region is outlined in red in the output's slices,
    and ``region`` (e.g. the ground-truth identity region), if given, in yellow in both rows.
    ``title`` replaces the title made from ``record``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png = Path(png)
    _, threshold = surface_mask(original)
    renders = [render_views(vol, size=size, threshold=threshold) for vol in (original, output)]
    orig_lps, out_lps, mask_lps = (sitk.GetArrayFromImage(sitk.DICOMOrient(v, "LPS")) for v in
                                   (original, output, mask))
    region_lps = sitk.GetArrayFromImage(sitk.DICOMOrient(region, "LPS")) if region is not None else None
    sp = sitk.DICOMOrient(original, "LPS").GetSpacing()
    nz = np.argwhere(mask_lps > 0)
    cz, cy, cx = (nz.mean(axis=0) if nz.size else np.array(mask_lps.shape) / 2).astype(int)
    if idm.guess_modality(original, modality_of(original)) == "CT":
        lo, hi = -160.0, 240.0  # soft-tissue window: the face and its fill are what QC looks at
    else:
        lo, hi = np.percentile(orig_lps, [0.5, 99.5])

    fig, axes = plt.subplots(2, 5, figsize=(20, 8.4), facecolor="black")
    for row, (vol, rend, which) in enumerate(((orig_lps, renders[0], "original"),
                                              (out_lps, renders[1], "de-identified"))):
        cuts = [((cz,), sp[1] / sp[0], "axial"), ((slice(None, None, -1), cy), sp[2] / sp[0], "coronal"),
                ((slice(None, None, -1), slice(None), cx), sp[2] / sp[1], "sagittal")]
        for col, (index, aspect, name) in enumerate(cuts):
            def cut(a: np.ndarray, index: tuple = index, name: str = name) -> np.ndarray:
                return a[index][:, ::-1] if name == "sagittal" else a[index]

            ax = axes[row, col]
            ax.imshow(cut(vol), cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="bilinear")
            if region_lps is not None and cut(region_lps).any():
                ax.contour(cut(region_lps), levels=[0.5], colors="#ffd400", linewidths=0.8)
            if row == 1 and cut(mask_lps).any():
                ax.contour(cut(mask_lps), levels=[0.5], colors="#ff5050", linewidths=0.8)
            ax.set_title(f"{which} · {name}", color="white", fontsize=11)
        for col, view in ((3, "frontal"), (4, "lateral")):
            axes[row, col].imshow(rend[view], cmap="gray", vmin=0, vmax=1)
            axes[row, col].set_title(f"{which} · {view} render", color="white", fontsize=11)
    for ax in axes.ravel():
        ax.axis("off")
    if title:
        fig.suptitle(title, color="white", fontsize=12)
    elif record:
        fig.suptitle(
            f"SemID · level {record.get('level')} ({record.get('preset') or 'custom'}) · blocked "
            f"{record.get('blocked_ml')} ml · voxels changed outside block "
            f"{record.get('voxels_changed_outside_block')} · brain voxels changed "
            f"{record.get('brain_voxels_changed')}",
            color="white", fontsize=12)
    fig.tight_layout()
    return save_figure(fig, png, facecolor="black")


def save_figure(fig: object, png: str | Path, **savefig_kwargs: object) -> Path:
    """Write a matplotlib figure to ``png`` atomically (80 dpi) and close it, even on failure."""
    import matplotlib.pyplot as plt

    png = Path(png)
    try:
        with atomic_path(png) as tmp:
            fig.savefig(tmp, dpi=80, format="png", **savefig_kwargs)
    finally:
        plt.close(fig)
    return png
