"""SemID MONAI Label app: de-identifies head CT/MRI volumes (task configs live in lib/configs).

Start it with, for example::

    monailabel start_server --app monailabel_app --studies /path/to/studies \
        --host 127.0.0.1 --port 8000 --conf models deidentify

MONAI Label binds 0.0.0.0 (every interface) unless told otherwise, and the server reads and returns
patient volumes without authentication: always pass ``--host 127.0.0.1`` (or an address you mean to
expose behind access control).

App conf keys: ``models`` (comma-separated task configs, or ``all``; default ``all``) and ``level``
(the privacy level used when a request names none; default ``high``), ``model_dir`` (where train tasks
publish weights and infer tasks load them; default ``<app>/model``), ``max_upload_mb`` (largest request
body accepted, larger ones get 413; default 1024), ``segcheck_threshold`` (the segcheck task's Dice
threshold when a request names none; default 0.8), ``auto_score`` (``true`` lets MONAI Label re-run the
``reid_risk`` scoring at start-up and after training and active-learning requests; default ``false``:
run it with ``POST /scoring/reid_risk``), ``dicom_proxy`` (``true`` serves MONAI Label's ``/proxy/dicom``
routes, which pass any request through to the PACS and its identified originals; default ``false``: 403),
``cors_origins`` (comma-separated origins of web applications allowed to call the server, e.g.
``http://localhost:3000``; default none: a request from another origin gets 403).
``level`` is also the level of the ``reid_risk`` scoring method and of the ``highest_risk`` strategy;
batch inference (``/batch/infer/deidentify``) stores its results under the label tag ``deid``
(``lib/batch.py``). With ``--studies http://HOST:PORT/dicom-web`` (a DICOMweb server such as Orthanc),
``modalities`` (default ``CT,MR``) says which series are listed, and a result saved under ``deid`` is
stored back as a new de-identified DICOM series (``lib/datastore/dicomweb.py``).

Safety defaults (``lib/security.py``): request bodies over ``max_upload_mb`` refused with 413, infer
requests naming a server path instead of a datastore id or this request's upload refused, MONAI Label's
log lines stripped of anything interpolated into them (patient names travel in file names, ids and
request parameters), and a warning in the log when the server listens on a non-loopback address.
"""

from __future__ import annotations

import logging
import os
import sys

# `lib` is this app's own package: MONAI Label puts the app folder on sys.path only while it imports
# this file, so every lib import must happen here at import time.
from lib import DEID_TAG, security
from lib.activelearning import HighestRisk
from lib.batch import DeidentifyBatchInfer
from lib.configs import TASK_CONFIGS
from lib.datastore import create_dicomweb_datastore
from lib.infers.common import check_params
from lib.infers.deidentify import DEFAULT_LEVEL
from lib.scoring import ReidRiskScoring
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

import semid

logger = logging.getLogger(__name__)


def select_task_configs(models: str) -> dict[str, TaskConfig]:
    """Instantiate the task configs named in `models` ("all" or comma-separated names)."""
    names = [m.strip() for m in models.split(",") if m.strip()] or ["all"]
    if "all" in names:
        names = list(TASK_CONFIGS)
    unknown = [n for n in names if n not in TASK_CONFIGS]
    if unknown:
        raise ValueError(
            f"Unknown model(s) {', '.join(unknown)} in --conf models; choose from: {', '.join(TASK_CONFIGS)}."
        )
    return {n: TASK_CONFIGS[n]() for n in names}


