"""Shared fixtures: the small real sample head and a real MONAI Label server running the SemID app
(the server launcher itself lives in servers.py, so tests that need a differently configured server
start their own)."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import MONAILABEL, REPO_ROOT, SAMPLE_IMAGE_ID, MonaiLabelServer
from servers import monailabel_server as start_server

__all__ = ["sample_head_path", "SAMPLE_IMAGE_ID"]


def sample_head_path() -> Path:
    """Where `make data` puts the small real T1w head (`$SEMID_DATA_DIR` overrides `<repo>/.data`)."""
    data_dir = os.environ.get("SEMID_DATA_DIR")
    base = Path(data_dir) if data_dir else REPO_ROOT / ".data"
    return base / "samples" / "t1w_small.nii.gz"


@pytest.fixture(scope="session")
def sample_head() -> Path:
    """The small real head (2 mm T1w, int16); skips when `make data` has not been run."""
    path = sample_head_path()
    if not path.is_file():
        pytest.skip(f"sample head {path} not found: run `make data` first")
    return path


@pytest.fixture(scope="session")
def monailabel_server(sample_head: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MonaiLabelServer]:
    """Start a real MONAI Label server (SemID app, CPU, loopback) once per test session."""
    if not MONAILABEL.exists():
        pytest.skip(f"MONAI Label is not installed next to {sys.executable}: pip install -e '.[server]'")
    root = tmp_path_factory.mktemp("monailabel")
    studies = root / "studies"
    studies.mkdir()
    shutil.copyfile(sample_head, studies / f"{SAMPLE_IMAGE_ID}.nii.gz")
    try:
        with start_server(root, studies) as server:
            yield server
    except RuntimeError as error:  # the server did not come up: its log tail is in the message
        pytest.fail(str(error), pytrace=False)
