"""Where identity lives in a head: the head mask, the identity atlas, its registration, and ``s(x)``.

The identity region (face soft tissue, nose, lips, eyes, ears, plus a margin of air in front of the
face so a large nose is never left outside it) and the identity score ``s(x)`` in [0, 1] are defined
once on an average head (pydeface's mean T1w head, with the MNI152 brain brought in through the
MNI305 head, which shares MNI space with it). For each subject the average head is registered to the
subject (``fit_atlas``):

1. it starts from the brains (the subject's found in its own image, ``semid.brain``; the average
   head's found by the same tool): their centres and sizes give position and scale;
2. a similarity transform is fitted by Mattes mutual information between the average head and the
   subject's intensities, over the subject's head inside its field of view: any MR weighting or CT,
   and a face cut off by the field of view is simply not looked at;
3. it is refined on the *cranium* only (the head away from the face): the transform that places the
   identity region and the drawn face must not take on the face's shape, or the region and the drawn
   face would tell it;
4. an affine fit of the head's *outline* in view (face, chin and neck included; smoothed masks, mean
   squares) from there gives ``whole_head``: it follows the face's proportions, which the cranium fit
   must not, and only adds to the region (a long chin is then covered).

The older fit that matched smoothed head *masks* (``fit_head_shape``) is kept for the phantom
population, whose labels were made with it; a head whose field of view cuts the face defeated it.

SimpleITK does the registration and resampling; numpy only does what ITK has no filter for (the
analytic zone definitions and the ranking).
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from semid.errors import InputError

#: Head-mask threshold for CT, in Hounsfield units (between air/foam and skin).
CT_HEAD_HU = -300.0
#: Grid spacing (mm) on which registration runs.
REGISTRATION_SPACING = 4.0
#: Head-mask Dice below which the volume is taken not to contain a head.
HEAD_DICE = 0.72
#: Fraction of the atlas's face features a head must cover once fitted (a sphere or a body part does not).
MIN_FEATURE_COVERAGE = 0.4
#: Head volume (ml) below which a foreground is too small to be a head.
MIN_HEAD_ML = 600.0
#: v2: the template and the brain deepbet finds in it (``brain_image``) are part of the atlas, and the fit
#: is the intensity fit of ``fit_atlas``.
ATLAS_VERSION = "atlas-v2"


# ----------------------------------------------------------------------------------------------- masks


def guess_modality(image: sitk.Image, declared: str = "") -> str:
    """"CT" or "MR": what the header declared, else CT when the volume holds Hounsfield-like air."""
    if declared in ("CT", "MR"):
        return declared
    stats = sitk.StatisticsImageFilter()
    stats.Execute(image)
    return "CT" if stats.GetMinimum() <= -500 else "MR"


def head_threshold(image: sitk.Image, modality: str) -> float:
    """Intensity that separates the head from the air around it (HU for CT, Otsu for MR)."""
    if modality == "CT":
        return CT_HEAD_HU
    small = _downsample(sitk.Cast(image, sitk.sitkFloat32), 2.0)
    arr = sitk.GetArrayViewFromImage(small)
    hi = float(np.percentile(arr, 99.5))
    clipped = sitk.Clamp(small, sitk.sitkFloat32, float(arr.min()), hi)
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.SetInsideValue(0)
    otsu.SetOutsideValue(1)
    otsu.Execute(clipped)
    # Otsu on a T1 head sits between background and grey tissue; half of it keeps dark skin and fat-poor
    # faces in the mask while staying far above the noise floor.
    return 0.5 * float(otsu.GetThreshold())


def head_mask(image: sitk.Image, threshold: float, fill: bool = True) -> sitk.Image:
    """Binary uint8 mask of the head: above ``threshold``, largest connected part, holes filled.

    Works on the image's own grid; slice-wise hole filling would break on oblique data, so holes are
    filled in 3D.
    """
    fg = sitk.Cast(sitk.Cast(image, sitk.sitkFloat32) >= float(threshold), sitk.sitkUInt8)
    # An opening detaches thin things touching the head (CT table foam, coil pads, noise bridges).
    radius = [max(1, int(round(1.5 / s))) for s in image.GetSpacing()]
    fg = sitk.BinaryMorphologicalOpening(fg, radius)
    cc = sitk.RelabelComponent(sitk.ConnectedComponent(fg), sortByObjectSize=True)
    mask = sitk.Cast(sitk.Equal(cc, 1), sitk.sitkUInt8)
    if fill:
        filled = sitk.GetImageFromArray(fill_holes(sitk.GetArrayViewFromImage(mask)).astype(np.uint8))
        filled.CopyInformation(mask)
        mask = filled
    return mask


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` (boolean, any 3D shape) with its holes filled: the background that is not face-connected
    to the array's border joins it.

    The result equals ``scipy.ndimage.binary_fill_holes`` and ITK's ``BinaryFillhole`` (face
    connectivity). It is computed by labelling the background with ITK's connected components and
    keeping the labels that touch the border, which is faster than either on a 1 mm head's identity
    box (``benchmarks/pipeline_parts.py``).
    """
    mask = np.asarray(mask, bool)
    if mask.size == 0:
        return mask.copy()
    labels_img = sitk.ConnectedComponent(sitk.GetImageFromArray((~mask).astype(np.uint8)), False)
    labels = sitk.GetArrayViewFromImage(labels_img)
    outside = np.zeros(int(labels.max()) + 1, bool)
    for axis in range(labels.ndim):
        outside[np.take(labels, 0, axis=axis)] = True
        outside[np.take(labels, -1, axis=axis)] = True
    outside[0] = False  # label 0 is the mask itself
    return ~outside[labels]


