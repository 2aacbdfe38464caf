"""The module's settings (server URL, default level, output folder): defaults, keys and validation.

The widget keeps them with `qt.QSettings` under `KEYS`; everything read back goes through `validate`,
so a hand-edited or stale settings file gives a clear sentence instead of a broken panel.
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from .levels import PRESETS, parse_level

DEFAULT_SERVER_URL = "http://127.0.0.1:8000"
DEFAULT_LEVEL = PRESETS["high"]
DEFAULT_TIMEOUT_S = 600.0
#: QSettings keys (Slicer's settings file groups them under "SemID").
KEYS = {"server_url": "SemID/ServerURL", "level": "SemID/DefaultLevel", "output_folder": "SemID/OutputFolder"}


def default_output_folder() -> str:
    return str(Path.home() / "SemID")


@dataclass(frozen=True)
class Settings:
    server_url: str = DEFAULT_SERVER_URL
    level: float = DEFAULT_LEVEL
    output_folder: str = ""

    def as_strings(self) -> dict[str, str]:
        """Values to store, keyed like `KEYS`."""
        return {"server_url": self.server_url, "level": f"{self.level:.4f}", "output_folder": self.output_folder}


def validate_server_url(url: str) -> str:
    """The URL normalised (scheme added, no trailing slash); ValueError with one sentence otherwise.

    Any host is accepted: the server may run on this machine or another.
    """
    text = (url or "").strip()
    if not text:
        raise ValueError("No SemID server URL is set: enter one such as http://127.0.0.1:8000.")
    if "://" not in text:
        text = "http://" + text
    parsed = urllib.parse.urlparse(text)
    try:
        port = parsed.port
    except ValueError:
        port = -1
    if parsed.scheme not in ("http", "https") or not parsed.hostname or port == -1:
        raise ValueError(f"The server URL {url!r} is not valid: use one such as http://127.0.0.1:8000.")
    return text.rstrip("/")


def validate_output_folder(folder: str) -> str:
    """An absolute folder path that is (or can be made) a writable folder; ValueError otherwise."""
    text = (folder or "").strip()
    if not text:
        raise ValueError("Choose an output folder for the DICOM series.")
    path = Path(text).expanduser()
    if not path.is_absolute():
        raise ValueError("The output folder must be a full path (pick it with the folder button).")
    if path.exists() and not path.is_dir():
        raise ValueError("The output folder is a file, not a folder: choose a folder.")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        raise ValueError("The output folder is not writable: choose a folder you can write to.")
    return str(path)


def validate(values: dict[str, str | None]) -> tuple[Settings, list[str]]:
    """Settings from stored strings (missing ones take the defaults) and one sentence per value that
    was bad and replaced by its default."""
    problems: list[str] = []
    url = DEFAULT_SERVER_URL
    if values.get("server_url"):
        try:
            url = validate_server_url(str(values["server_url"]))
        except ValueError as exc:
            problems.append(str(exc))
    level = DEFAULT_LEVEL
    if values.get("level") not in (None, ""):
        try:
            level = parse_level(str(values["level"]))
        except ValueError as exc:
            problems.append(str(exc))
    folder = default_output_folder()
    if values.get("output_folder"):
        try:
            folder = validate_output_folder(str(values["output_folder"]))
        except ValueError as exc:
            problems.append(str(exc))
    return Settings(url, level, folder), problems
