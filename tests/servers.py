"""Real servers for the tests: `monailabel start_server` with the SemID app, and Orthanc with its DICOMweb
plugin, each started on a free loopback port in its own process group and stopped by that group's id
(never by name)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_DIR = REPO_ROOT / "monailabel_app"
MONAILABEL = Path(sys.executable).parent / "monailabel"

#: Id under which the sample head sits in the server's datastore (neutral: no name, no date).
SAMPLE_IMAGE_ID = "head001"
SERVER_START_TIMEOUT_S = 120.0
SERVER_STOP_TIMEOUT_S = 15.0

# Log to stdout only (captured into the server's log file): MONAI Label's default log config writes
# app.log into <app>/logs, i.e. into the repository.
_LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"simple": {"format": "[%(asctime)s] [%(levelname)s] (%(name)s:%(lineno)d) - %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "simple"}},
    "root": {"level": "INFO", "handlers": ["console"]},
}


@dataclass(frozen=True)
class MonaiLabelServer:
    """A running `monailabel start_server` with the SemID app."""

    url: str  # e.g. http://127.0.0.1:PORT, no trailing slash
    pid: int  # leader of its own process group
    studies: str | Path  # the local datastore folder or the DICOMweb URL
    log_path: Path  # the server's stdout+stderr
    tmp_dir: Path  # the server's TMPDIR: uploads and results pass through it
    image_id: str = SAMPLE_IMAGE_ID  # the sample head's id in the datastore

    def log_tail(self, chars: int = 6000) -> str:
        """The end of the server log, for failure messages."""
        return tail(self.log_path, chars)


def tail(path: Path, chars: int) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "<no server log>"


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process_group(proc: subprocess.Popen) -> None:
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


def wait_until_up(proc: subprocess.Popen, url: str, log_path: Path) -> None:
    import requests

    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"MONAI Label server exited with code {proc.returncode} while starting; log:\n" + tail(log_path, 6000)
            )
        try:
            if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(
        f"MONAI Label server did not answer /info/ within {SERVER_START_TIMEOUT_S:.0f} s; log:\n"
        + tail(log_path, 6000)
    )




@contextmanager
def monailabel_server(root: Path, studies: str | Path, conf: dict[str, str] | None = None,
                      env_extra: dict[str, str] | None = None, host: str | None = "127.0.0.1"
                      ) -> Iterator[MonaiLabelServer]:
    """Start `monailabel start_server` (SemID app, CPU, loopback) under `root`; stop it on exit.

    `studies` is a local folder or a DICOMweb URL; `conf` adds `--conf KEY VALUE` pairs (default
    `models deidentify`); `env_extra` adds environment variables (MONAI Label settings).
    Raises RuntimeError with the log tail when the server does not come up.
    """
    root.mkdir(parents=True, exist_ok=True)
    log_config = root / "logging.json"
    log_config.write_text(json.dumps(_LOG_CONFIG))
    log_path = root / "server.log"
    server_tmp = root / "tmp"
    server_tmp.mkdir(exist_ok=True)
    port = free_loopback_port()
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
    # task raises; a private TMPDIR keeps those inside this server's temporary folder.
    env["TMPDIR"] = str(server_tmp)
    env.update(env_extra or {})
    conf = {"models": "deidentify"} if conf is None else dict(conf)
    # Weights trained during a test are published here, not into the repository's monailabel_app/model,
    # and weights published there by hand never change what a test server infers with.
    conf.setdefault("model_dir", str(root / "model"))
    cmd = [
        str(MONAILABEL),
        "start_server",
        "--app", str(APP_DIR),
        "--studies", str(studies),
        "--port", str(port),
        "--log_config", str(log_config),
    ]  # fmt: skip
    if host is not None:  # None: MONAI Label's default, which the SemID app refuses
        cmd += ["--host", host]
    for key, value in conf.items():
        cmd += ["--conf", key, str(value)]
    with open(log_path, "wb") as log:
        # Own process group (session), so teardown can stop the server and its children by id.
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=root,
            start_new_session=True,
        )  # fmt: skip
    try:
        wait_until_up(proc, url, log_path)
        yield MonaiLabelServer(url=url, pid=proc.pid, studies=studies, log_path=log_path, tmp_dir=server_tmp)
    finally:
        stop_process_group(proc)


# ------------------------------------------------------------------------------------------ Orthanc

#: Debian's Orthanc (package `orthanc`) and its DICOMweb plugin (package `orthanc-dicomweb`).
ORTHANC = Path("/usr/sbin/Orthanc")
ORTHANC_DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ORTHANC_START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class OrthancServer:
    """A running Orthanc with the DICOMweb plugin, HTTP on a loopback port, storage in a temporary folder."""

    url: str  # REST API root, e.g. http://127.0.0.1:PORT, no trailing slash
    dicomweb_url: str  # e.g. http://127.0.0.1:PORT/dicom-web
    pid: int  # leader of its own process group
    storage_dir: Path  # storage area and SQLite index
    log_path: Path
    process: subprocess.Popen = field(repr=False, compare=False)

    def log_tail(self, chars: int = 6000) -> str:
        return tail(self.log_path, chars)

    def stop(self) -> None:
        """Stop it now (by process group id); stopping again is a no-op."""
        stop_process_group(self.process)

    def upload(self, files: list[Path]) -> None:
        """Store DICOM files through Orthanc's REST API (not DICOMweb: the app under test uses that)."""
        import requests

        with requests.Session() as session:
            for path in files:
                response = session.post(f"{self.url}/instances", data=path.read_bytes(), timeout=30)
                if response.status_code != 200:
                    raise RuntimeError(f"Orthanc refused {path.name}: {response.status_code} {response.text[:200]}")

    def series_uids(self) -> set[str]:
        """The Series Instance UID of every series Orthanc holds (through the REST API)."""
        import requests

        with requests.Session() as session:
            return {session.get(f"{self.url}/series/{i}", timeout=30).json()["MainDicomTags"]["SeriesInstanceUID"]
                    for i in session.get(f"{self.url}/series", timeout=30).json()}

    def series_files(self, series_uid: str, folder: Path) -> list[Path]:
        """Download the stored files of one series through the REST API into ``folder``."""
        import requests

        found = requests.post(f"{self.url}/tools/lookup", data=series_uid, timeout=30).json()
        series_id = next(item["ID"] for item in found if item["Type"] == "Series")
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        with requests.Session() as session:
            instances = session.get(f"{self.url}/series/{series_id}", timeout=30).json()["Instances"]
            for k, instance in enumerate(instances):
                path = folder / f"{k:05d}.dcm"
                path.write_bytes(session.get(f"{self.url}/instances/{instance}/file", timeout=30).content)
                files.append(path)
        return files

    def stored(self) -> dict[str, str]:
        """Every instance Orthanc holds: its id -> sha256 of the stored file (through the REST API)."""
        import hashlib

        import requests

        with requests.Session() as session:
            ids = session.get(f"{self.url}/instances", timeout=30).json()
            return {i: hashlib.sha256(session.get(f"{self.url}/instances/{i}/file", timeout=30).content).hexdigest()
                    for i in ids}


