"""Segmentation check: does a de-identified volume still segment like its original?

``check_segmentation(original, deidentified)`` segments both volumes with the project's segmentation
model (``semid.eval.utility.SegmentationModel``, the committed ``seg_unet.pt``: background, brain,
other head tissue, identity region, brain lesion, face-region lesion), and compares the two label maps
class by class with Dice. The check passes when every *compared* class reaches the threshold.

Which classes are compared:

- by default the medical ones, ``CHECKED_CLASSES`` (brain, head, brain_lesion, face_lesion). The
  ``identity`` class (the soft tissue of the face) is reported but does not decide: redrawing it is the
  point of de-identification, so its segmentation moves with the level by design (on the 2 mm sample
  head its Dice falls from 0.89 at ``low`` to 0.78 at ``max`` while brain stays above 0.99);
- a class that is smaller than ``MIN_CLASS_ML`` in *both* segmentations is not compared (Dice of a
  handful of voxels is noise: the phantom-trained model finds 5-8 stray "lesion" voxels in the real
  sample head), and a class absent from both is not a failure (its Dice is ``None``);
- a class that is present in one segmentation and missing from the other has Dice 0 and fails.

The model is trained on MR only; a CT volume is refused with an ``InputError`` unless the weights say
they were trained on CT.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from semid.errors import InputError
from semid.io import MODALITY_KEY, modality_of, require_3d_scalar, same_geometry

#: Label names, index = label value (``semid.eval.utility.LABEL_NAMES``, kept here so this module's
#: constants import without torch).
LABEL_NAMES: tuple[str, ...] = ("background", "brain", "head", "identity", "brain_lesion", "face_lesion")
#: Classes whose Dice decides pass/fail by default (the medical content; see the module docstring).
CHECKED_CLASSES: tuple[str, ...] = ("brain", "head", "brain_lesion", "face_lesion")
#: Dice every compared class must reach by default.
DEFAULT_THRESHOLD = 0.8
#: A class smaller than this (ml) in both segmentations is not compared.
MIN_CLASS_ML = 0.5
#: Geometry tolerance (mm, direction cosines): NIfTI stores geometry in float32.
GEOMETRY_TOL = 1e-3


@dataclass
class SegCheck:
    """What ``check_segmentation`` returns.

    Attributes:
        labels: uint8 label map of the de-identified volume (values index ``LABEL_NAMES``), with the
            de-identified volume's geometry (= the original's).
        original_labels: the same for the original volume.
        dice: Dice per class 1..5 by name between the two label maps; ``None`` where the class is absent
            from both.
        volumes_ml: ``{"original": {class: ml}, "deidentified": {class: ml}}``.
        compared: classes that decided pass/fail (checked and large enough in at least one map).
        failed: compared classes whose Dice is below the threshold.
        threshold: the Dice every compared class had to reach.
        passed: True when at least one class was compared and none failed.
        modality: the modality the model was run for ("MR" or "CT").
    """

    labels: sitk.Image
    original_labels: sitk.Image
    dice: dict[str, float | None]
    volumes_ml: dict[str, dict[str, float]]
    compared: list[str]
    failed: list[str]
    threshold: float
    passed: bool
    modality: str
    classes: list[str] = field(default_factory=list)
    min_class_ml: float = MIN_CLASS_ML

    def summary(self) -> dict[str, Any]:
        """JSON-ready account of the check (no images)."""
        return {
            "dice": {k: (None if v is None else round(v, 4)) for k, v in self.dice.items()},
            "threshold": self.threshold,
            "passed": self.passed,
            "compared_classes": list(self.compared),
            "failed_classes": list(self.failed),
            "checked_classes": list(self.classes),
            "min_class_ml": self.min_class_ml,
            "volumes_ml": self.volumes_ml,
            "modality": self.modality,
            "labels": {name: value for value, name in enumerate(LABEL_NAMES) if value},
        }


def parse_threshold(value: Any) -> float:
    """A Dice threshold as a float in [0, 1] (a number or a numeric string).

    Raises:
        InputError: not a number, or outside [0, 1].
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InputError("The Dice threshold must be a number from 0 to 1, such as 0.8.")
    try:
        number = float(value)
    except ValueError:
        raise InputError("The Dice threshold must be a number from 0 to 1, such as 0.8.") from None
    if not math.isfinite(number) or not 0.0 <= number <= 1.0:
        raise InputError(f"The Dice threshold {number:g} is out of range: use a number from 0 to 1, such as 0.8.")
    return number


def parse_classes(value: Any) -> tuple[str, ...]:
    """Class names that decide pass/fail, from a list or a comma-separated string.

    Raises:
        InputError: empty, or a name that is not one of the model's classes 1..5.
    """
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise InputError(f"The classes to check must be a list of class names from {', '.join(LABEL_NAMES[1:])}.")
    names = [n for n in names if n]
    unknown = [n for n in names if n not in LABEL_NAMES[1:]]
    if unknown or not names:
        raise InputError(f"Unknown or no classes to check: choose from {', '.join(LABEL_NAMES[1:])}.")
    return tuple(dict.fromkeys(names))


