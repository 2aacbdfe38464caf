"""MONAI Label infer task `identity`: the identity region the identity network finds, as a label map.

It returns what the network itself segments (``IdentityNetwork.predict(volume) > 0.5``; label 1 =
``identity``), on the input's exact grid, so a person can review and correct it in Slicer's segment
editor and save it to the datastore as the image's ``final`` label; the ``identity`` train task
fine-tunes the network on those labels. (The de-identifier blocks more than this: the network's
region joined with the registered atlas's region and the air in front of the face.)

The weights are the app's published ones (``<model_dir>/identity_unet.pt``, written by the train task)
when that file exists, else the ones bundled with the library; the library reloads them when the file
changes. Like `deidentify`, this subclasses the bare `InferTask` (no torchvision through
`monailabel.transform.post`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.deidentifiers import published_identity_weights
from lib.infers.common import INPUT_ERROR_STATUS, request_image_path, write_result
from semid.errors import InputError
from semid.io import read_volume

logger = logging.getLogger(__name__)

#: Label value and name of the identity region in the returned label map.
IDENTITY_LABELS = {"identity": 1}


class IdentityInfer(InferTask):
    """Segment the identity region (face soft tissue, nose, lips, eyes, ears) of a head CT/MR."""

    #: The request parameters this task reads (``common.check_params`` refuses any other): none.
    params: frozenset[str] = frozenset()

    def __init__(self, model_dir: str | Path | None = None) -> None:
        self.model_dir = model_dir
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=dict(IDENTITY_LABELS),
            dimension=3,
            description=(
                "Identity region of a head CT/MRI (face soft tissue, nose, lips, eyes, ears) found by the identity "
                "network, as a label map to review and save as the final label for training."
            ),
        )

    def is_valid(self) -> bool:
        """Always loadable: the library ships weights, nothing is fetched at run time."""
        return True

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Segment ``request["image"]``; return (label map NIfTI path, record)."""
        from semid.identity.network import load_cached

        image_path = request_image_path(request)
        started = time.perf_counter()
        try:
            image = read_volume(image_path)
            net = load_cached(published_identity_weights(self.model_dir))
            prob = net.predict(image, "auto")
        except InputError as error:
            raise HTTPException(status_code=INPUT_ERROR_STATUS, detail=str(error)) from None
        region = (sitk.GetArrayViewFromImage(prob) > 0.5).astype(np.uint8) * np.uint8(IDENTITY_LABELS["identity"])
        label = sitk.GetImageFromArray(region)
        label.CopyInformation(image)

        out_path = write_result(label, "semid_identity_")
        voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
        record = {
            "labels": dict(IDENTITY_LABELS),
            "identity_region_ml": round(float(np.count_nonzero(region)) * voxel_ml, 3),
            "identity_network": net.describe(),
        }
        logger.info("identity: %.1f ml region, %.2f s", record["identity_region_ml"], time.perf_counter() - started)
        return out_path, record
