"""Task config for the `dicomheader` infer task."""

from __future__ import annotations

from typing import Any

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from lib.infers.dicomheader import DEFAULT_MAX_HEADER_MB, DicomHeaderInfer, parse_max_mb


class DicomHeaderConfig(TaskConfig):
    """The DICOM header de-identifier: one infer task (JSON answer), no trainer.

    The pseudonym key is the server's: ``SEMID_KEY`` or ``SEMID_KEY_FILE`` in its environment, else the
    key kept in the user's config folder (made on first use), as for ``semid deidentify-tree``.

    App conf keys (``monailabel start_server ... --conf KEY VALUE``):
        dicomheader_max_mb: largest header upload accepted (default 8; larger ones get 413).
    """

    def init(self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs: Any) -> None:
        """Record the app conf; a bad size limit stops the start-up with one sentence."""
        super().init(name, model_dir, conf, planner, **kwargs)
        self.max_mb = parse_max_mb(conf.get("dicomheader_max_mb", DEFAULT_MAX_HEADER_MB))

    def infer(self) -> dict[str, InferTask]:
        """The `dicomheader` infer task (named after this config); the key is loaded here, at start-up."""
        return {self.name: DicomHeaderInfer(max_mb=self.max_mb)}

    def trainer(self) -> TrainTask | None:
        """Nothing to train."""
        return None
