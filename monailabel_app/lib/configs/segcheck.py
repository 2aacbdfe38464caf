"""Task config for the `segcheck` infer task."""

from __future__ import annotations

from typing import Any

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from lib.infers.deidentify import DEFAULT_LEVEL
from lib.infers.segcheck import SegcheckInfer
from semid.eval.segcheck import DEFAULT_THRESHOLD


class SegcheckConfig(TaskConfig):
    """The segmentation check: one infer task, no trainer (its model is the benchmark's fixed U1 segmenter).

    App conf keys (``monailabel start_server ... --conf KEY VALUE``):
        level: the privacy level used when a request names none (preset or float; default ``high``).
        segcheck_threshold: the Dice threshold used when a request names none (default 0.8).
    """

    def init(self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs: Any) -> None:
        """Record the app conf; the library loads its own models, so nothing is downloaded here."""
        super().init(name, model_dir, conf, planner, **kwargs)
        self.default_level = conf.get("level", DEFAULT_LEVEL)
        self.default_threshold = conf.get("segcheck_threshold", DEFAULT_THRESHOLD)

    def infer(self) -> dict[str, InferTask]:
        """The `segcheck` infer task (named after this config)."""
        return {self.name: SegcheckInfer(self.default_level, self.default_threshold, self.model_dir)}

    def trainer(self) -> TrainTask | None:
        """No trainer: the segmenter is the benchmark's fixed reference model."""
        return None
