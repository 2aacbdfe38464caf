"""Task config for the `deidentify` infer task."""

from __future__ import annotations

from typing import Any

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from lib.infers.deidentify import DEFAULT_LEVEL, DeidentifyInfer


class DeidentifyConfig(TaskConfig):
    """The de-identifier: one infer task, no trainer yet.

    App conf keys (``monailabel start_server ... --conf KEY VALUE``):
        level: the privacy level used when a request names none (preset or float; default ``high``).
    """

    def init(self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs: Any) -> None:
        """Record the app conf; the library loads its own models, so nothing is downloaded here."""
        super().init(name, model_dir, conf, planner, **kwargs)
        self.default_level = conf.get("level", DEFAULT_LEVEL)

    def infer(self) -> dict[str, InferTask]:
        """The `deidentify` infer task (named after this config)."""
        return {self.name: DeidentifyInfer(default_level=self.default_level, model_dir=self.model_dir)}

    def trainer(self) -> TrainTask | None:
        """No trainer yet."""
        return None
