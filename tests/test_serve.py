"""`semid serve`, the README's way to start the server, run as a new user would: from a plain shell whose PATH
has only /usr/bin and /bin (the virtual environment not activated)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from servers import MONAILABEL, free_loopback_port, stop_process_group

pytestmark = pytest.mark.server

SEMID = Path(sys.executable).parent / "semid"
PLAIN_PATH = "/usr/bin:/bin"


def _plain_env(tmp: Path) -> dict[str, str]:
    return {"PATH": PLAIN_PATH, "HOME": os.environ.get("HOME", str(tmp)), "TMPDIR": str(tmp), "LANG": "C.UTF-8",
            "CUDA_VISIBLE_DEVICES": ""}


def test_serve_starts_from_a_plain_shell_and_leaves_nothing(sample_head, tmp_path) -> None:
    if not MONAILABEL.exists():
        pytest.skip("MONAI Label is not installed in this environment: pip install -e '.[server]'")
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copyfile(sample_head, studies / "head001.nii.gz")
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    port = free_loopback_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(SEMID), "serve", str(studies), "--port", str(port), "--models", "deidentify",
                                 "--conf", "model_dir", str(tmp_path / "model")],
                                stdout=out, stderr=subprocess.STDOUT, env=_plain_env(private_tmp),
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "SemID server:" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        line = next(x for x in log.read_text().splitlines() if x.startswith("SemID server:"))
        assert f"http://127.0.0.1:{port}" in line and "deidentify" in line
        info = requests.get(f"http://127.0.0.1:{port}/info/", timeout=30)
        assert info.status_code == 200 and "deidentify" in info.json()["models"]
        # its uploads and sessions live in one private folder under TMPDIR
        (private,) = [p for p in private_tmp.iterdir() if p.name.startswith("semid-serve-")]
        assert (private.stat().st_mode & 0o777) == 0o700
        os.kill(proc.pid, signal.SIGTERM)  # the `semid serve` process, by its id
        assert proc.wait(timeout=60) == 0, log.read_text(errors="replace")[-2000:]
        assert not any(private_tmp.iterdir()), list(private_tmp.iterdir())
    finally:
        stop_process_group(proc)


def test_serve_refuses_a_missing_studies_folder_in_one_sentence(tmp_path) -> None:
    proc = subprocess.run([str(SEMID), "serve", str(tmp_path / "nowhere")], capture_output=True, text=True,
                          env=_plain_env(tmp_path), timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("semid: error: The studies folder does not exist")
    assert "Traceback" not in proc.stderr
