"""A server request that runs in a worker thread, reports its progress and can be cancelled.

The Slicer panel must not freeze while the server works (a de-identification takes tens of seconds,
a segmentation check longer), so `InferJob` sends the request from a plain `threading.Thread` and the
widget polls `job.progress()` with a timer. The request is made with `http.client` (standard library:
Slicer's Python may lack `requests`) so that the upload can be sent in chunks (bytes known) and the
connection can be shut down from the polling thread: that is what Cancel does. A cancelled job
discards the answer and removes every file it wrote.

Phases: ``uploading`` (bytes sent / total), ``working`` (the server computes; MONAI Label answers
only when done), ``downloading`` (bytes received / total when the server sends a length), then
``done``, ``failed`` or ``cancelled``.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .client import (
    _TIMEOUTS,
    DeidentifyResult,
    SemIDClient,
    SemIDClientError,
    ServerError,
    ServerTimeoutError,
    _encode_multipart,
    _server_sentence,
    split_volume_answer,
    volume_suffix,
)
from .series_export import HEADER_TASK, ServerHeader, header_upload_copy

UPLOADING, WORKING, DOWNLOADING = "uploading", "working", "downloading"
PENDING, DONE, FAILED, CANCELLED = "pending", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)
CHUNK_BYTES = 256 * 1024
CANCELLED_MESSAGE = "Cancelled: the request was stopped and its result discarded."

_PHASE_TEXT = {
    PENDING: "Waiting to start",
    UPLOADING: "Uploading the volume",
    WORKING: "The server is working",
    DOWNLOADING: "Downloading the result",
    DONE: "Done",
    FAILED: "Failed",
    CANCELLED: "Cancelled",
}


class JobCancelledError(SemIDClientError):
    """The user cancelled the request: nothing was kept."""


@dataclass(frozen=True)
class Progress:
    """A snapshot of a job, safe to read from another thread."""

    phase: str
    bytes_done: int = 0
    bytes_total: int | None = None
    elapsed_s: float = 0.0

    @property
    def fraction(self) -> float | None:
        """Fraction of the current phase's bytes, or None when unknown (server working, no length)."""
        if self.bytes_total:
            return min(1.0, self.bytes_done / self.bytes_total)
        return None

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED

    def text(self) -> str:
        """One line for the panel, e.g. 'Uploading the volume: 1.2 of 4.0 MB (12 s)'."""
        line = _PHASE_TEXT.get(self.phase, self.phase)
        if self.phase in (UPLOADING, DOWNLOADING) and self.bytes_total:
            line += f": {self.bytes_done / 1e6:.1f} of {self.bytes_total / 1e6:.1f} MB"
        elif self.phase == DOWNLOADING and self.bytes_done:
            line += f": {self.bytes_done / 1e6:.1f} MB"
        return f"{line} ({self.elapsed_s:.0f} s)"


