"""Batch inference of the SemID MONAI Label app: `/batch/infer/deidentify` over the datastore.

It replaces MONAI Label's `BatchInferTask.__call__` for three reasons:

- **label tag**: results always go under the label tag `deid`, whatever the request says (MONAI
  Label's default is `original`, which a client treats as the model's label *of the image*; a
  de-identified volume must never take that place);
- **CPU-only servers**: MONAI Label builds its device list from `torch.cuda.device_count()` when
  `multi_gpu` is true (its default) and then divides by the list's length, which is zero without a
  GPU. Here the devices are the GPUs when there are any, else `cpu`;
- **one image failing does not end the batch**: MONAI Label's sequential path has no try/except. Here
  each image's failure is recorded with its one-sentence reason and the batch goes on.

Images: `images` in the request is `all` (default), `unlabeled` (no `deid` label yet: resumes an
interrupted batch), `labeled` (a `deid` label already: redo them), or a list of image ids. Images run one
after another (de-identifying one volume already uses every core). Progress goes to the log as
`deidentify batch: i/n done; <image id> de-identified in 9.5 s` (or `... failed in 0.1 s: <reason>`);
run in the background (`POST /batch/infer/deidentify`), these lines are the task details of
`GET /batch/infer`. The result is a summary plus one entry per image. Logs name image ids only, never
paths.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable
from enum import Enum
from typing import Any

import torch
from fastapi import HTTPException
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelException
from monailabel.interfaces.tasks.batch_infer import BatchInferImageType, BatchInferTask

from lib import DEID_TAG
from semid.errors import InputError

logger = logging.getLogger(__name__)

#: The only label tag batch results are stored under.
#: The models the batch runs (their results are de-identified volumes).
BATCH_MODELS = ("deidentify",)
#: Request keys that steer the batch itself and are not passed on to each image's inference.
_BATCH_KEYS = ("images", "max_batch_size", "max_workers", "multi_gpu", "gpus", "label_tag", "save_label")


def _devices(request: dict[str, Any]) -> list[str]:
    """The devices to cycle the images over: the requested GPUs when CUDA is there, else the CPU."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return ["cpu"]
    wanted = str(request.get("device", "cuda"))
    if not wanted.startswith("cuda"):
        return [wanted]
    gpus = request.get("gpus", "all")
    if request.get("multi_gpu", True) and (not gpus or gpus == "all"):
        return [f"cuda:{i}" for i in range(count)]
    if request.get("multi_gpu", True) and isinstance(gpus, str):
        ids = [g.strip() for g in gpus.split(",") if g.strip().isdigit() and int(g) < count]
        if ids:
            return [f"cuda:{g}" for g in ids]
    return [wanted if ":" in wanted else "cuda:0"]


def _reason(error: BaseException) -> str:
    """The one-sentence reason of an image's failure, fit for the client and the log (no paths)."""
    if isinstance(error, HTTPException) and isinstance(error.detail, str):
        return error.detail
    if isinstance(error, InputError):
        return str(error)
    if isinstance(error, MONAILabelException):
        return "MONAI Label could not run the deidentify model for this image (is it among the app's models?)."
    return f"De-identification failed with an internal error ({type(error).__name__}): see the server log."