@functools.lru_cache(maxsize=1)
def _default_model():  # noqa: ANN202 - torch stays out of this module's import
    from semid.eval.utility import SegmentationModel

    return SegmentationModel.load()


def _with_modality(image: sitk.Image, modality: str) -> sitk.Image:
    """A shallow copy of ``image`` (SimpleITK copies on write) tagged with ``modality``; the input is
    left as it is."""
    tagged = sitk.Image(image)
    tagged.SetMetaData(MODALITY_KEY, modality)
    return tagged


def check_segmentation(original: sitk.Image, deidentified: sitk.Image, threshold: float = DEFAULT_THRESHOLD,
                       classes: Sequence[str] = CHECKED_CLASSES, modality: str | None = None, model: Any = None,
                       min_class_ml: float = MIN_CLASS_ML) -> SegCheck:
    """Segment ``original`` and ``deidentified`` and compare them class by class (Dice).

    Args:
        original: the volume before de-identification (3D, any orientation); not modified.
        deidentified: the de-identified volume on the same grid (size, spacing, origin, direction).
        threshold: Dice in [0, 1] that every compared class must reach.
        classes: names of the classes that may decide pass/fail (default ``CHECKED_CLASSES``).
        modality: "MR" or "CT"; default: what the original's header says, else guessed from its
            intensities (``semid.identity.guess_modality``).
        model: a ``SegmentationModel`` (default: the committed weights, loaded once per process).
        min_class_ml: classes smaller than this (ml) in both label maps are not compared.

    Raises:
        InputError: not 3D, grids differ, bad threshold or classes, or a modality the model was not
            trained on.
    """
    from semid import identity as idm

    threshold = parse_threshold(threshold)
    classes = parse_classes(classes)
    original = require_3d_scalar(original)
    deidentified = require_3d_scalar(deidentified)
    if not same_geometry(original, deidentified, tol=GEOMETRY_TOL):
        raise InputError("The de-identified volume lies on another grid than the original (size, spacing, origin "
                         "or orientation differ): give the de-identified version of this very volume.")
    modality = modality or idm.guess_modality(original, modality_of(original))
    model = model if model is not None else _default_model()
    if modality not in model.modalities:
        raise InputError(f"The segmentation check's model was trained on {', '.join(model.modalities)} only, so "
                         f"this {modality} volume cannot be checked.")
    before = model.predict(_with_modality(original, modality))
    after = model.predict(_with_modality(deidentified, modality))
    return compare_label_maps(before, after, threshold, classes, min_class_ml, modality)


def compare_label_maps(before: sitk.Image, after: sitk.Image, threshold: float = DEFAULT_THRESHOLD,
                       classes: Sequence[str] = CHECKED_CLASSES, min_class_ml: float = MIN_CLASS_ML,
                       modality: str = "MR") -> SegCheck:
    """Compare two label maps on one grid (values index ``LABEL_NAMES``) by the rules of this module.

    ``before`` is the original's segmentation, ``after`` the de-identified volume's; voxel volumes come
    from ``before``'s spacing (mm). ``modality`` is only recorded.

    Raises:
        InputError: the label maps differ in size, or bad threshold or classes.
    """
    threshold = parse_threshold(threshold)
    classes = parse_classes(classes)
    if before.GetSize() != after.GetSize():
        raise InputError("The two segmentations differ in size: compare label maps of one grid.")
    a, b = sitk.GetArrayViewFromImage(before), sitk.GetArrayViewFromImage(after)
    voxel_ml = float(np.prod(before.GetSpacing())) / 1000.0
    dice: dict[str, float | None] = {}
    volumes: dict[str, dict[str, float]] = {"original": {}, "deidentified": {}}
    compared: list[str] = []
    failed: list[str] = []
    for value, name in enumerate(LABEL_NAMES):
        if value == 0:
            continue
        in_a, in_b = a == value, b == value
        n_a, n_b = int(in_a.sum()), int(in_b.sum())
        volumes["original"][name] = round(n_a * voxel_ml, 3)
        volumes["deidentified"][name] = round(n_b * voxel_ml, 3)
        dice[name] = 2.0 * int((in_a & in_b).sum()) / (n_a + n_b) if n_a + n_b else None
        if name in classes and max(n_a, n_b) * voxel_ml >= min_class_ml:
            compared.append(name)
            if dice[name] < threshold:
                failed.append(name)
    # a check that compared nothing (nothing segmented) has shown nothing, so it does not pass
    passed = bool(compared) and not failed
    labels = sitk.Cast(after, sitk.sitkUInt8)
    labels.CopyInformation(after)
    return SegCheck(labels, before, dice, volumes, compared, failed, threshold, passed, modality,
                    list(classes), min_class_ml)
