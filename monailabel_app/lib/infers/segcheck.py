"""MONAI Label infer task `segcheck`: a thin adapter over `semid.eval.segcheck.check_segmentation`.

The request names the ORIGINAL image (datastore id or upload). By default the task de-identifies it
at `level` itself (as `deidentify` would); with `deidentified` naming another image in the datastore it
checks that image instead (it must be the de-identified version of this one, on the same grid). Both
volumes are segmented by the project's segmentation model and compared class by class.

It returns the segmentation of the de-identified volume as a label map (InferType SEGMENTATION, label
names in /info/, so MONAI Label clients such as Slicer show it as segments) and JSON with `dice` per
class, `threshold`, `passed` and the de-identification record. The result is never saved into the
datastore: it is a check, not a label for the image (a `final` label of this app is the reviewed
identity region, which this 6-class map is not).

Like `deidentify`, it subclasses the bare `InferTask`: `BasicInferTask` pulls in torchvision.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.deidentifiers import make_deidentifier
from lib.infers.common import INPUT_ERROR_STATUS, NOT_IN_DATASTORE, request_image_path, write_result
from lib.infers.deidentify import DEFAULT_LEVEL
from semid.errors import InputError
from semid.eval.segcheck import (
    CHECKED_CLASSES,
    DEFAULT_THRESHOLD,
    LABEL_NAMES,
    MIN_CLASS_ML,
    check_segmentation,
    parse_classes,
    parse_threshold,
)
from semid.io import read_volume
from semid.pipeline import parse_level

logger = logging.getLogger(__name__)



def _datastore_image_path(image_id: Any) -> str:
    """Path of a datastore image named by id (never a path the client chose)."""
    if not isinstance(image_id, str) or not image_id.strip():
        raise HTTPException(status_code=INPUT_ERROR_STATUS,
                            detail="The de-identified image must be named by its id in the datastore.")
    # the running app's datastore (the task itself is given only the request)
    from monailabel.interfaces.utils.app import app_instance

    path = app_instance().datastore().get_image_uri(image_id)
    if not path or not os.path.exists(path):
        raise HTTPException(status_code=404, detail=NOT_IN_DATASTORE)
    return path


class SegcheckInfer(InferTask):
    """Segment the original and the de-identified volume; return the latter's labels and the Dice check."""

    #: The request parameters this task reads (``common.check_params`` refuses any other).
    params: frozenset[str] = frozenset({"deidentified", "threshold", "classes", "level"})

    def __init__(self, default_level: str | float = DEFAULT_LEVEL, default_threshold: float = DEFAULT_THRESHOLD,
                 model_dir: str | Path | None = None) -> None:
        # Fail at server start, not at the first request, when the configured defaults are bad.
        parse_level(default_level)
        self.default_threshold = parse_threshold(default_threshold)
        self.default_level = default_level
        self.model_dir = model_dir
        super().__init__(
            type=InferType.SEGMENTATION,
            labels={name: value for value, name in enumerate(LABEL_NAMES) if value},
            dimension=3,
            description=(
                "Segmentation check: segment the original and the de-identified head (brain, head tissue, "
                "identity region, lesions) and compare them by Dice per class against a threshold; returns "
                "the de-identified volume's segmentation."
            ),
            # Request parameters (infer params): level, threshold, classes, deidentified.
            config={
                "level": default_level,
                "threshold": self.default_threshold,
                "classes": list(CHECKED_CLASSES),
                "min_class_ml": MIN_CLASS_ML,
                "deidentified": "",
            },
        )

    def is_valid(self) -> bool:
        """Always loadable: the segmentation weights ship with the library."""
        return True

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Check `request["image"]`; return (label map NIfTI path, check JSON)."""
        image_path = request_image_path(request)
        # MONAI Label's app.infer reads save_label from this same dict after the call: a check result
        # is never stored as a label of the image (see the module docstring).
        request["save_label"] = False
        started = time.perf_counter()
        deidentified_id = request.get("deidentified") or None
        try:
            threshold = parse_threshold(request.get("threshold", self.default_threshold))
            classes = parse_classes(request.get("classes", list(CHECKED_CLASSES)))
            original = read_volume(image_path)
            if deidentified_id is not None:
                deidentified = read_volume(_datastore_image_path(deidentified_id))
                modality = None
                record: dict[str, Any] = {"source": "datastore image", "deidentified_image": deidentified_id}
            else:
                level = parse_level(request.get("level", self.default_level))
                result = make_deidentifier(level, self.model_dir).run(original)
                deidentified, record = result.image, dict(result.record)
                modality = record.get("modality")
            check = check_segmentation(original, deidentified, threshold, classes, modality=modality)
        except InputError as error:
            raise HTTPException(status_code=INPUT_ERROR_STATUS, detail=str(error)) from None

        out_path = write_result(check.labels, "semid_segcheck_")
        summary = check.summary()
        # Logged without the input path: file names of clinical data may carry PHI.
        logger.info(
            "segcheck: %s, threshold %.3g, %s (failed: %s), %.2f s",
            "stored de-identified image" if deidentified_id else f"level {float(record['level']):.3f}",
            check.threshold,
            "passed" if check.passed else "not passed",
            ", ".join(check.failed) or "none",
            time.perf_counter() - started,
        )
        return out_path, {**summary, "deidentification": record}
