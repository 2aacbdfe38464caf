"""SemID: adjustable, semantics-preserving de-identification of head CT and MRI."""

__version__ = "0.1.0"