def mask_volume_ml(mask: sitk.Image) -> float:
    """Volume of the non-zero voxels of ``mask`` in millilitres."""
    voxel_ml = float(np.prod(mask.GetSpacing())) / 1000.0
    return float(np.count_nonzero(sitk.GetArrayViewFromImage(mask))) * voxel_ml


def _downsample(image: sitk.Image, spacing: float, interpolator=sitk.sitkLinear) -> sitk.Image:
    """Resample onto a grid of ``spacing`` mm with the same direction and physical extent."""
    size = image.GetSize()
    old = image.GetSpacing()
    new_size = [max(2, int(round(n * s / spacing))) for n, s in zip(size, old, strict=True)]
    new_spacing = [n * s / m for n, s, m in zip(size, old, new_size, strict=True)]
    # Keep the physical extent: the first voxel centre moves by half the change of voxel size.
    direction = np.array(image.GetDirection()).reshape(3, 3)
    shift = direction @ (0.5 * (np.array(new_spacing) - np.array(old)))
    origin = np.array(image.GetOrigin()) + shift
    return sitk.Resample(image, new_size, sitk.Transform(), interpolator, origin.tolist(), new_spacing,
                         image.GetDirection(), 0.0, image.GetPixelID())


def smooth_mask(mask: sitk.Image, spacing: float = REGISTRATION_SPACING) -> sitk.Image:
    """A head mask as a smooth float image on a coarse grid: what the registration matches."""
    smooth = sitk.SmoothingRecursiveGaussian(sitk.Cast(mask, sitk.sitkFloat32), spacing)
    return _downsample(smooth, spacing)


# ----------------------------------------------------------------------------------------- registration


@dataclass
class Fit:
    """An affine fit of the atlas (fixed, template space) to a subject (moving).

    ``transform`` maps template points to subject points (ITK's fixed-to-moving convention); its
    inverse maps subject points into the template. ``dice`` is the head-mask overlap, ``coverage``
    the share of the atlas's face features (nose, lips, brows, chin, ears) inside the subject's head.
    ``whole_head`` is the fit to the whole head when ``transform`` was refined on the cranium
    (``fit_atlas``), else None.
    """

    transform: sitk.AffineTransform
    dice: float
    coverage: float
    whole_head: sitk.AffineTransform | None = None


