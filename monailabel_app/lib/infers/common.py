"""What every SemID infer task does around the library call: find the request's image, turn the
library's refusals into one-sentence 4xx answers, and write the result where MONAI Label expects it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any

import SimpleITK as sitk
from fastapi import HTTPException

from semid.io import write_volume

#: HTTP status for a request the library refuses (bad level, unreadable or non-3D input). MONAI Label
#: registers no exception handlers, so anything but FastAPI's HTTPException becomes a bare 500
#: "Internal Server Error"; HTTPException keeps its status and sends {"detail": message}.
INPUT_ERROR_STATUS = 422

NOT_IN_DATASTORE = "There is no image with that id in the datastore: list the images with /datastore/."


#: Request keys MONAI Label itself and its clients (the Slicer module, MONAI Label's own) put into an infer
#: request besides a task's parameters.
MONAI_LABEL_KEYS = frozenset({"model", "image", "label", "session", "session_id", "device", "client_id", "save_label",
                              "label_tag", "label_info", "result_extension", "result_dtype", "result_compress",
                              "multi_gpu", "gpus", "logging", "cache_transforms", "output"})


def check_params(request: dict[str, Any], task_params: frozenset[str], also: frozenset[str] = frozenset()) -> None:
    """Refuse (422, one sentence) a request that names a parameter the task does not take: a misspelt
    ``levle`` would otherwise be ignored and the task run at its default."""
    unknown = sorted(set(request) - MONAI_LABEL_KEYS - task_params - also)
    if unknown:
        takes = ", ".join(sorted(task_params)) or "no parameters"
        raise HTTPException(status_code=INPUT_ERROR_STATUS,
                            detail=f"Unknown parameter {', '.join(repr(k[:40]) for k in unknown[:5])} for "
                                   f"{request.get('model', 'this task')}: it takes {takes}.")


def request_image_path(request: dict[str, Any]) -> str:
    """The local path MONAI Label resolved for ``request["image"]``; 404 when there is none (its local
    datastore maps an unknown image id to "" instead of raising)."""
    image_path = request.get("image")
    if not image_path:
        raise HTTPException(status_code=404, detail=NOT_IN_DATASTORE)
    return str(image_path)


def write_result(image: sitk.Image, prefix: str) -> str:
    """Write ``image`` to a new temporary NIfTI (MONAI Label sends it and deletes it); nothing is left
    behind when writing fails."""
    fd, out_path = tempfile.mkstemp(prefix=prefix, suffix=".nii.gz")
    os.close(fd)
    try:
        write_volume(image, out_path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(out_path)
        raise
    return out_path