class InferJob:
    """POST one volume to `/infer/{task}` in a worker thread; the result lands in a new temporary folder.

    Use: ``job = InferJob(client, "deidentify", path, {"level": 0.75}).start()``, then poll
    ``job.progress()`` until ``job.done``; ``job.result`` holds the `DeidentifyResult` (volume file and
    the server's JSON) or ``job.error`` the `SemIDClientError` whose message is one sentence for the
    user. ``job.cancel()`` closes the connection; the job then ends promptly as ``cancelled``. The
    caller owns ``job.result.volume_path.parent`` (remove it with ``job.discard()``).
    """

    def __init__(
        self,
        client: SemIDClient,
        task: str,
        volume_path: str | os.PathLike[str],
        params: dict[str, Any] | None = None,
        output_dir: str | os.PathLike[str] | None = None,
        output: str = "all",
    ) -> None:
        self.client = client
        self.task = task
        self.volume_path = Path(volume_path)
        self.params = dict(params or {})
        self._output_parent = Path(output_dir) if output_dir is not None else None
        if output not in ("all", "json"):
            raise ValueError(f"Unknown answer kind {output!r}: use 'all' (volume and JSON) or 'json'.")
        #: "all": the task answers a volume and its JSON record; "json": JSON only (e.g. `dicomheader`),
        #: then ``result.volume_path`` is None and ``result.record`` holds the whole answer.
        self.output = output
        self.result: DeidentifyResult | None = None
        self.error: SemIDClientError | None = None
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._finished = threading.Event()
        self._phase = PENDING
        #: Phases entered, in order (a fast phase may end between two polls of `progress`).
        self.history: list[str] = [PENDING]
        self.bytes_sent = 0
        self.bytes_received = 0
        self._bytes_done = 0
        self._bytes_total: int | None = None
        self._started = time.monotonic()
        self._ended: float | None = None
        self._conn: http.client.HTTPConnection | None = None
        self._folder: Path | None = None
        self._thread = threading.Thread(target=self._run, name=f"semid-{task}", daemon=True)

    # -- control (any thread) -------------------------------------------------------------------
    def start(self) -> InferJob:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Stop now: shut the connection down so the worker's blocking read returns at once."""
        self._cancel.set()
        with self._lock:
            conn = self._conn
        sock = getattr(conn, "sock", None) if conn is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the worker

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job ends (tests, scripts); True when it has."""
        return self._finished.wait(timeout)

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    @property
    def cancelled(self) -> bool:
        return self._phase == CANCELLED

    def progress(self) -> Progress:
        with self._lock:
            end = self._ended if self._ended is not None else time.monotonic()
            return Progress(self._phase, self._bytes_done, self._bytes_total, end - self._started)

    def discard(self) -> None:
        """Remove the result files (after the caller loaded them)."""
        if self._folder is not None and self._output_parent is None:
            shutil.rmtree(self._folder, ignore_errors=True)
        elif self.result is not None and self.result.volume_path is not None:
            self.result.volume_path.unlink(missing_ok=True)

    # -- worker ---------------------------------------------------------------------------------
    def _set(self, phase: str, done: int = 0, total: int | None = None) -> None:
        with self._lock:
            if phase != self._phase:
                self.history.append(phase)
            self._phase, self._bytes_done, self._bytes_total = phase, done, total
            if phase == UPLOADING:
                self.bytes_sent = done
            elif phase == DOWNLOADING:
                self.bytes_received = done

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise JobCancelledError(CANCELLED_MESSAGE)

    def _check_deadline(self) -> None:
        if time.monotonic() - self._started > self.client.timeout:
            raise self.client._timeout_error()

    def _run(self) -> None:
        try:
            self.result = self._request()
            outcome = DONE
        except JobCancelledError as exc:
            self.error, outcome = exc, CANCELLED
        except SemIDClientError as exc:
            # A shut-down socket surfaces as a connection error: the cancel flag says what it was.
            if self._cancel.is_set():
                self.error, outcome = JobCancelledError(CANCELLED_MESSAGE), CANCELLED
            else:
                self.error, outcome = exc, FAILED
        except Exception as exc:  # noqa: BLE001 (a worker must never die silently)
            if self._cancel.is_set():
                self.error, outcome = JobCancelledError(CANCELLED_MESSAGE), CANCELLED
            else:
                self.error = ServerError(f"The request failed unexpectedly ({type(exc).__name__}); try again.")
                outcome = FAILED
        finally:
            with self._lock:
                conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()
        if outcome != DONE:
            self.result = None
            self._remove_outputs()
        with self._lock:
            self._phase, self._ended = outcome, time.monotonic()
            self.history.append(outcome)
        self._finished.set()

    def _remove_outputs(self) -> None:
        if self._folder is None:
            return
        if self._output_parent is None:
            shutil.rmtree(self._folder, ignore_errors=True)
        else:
            for path in self._folder.glob(".semid-*.part"):
                path.unlink(missing_ok=True)

    def _connection(self) -> http.client.HTTPConnection:
        parsed = urllib.parse.urlparse(self.client.server_url)
        cls = http.client.HTTPSConnection if parsed.scheme == "https" else http.client.HTTPConnection
        return cls(parsed.hostname or "", parsed.port, timeout=self.client.timeout)

    def _request(self) -> DeidentifyResult:
        try:
            data = self.volume_path.read_bytes()
        except OSError as exc:
            raise SemIDClientError(f"Cannot read the volume to send ({exc.strerror or exc}).") from None
        # A neutral upload name: the input's own file name may carry a patient name.
        body, content_type = _encode_multipart(
            {"params": json.dumps(self.params)}, {"file": ("volume" + volume_suffix(self.volume_path), data)}
        )
        del data
        base = urllib.parse.urlparse(self.client.server_url).path.rstrip("/")
        path = f"{base}/infer/{urllib.parse.quote(self.task)}?output={self.output}"
        try:
            status, headers, answer = self._exchange(path, body, content_type)
        except (JobCancelledError, ServerTimeoutError):
            raise
        except _TIMEOUTS:
            raise self.client._timeout_error() from None
        except (http.client.HTTPException, OSError):
            self._check_cancel()
            raise self.client._unreachable_error() from None
        if status >= 400:
            error = self.client._http_error(status, _server_sentence(answer, headers.get("Content-Type", "")))
            # MONAI Label answers an unknown task with a bare 500: name that case for the user.
            SemIDClient(self.client.server_url, self.client.timeout, task=self.task)._raise_if_task_missing()
            raise error
        return self._save(answer, headers.get("Content-Type", ""))

    def _exchange(self, path: str, body: bytes, content_type: str) -> tuple[int, Any, bytes]:
        conn = self._connection()
        with self._lock:
            self._conn = conn
        self._check_cancel()
        conn.connect()
        self._check_cancel()
        self._set(UPLOADING, 0, len(body))
        conn.putrequest("POST", path)
        conn.putheader("Content-Type", content_type)
        conn.putheader("Content-Length", str(len(body)))
        conn.putheader("Accept", "multipart/form-data, application/json, */*")
        conn.endheaders()
        view = memoryview(body)
        for offset in range(0, len(body), CHUNK_BYTES):
            self._check_cancel()
            self._check_deadline()
            conn.send(view[offset : offset + CHUNK_BYTES])
            self._set(UPLOADING, min(offset + CHUNK_BYTES, len(body)), len(body))
        self._set(WORKING)
        # Blocks until the server is done (MONAI Label sends nothing before); the socket time-out bounds it.
        response = conn.getresponse()
        self._check_cancel()
        length = response.getheader("Content-Length")
        total = int(length) if length and length.isdigit() else None
        self._set(DOWNLOADING, 0, total)
        chunks: list[bytes] = []
        received = 0
        while True:
            self._check_cancel()
            self._check_deadline()
            chunk = response.read(CHUNK_BYTES)
            if not chunk:
                break
            chunks.append(chunk)
            received += len(chunk)
            self._set(DOWNLOADING, received, total)
        self._check_cancel()
        return response.status, response.headers, b"".join(chunks)

    def _save(self, answer: bytes, answer_type: str) -> DeidentifyResult:
        if self.output == "json":
            return self._json_result(answer)
        filename, volume_bytes, record = split_volume_answer(answer, answer_type, self.task)
        if self._output_parent is None:
            self._folder = Path(tempfile.mkdtemp(prefix="semid-"))
        else:
            self._output_parent.mkdir(parents=True, exist_ok=True)
            self._folder = self._output_parent
        self._check_cancel()
        output = self._folder / (self.task + volume_suffix(filename or "result.nii.gz"))
        # Written beside the target and renamed, so a reader never sees half a volume.
        partial = self._folder / f".semid-{self.task}.part"
        partial.write_bytes(volume_bytes)
        self._check_cancel()
        os.replace(partial, output)
        return DeidentifyResult(volume_path=output, record=record)

    def _json_result(self, answer: bytes) -> DeidentifyResult:
        """A JSON-only answer: nothing is written to disk, the answer is the record."""
        try:
            loaded = json.loads(answer.decode("utf-8") or "null")
        except ValueError:
            raise ServerError(f"The server's answer to `{self.task}` is not valid JSON.") from None
        if not isinstance(loaded, dict):
            raise ServerError(f"The `{self.task}` task answered no JSON object; see the server log for the cause.")
        self._check_cancel()
        return DeidentifyResult(volume_path=None, record=loaded)


def start_header_job(
    client: SemIDClient, source_instance: str | os.PathLike[str], work_dir: str | os.PathLike[str]
) -> InferJob:
    """Start fetching the profile's header for a source series, in the background.

    ``source_instance`` is one DICOM file of the source series (only read); its header, pixel data
    removed, is written into ``work_dir`` (private, holds PHI: the caller removes it afterwards) and sent
    to the server's `dicomheader` task. When the job is done, ``ServerHeader.from_answer(job.result.record)``
    is the base for `plan_series(..., header=...)`.
    """
    upload = header_upload_copy(source_instance, Path(work_dir) / "header.dcm")
    return InferJob(client, HEADER_TASK, upload, {}, output="json").start()


def fetch_server_header(
    client: SemIDClient, source_instance: str | os.PathLike[str], work_dir: str | os.PathLike[str] | None = None
) -> ServerHeader:
    """`start_header_job` and wait (scripts, self tests); raises the job's `SemIDClientError` on failure.

    Without ``work_dir`` a private temporary folder is used and removed.
    """
    own = work_dir is None
    folder = Path(tempfile.mkdtemp(prefix="semid-header-")) if own else Path(work_dir)
    try:
        job = start_header_job(client, source_instance, folder)
        job.wait()
        if job.progress().phase != DONE:
            raise job.error if job.error is not None else ServerError("The header request failed; try again.")
        return ServerHeader.from_answer(job.result.record)
    finally:
        if own:
            shutil.rmtree(folder, ignore_errors=True)
