"""Slicer-independent parts of the SemID module: the server client, privacy levels, DICOM export.

Nothing here imports slicer, qt, ctk or vtk, so all of it is tested with pytest outside Slicer.
"""

from .client import (
    BadRequestError,
    DeidentifyResult,
    SemIDClient,
    SemIDClientError,
    ServerError,
    ServerInfo,
    ServerTimeoutError,
    ServerUnreachableError,
    TaskMissingError,
    summarize_record,
)
from .levels import PRESETS, explain_level, format_level, parse_level, preset_name
from .series_export import (
    Geometry,
    SeriesExportError,
    SeriesPlan,
    plan_series,
    read_source_attributes,
    write_series,
)

__all__ = [
    "PRESETS",
    "BadRequestError",
    "DeidentifyResult",
    "Geometry",
    "SemIDClient",
    "SemIDClientError",
    "SeriesExportError",
    "SeriesPlan",
    "ServerError",
    "ServerInfo",
    "ServerTimeoutError",
    "ServerUnreachableError",
    "TaskMissingError",
    "explain_level",
    "format_level",
    "parse_level",
    "plan_series",
    "preset_name",
    "read_source_attributes",
    "summarize_record",
    "write_series",
]