_ONE_THREAD = threading.Lock()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """ITK filters and registrations on one thread while inside: the same volume then always gets the same
    fit. With several threads ITK's metrics sum their parts in a varying order, and the fits of one volume
    differed in the fourth decimal, enough to move voxels of the drawn face. (SimpleITK's per-registration
    thread count does not reach the metric's own threads, so the global default is set; a lock keeps two
    threads of one process from restoring it under each other.)"""
    with _ONE_THREAD:
        before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
        try:
            yield
        finally:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def register_masks(fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform,
                   iterations: int = 120, shrink: tuple[int, ...] = (2, 1),
                   fixed_mask: sitk.Image | None = None, sampling: float = 1.0) -> sitk.AffineTransform:
    """Mean-squares registration of two smoothed masks (``smooth_mask``); fixed points -> moving points.
    ``sampling`` < 1: that share of the voxels, drawn with a fixed seed."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMeanSquares()
    if fixed_mask is not None:
        reg.SetMetricFixedMask(fixed_mask)
    if sampling < 1.0:
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(sampling, 1)
    else:
        reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=iterations, relaxationFactor=0.6,
        gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel([max(0.0, f / 2.0) if f > 1 else 0.0 for f in shrink])
    reg.SetInitialTransform(initial, inPlace=False)
    out = reg.Execute(fixed, moving)
    return _as_affine(out)


def _as_affine(transform: sitk.Transform) -> sitk.AffineTransform:
    """Flatten any composite/Euler/similarity/affine transform into one AffineTransform."""
    if isinstance(transform, sitk.CompositeTransform):
        transform.FlattenTransform()
        transform = transform.GetNthTransform(0) if transform.GetNumberOfTransforms() == 1 else transform
    if isinstance(transform, sitk.CompositeTransform):
        # compose by sampling: A x + t from the images of the origin and unit vectors
        t0 = np.array(transform.TransformPoint((0.0, 0.0, 0.0)))
        cols = [np.array(transform.TransformPoint(tuple(e))) - t0 for e in np.eye(3)]
        affine = sitk.AffineTransform(3)
        affine.SetMatrix(np.column_stack(cols).ravel().tolist())
        affine.SetTranslation(t0.tolist())
        return affine
    generic = sitk.Transform(transform)
    try:
        affine = sitk.AffineTransform(generic)
    except (RuntimeError, TypeError):
        affine = sitk.AffineTransform(3)
        affine.SetMatrix(transform.GetMatrix())
        affine.SetTranslation(transform.GetTranslation())
        affine.SetCenter(transform.GetCenter())
    return affine


def _dice_on(fixed_mask: sitk.Image, moving_mask: sitk.Image, transform: sitk.Transform) -> float:
    warped = sitk.Resample(moving_mask, fixed_mask, transform, sitk.sitkNearestNeighbor, 0)
    a = sitk.GetArrayViewFromImage(fixed_mask) > 0
    b = sitk.GetArrayViewFromImage(warped) > 0
    denom = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / denom) if denom else 0.0


def fit_head_shape(atlas_mask: sitk.Image, subject_mask: sitk.Image, features: sitk.Image,
                   cranium: sitk.Image | None = None) -> Fit:
    """Affine fit of the atlas head mask to the subject head mask (both binary, any grids): the fit the
    phantom population's labels were made with (``semid.phantoms``); heads are fitted by ``fit_atlas``.

    Registration runs in physical (world) space, so any storage orientation, obliquity or voxel size
    works as long as the header's orientation is right. A sphere or a body part can match the head's
    outline but not its face: ``coverage`` tells them apart.

    With ``cranium`` (a mask on the atlas grid, ``cranium_mask``), the whole-head fit is refined, as a
    similarity, on the head outside the face only, and that refinement is the returned ``transform``: a fit that matched
    the face too would take on the face's proportions, and every region and frame placed by it would
    tell them (``dice`` and ``coverage``, which decide whether the volume is a head with a face, stay
    those of the whole-head fit).
    """
    fixed_bin = _downsample(atlas_mask, REGISTRATION_SPACING, sitk.sitkNearestNeighbor)
    moving_bin = _downsample(subject_mask, REGISTRATION_SPACING, sitk.sitkNearestNeighbor)
    fixed = smooth_mask(atlas_mask)
    moving = smooth_mask(subject_mask)
    init = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS)
    similarity = register_masks(fixed, moving, _similarity_from(sitk.AffineTransform(init)), iterations=80)
    affine = register_masks(fixed, moving, similarity, iterations=120)
    fit = Fit(affine, _dice_on(fixed_bin, moving_bin, affine), feature_coverage(features, subject_mask, affine))
    if cranium is not None:
        fit.whole_head = affine
        # a similarity (pose and one scale): an affine is not pinned down by a cranium seen without its front
        fit.transform = register_masks(fixed, moving, _similarity_from(affine), iterations=80,
                                  fixed_mask=_downsample(cranium, REGISTRATION_SPACING, sitk.sitkNearestNeighbor))
    return fit


#: Spacing (mm) of the intensity registration (``fit_atlas``): a head is about 60 x 80 x 70 voxels.
MI_SPACING_MM = 3.0
#: Width (mm) of the air around the subject's head that the intensity fit also looks at (the skin's edge).
MI_AIR_MM = 6.0
#: Depth (mm) of the field of view's edge that the fit leaves out (a cut edge is not anatomy).
MI_FOV_INSET_MM = 4.0
#: Bounds of the starting scale taken from the brains' volumes (atlas size / subject size).
START_SCALE = (0.8, 1.25)
#: Mean distance (mm) over the face by which the whole-head affine fit may depart from the cranium fit;
#: beyond it the affine fit is not used (a field of view that shows little of the head leaves it free). On
#: the real sample head it departs by 18 mm: its chin is 15-20 mm lower than the average head's.
MAX_WHOLE_HEAD_DEPARTURE_MM = 25.0
#: Depth (mm) of the field of view's edge the outline fit leaves out (the masks are smoothed by 4 mm).
OUTLINE_FOV_INSET_MM = 8.0


def coarse_copy(image: sitk.Image, spacing: float) -> sitk.Image:
    """``image`` (float32) on a ``spacing`` mm grid of its own orientation, block-averaged first."""
    img = sitk.Cast(image, sitk.sitkFloat32)
    factors = [max(1, int(np.floor(spacing / s + 1e-6))) for s in img.GetSpacing()]
    if max(factors) > 1:
        img = sitk.BinShrink(img, factors)
    return _downsample(img, spacing)


def centroid_mm(mask: sitk.Image) -> tuple[np.ndarray, float]:
    """World (LPS) centroid and volume (ml) of a binary mask."""
    idx = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)
    if idx.size == 0:
        return np.zeros(3), 0.0
    centre = mask.TransformContinuousIndexToPhysicalPoint(idx.mean(axis=0)[::-1].tolist())
    return np.array(centre), float(len(idx)) * float(np.prod(mask.GetSpacing())) / 1000.0


#: Iterations of the whole-head and the cranium intensity fits, and the share of the voxels they sample.
MI_ITERATIONS, MI_SAMPLING = (150, 150), 0.3
#: Shrink factors (of ``MI_SPACING_MM``) of the rough whole-head fit's levels: one coarse level, since the
#: refined fit that follows runs at the full grid (``benchmarks/fit_settings.py``: against two levels, the
#: fits move by well under a millimetre on the real-head cases, for about a second less).
ROUGH_SHRINK = (2,)
#: Shrink factors (of ``REGISTRATION_SPACING``) of the outline fit: two levels; with one, the whole-head fit
#: moves by millimetres (``benchmarks/fit_settings.py``).
OUTLINE_SHRINK = (2, 1)
#: Iterations of the outline fit and the share of the voxels it samples (``benchmarks/pipeline_parts.py``:
#: within 2 mm of 120 iterations on every voxel, in a sixth of the time).
OUTLINE_ITERATIONS, OUTLINE_SAMPLING = 40, 0.25


def _mutual_information(fixed: sitk.Image, moving: sitk.Image, mask: sitk.Image, initial: sitk.Transform,
                        iterations: int, shrink: tuple[int, ...] = (2, 1)) -> sitk.AffineTransform:
    """Mattes mutual information registration (fixed points -> moving points) over ``mask``."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricFixedMask(mask)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(MI_SAMPLING, 1)  # a fixed seed: the same volume always gets the same fit
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-3, iterations, relaxationFactor=0.6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel([f / 2.0 if f > 1 else 0.0 for f in shrink])
    reg.SetInitialTransform(initial, inPlace=False)
    return _as_affine(reg.Execute(fixed, moving))


