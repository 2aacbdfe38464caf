"""Train tasks of the SemID MONAI Label app."""

from lib.trainers.identity import IdentityTrain

__all__ = ["IdentityTrain"]
