"""``semid serve``: start the MONAI Label server with SemID's app, from any shell.

MONAI Label's own ``monailabel start_server`` is a bash wrapper that runs whatever ``python`` comes first on
PATH: from a plain shell (the virtual environment not activated) it fails or starts the wrong interpreter.
This module runs ``monailabel.main start_server`` with this environment's interpreter, in its own process
group, with the app's safe defaults:

- it listens on the loopback address unless ``--host`` names another one on purpose;
- uploads, results and sessions live in a private temporary folder (0700) that is removed when the server
  stops (MONAI Label writes them to the shared temporary folder and its sessions to ``~/.cache``);
- MONAI Label's usage tracking is off.

When the server answers, the URL and the tasks it serves are printed; Ctrl-C (or SIGTERM) stops the server
and everything it started. Nothing here imports the server: it runs in the child process.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from semid.errors import InputError

#: Seconds the server is given to answer ``/info/`` after it starts (it loads the models first).
START_TIMEOUT_S = 300.0


def app_folder(app: str | Path | None = None) -> Path:
    """The MONAI Label app folder: ``app``, or ``monailabel_app`` of the source checkout SemID runs from.

    Raises:
        InputError: the folder has no ``main.py``.
    """
    folder = Path(app) if app else Path(__file__).resolve().parents[2] / "monailabel_app"
    if not (folder / "main.py").is_file():
        raise InputError("SemID's MONAI Label app was not found: run from a source checkout (its monailabel_app "
                         "folder), or name the app folder with --app.")
    return folder


def server_command(app: Path, studies: str, host: str, port: int, conf: Sequence[tuple[str, str]]) -> list[str]:
    """The ``start_server`` command line, with this interpreter."""
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", studies,
           "--host", host, "--port", str(port)]
    for key, value in conf:
        cmd += ["--conf", key, value]
    return cmd


def wait_for_info(url: str, proc: subprocess.Popen, timeout_s: float = START_TIMEOUT_S) -> dict | None:
    """``/info/`` of the server at ``url`` once it answers; None when the process ended first or time ran out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/info/", timeout=5) as response:  # noqa: S310 - our own server
                return json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError):
            time.sleep(0.5)
    return None


def serve(studies: str, host: str = "127.0.0.1", port: int = 8000, conf: Sequence[tuple[str, str]] = (),
          app: str | Path | None = None) -> int:
    """Run the server until it stops or is stopped; returns its exit code (0 when stopped by a signal).

    Raises:
        InputError: MONAI Label is not installed, the app is missing, or the studies folder does not exist.
    """
    if importlib.util.find_spec("monailabel") is None:
        raise InputError("The server needs MONAI Label: pip install -e '.[server]' (make venv does).")
    folder = app_folder(app)
    if "://" not in studies and not Path(studies).is_dir():
        raise InputError("The studies folder does not exist: name a folder of volumes, or a DICOMweb URL "
                         "(http://HOST:PORT/dicom-web).")
    if not 0 < port < 65536:
        raise InputError(f"--port {port} is not a TCP port: give a number from 1 to 65535.")
    private = Path(tempfile.mkdtemp(prefix="semid-serve-"))  # 0700
    env = {**os.environ, "TMPDIR": str(private), "MONAI_LABEL_SESSION_PATH": str(private / "sessions"),
           "MONAI_LABEL_TRACKING_ENABLED": "false", "PYTHONUNBUFFERED": "1",
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    studies_arg = studies if "://" in studies else str(Path(studies).resolve())
    proc = subprocess.Popen(server_command(folder, studies_arg, host, port, conf), env=env, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        url = f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"
        info = wait_for_info(url, proc)
        if info is not None:
            tasks = ", ".join(sorted(info.get("models", {}))) or "none"
            print(f"SemID server: {url} (tasks: {tasks}); Ctrl-C stops it.", flush=True)
        elif proc.poll() is None and not stopping:
            print(f"semid: the server did not answer at {url} within {START_TIMEOUT_S:.0f} s; it keeps starting "
                  "(its log is above).", file=sys.stderr, flush=True)
        code = proc.wait()
        if proc.poll() is not None:  # anything it started goes with it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        return 0 if stopping else code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(private, ignore_errors=True)
