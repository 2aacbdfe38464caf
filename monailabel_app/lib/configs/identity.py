"""Task config for the `identity` infer task and the `identity` train task."""

from __future__ import annotations

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from lib.infers.identity import IdentityInfer
from lib.trainers.identity import IdentityTrain


class IdentityConfig(TaskConfig):
    """The identity-region network: review its region (infer) and fine-tune it on reviewed labels (train).

    Both use the app's model folder (``SemIDApp.model_dir``: app conf ``model_dir``, default ``<app>/model``):
    the train task publishes ``identity_unet.pt`` there, the infer tasks load it from there.
    """

    def infer(self) -> dict[str, InferTask]:
        """The `identity` infer task (named after this config)."""
        return {self.name: IdentityInfer(model_dir=self.model_dir)}

    def trainer(self) -> TrainTask | None:
        """The `identity` train task."""
        return IdentityTrain(model_dir=self.model_dir)
