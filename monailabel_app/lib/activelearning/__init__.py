"""Active-learning strategies of the SemID MONAI Label app."""

from lib.activelearning.highest_risk import HighestRisk

__all__ = ["HighestRisk"]
