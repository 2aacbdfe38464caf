"""MONAI Label train task `identity`: fine-tune the identity network on the datastore's reviewed labels.

A thin adapter over ``semid.identity.finetune.finetune``: it takes the datastore's images that have a
``final`` label (MONAI Label's ``datastore.datalist()``), starts from the weights in use (the app's
published ``<model_dir>/identity_unet.pt``, else the library's own), and lets the library publish the
result into the model folder only when it validates at least as well as those weights (see the library
module for the key metric, the validation data and the phantom sanity floor). The next inference of
``identity`` and ``deidentify`` then loads the new file; the de-identification record names its sha256.

Request parameters (``POST /train/identity`` JSON body, defaults in ``config()``): ``max_steps``,
``max_epochs`` (when above 0, instead of ``max_steps``), ``lr``, ``batch``, ``device`` (auto, cpu, cuda),
``validation`` (auto, datastore, phantoms) and ``seed``.

MONAI Label's ``BasicTrainTask`` is not used: it imports no torchvision (checked), but it brings its own
ignite engines, TensorBoard handlers and a publish rule (the best epoch by its own validation) that would
replace the model file without comparing it with the weights in use.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from lib.deidentifiers import PUBLISHED_IDENTITY_WEIGHTS, published_identity_weights
from lib.infers.common import INPUT_ERROR_STATUS
from semid.errors import InputError

logger = logging.getLogger(__name__)

#: Training defaults, published under trainers.identity.config in /info/ (clients may override each).
DEFAULTS: dict[str, Any] = {"max_steps": 60, "max_epochs": 0, "lr": 1e-3, "batch": 2, "device": "auto",
                            "validation": "auto", "seed": 0}


class IdentityTrain(TrainTask):
    """Fine-tune the identity-region network from reviewed ``final`` labels; publish only a model that is not worse."""

    def __init__(self, model_dir: str | Path) -> None:
        super().__init__(
            "Fine-tune the identity-region network on the datastore's reviewed final labels; the new weights are "
            "published only if they validate at least as well as the weights in use"
        )
        self.model_dir = Path(model_dir)
        self._last: dict[str, Any] = {}
        self._lock = threading.Lock()

    def config(self) -> dict[str, Any]:
        """The request parameters and their defaults."""
        return dict(DEFAULTS)

    def stats(self) -> dict[str, Any]:
        """The last run's report (MONAI Label shows it in /model/info/identity and the train status)."""
        return dict(self._last)

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        """Run one fine-tuning; returns the library's report (published or not, both Dice values, ...)."""
        from semid.identity.finetune import FinetuneConfig, finetune

        params = {**DEFAULTS, **{k: v for k, v in request.items() if k in DEFAULTS}}
        try:
            config = FinetuneConfig.checked(steps=params["max_steps"], lr=params["lr"], batch=params["batch"],
                                            device=params["device"], validation=params["validation"],
                                            seed=params["seed"], epochs=params["max_epochs"])
            pairs = [(item["image"], item["label"]) for item in datastore.datalist()]
            # one run at a time in this process: two runs would race to publish
            with self._lock:
                result = finetune(pairs, self.model_dir / PUBLISHED_IDENTITY_WEIGHTS,
                                  published_identity_weights(self.model_dir),
                                  config, log=lambda line: logger.info("identity train: %s", line))
        except InputError as error:
            raise HTTPException(status_code=INPUT_ERROR_STATUS, detail=str(error)) from None
        self._last = result
        return result
