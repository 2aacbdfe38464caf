"""Client for the SemID MONAI Label server, on the standard library only.

It must run inside 3D Slicer's Python, where `requests` may be missing, so HTTP and multipart are
done with `urllib.request` and a small multipart reader. Every failure the user can act on becomes a
`SemIDClientError` whose message is one sentence, shown as it is (no traceback).

Endpoints (MONAI Label 0.8.5):
- `GET /info/`: the app's info; `models[task]["config"]` is the task's published config.
- `POST /infer/{task}?output=all`: multipart form with `params` (JSON text) and `file` (the volume);
  the answer is multipart with `params` (JSON) and `image` (the result volume, with a file name), or
  plain JSON when the task produced no image.
"""

from __future__ import annotations

import email.message
import json
import os
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .levels import format_level

DEFAULT_TASK = "deidentify"
# socket.timeout became an alias of TimeoutError only in Python 3.10; Slicer <= 5.6 runs Python 3.9.
_TIMEOUTS = (socket.timeout, TimeoutError)
START_HINT = "start it with `monailabel start_server --app monailabel_app --studies DATA_FOLDER --host 127.0.0.1`"


class SemIDClientError(Exception):
    """Base class: the message is one sentence for the user."""


class ServerUnreachableError(SemIDClientError):
    """Nothing answers at the server URL."""


class ServerTimeoutError(SemIDClientError):
    """The server did not answer in time."""


class TaskMissingError(SemIDClientError):
    """The server runs, but has no `deidentify` task (wrong app, or the task failed to load)."""


class BadRequestError(SemIDClientError):
    """The server refused the request (4xx): the message is the server's sentence."""


class ServerError(SemIDClientError):
    """The server failed (5xx) or answered something that is not a MONAI Label answer."""


@dataclass(frozen=True)
class ServerInfo:
    """What the server publishes about the app and the de-identification task."""

    url: str
    name: str
    version: str
    task: str
    models: tuple[str, ...]
    description: str
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def level_parameter(self) -> Any:
        """The task's published default for the privacy level (None when it does not publish one)."""
        return self.config.get("level")


@dataclass(frozen=True)
class DeidentifyResult:
    """The de-identified volume written to disk, and the server's record of what was done.

    ``volume_path`` is None for a task that answers JSON only (``InferJob(..., output="json")``).
    """

    volume_path: Path | None
    record: dict[str, Any]


def _one_line(text: str, limit: int = 400) -> str:
    """Collapse a server message to one line, so a multi-line answer never reaches the user as is."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _server_sentence(body: bytes, content_type: str) -> str:
    """The human sentence in an error answer: FastAPI's `detail`, a `message`, or the plain text."""
    text = body.decode("utf-8", errors="replace")
    if "html" in content_type or text.lstrip().startswith("<"):
        return ""  # a web page, not a sentence: the caller words the error from the status instead
    if "json" in content_type or text.lstrip().startswith(("{", "[")):
        try:
            payload = json.loads(text)
        except ValueError:
            payload = None
        if isinstance(payload, dict):
            detail = payload.get("detail", payload.get("message", payload.get("error")))
            if isinstance(detail, str):
                return _one_line(detail)
            if isinstance(detail, list):
                # FastAPI validation errors: a list of {"loc": [...], "msg": "..."}.
                msgs = [str(d.get("msg", d)) if isinstance(d, dict) else str(d) for d in detail]
                return _one_line("; ".join(msgs))
            if detail is not None:
                return _one_line(json.dumps(detail))
    return _one_line(text)