@contextmanager
def orthanc_holding(root: Path, studies: list[list[Path]]) -> Iterator[tuple[OrthancServer, dict[str, str]]]:
    """An Orthanc (``orthanc_server``) with every file of ``studies`` uploaded; yields it and its stored
    files' hashes before any test touched them. A server that does not start fails the test in one line."""
    from contextlib import ExitStack

    import pytest

    with ExitStack() as stack:
        try:
            orthanc = stack.enter_context(orthanc_server(root))
        except RuntimeError as error:
            pytest.fail(str(error), pytrace=False)
        for paths in studies:
            orthanc.upload(paths)
        before = orthanc.stored()
        assert len(before) == sum(len(paths) for paths in studies)
        yield orthanc, before


def orthanc_missing() -> str | None:
    """Why the Orthanc tests cannot run here (a sentence), or None when Orthanc and its plugin are installed."""
    if not ORTHANC.is_file():
        return f"Orthanc is not installed ({ORTHANC}): apt-get install orthanc orthanc-dicomweb"
    if not ORTHANC_DICOMWEB_PLUGIN.exists():
        return f"Orthanc's DICOMweb plugin is missing ({ORTHANC_DICOMWEB_PLUGIN}): apt-get install orthanc-dicomweb"
    return None


@contextmanager
def orthanc_server(root: Path, config_extra: dict | None = None) -> Iterator[OrthancServer]:
    """Start Orthanc under `root` (config, storage, log) on a free loopback port; stop it on exit.

    The DICOM (DIMSE) server is off, remote access is off (Orthanc 1.10 has no bind address: it listens
    on every interface but refuses clients that are not on this machine), no authentication, the
    DICOMweb plugin at /dicom-web/; `config_extra` adds or replaces configuration keys (e.g.
    authentication). Raises RuntimeError with the log tail when it does not come up.
    """
    import requests

    root.mkdir(parents=True, exist_ok=True)
    storage = root / "storage"
    storage.mkdir(exist_ok=True)
    port = free_loopback_port()
    config = {
        "Name": "SemID-test",
        "HttpPort": port,
        "DicomServerEnabled": False,
        "DicomPort": 0,
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [str(ORTHANC_DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        **(config_extra or {}),
    }
    config_path = root / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log_path = root / "orthanc.log"
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(ORTHANC), str(config_path)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=root, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + ORTHANC_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with code {proc.returncode} while starting; log:\n"
                                   + tail(log_path, 6000))
            try:
                if requests.get(f"{url}/system", timeout=5).status_code in (200, 401):  # 401: it asks for a user
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not answer /system within {ORTHANC_START_TIMEOUT_S:.0f} s; log:\n"
                                   + tail(log_path, 6000))
            time.sleep(0.2)
        yield OrthancServer(url=url, dicomweb_url=f"{url}/dicom-web", pid=proc.pid, storage_dir=storage,
                            log_path=log_path, process=proc)
    finally:
        stop_process_group(proc)
