"""SemID MONAI Label app: de-identifies head CT/MRI volumes (task configs live in lib/configs).

Start it with, for example::

    monailabel start_server --app monailabel_app --studies /path/to/studies \
        --host 127.0.0.1 --port 8000 --conf models deidentify

MONAI Label binds 0.0.0.0 (every interface) unless told otherwise, and the server reads and returns
patient volumes without authentication: always pass ``--host 127.0.0.1`` (or an address you mean to
expose behind access control).

App conf keys: ``models`` (comma-separated task configs, or ``all``; default ``all``) and ``level``
(the privacy level used when a request names none; default ``high``).
"""

from __future__ import annotations

import logging
import os

# `lib` is this app's own package: MONAI Label puts the app folder on sys.path only while it imports
# this file, so every lib import must happen here at import time.
from lib.configs import TASK_CONFIGS
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

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
    """The SemID app: one infer task per selected task config (today: `deidentify`)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.model_dir = os.path.join(app_dir, "model")
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
