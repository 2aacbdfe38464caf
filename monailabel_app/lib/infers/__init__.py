"""Infer tasks of the SemID MONAI Label app."""

from lib.infers.deidentify import DeidentifyInfer

__all__ = ["DeidentifyInfer"]