#: A head whose extreme along a world axis lies within this distance (mm) of the field of view's extreme on
#: that side is cut by the field of view there (``start_from_uncut_edges``).
CUT_BY_VIEW_MM = 6.0


def _world_points(mask: sitk.Image) -> np.ndarray:
    """World (LPS, mm) points of the voxels of a binary mask, (n, 3)."""
    idx = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1].astype(np.float64)
    direction = np.array(mask.GetDirection()).reshape(3, 3)
    return np.array(mask.GetOrigin()) + (idx * np.array(mask.GetSpacing())) @ direction.T


def cut_sides(mask: sitk.Image, fov: sitk.Image) -> list[tuple[int, int]]:
    """The (world axis, side: -1 low / +1 high) on which ``mask`` reaches the field of view's edge."""
    pts, view = _world_points(mask), _world_points(fov)
    if not len(pts) or not len(view):
        return []
    sides = []
    for axis in range(3):
        if pts[:, axis].min() - view[:, axis].min() < CUT_BY_VIEW_MM:
            sides.append((axis, -1))
        if view[:, axis].max() - pts[:, axis].max() < CUT_BY_VIEW_MM:
            sides.append((axis, +1))
    return sides


def start_from_uncut_edges(atlas_head: sitk.Image, head: sitk.Image,
                           cut: list[tuple[int, int]]) -> sitk.Similarity3DTransform:
    """A start (subject points -> template points, scale 1) for a head cut by the field of view: along each
    world axis cut on one side, the head's other, uncut edge (the skin) goes onto the atlas head's; along the
    others, the centres meet. The default start, brain centre on brain centre, leaves the fit far off on the
    top of a head alone, whose brain's centre lies centimetres above the whole brain's."""
    pts, ref = _world_points(head), _world_points(atlas_head)
    subject, target = pts.mean(axis=0), ref.mean(axis=0)
    for axis in range(3):
        sides = {side for a, side in cut if a == axis}
        if len(sides) == 1:
            uncut = -next(iter(sides))
            subject[axis] = pts[:, axis].max() if uncut > 0 else pts[:, axis].min()
            target[axis] = ref[:, axis].max() if uncut > 0 else ref[:, axis].min()
    start = sitk.Similarity3DTransform()
    start.SetCenter(subject.tolist())
    start.SetTranslation((target - subject).tolist())
    return start


def fit_atlas(atlas: Atlas, head: sitk.Image, brain: sitk.Image, image: sitk.Image,
              fov: sitk.Image, start: sitk.Similarity3DTransform | None = None) -> Fit:
    """Fit the atlas to a subject by its intensities inside the field of view (module docstring).

    Args:
        atlas: the identity atlas (its ``template``, ``brain_image``, ``cranium``, ``head`` and ``features``).
        head: the subject's head mask (uint8, any grid; ``head_mask``).
        brain: the subject's brain mask found in its image (uint8, any grid; ``semid.brain``).
        image: the subject's volume (any orientation, spacing, MR weighting or CT).
        fov: uint8 mask (any grid) of where the subject's volume holds data (``grids.FieldOfView.mask_on``).
        start: where the fit starts (subject points -> template points); default: the subject's brain centre
            on the atlas brain's, scaled by their volumes.

    Returns:
        ``Fit``: ``transform`` the cranium fit (a similarity, template -> subject points), ``whole_head`` the
        affine fit over everything in view, ``dice`` the head-mask overlap inside the field of view.
    """
    with one_thread():
        return _fit_atlas(atlas, head, brain, image, fov, start)


