"""Slicer-independent parts of the SemID module: the server client and background jobs, privacy
levels, the side-by-side data and renders, the record and segmentation-check text, settings, DICOM export.

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
from .jobs import CANCELLED, DONE, FAILED, InferJob, JobCancelledError, Progress
from .levels import PRESETS, explain_level, format_level, parse_level, preset_name
from .results import SegcheckSummary, format_record, models_used, record_rows, residual_risk
from .series_export import (
    Geometry,
    SeriesExportError,
    SeriesPlan,
    plan_series,
    read_source_attributes,
    write_series,
)
from .settings import DEFAULT_SERVER_URL, KEYS, Settings, validate, validate_output_folder, validate_server_url
from .views import (
    OUTLINE_SOURCE,
    Renders,
    SideBySide,
    changed_mask,
    display_window,
    render_pair,
    side_by_side,
    surface_render,
    write_png,
    write_renders,
)

__all__ = [
    "CANCELLED",
    "DEFAULT_SERVER_URL",
    "DONE",
    "FAILED",
    "KEYS",
    "OUTLINE_SOURCE",
    "PRESETS",
    "InferJob",
    "JobCancelledError",
    "Progress",
    "Renders",
    "SegcheckSummary",
    "Settings",
    "SideBySide",
    "changed_mask",
    "display_window",
    "format_record",
    "models_used",
    "record_rows",
    "render_pair",
    "residual_risk",
    "side_by_side",
    "surface_render",
    "validate",
    "validate_output_folder",
    "validate_server_url",
    "write_png",
    "write_renders",
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