def parse_multipart(body: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """Split a multipart body into {field name: (file name or None, raw bytes)}.

    Hand-written because the `email` parser may touch line endings of binary parts; here the bytes
    between the part headers and the next boundary are returned untouched.
    """
    header = email.message.Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise ServerError("The server's answer is not a multipart message: is this a SemID server?")
    delimiter = b"--" + boundary.encode("latin-1")
    parts: dict[str, tuple[str | None, bytes]] = {}
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break  # closing delimiter
        chunk = chunk[2:] if chunk.startswith(b"\r\n") else chunk
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            continue
        if data.endswith(b"\r\n"):
            data = data[:-2]
        part_headers = email.message.Message()
        for line in head.decode("latin-1").split("\r\n"):
            key, colon, value = line.partition(":")
            if colon:
                part_headers[key.strip()] = value.strip()
        name = part_headers.get_param("name", header="content-disposition")
        filename = part_headers.get_param("filename", header="content-disposition")
        if isinstance(name, str):
            parts[name] = (filename if isinstance(filename, str) else None, data)
    return parts


def _encode_multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """Build a multipart/form-data body; returns (body, content type)."""
    boundary = "semid-" + uuid.uuid4().hex
    out: list[bytes] = []
    for name, value in fields.items():
        out.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value.encode("utf-8")
            + b"\r\n"
        )
    for name, (filename, data) in files.items():
        out.append(
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


def volume_suffix(path: str | os.PathLike[str]) -> str:
    """The full volume extension ('.nii.gz', '.nrrd', ...) that the server uses to pick a reader."""
    name = Path(path).name.lower()
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.endswith(suffix):
            return suffix
    return "".join(Path(path).suffixes) or ".nii.gz"


def split_volume_answer(answer: bytes, answer_type: str, task: str) -> tuple[str | None, bytes, dict[str, Any]]:
    """A volume task's multipart answer -> (file name, volume bytes, record); ServerError when it has no
    volume (MONAI Label falls back to the bare JSON when the task wrote no image) or a bad record."""
    if not answer_type.lower().startswith("multipart/"):
        raise ServerError(f"The `{task}` task returned no volume; see the server log for the cause.")
    parts = parse_multipart(answer, answer_type)
    if "image" not in parts:
        raise ServerError(f"The `{task}` task returned no volume; see the server log for the cause.")
    filename, volume_bytes = parts["image"]
    record: dict[str, Any] = {}
    if "params" in parts:
        try:
            loaded = json.loads(parts["params"][1].decode("utf-8") or "null")
        except ValueError:
            raise ServerError(f"The server's answer to `{task}` is not valid JSON.") from None
        record = loaded if isinstance(loaded, dict) else {"params": loaded}
    return filename, volume_bytes, record


class SemIDClient:
    """Talks to one SemID MONAI Label server."""

    def __init__(self, server_url: str, timeout: float = 600.0, task: str = DEFAULT_TASK) -> None:
        url = (server_url or "").strip()
        if not url:
            raise SemIDClientError("No SemID server URL is set: enter one such as http://127.0.0.1:8000.")
        if "://" not in url:
            url = "http://" + url
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise SemIDClientError(
                f"The server URL {server_url!r} is not valid: use one such as http://127.0.0.1:8000."
            )
        self.server_url = url.rstrip("/")
        self.timeout = float(timeout)
        self.task = task

    # -- HTTP -----------------------------------------------------------------------------------
    def _request(
        self, method: str, path: str, body: bytes | None = None, content_type: str | None = None
    ) -> tuple[bytes, str]:
        """Send one request; returns (body, content type) or raises a SemIDClientError."""
        request = urllib.request.Request(self.server_url + path, data=body, method=method)
        request.add_header("Accept", "multipart/form-data, application/json, */*")
        if content_type:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read(), response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            data = exc.read() if exc.fp is not None else b""
            sentence = _server_sentence(data, exc.headers.get("Content-Type", "") if exc.headers else "")
            raise self._http_error(exc.code, sentence) from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, _TIMEOUTS):
                raise self._timeout_error() from None
            raise self._unreachable_error() from None
        except _TIMEOUTS:
            raise self._timeout_error() from None
        except (ConnectionError, OSError):
            # Connection reset or closed mid-answer: from the user's side the server is not there.
            raise self._unreachable_error() from None

    def _unreachable_error(self) -> ServerUnreachableError:
        return ServerUnreachableError(
            f"Cannot reach the SemID server at {self.server_url}: {START_HINT} or check the URL."
        )

    def _timeout_error(self) -> ServerTimeoutError:
        return ServerTimeoutError(
            f"The SemID server at {self.server_url} did not answer within {self.timeout:g} s: "
            "try again, or raise the timeout for large volumes."
        )

    def _http_error(self, status: int, sentence: str) -> SemIDClientError:
        if 400 <= status < 500:
            if status in (404, 405) and sentence in ("", "Not Found", "Method Not Allowed"):
                return ServerError(
                    f"The server at {self.server_url} has no MONAI Label endpoint here (HTTP {status}): "
                    "is it a SemID server?"
                )
            return BadRequestError(sentence or f"The server refused the request (HTTP {status}).")
        return ServerError(
            f"The SemID server failed (HTTP {status}): {sentence or 'no details'}; see the server log."
            if sentence and sentence != "Internal Server Error"
            else f"The SemID server failed (HTTP {status}); see the server log for the cause."
        )

    # -- API ------------------------------------------------------------------------------------
    def info(self) -> ServerInfo:
        """The app's info and the de-identification task's published config.

        Raises TaskMissingError when the server runs but has no such task.
        """
        body, content_type = self._request("GET", "/info/")
        try:
            payload = json.loads(body.decode("utf-8"))
        except ValueError:
            raise ServerError(
                f"The server at {self.server_url} did not answer with MONAI Label info: is it a SemID server?"
            ) from None
        if not isinstance(payload, dict) or not isinstance(payload.get("models"), dict):
            raise ServerError(
                f"The server at {self.server_url} did not answer with MONAI Label info: is it a SemID server?"
            )
        models = payload["models"]
        model = models.get(self.task)
        if not isinstance(model, dict):
            raise TaskMissingError(
                f"The server at {self.server_url} has no `{self.task}` task: {START_HINT} "
                "(the SemID app) and check its log for a task that failed to load."
            )
        config = model.get("config") if isinstance(model.get("config"), dict) else {}
        return ServerInfo(
            url=self.server_url,
            name=str(payload.get("name", "")),
            version=str(payload.get("version", "")),
            task=self.task,
            models=tuple(sorted(models)),
            description=str(model.get("description", "")),
            config=dict(config),
        )

    def deidentify(
        self,
        volume_path: str | os.PathLike[str],
        level: str | float,
        output_path: str | os.PathLike[str] | None = None,
        params: dict[str, Any] | None = None,
    ) -> DeidentifyResult:
        """Upload a volume, run the de-identification task at `level`, and write the result.

        `level` is passed to the server as given (a preset name or a number), so the server, which
        owns the rules, is the one that accepts or refuses it. The result goes to `output_path`, or
        to a new temporary folder (the caller owns it) with the extension the server answered with.
        """
        source = Path(volume_path)
        try:
            data = source.read_bytes()
        except OSError as exc:
            raise SemIDClientError(f"Cannot read the volume to send ({exc.strerror or exc}).") from None
        request_params: dict[str, Any] = dict(params or {})
        request_params["level"] = level
        # A neutral upload name: the input's own file name may carry a patient name.
        upload_name = "volume" + volume_suffix(source)
        body, content_type = _encode_multipart({"params": json.dumps(request_params)}, {"file": (upload_name, data)})
        del data
        try:
            answer, answer_type = self._request(
                "POST", f"/infer/{urllib.parse.quote(self.task)}?output=all", body, content_type
            )
        except (BadRequestError, ServerError):
            # MONAI Label answers a missing task with a bare 500: tell that case apart for the user.
            self._raise_if_task_missing()
            raise
        return self._read_result(answer, answer_type, output_path)

    def _raise_if_task_missing(self) -> None:
        try:
            self.info()
        except TaskMissingError:
            raise
        except SemIDClientError:
            pass  # the original error says more than a failing follow-up check

    def _read_result(
        self, answer: bytes, answer_type: str, output_path: str | os.PathLike[str] | None
    ) -> DeidentifyResult:
        filename, volume_bytes, record = split_volume_answer(answer, answer_type, self.task)
        if output_path is None:
            folder = Path(tempfile.mkdtemp(prefix="semid-"))
            output = folder / ("deidentified" + volume_suffix(filename or "result.nii.gz"))
        else:
            output = Path(output_path)
            output.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target and rename, so a reader never sees half a volume.
        partial = output.with_name("." + output.name + ".part")
        partial.write_bytes(volume_bytes)
        os.replace(partial, output)
        return DeidentifyResult(volume_path=output, record=record)