def _fit_atlas(atlas: Atlas, head: sitk.Image, brain: sitk.Image, image: sitk.Image, fov: sitk.Image,
               start: sitk.Similarity3DTransform | None) -> Fit:
    fixed = coarse_copy(image, MI_SPACING_MM)
    moving = atlas.template_coarse
    near = sitk.Cast(sitk.Resample(head, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0), sitk.sitkUInt8)
    near = sitk.Cast(sitk.SignedMaurerDistanceMap(near, insideIsPositive=False, squaredDistance=False,
                                                  useImageSpacing=True) <= MI_AIR_MM, sitk.sitkUInt8)
    in_view = sitk.Cast(sitk.Resample(fov, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0), sitk.sitkUInt8)
    in_view = sitk.Cast(sitk.SignedMaurerDistanceMap(in_view, insideIsPositive=True, squaredDistance=False,
                                                     useImageSpacing=True) >= MI_FOV_INSET_MM, sitk.sitkUInt8)
    looked_at = sitk.And(near, in_view)
    # start: the subject's brain onto the atlas's (subject points -> template points)
    if start is None:
        subject_centre, subject_ml = centroid_mm(brain)
        atlas_centre, atlas_ml = centroid_mm(atlas.brain_image)
        start = sitk.Similarity3DTransform()
        start.SetCenter(subject_centre.tolist())
        start.SetTranslation((atlas_centre - subject_centre).tolist())
        if subject_ml > 0:
            start.SetScale(float(np.clip((atlas_ml / subject_ml) ** (1.0 / 3.0), *START_SCALE)))
    rough = _mutual_information(fixed, moving, looked_at, start, MI_ITERATIONS[0], ROUGH_SHRINK)
    cranium = sitk.Cast(sitk.Resample(atlas.cranium, fixed, rough, sitk.sitkNearestNeighbor, 0), sitk.sitkUInt8)
    refined = _mutual_information(fixed, moving, sitk.And(cranium, looked_at), _similarity_from(rough),
                                  MI_ITERATIONS[1])
    transform = _as_affine(refined.GetInverse())
    # the outline: smoothed head masks, the subject's (in view) fixed, so the atlas is always whole where looked at
    outline = smooth_mask(head)
    outline_view = sitk.Cast(sitk.Resample(fov, outline, sitk.Transform(), sitk.sitkNearestNeighbor, 0), sitk.sitkUInt8)
    outline_view = sitk.Cast(sitk.SignedMaurerDistanceMap(outline_view, insideIsPositive=True, squaredDistance=False,
                                                          useImageSpacing=True) >= OUTLINE_FOV_INSET_MM, sitk.sitkUInt8)
    whole = register_masks(outline, atlas.head_outline, sitk.AffineTransform(refined), OUTLINE_ITERATIONS,
                           shrink=OUTLINE_SHRINK, fixed_mask=outline_view, sampling=OUTLINE_SAMPLING)
    whole_head = _as_affine(whole.GetInverse())
    if mean_departure_mm(whole_head, transform, atlas.features) > MAX_WHOLE_HEAD_DEPARTURE_MM:
        whole_head = None
    return Fit(transform, _head_dice_in_view(atlas.head, head, fov, transform), 0.0, whole_head)


def mean_departure_mm(a: sitk.Transform, b: sitk.Transform, where: sitk.Image) -> float:
    """Mean distance (mm) between where ``a`` and ``b`` take the voxels of ``where`` (template grid)."""
    idx = np.argwhere(sitk.GetArrayViewFromImage(where) > 0)[::7, ::-1]
    if idx.size == 0:
        return 0.0
    pts = [where.TransformIndexToPhysicalPoint([int(v) for v in p]) for p in idx]
    return float(np.mean([np.linalg.norm(np.subtract(a.TransformPoint(p), b.TransformPoint(p))) for p in pts]))


def _head_dice_in_view(atlas_head: sitk.Image, head: sitk.Image, fov: sitk.Image,
                       transform: sitk.Transform) -> float:
    """Dice of the fitted atlas head and the subject's head, on the subject's grid inside its field of view."""
    ref = _downsample(head, REGISTRATION_SPACING, sitk.sitkNearestNeighbor)
    warped = sitk.GetArrayFromImage(sitk.Resample(atlas_head, ref, transform.GetInverse(),
                                                      sitk.sitkNearestNeighbor, 0)) > 0
    subject = sitk.GetArrayViewFromImage(ref) > 0
    view = sitk.GetArrayFromImage(sitk.Resample(fov, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0)) > 0
    a, b = warped & view, subject & view
    denom = int(a.sum()) + int(b.sum())
    return float(2.0 * np.logical_and(a, b).sum() / denom) if denom else 0.0


#: Distance (mm) from the atlas's identity region beyond which the head counts as cranium for the
#: refined fit (``cranium_mask``): more than the region's margin plus the largest face displacement
#: that reaches past it, so no part of the face steers the fit.
CRANIUM_EXCLUSION_MM = 12.0
#: Air (mm) around the atlas head that the refined fit also matches.
CRANIUM_AIR_MM = 12.0
#: Margin (mm) of tissue around the atlas's identity region that joins the region, ranked after it
#: (so it is blocked only near p = 1; ``blocking_score``). A face's shape does not stop at a sharp
#: line (the phantoms' identity field fades out over 6 mm beyond the region), and a block that ends
#: where the region ends leaves that rim. ``benchmarks/generator_leak.py`` block-only, adaptive A2 AUC:
#: 0.57 as shipped, 0.53 without the margin, 0.61 with the whole-head fit instead of the cranium fit
#: (0.62 before both): on the phantoms the fit is what mattered; the margin is kept as a safety margin
#: for real faces, whose identity has no fade radius to rely on.
REGION_MARGIN_MM = 8.0


