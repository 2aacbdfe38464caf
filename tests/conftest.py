"""Shared fixtures: the small real sample head and a real MONAI Label server running the SemID app."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_DIR = REPO_ROOT / "monailabel_app"

#: Id under which the sample head sits in the server's datastore (neutral: no name, no date).
SAMPLE_IMAGE_ID = "head001"
SERVER_START_TIMEOUT_S = 120.0
SERVER_STOP_TIMEOUT_S = 15.0

# Log to stdout only (captured into the fixture's log file): MONAI Label's default log config writes
# app.log into <app>/logs, i.e. into the repository.
_LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"simple": {"format": "[%(asctime)s] [%(levelname)s] (%(name)s:%(lineno)d) - %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "simple"}},
    "root": {"level": "INFO", "handlers": ["console"]},
}


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


@dataclass(frozen=True)
class MonaiLabelServer:
    """A running `monailabel start_server` with the SemID app."""

    url: str  # e.g. http://127.0.0.1:PORT, no trailing slash
    pid: int  # leader of its own process group
    studies: Path  # the local datastore folder
    log_path: Path  # the server's stdout+stderr
    tmp_dir: Path  # the server's TMPDIR: uploads and results pass through it
    image_id: str = SAMPLE_IMAGE_ID  # the sample head's id in the datastore

    def log_tail(self, chars: int = 6000) -> str:
        """The end of the server log, for failure messages."""
        return _tail(self.log_path, chars)


def _tail(path: Path, chars: int) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "<no server log>"


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server's process group by id: SIGTERM, then SIGKILL after a grace period."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=SERVER_STOP_TIMEOUT_S)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=SERVER_STOP_TIMEOUT_S)


def _wait_until_up(proc: subprocess.Popen, url: str, log_path: Path) -> None:
    import requests

    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"MONAI Label server exited with code {proc.returncode} while starting; log:\n" + _tail(log_path, 6000)
            )
        try:
            if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(
        f"MONAI Label server did not answer /info/ within {SERVER_START_TIMEOUT_S:.0f} s; log:\n"
        + _tail(log_path, 6000)
    )


@pytest.fixture(scope="session")
def monailabel_server(sample_head: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MonaiLabelServer]:
    """Start a real MONAI Label server (SemID app, CPU, loopback) once per test session."""
    monailabel = Path(sys.executable).parent / "monailabel"
    if not monailabel.exists():
        pytest.skip("MONAI Label is not installed in this environment: pip install -e '.[server]'")

    root = tmp_path_factory.mktemp("monailabel")
    studies = root / "studies"
    studies.mkdir()
    shutil.copyfile(sample_head, studies / f"{SAMPLE_IMAGE_ID}.nii.gz")
    log_config = root / "logging.json"
    log_config.write_text(json.dumps(_LOG_CONFIG))
    log_path = root / "server.log"
    server_tmp = root / "tmp"
    server_tmp.mkdir()
    port = _free_loopback_port()
    url = f"http://127.0.0.1:{port}"

    env = dict(os.environ)
    # The `monailabel` launcher is a shell script that runs `$MONAILABEL_PYEXE -m monailabel.main`.
    env["MONAILABEL_PYEXE"] = sys.executable
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU only, even on a machine with a GPU
    env["MONAI_LABEL_SESSION_PATH"] = str(root / "sessions")  # not ~/.cache/monailabel
    env["MONAI_LABEL_TRACKING_ENABLED"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    # MONAI Label writes uploads and results under TMPDIR and leaves an upload behind when the infer
    # task raises; a private TMPDIR keeps those inside this session's temporary folder.
    env["TMPDIR"] = str(server_tmp)
    cmd = [
        str(monailabel),
        "start_server",
        "--app", str(APP_DIR),
        "--studies", str(studies),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--log_config", str(log_config),
        "--conf", "models", "deidentify",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        # Own process group (session), so teardown can stop the server and its children by id.
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=root,
            start_new_session=True,
        )  # fmt: skip
    try:
        try:
            _wait_until_up(proc, url, log_path)
        except RuntimeError as error:
            pytest.fail(str(error), pytrace=False)
        yield MonaiLabelServer(url=url, pid=proc.pid, studies=studies, log_path=log_path, tmp_dir=server_tmp)
    finally:
        _stop(proc)