class DeidentifyBatchInfer(BatchInferTask):
    """`/batch/infer/deidentify`: de-identify many datastore images, results under the label tag `deid`."""

    def get_images(self, request: dict[str, Any], datastore: Datastore) -> list[str]:
        """Image ids to run, in order: all, unlabeled / labeled with respect to `deid`, or a given list."""
        images = request.get("images", BatchInferImageType.IMAGES_ALL)
        if isinstance(images, Enum):  # FastAPI hands the query parameter over as the enum (a sync run)
            images = images.value
        if isinstance(images, (list, tuple)):
            if not all(isinstance(i, str) for i in images):
                raise HTTPException(status_code=422, detail="The images to run must be a list of image ids.")
            return list(dict.fromkeys(images))  # as given, once each
        if not isinstance(images, str) or images not in {t.value for t in BatchInferImageType}:
            raise HTTPException(status_code=422,
                                detail="The images to run must be all, labeled, unlabeled, or a list of image ids.")
        every = sorted(datastore.list_images())
        if images == BatchInferImageType.IMAGES_ALL:
            return every
        # MONAI Label's local datastore ignores the tag in get_(un)labeled_images: ask for `deid` here
        has_deid = {i for i in every if datastore.get_label_by_image_id(i, DEID_TAG)}
        if images == BatchInferImageType.IMAGES_LABELED:
            return [i for i in every if i in has_deid]
        return [i for i in every if i not in has_deid]

    def __call__(self, request: dict[str, Any], datastore: Datastore, infer: Callable) -> dict[str, Any]:
        """Run `infer` on each selected image, saving under `deid`; return a summary and per-image results."""
        model = request.get("model")
        if model not in BATCH_MODELS:
            detail = "Batch inference runs the deidentify model only: use /batch/infer/deidentify."
            logger.error("deidentify batch: refused: %s", detail)
            raise HTTPException(status_code=422, detail=detail)
        started = time.perf_counter()
        image_ids = self.get_images(request, datastore)
        max_batch_size = request.get("max_batch_size", 0)
        if isinstance(max_batch_size, int) and not isinstance(max_batch_size, bool) and max_batch_size > 0:
            image_ids = image_ids[:max_batch_size]
        if request.get("label_tag", DEID_TAG) != DEID_TAG:
            logger.info("deidentify batch: results are stored under the label tag %s, not the one asked for "
                        "(a de-identified volume never replaces the original label)", DEID_TAG)
        devices = _devices(request)
        known = set(datastore.list_images())
        total = len(image_ids)
        logger.info("deidentify batch: %d image(s) on %s", total, ", ".join(devices))

        base = {k: v for k, v in copy.deepcopy(request).items() if k not in _BATCH_KEYS}
        results: dict[str, dict[str, Any]] = {}
        for done, image_id in enumerate(image_ids, 1):
            t0 = time.perf_counter()
            req = {**base, "model": model, "image": image_id, "save_label": True, "label_tag": DEID_TAG,
                   "device": devices[(done - 1) % len(devices)]}
            result_file = None
            try:
                if image_id not in known:
                    raise InputError("There is no image with that id in the datastore.")
                answer = infer(req, datastore)
                result_file = answer.get("file")
                record = answer.get("params") or {}
                results[image_id] = {
                    "status": "done",
                    "label": answer.get("label"),
                    "tag": DEID_TAG,
                    "level": record.get("level"),
                    "blocked_ml": record.get("blocked_ml"),
                    "seconds": round(time.perf_counter() - t0, 2),
                }
                outcome = f"{image_id} de-identified in {time.perf_counter() - t0:.1f} s"
            except Exception as error:  # noqa: BLE001 - one image failing must not end the batch
                reason = _reason(error)
                results[image_id] = {"status": "failed", "reason": reason}
                if not isinstance(error, (HTTPException, InputError, MONAILabelException)):
                    logger.error("deidentify batch: image %s failed with %s", image_id, type(error).__name__)
                outcome = f"{image_id} failed in {time.perf_counter() - t0:.1f} s: {reason}"
            finally:
                # MONAI Label's app.infer copied the result into the datastore; the temporary file goes
                if result_file and os.path.isfile(result_file):
                    os.remove(result_file)
            logger.info("deidentify batch: %d/%d done; %s", done, total, outcome)

        failed = {i: r["reason"] for i, r in results.items() if r["status"] == "failed"}
        summary = {
            "model": model,
            "label_tag": DEID_TAG,
            "devices": devices,
            "total": total,
            "succeeded": total - len(failed),
            "failed": len(failed),
            "failures": failed,
            "seconds": round(time.perf_counter() - started, 2),
        }
        logger.info("deidentify batch: finished, %d of %d de-identified, %d failed%s", summary["succeeded"], total,
                    len(failed), f" ({', '.join(failed)})" if failed else "")
        return {"summary": summary, "images": results}