def cranium_mask(head: sitk.Image, score: sitk.Image) -> sitk.Image:
    """Where the refined fit looks (uint8, atlas grid): the atlas head and the air within
    ``CRANIUM_AIR_MM`` of it, farther than ``CRANIUM_EXCLUSION_MM`` from the identity region.

    The air matters: inside the head alone, shrinking the atlas would always look better.
    """
    region = sitk.Cast(score > 0.02, sitk.sitkUInt8)
    far = _signed_distance(region) > CRANIUM_EXCLUSION_MM
    near_head = _signed_distance(sitk.Cast(head > 0, sitk.sitkUInt8)) <= CRANIUM_AIR_MM
    return sitk.Cast(sitk.And(sitk.Cast(near_head, sitk.sitkUInt8), sitk.Cast(far, sitk.sitkUInt8)), sitk.sitkUInt8)


def blocking_score(score: sitk.Image, brain: sitk.Image) -> sitk.Image:
    """The atlas score ``s(x)`` with a ``REGION_MARGIN_MM`` margin around its region (float32, atlas grid).

    The margin's values lie just above the region threshold (0.02) and fall outwards, below every
    voxel of the region, so it is blocked last; it keeps ``BRAIN_MARGIN_MM`` from the brain like the
    region.
    """
    arr = sitk.GetArrayFromImage(score).astype(np.float32)
    out_dist = sitk.GetArrayFromImage(_signed_distance(sitk.Cast(score > 0.02, sitk.sitkUInt8)))
    brain_dist = sitk.GetArrayFromImage(_signed_distance(sitk.Cast(brain > 0, sitk.sitkUInt8)))
    margin = (out_dist > 0) & (out_dist <= REGION_MARGIN_MM) & (brain_dist >= BRAIN_MARGIN_MM)
    lowest = float(arr[arr > 0.02].min(initial=1.0))  # the margin ranks under every voxel of the region
    ranked = 0.02 + (lowest - 0.02) * (0.1 + 0.8 * (1.0 - out_dist / REGION_MARGIN_MM))
    ranked = np.maximum(ranked.astype(np.float32), np.nextafter(np.float32(0.02), np.float32(1.0)))
    out = sitk.GetImageFromArray(np.where(margin, ranked, arr).astype(np.float32))
    out.CopyInformation(score)
    return out


def _similarity_from(affine: sitk.AffineTransform) -> sitk.Similarity3DTransform:
    sim = sitk.Similarity3DTransform()
    sim.SetCenter(affine.GetCenter())
    matrix = np.array(affine.GetMatrix()).reshape(3, 3)
    u, _, vt = np.linalg.svd(matrix)
    rot = u @ vt
    if np.linalg.det(rot) < 0:
        u[:, -1] *= -1
        rot = u @ vt
    sim.SetMatrix(rot.ravel().tolist())
    sim.SetTranslation(affine.GetTranslation())
    return sim


# ---------------------------------------------------------------------------------------------- atlas

#: Atlas grid spacing (mm): the score and the blank surface are smooth, 2 mm is plenty.
ATLAS_SPACING = 2.0
#: Depth (mm) of the identity region under the skin, and air margin (mm) in front of it.
FACE_DEPTH_MM, EAR_DEPTH_MM, FOREHEAD_DEPTH_MM, AIR_MARGIN_MM = 28.0, 14.0, 8.0, 14.0
#: Margin (mm) kept between the identity region and the brain.
BRAIN_MARGIN_MM = 8.0
#: Gaussian scale (mm) that turns the average head into a featureless one (no nose, eyes, lips, ears).
BLANK_SMOOTHING_MM = 9.0


def _register_mni(mni_head: sitk.Image, mean_head: sitk.Image) -> sitk.AffineTransform:
    """Affine MI registration of the MNI305 head (fixed) to the average head; MNI -> mean points.

    MNI305's field of view is a box that cuts the chin: the metric only looks inside that box.
    """
    fixed = _downsample(sitk.Cast(mni_head, sitk.sitkFloat32), 3.0)
    moving = _downsample(sitk.Cast(mean_head, sitk.sitkFloat32), 3.0)
    fov = sitk.BinaryErode(sitk.Cast(fixed > 0, sitk.sitkUInt8), [1, 1, 1])
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricFixedMask(fov)
    reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 300, relaxationFactor=0.7)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    init = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.GEOMETRY)
    reg.SetInitialTransform(init, inPlace=False)
    return _as_affine(reg.Execute(fixed, moving))


def _physical_points(image: sitk.Image) -> np.ndarray:
    """World (LPS) coordinates of every voxel centre, shaped like the numpy array (z, y, x, 3)."""
    size = image.GetSize()
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij"), axis=-1)
    index_xyz = grid[..., ::-1].astype(np.float64)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return np.array(image.GetOrigin()) + (index_xyz * np.array(image.GetSpacing())) @ direction.T


def _apply_affine(transform: sitk.AffineTransform, points: np.ndarray) -> np.ndarray:
    matrix = np.array(transform.GetMatrix()).reshape(3, 3)
    center = np.array(transform.GetCenter())
    return (points - center) @ matrix.T + center + np.array(transform.GetTranslation())


def _signed_distance(mask: sitk.Image) -> sitk.Image:
    """Signed distance (mm) to the mask's surface: negative inside, positive outside."""
    return sitk.SignedMaurerDistanceMap(mask, insideIsPositive=False, squaredDistance=False,
                                        useImageSpacing=True)