class SemIDApp(MONAILabelApp):
    """The SemID app: the infer and train tasks of the selected task configs, risk-driven active learning,
    batch de-identification and, for DICOMweb studies, SemID's own datastore."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        # First, so that nothing MONAI Label logs from here on carries PHI; the limit is checked before
        # anything else is set up, so a bad value stops the start-up with one sentence.
        security.install_log_scrubber()
        max_body = security.max_upload_bytes(conf)
        origins = security.parse_origins(conf.get("cors_origins"))
        self.model_dir = conf.get("model_dir") or os.path.join(app_dir, "model")
        # Must exist before super().__init__, which calls init_infers()/init_trainers().
        self.task_configs = select_task_configs(conf.get("models", "all"))
        for name, task_config in self.task_configs.items():
            logger.info("SemID: adding model %s", name)
            task_config.init(name, self.model_dir, conf, None)

        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="SemID",
            description="Adjustable, semantics-preserving de-identification of head CT and MRI",
            version=semid.__version__,
        )
        # MONAI Label re-runs every scoring method at start-up and after each training and active-learning
        # request; `reid_risk` de-identifies every image it has not scored, which over a PACS means
        # fetching the whole archive at each start. Off unless asked for (`--conf auto_score true`).
        self._auto_update_scoring = self._auto_update_scoring and conf.get("auto_score", "false").lower() == "true"
        # In the server (not in MONAI Label's training subprocess): the upload limit, upload tracking and
        # the bind-address check; the server accepts no request before this constructor returns.
        dicom_proxy = conf.get("dicom_proxy", "false").lower() == "true"
        refusal = security.default_bind_refusal(sys.argv)
        if refusal:
            # one sentence in the log and a non-zero exit, before the socket is bound (an exception here
            # would end the start-up with a traceback)
            logger.error(refusal)
            logging.shutdown()
            os._exit(2)
        if security.install_request_guard(max_body, dicom_proxy, origins):
            security.install_upload_tracking()
            security.log_bind_address()

    def infer(self, request: dict, datastore: Datastore | None = None) -> dict:
        """MONAI Label's infer, after refusing an ``image`` that is a server path rather than a datastore id or
        this request's upload (MONAI Label would read any existing path), for every infer task."""
        store = datastore or self.datastore()
        sessions = self.sessions()
        roots = [getattr(store, "_datastore_path", None), sessions.store_path if sessions else None]
        security.check_request_images(request, roots)
        task = self._infers.get(request.get("model", ""))
        if task is not None:
            check_params(request, getattr(task, "params", frozenset()))
        if request.get("model") == "deidentify" and request.get("save_label"):
            # MONAI Label saves an infer result under the request's tag (default `original`): a
            # de-identified volume must never stand in for a model's or a person's label.
            request = {**request, "label_tag": DEID_TAG}
        return super().infer(request, datastore)

    def init_remote_datastore(self) -> Datastore:
        """DICOMweb (``--studies http://HOST:PORT/dicom-web``) through SemID's datastore: CT and MR listed
        (``--conf modalities``), results stored back as new de-identified series. MONAI Label's own set-up
        first downloads dcmqi tools from GitHub; SemID's never downloads anything. XNAT and DSA
        (MONAI_LABEL_DATASTORE) keep MONAI Label's datastores."""
        if settings.MONAI_LABEL_DATASTORE.lower() in ("xnat", "dsa"):
            return super().init_remote_datastore()
        logger.info("SemID: DICOMweb datastore")
        return create_dicomweb_datastore(self.studies, self.conf)

    def init_infers(self) -> dict[str, InferTask]:
        """Infer tasks from every selected task config."""
        infers: dict[str, InferTask] = {}
        for name, task_config in self.task_configs.items():
            tasks = task_config.infer()
            infers.update(tasks if isinstance(tasks, dict) else {name: tasks})
        return infers

    def init_trainers(self) -> dict[str, TrainTask]:
        """Trainers from the selected task configs that have one."""
        trainers: dict[str, TrainTask] = {}
        for name, task_config in self.task_configs.items():
            trainer = task_config.trainer()
            if trainer is not None:
                trainers[name] = trainer
        return trainers

    def init_strategies(self) -> dict[str, Strategy]:
        """`highest_risk` (riskiest image without a final label first), and MONAI Label's `random` and `first`."""
        return {
            "highest_risk": HighestRisk(self.conf.get("level", DEFAULT_LEVEL), self.model_dir),
            "random": Random(),
            "first": First(),
        }

    def init_scoring_methods(self) -> dict[str, ScoringMethod]:
        """`reid_risk`: each image's residual re-identification risk at the app's level, in its info."""
        return {"reid_risk": ReidRiskScoring(self.conf.get("level", DEFAULT_LEVEL), self.model_dir)}

    def init_batch_infer(self) -> DeidentifyBatchInfer:
        """`/batch/infer/deidentify`: results under the label tag `deid`, CPU-only servers, failures reported."""
        return DeidentifyBatchInfer()
