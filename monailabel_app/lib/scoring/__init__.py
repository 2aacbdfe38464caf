"""Scoring methods of the SemID MONAI Label app."""

from lib.scoring.reid_risk import INFO_KEY, ReidRiskScoring

__all__ = ["INFO_KEY", "ReidRiskScoring"]