def identity_score_from_mni(mni_ras: np.ndarray, depth: np.ndarray, brain_dist: np.ndarray) -> np.ndarray:
    """The identity score ``s(x)`` on the atlas grid, from each voxel's MNI (RAS) position.

    Args:
        mni_ras: (..., 3) MNI coordinates in mm, RAS (x right, y anterior, z superior).
        depth: signed distance to the skin in mm (negative inside the head).
        brain_dist: distance to the brain in mm (0 inside).

    Returns:
        s in [0, 1], 0 outside the identity region. The region is the face (nose, lips, eyes, cheeks,
        chin), a thin forehead shell and the ears, to the depths of the module constants, plus air
        in front of them; ``s`` is highest for superficial voxels near the centre of the face (nose,
        eyes, mouth) and lower for deep, peripheral and ear voxels, so ``B_p`` grows from the face
        centre outwards and inwards as ``p`` rises.
    """
    x, y, z = mni_ras[..., 0], mni_ras[..., 1], mni_ras[..., 2]
    # Zones in MNI millimetres, measured on the average head: brow ridge at z = -15, nose tip at
    # (0, 91, -74), chin at z = -125, outer ears at |x| = 88, y = -40..-30, z = -30..-20.
    face = (z < -15) & (z > -140) & (y > np.where(z < -60, -5.0, 20.0)) & (np.abs(x) < 75)
    forehead = (z >= -15) & (z < 45) & (y > 45)
    ears = (np.abs(x) > 55) & (y > -70) & (y < 5) & (z > -65) & (z < 10)
    outside = depth > 0
    in_face = face & (depth <= AIR_MARGIN_MM) & (depth >= -FACE_DEPTH_MM)
    in_forehead = forehead & (depth <= AIR_MARGIN_MM) & (depth >= -FOREHEAD_DEPTH_MM)
    in_ears = ears & (depth <= AIR_MARGIN_MM) & (depth >= -EAR_DEPTH_MM)
    region = (in_face | in_forehead | in_ears) & (brain_dist > BRAIN_MARGIN_MM)

    centrality = np.exp(-(x**2) / (2 * 30.0**2) - ((z + 70.0) ** 2) / (2 * 45.0**2))
    superficial = np.where(outside, 1.0, 1.0 - np.clip(-depth / FACE_DEPTH_MM, 0.0, 1.0))
    face_score = 0.55 * centrality + 0.45 * superficial
    ear_score = 0.25 + 0.5 * superficial
    score = np.where(in_face | in_forehead, face_score, ear_score)
    return np.where(region, 0.05 + 0.95 * score, 0.0).astype(np.float32)


