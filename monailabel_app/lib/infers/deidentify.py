"""MONAI Label infer task `deidentify`: a thin adapter over `semid.pipeline.Deidentifier`.

The task does no imaging work of its own: it reads the volume MONAI Label hands it, runs the
library at the requested privacy level and writes the result as NIfTI. MONAI Label sends that file
back to the client (multipart `image` + `params`, or `?output=image` / `?output=json`) and deletes it.

It deliberately subclasses the bare `InferTask`, not `BasicInferTask`: the latter's transform chains
pull in `monailabel.transform.post`, which imports torchvision, and the registry's torchvision is a CUDA
build that fails to import next to the CPU-only torch.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.deidentifiers import make_deidentifier
from lib.infers.common import INPUT_ERROR_STATUS, request_image_path, write_result
from semid.errors import InputError
from semid.io import read_volume
from semid.pipeline import LEVEL_PRESETS, parse_level

logger = logging.getLogger(__name__)

#: Privacy level used when a request names none (DESIGN.md section 4: presets, or any float in [0, 1]).
DEFAULT_LEVEL = "high"



class DeidentifyInfer(InferTask):
    """Block the face and ears at the requested privacy level and fill the blocked region."""

    #: The request parameters this task reads (``common.check_params`` refuses any other).
    params: frozenset[str] = frozenset({"level"})

    def __init__(self, default_level: str | float = DEFAULT_LEVEL, model_dir: str | None = None) -> None:
        # Fail at server start, not at the first request, when the configured default is bad.
        parse_level(default_level)
        self.default_level = default_level
        # the app's model folder: identity weights published there by the `identity` train task are used
        # (and reloaded when the file changes), else the library's own
        self.model_dir = model_dir
        super().__init__(
            type=InferType.OTHERS,
            labels=None,
            dimension=3,
            description=(
                "De-identify a head CT/MRI: block the identity-bearing region (face, ears) at the privacy "
                "level and fill it from the volume's medical content; returns the volume and a record."
            ),
            # Published under models.deidentify.config in /info/. `level` is the one request parameter;
            # clients send it in the infer params, e.g. {"level": "medium"} or {"level": 0.6}.
            config={
                "level": default_level,
                "level_presets": dict(LEVEL_PRESETS),
                "level_range": [0.0, 1.0],
            },
        )

    def is_valid(self) -> bool:
        """Always loadable: the library brings its own models, nothing is fetched at run time."""
        return True

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Run the de-identifier on `request["image"]`; return (result NIfTI path, record)."""
        image_path = request_image_path(request)
        started = time.perf_counter()
        try:
            level = parse_level(request.get("level", self.default_level))
            image = read_volume(image_path)
            result = make_deidentifier(level, self.model_dir).run(image)
        except InputError as error:
            raise HTTPException(status_code=INPUT_ERROR_STATUS, detail=str(error)) from None

        out_path = write_result(result.image, "semid_deid_")
        record = dict(result.record)
        # Logged without the input path: file names of clinical data may carry PHI.
        logger.info(
            "deidentify: level %.3f, %.1f ml blocked, %.2f s",
            level,
            float(record.get("blocked_ml", 0.0)),
            time.perf_counter() - started,
        )
        return out_path, record