def _find_number(record: dict[str, Any], *keys: str) -> float | None:
    """First numeric value under one of `keys`, looking one level into nested dicts too."""
    for key in keys:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    for value in record.values():
        if isinstance(value, dict):
            found = _find_number(value, *keys)
            if found is not None:
                return found
    return None


def summarize_record(record: dict[str, Any], level: float | None = None) -> str:
    """One status line from the server's record: level, what was blocked, residual risk if reported."""
    shown_level = _find_number(record, "level", "privacy_level")
    if shown_level is None:
        shown_level = level
    line = "De-identified"
    if shown_level is not None:
        line += f" at level {format_level(shown_level)}"
    details = []
    tissue = _find_number(record, "blocked_tissue_ml")
    blocked = _find_number(record, "blocked_ml", "blocked_volume_ml")
    if tissue is not None:
        details.append(f"{tissue:.1f} ml of tissue blocked and refilled")
    elif blocked is not None:
        details.append(f"{blocked:.1f} ml blocked and refilled")
    if _find_number(record, "brain_voxels_changed") == 0:
        details.append("brain unchanged")
    risk = _find_number(record, "residual_risk", "reid_risk")
    if risk is not None:
        details.append(f"residual re-identification risk {risk:.2f}")
    return line + (": " + ", ".join(details) if details else "") + "."