def _like(arr: np.ndarray, reference: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.CopyInformation(reference)
    return img


def feature_coverage(features: sitk.Image, subject_mask: sitk.Image, transform: sitk.Transform) -> float:
    """Fraction of the atlas's face features (nose, lips, brows, chin, ears) inside the subject's head."""
    warped = sitk.Resample(subject_mask, features, transform, sitk.sitkNearestNeighbor, 0)
    f = sitk.GetArrayViewFromImage(features) > 0
    return float((sitk.GetArrayViewFromImage(warped)[f] > 0).mean()) if f.any() else 0.0


# ----------------------------------------------------------------------------------------- the atlas


@dataclass
class Atlas:
    """The identity atlas on its 2 mm template grid (``build_atlas``; loaded by ``load_atlas``).

    Attributes:
        template: the average head itself (float32): what ``fit_atlas`` registers.
        head, brain: its head mask and the MNI152 brain brought into it (uint8).
        brain_image: the brain ``semid.brain`` finds in ``template`` (uint8): the same tool as on a subject,
            so ``fit_atlas`` starts from like for like.
        score: ``s(x)`` (float32, 0 outside the identity region); blank_sdf: signed distance to the
            featureless head surface; features: nose, lips, brows, chin, ears (uint8).
    """

    template: sitk.Image
    head: sitk.Image
    brain: sitk.Image
    brain_image: sitk.Image
    score: sitk.Image
    blank_sdf: sitk.Image
    features: sitk.Image
    version: str

    @classmethod
    def load(cls, folder: Path | None = None) -> Atlas:
        from semid.data import data_file

        folder = Path(folder or data_file("atlas"))
        meta_path = folder / "atlas.json"
        if not meta_path.exists():
            raise InputError("SemID's identity atlas is missing: run `make data` (or `semid data fetch`) first.")
        meta = json.loads(meta_path.read_text())
        if meta.get("version") != ATLAS_VERSION or not (folder / "brain_image.nii.gz").exists():
            raise InputError("SemID's identity atlas was built by an older version: run `make data` (or "
                             "`semid data fetch`) again.")

        def read(name: str) -> sitk.Image:
            return sitk.ReadImage(str(folder / name))

        return cls(sitk.Cast(read("template.nii.gz"), sitk.sitkFloat32), read("head.nii.gz"), read("brain.nii.gz"),
                   read("brain_image.nii.gz"), read("score.nii.gz"), read("blank_sdf.nii.gz"),
                   read("features.nii.gz"), meta["version"])

    @functools.cached_property
    def template_coarse(self) -> sitk.Image:
        """``template`` on the intensity fit's grid (``MI_SPACING_MM``)."""
        return coarse_copy(self.template, MI_SPACING_MM)

    @functools.cached_property
    def head_outline(self) -> sitk.Image:
        """``head`` smoothed on the outline fit's grid (``smooth_mask``)."""
        return smooth_mask(self.head)

    @functools.cached_property
    def cranium(self) -> sitk.Image:
        """The head outside the face (``cranium_mask``): what the atlas fit is refined on."""
        return cranium_mask(self.head, self.score)

    @functools.cached_property
    def blocking_score(self) -> sitk.Image:
        """``s(x)`` with the tissue margin around the region (``blocking_score``): what is blocked."""
        return blocking_score(self.score, self.brain)


_ATLASES: dict[str, Atlas] = {}


def load_atlas(folder: Path | None = None) -> Atlas:
    """The atlas in ``folder`` (default: the data folder's ``atlas``), loaded once per process."""
    key = str(folder)
    if key not in _ATLASES:
        _ATLASES[key] = Atlas.load(folder)
    return _ATLASES[key]


def build_atlas(root: Path) -> Path:
    """Build the identity atlas from the fetched templates into ``root/atlas`` (once, ~20 s).

    Files, all on one 2 mm grid of the average head: ``template.nii.gz`` (the head, for QC),
    ``head.nii.gz`` (head mask), ``brain.nii.gz`` (MNI152 grey+white matter brought in through the
    MNI305 head), ``score.nii.gz`` (``s(x)``, 0 outside the identity region) and ``blank_sdf.nii.gz``
    (signed distance to a featureless head surface, used by the plain fill).
    """
    root = Path(root)
    templates = root / "templates"
    out = root / "atlas"
    out.mkdir(parents=True, exist_ok=True)
    mean_full = sitk.ReadImage(str(templates / "mean_head.nii.gz"), sitk.sitkFloat32)
    mni_head = sitk.ReadImage(str(templates / "mni305_head.nii.gz"), sitk.sitkFloat32)
    mni_to_mean = _register_mni(mni_head, mean_full)
    mean_to_mni = mni_to_mean.GetInverse()

    mean = _downsample(mean_full, ATLAS_SPACING)
    head = head_mask(mean, head_threshold(mean, "MR"))
    brain_prob = sitk.Resample(
        sitk.ReadImage(str(templates / "mni152_gm.nii.gz"), sitk.sitkFloat32)
        + sitk.ReadImage(str(templates / "mni152_wm.nii.gz"), sitk.sitkFloat32),
        mean, mean_to_mni, sitk.sitkLinear, 0.0)
    brain = sitk.Cast(sitk.BinaryFillhole(sitk.Cast(brain_prob > 0.35 * 255, sitk.sitkUInt8)), sitk.sitkUInt8)
    brain = sitk.And(brain, head)

    lps = _apply_affine(mean_to_mni, _physical_points(mean))
    mni_ras = lps * np.array([-1.0, -1.0, 1.0])
    depth = sitk.GetArrayFromImage(_signed_distance(head))
    brain_dist = np.maximum(sitk.GetArrayFromImage(_signed_distance(brain)), 0.0)
    score = identity_score_from_mni(mni_ras, depth, brain_dist)

    smooth = sitk.SmoothingRecursiveGaussian(sitk.Cast(head, sitk.sitkFloat32), BLANK_SMOOTHING_MM)
    blank = sitk.Cast(smooth > 0.5, sitk.sitkUInt8)

    def save(arr_or_img, name: str, pixel=sitk.sitkFloat32) -> None:
        img = arr_or_img
        if isinstance(arr_or_img, np.ndarray):
            img = sitk.GetImageFromArray(arr_or_img)
            img.CopyInformation(mean)
        sitk.WriteImage(sitk.Cast(img, pixel), str(out / name), useCompression=True)

    save(mean, "template.nii.gz")
    save(head, "head.nii.gz", sitk.sitkUInt8)
    save(brain, "brain.nii.gz", sitk.sitkUInt8)
    save(score, "score.nii.gz")
    save(_signed_distance(blank), "blank_sdf.nii.gz")
    # what makes a face a face: the parts of the head the featureless surface cuts away (nose, lips,
    # brows, chin, ears); a head must cover most of them once the atlas is fitted to it
    features = sitk.And(sitk.And(head, sitk.Not(blank)), _like(score > 0, head))
    save(features, "features.nii.gz", sitk.sitkUInt8)
    # the brain the subject's brain is found by (``semid.brain``), found the same way in the template
    from semid.brain import mr_brain

    found = mr_brain(mean)
    save(sitk.Resample(found.mask, mean, sitk.Transform(), sitk.sitkNearestNeighbor, 0), "brain_image.nii.gz",
         sitk.sitkUInt8)
    meta = {"version": ATLAS_VERSION, "spacing_mm": ATLAS_SPACING,
            "identity_region_ml": float((score > 0).sum()) * ATLAS_SPACING**3 / 1000.0,
            "mni_to_template": {"matrix": list(mni_to_mean.GetMatrix()),
                                "translation": list(mni_to_mean.GetTranslation()),
                                "center": list(mni_to_mean.GetCenter())}}
    (out / "atlas.json").write_text(json.dumps(meta, indent=2))
    return out
