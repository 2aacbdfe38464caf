"""Server-side safety defaults of the SemID app (the library itself never sees a server).

MONAI Label builds its FastAPI ``app`` (``monailabel/app.py``) before it imports this app, and creates
``SemIDApp`` in the lifespan start-up, after the ASGI middleware stack is built (middleware can no longer
be added then). ``SemIDApp.__init__`` therefore installs what follows on the running process:

1. **Request-body limit** (``RequestGuard``, app conf ``max_upload_mb``, default 1024): the built ASGI stack
   is wrapped (``app.middleware_stack``, which Starlette calls for every request; FastAPI's own
   ``max_body_size`` can only be given when the app is constructed, which MONAI Label does). A request whose
   ``Content-Length`` is over the limit gets 413 before a byte of its body is read, so nothing is stored;
   a body sent without a length (chunked) is counted as it streams and cut off at the limit: the parser's
   half-read upload (an anonymous temporary file) is dropped and the answer is 413.
2. **Images only from the datastore or from this request's upload** (``check_request_images``, called by
   ``SemIDApp.infer`` for every infer task): MONAI Label reads an ``image`` that is an existing server path
   as a file (``os.path.exists(image)`` in ``MONAILabelApp.infer``), so ``?image=/etc/passwd`` would reach
   the task. Uploads are told apart exactly: MONAI Label's upload endpoints name their temporary files with
   ``tempfile.NamedTemporaryFile``; ``install_upload_tracking`` gives those modules a stand-in whose
   ``NamedTemporaryFile`` records each name in the current request's state (a context variable set by
   ``RequestGuard``). Paths inside the datastore's own folder and the session store stay allowed (they are
   datastore images and earlier uploads).
3. **No PHI in the log** (``install_log_scrubber``): MONAI Label logs request dictionaries, upload file
   names, image ids, label info and datastore paths, all of which can carry a patient's name. A log-record
   factory rewrites every record of the ``monailabel`` loggers to the *template* of its logging call, read
   from MONAI Label's source (``f"Infer Request: {request}"`` is logged as ``Infer Request: <withheld>``),
   strips query strings from access-log lines, and reduces every logged exception to its stack and type
   (exception messages name files and ids). The stand-in ``NamedTemporaryFile`` also keeps the client's
   file name out of server file names: ``Doe.Jane.nii.gz`` was stored as ``/tmp/tmpXXXX.Jane.nii.gz``.
4. **No pass-through to the PACS**: MONAI Label's ``/proxy/dicom/...`` routes forward any request to the
   DICOMweb server behind the app (for OHIF), which would hand every client the original, identified
   studies; ``RequestGuard`` answers them 403 unless the app conf says ``dicom_proxy true``.
5. **Bind address** (``default_bind_refusal``, ``log_bind_address``): MONAI Label binds 0.0.0.0 unless
   ``--host`` is given and keeps no host setting; the address is read from ``start_server``'s command line.
   With no ``--host`` the app stops before the socket is bound (SemID's default is loopback); an address
   named on purpose is served, with a warning in the log when it is not a loopback address.
6. **No cross-origin reads**: MONAI Label's CORS setting grants every origin (``*``, with credentials), so any
   web page open in the user's browser could read originals from a server on loopback. ``RequestGuard``
   answers 403 to a request whose ``Origin`` is neither the server's own nor named in the app conf
   ``cors_origins`` (comma-separated, no wildcard), and strips MONAI Label's ``Access-Control-*`` headers
   from every other answer; a named origin gets itself back, without credentials.
"""

from __future__ import annotations

import ast
import atexit
import contextlib
import contextvars
import functools
import ipaddress
import json
import linecache
import logging
import os
import re
import shutil
import sys
import tempfile
import traceback
import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Default request-body limit (app conf ``max_upload_mb``): a 1 mm head is a few tens of MB, a DICOM
#: series zip a few hundred.
DEFAULT_MAX_UPLOAD_MB = 1024.0
PATH_REFUSED = ("Name the image by its datastore id (GET /datastore/?output=all lists them) or upload the volume "
                "with this request; paths on the server are not accepted.")
UNKNOWN_IMAGE = "There is no image with that id in the datastore: list the images with /datastore/."
WITHHELD = "<withheld>"


# ---------------------------------------------------------------------------------------- request state


@dataclass
class RequestState:
    """What the server knows about the HTTP request being served (one per request, in a context variable).

    Attributes:
        uploads: real paths of the temporary files MONAI Label wrote this request's uploads to.
    """

    uploads: set[str] = field(default_factory=set)


_REQUEST: contextvars.ContextVar[RequestState | None] = contextvars.ContextVar("semid_request", default=None)


def current_request() -> RequestState | None:
    """The state of the HTTP request this code runs for, or None outside one (start-up, worker threads)."""
    return _REQUEST.get()


# ------------------------------------------------------------------------------------ request-body limit


class _BodyTooLarge(Exception):
    """Raised into the application from a body stream that went past the limit."""


def max_upload_bytes(conf: dict[str, str]) -> int:
    """The request-body limit in bytes from app conf ``max_upload_mb`` (MB = 2**20 bytes).

    Raises:
        ValueError: not a positive number (the server then refuses to start, saying so).
    """
    raw = conf.get("max_upload_mb", DEFAULT_MAX_UPLOAD_MB)
    try:
        mb = float(raw)
    except (TypeError, ValueError):
        mb = float("nan")
    if not mb > 0 or mb == float("inf"):
        raise ValueError(f"--conf max_upload_mb {str(raw)[:20]!r} is not a positive number of megabytes.")
    return int(mb * 2**20)


class RequestGuard:
    """ASGI wrapper around MONAI Label's app: per-request state and the request-body limit.

    Args:
        app: the wrapped ASGI application (the built middleware stack).
        max_body_bytes: largest request body accepted; larger ones get 413 with one sentence.
        dicom_proxy: serve MONAI Label's ``/proxy/dicom`` routes (off: 403). They forward any request to the
            DICOMweb server behind the app, so every client could read the original, identified studies.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, dicom_proxy: bool = False,
                 allowed_origins: Sequence[str] = ()) -> None:
        self.app = app
        self.max_body_bytes = int(max_body_bytes)
        self.dicom_proxy = dicom_proxy
        self.allowed_origins = frozenset(allowed_origins)

    @property
    def message(self) -> str:
        mb = self.max_body_bytes / 2**20
        return (f"The request is larger than this server's upload limit of {mb:g} MB: send a smaller volume, "
                "or ask the administrator to raise max_upload_mb.")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        origin = _header(scope, b"origin")
        if origin is not None and origin not in self.allowed_origins and origin != _own_origin(scope):
            # a web page on another site (any tab of the user's browser) must not read patient volumes from a
            # server on loopback: no CORS grant, and the request is not served at all (a browser sends Origin
            # on every cross-site request; the Slicer module and curl send none)
            await self._answer(send, 403, "Cross-origin requests are not served: this server answers the Slicer "
                                          "module, scripts and its own pages; to let a web application call it, "
                                          "start it with --conf cors_origins <that application's origin>.")
            return
        if not self.dicom_proxy and scope.get("path", "").rstrip("/").split("/")[1:2] == ["proxy"]:
            await self._answer(send, 403, "This server does not pass requests through to the PACS behind it: "
                                          "ask for de-identified images through /infer, or start the server with "
                                          "--conf dicom_proxy true.")
            return
        if scope.get("method") == "POST" and scope.get("path", "").startswith("/infer/"):
            media = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
            if media == "application/json":
                scope, receive = await self._json_as_form(scope, receive, send)
                if scope is None:
                    return
            elif media and media not in ("multipart/form-data", "application/x-www-form-urlencoded"):
                await self._answer(send, 415, f"An infer request's body is {media[:60]!r}: send the parameters as "
                                              "a JSON object (application/json) or as the multipart field "
                                              "'params' next to an uploaded file.")
                return
        state = RequestState()
        token = _REQUEST.set(state)
        try:
            await self._limited(scope, receive, _cors_headers_for(origin, self.allowed_origins, send))
        finally:
            _REQUEST.reset(token)
            remove_uploads(state)  # after the answer and its background tasks, whatever the outcome

    async def _json_as_form(self, scope: Scope, receive: Receive, send: Send) -> tuple[Scope | None, Receive]:
        """An infer request with a JSON body, as the form MONAI Label's ``/infer`` reads (its parameters only
        come from the form field ``params``: a JSON body was ignored and the task ran with its defaults).
        Returns (None, receive) when it has answered the request itself (too large, not a JSON object)."""
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._refuse(send)  # as for any body: refused before a byte of it is read
            return None, receive
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                await self._refuse(send)
                return None, receive
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        try:
            params = json.loads(body or b"{}")
        except ValueError:
            params = None
        if not isinstance(params, dict):
            await self._answer(send, 422, "The request's JSON body is not a JSON object of parameters: send for "
                                          "example {\"level\": \"high\"}.")
            return None, receive
        form = urllib.parse.urlencode({"params": json.dumps(params)}).encode()
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/x-www-form-urlencoded"),
                    (b"content-length", str(len(form)).encode())]
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()  # (the disconnect, once the app waits for it)
            sent = True
            return {"type": "http.request", "body": form, "more_body": False}

        return {**scope, "headers": headers}, replay

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.max_body_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await self._refuse(send)  # nothing of the body has been read, so nothing is stored
            return
        received = 0
        over = False
        started = False

        async def counted_receive() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    raise _BodyTooLarge
            return message

        async def filtered_send(message: Message) -> None:
            nonlocal started
            if over:
                return  # whatever the app answers to a cut-off body (400, 500) is replaced by the 413 below
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, filtered_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        await self._answer(send, 413, self.message)

    @staticmethod
    async def _answer(send: Send, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})  # the unread rest of the body ends with the connection
        await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    """The first value of request header ``name`` (lower case), or None."""
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _own_origin(scope: Scope) -> str | None:
    """The origin the server itself is reached at (scheme and Host header): its own pages (/docs) send it.
    Only for an address or ``localhost``: a page whose site name was pointed at 127.0.0.1 (DNS rebinding)
    also sends its own site as both Host and Origin."""
    host = _header(scope, b"host")
    if not host:
        return None
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        if name.lower() != "localhost":
            return None
    return f"{scope.get('scheme', 'http')}://{host}"


def parse_origins(raw: str | None) -> tuple[str, ...]:
    """App conf ``cors_origins``: comma-separated ``scheme://host[:port]`` origins (none by default).

    Raises:
        ValueError: a wildcard, or an entry that is not an origin (one sentence).
    """
    origins = tuple(o.strip().rstrip("/") for o in (raw or "").split(",") if o.strip())
    for origin in origins:
        if "*" in origin or not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ValueError(f"--conf cors_origins {origin[:40]!r} is not an origin: name each web application "
                             "as scheme://host:port (no wildcard).")
    return origins


def _cors_headers_for(origin: str | None, allowed: frozenset[str], send: Send) -> Send:
    """``send`` with MONAI Label's CORS answer made exact: an allowed origin gets itself back, never ``*``, and
    no credentials (the server uses none); every other request (no Origin, or the server's own pages) gets no
    ``Access-Control-*`` header at all (MONAI Label's default grants ``*`` with credentials)."""
    async def exact(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", [])
                       if not k.lower().startswith(b"access-control-allow-origin")
                       and k.lower() != b"access-control-allow-credentials"]
            if origin is not None and origin in allowed:
                headers.append((b"access-control-allow-origin", origin.encode("latin-1")))
                headers.append((b"vary", b"Origin"))
            else:
                headers = [(k, v) for k, v in headers if not k.lower().startswith(b"access-control-")]
            message = {**message, "headers": headers}
        await send(message)

    return exact


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def install_request_guard(max_body_bytes: int, dicom_proxy: bool = False,
                          allowed_origins: Sequence[str] = ()) -> bool:
    """Wrap the running MONAI Label server's ASGI stack in ``RequestGuard`` (again: update its settings).

    Returns False when this process is no server (e.g. MONAI Label's training subprocess).
    """
    module = sys.modules.get("monailabel.app")
    app = getattr(module, "app", None)
    if app is None:
        return False
    stack = app.middleware_stack
    if isinstance(stack, RequestGuard):
        stack.max_body_bytes = int(max_body_bytes)
        stack.dicom_proxy = dicom_proxy
        stack.allowed_origins = frozenset(allowed_origins)
    elif stack is not None:
        # Starlette calls app.middleware_stack for every request; it is built (at the lifespan start-up
        # that creates this app) and no longer rebuilt, so replacing it wraps every later request
        app.middleware_stack = RequestGuard(stack, max_body_bytes, dicom_proxy, allowed_origins)
    else:  # not started yet: wrap the stack when Starlette builds it
        build = app.build_middleware_stack
        app.build_middleware_stack = lambda: RequestGuard(build(), max_body_bytes, dicom_proxy, allowed_origins)
    return True


# --------------------------------------------------------------------------------------- upload tracking

#: File-type extensions kept from an upload's suffix; anything before them is the client's file name.
_SUFFIX_TOKENS = frozenset({"nii", "gz", "nrrd", "nhdr", "mha", "mhd", "raw", "dcm", "zip", "json", "txt", "bin",
                            "pt", "pth", "ts", "png", "jpg", "jpeg", "tif", "tiff", "npy", "npz", "seg", "xml"})
_UPLOAD_MODULES = ("monailabel.endpoints.infer", "monailabel.endpoints.datastore", "monailabel.endpoints.model",
                   "monailabel.endpoints.wsi_infer")


def safe_suffix(suffix: str) -> str:
    """The trailing file-type extensions of an upload's suffix: ``".Jane.nii.gz"`` -> ``".nii.gz"``.

    MONAI Label builds the suffix from every dot-part of the client's file name, so a name like
    ``Doe.Jane.nii.gz`` would otherwise end up in server file names (and in the log lines that print them).
    """
    tokens = str(suffix).split(".")[1:]
    kept: list[str] = []
    for token in reversed(tokens):
        if token.lower() not in _SUFFIX_TOKENS:
            break
        kept.append(token)
    return "".join("." + t for t in reversed(kept))


@dataclass(frozen=True)
class _Named:
    name: str


class _UploadTempfile:
    """Stands in for the ``tempfile`` module inside MONAI Label's upload endpoints.

    MONAI Label takes only the ``name`` of a ``NamedTemporaryFile`` (the file itself is deleted when the object
    is dropped) and opens that name again, so the upload landed in the shared temporary folder with the
    process's umask (0644). Here the name is of a file made (0600) in this server's private folder (0700) and
    kept, so the upload is written into it; ``RequestGuard`` removes the request's uploads when it ends,
    whatever its outcome (MONAI Label removes them only after a successful answer).
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def __getattr__(self, name: str) -> Any:
        return getattr(tempfile, name)

    def NamedTemporaryFile(self, *args: Any, suffix: str | None = None, **kwargs: Any) -> Any:  # noqa: N802, ARG002
        fd, path = tempfile.mkstemp(suffix=safe_suffix(suffix) if suffix else "", prefix="upload-", dir=self.folder)
        os.close(fd)
        state = current_request()
        if state is not None:
            state.uploads.add(os.path.realpath(path))
        return _Named(path)


def install_upload_tracking() -> int:
    """Give MONAI Label's upload endpoints the recording ``NamedTemporaryFile`` (uploads in a private folder
    made now, 0700, under the temporary folder); returns how many modules."""
    folder = None
    count = 0
    for name in _UPLOAD_MODULES:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "tempfile", None) is not None:
            if not isinstance(module.tempfile, _UploadTempfile):
                if folder is None:
                    folder = tempfile.mkdtemp(prefix="semid-uploads-")
                    atexit.register(shutil.rmtree, folder, True)  # the folder goes with the server
                module.tempfile = _UploadTempfile(folder)
            count += 1
    return count


def remove_uploads(state: RequestState) -> None:
    """Remove what is left of one request's uploads (files or folders)."""
    for path in state.uploads:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)


# ------------------------------------------------------------------------------------------ image check


def _inside(path: str, root: str) -> bool:
    real_root = os.path.realpath(root)
    candidates = (os.path.realpath(path), os.path.abspath(os.path.normpath(path)))
    return any(c == real_root or c.startswith(real_root.rstrip(os.sep) + os.sep) for c in candidates)


def _looks_like_path(value: str) -> bool:
    return ("/" in value or "\\" in value or value in (".", "..") or value.startswith("~")
            or value.lower().startswith("file:"))


def check_request_images(request: dict[str, Any], trusted_roots: Sequence[str | None]) -> None:
    """Refuse an infer request whose ``image`` (or ``label``) is neither a datastore id nor this request's upload.

    Allowed: a string that is no server path (a datastore id; an unknown one is answered 404 by the task),
    a file MONAI Label wrote for this request's upload, and a path inside ``trusted_roots`` (the datastore
    folder, the session store). In-process callers with no HTTP request (batch jobs, scoring) are held to
    the same rule for strings, so a client cannot pass a path through a batch request either.

    Raises:
        HTTPException: 400 with one sentence for a server path; 404 for an existing server file named
            without a path (answered like an unknown id, so replies do not reveal which files exist).
    """
    state = current_request()
    roots = [r for r in trusted_roots if r]
    for key in ("image", "label"):
        value = request.get(key)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            if state is not None:  # from a client: ids and uploads only
                raise HTTPException(status_code=400, detail=PATH_REFUSED)
            continue  # in-process callers may hand over arrays or images
        if state is not None and os.path.realpath(value) in state.uploads:
            continue
        if any(_inside(value, root) for root in roots):
            continue
        if _looks_like_path(value):
            logger.info("SemID: refused an infer request that named a server path")
            raise HTTPException(status_code=400, detail=PATH_REFUSED)
        if os.path.lexists(value):
            logger.info("SemID: refused an infer request that named a server file")
            raise HTTPException(status_code=404, detail=UNKNOWN_IMAGE)


# ------------------------------------------------------------------------------------------ log scrubber

_LOG_METHODS = frozenset({"debug", "info", "warning", "warn", "error", "exception", "critical", "fatal", "log"})
_PERCENT = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[diouxXeEfFgGcrsa]")
_BRACES = re.compile(r"\{[^{}]*\}")
_UID = re.compile(r"^\d+(?:\.\d+){3,}$")
_TEMPLATES: dict[str, dict[int, str]] = {}
_MONAILABEL_DIR = os.sep + "nonexistent" + os.sep  # set by install_log_scrubber


def _template_text(node: ast.expr, has_args: bool) -> str:
    """The constant text of a log message expression, each interpolated value replaced by ``<withheld>``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return _PERCENT.sub(WITHHELD, node.value) if has_args else node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(p.value if isinstance(p, ast.Constant) else WITHHELD for p in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _template_text(node.left, False) + _template_text(node.right, False)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
        return _template_text(node.left, True)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format"
            and isinstance(node.func.value, ast.Constant) and isinstance(node.func.value.value, str)):
        return _BRACES.sub(WITHHELD, node.func.value.value)
    return WITHHELD


def _templates(pathname: str) -> dict[int, str]:
    """Line number -> message template of every logging call in a source file (parsed once)."""
    if pathname in _TEMPLATES:
        return _TEMPLATES[pathname]
    found: dict[int, tuple[int, str]] = {}
    try:
        tree = ast.parse("".join(linecache.getlines(pathname)))
    except (SyntaxError, ValueError):
        tree = None
    for node in ast.walk(tree) if tree is not None else ():
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in _LOG_METHODS and node.args):
            continue
        index = 1 if node.func.attr == "log" else 0
        if len(node.args) <= index:
            continue
        text = _template_text(node.args[index], len(node.args) > index + 1)
        span = (node.end_lineno or node.lineno) - node.lineno
        for line in range(node.lineno, (node.end_lineno or node.lineno) + 1):
            if line not in found or span < found[line][0]:  # the innermost call on a line wins
                found[line] = (span, text)
    _TEMPLATES[pathname] = {line: text for line, (_, text) in found.items()}
    return _TEMPLATES[pathname]


def _safe_access_path(full_path: str) -> str:
    """An access-log path without its query string (image ids, file names) and with UID segments hidden."""
    path, _, query = full_path.partition("?")
    path = "/".join("<uid>" if _UID.match(part) else part for part in path.split("/"))
    return path + ("?" + WITHHELD if query else "")


def _safe_traceback(exc_info: tuple[Any, Any, Any]) -> str:
    etype, _value, tb = exc_info
    frames = "".join(traceback.format_tb(tb)) if tb is not None else ""
    name = getattr(etype, "__name__", "Exception")
    return f"Traceback (most recent call last):\n{frames}{name}: {WITHHELD} (exception messages may name patients)"


def _monailabel_dir() -> str:
    import monailabel

    return os.path.dirname(os.path.realpath(monailabel.__file__)) + os.sep


@functools.lru_cache(maxsize=512)
def _is_monailabel_source(pathname: str) -> bool:
    return os.path.realpath(pathname).startswith(_MONAILABEL_DIR)


def scrub_record(record: logging.LogRecord) -> None:
    """Make one log record safe to write (see the module docstring, point 3)."""
    if record.exc_info and isinstance(record.exc_info, tuple):
        record.exc_text = _safe_traceback(record.exc_info)
        record.exc_info = None
    name = record.name
    # by logger name, or by source file: MONAI Label's task subprocesses run its code as `__main__`
    # (`Result: {...}` of a batch or scoring run lists image ids)
    if name == "monailabel" or name.startswith("monailabel.") or _is_monailabel_source(record.pathname):
        record.msg = _templates(record.pathname).get(record.lineno, WITHHELD)
        record.args = ()
    elif name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) >= 3:
        args = list(record.args)
        args[2] = _safe_access_path(str(args[2]))
        record.args = tuple(args)


def install_log_scrubber() -> None:
    """Route every log record of this process through ``scrub_record`` (once; records made from now on)."""
    global _MONAILABEL_DIR
    _MONAILABEL_DIR = _monailabel_dir()
    previous = logging.getLogRecordFactory()
    if getattr(previous, "semid_scrubber", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            scrub_record(record)
        except Exception:  # never let logging fail, and never let an unscrubbed message through
            record.msg, record.args, record.exc_info, record.exc_text = "<log message withheld>", (), None, None
        return record

    factory.semid_scrubber = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


# ------------------------------------------------------------------------------------------ bind address


def bind_host(argv: Sequence[str]) -> str | None:
    """The address ``monailabel start_server`` binds, read from its command line (its default: 0.0.0.0);
    None when ``argv`` is not a ``start_server`` command line (e.g. a training subprocess)."""
    if "start_server" not in argv:
        return None
    host = "0.0.0.0"
    for i, arg in enumerate(argv):
        if arg in ("--host", "-i") and i + 1 < len(argv):
            host = argv[i + 1]
        elif arg.startswith("--host="):
            host = arg.split("=", 1)[1]
        elif arg.startswith("-i") and len(arg) > 2 and not arg.startswith("--"):
            host = arg[2:]
    return host


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``localhost`` counts; other names are not resolved)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def default_bind_refusal(argv: Sequence[str]) -> str | None:
    """The sentence the server stops with when ``start_server`` was given no ``--host``, else None.

    MONAI Label's default is 0.0.0.0 (every interface); SemID's is loopback. Uvicorn runs the lifespan
    start-up (which creates this app) before it binds its socket, but the address is fixed in its own
    config by then, so the app cannot move it: it stops before anything listens, and an address named on
    purpose (even 0.0.0.0) is served with the warning of ``bind_warning``.
    """
    if "start_server" not in argv:
        return None
    named = any(arg in ("--host", "-i") or arg.startswith("--host=") or (arg.startswith("-i") and len(arg) > 2
                                                                        and not arg.startswith("--"))
                for arg in argv)
    if named:
        return None
    return ("SemID: no --host was given, so MONAI Label would listen on every interface (0.0.0.0): start the "
            "server with --host 127.0.0.1, or name the address to expose on purpose.")


def bind_warning(argv: Sequence[str], auth_enabled: bool) -> str | None:
    """The warning to log for this command line, or None when the bind address is loopback (or unknown)."""
    host = bind_host(argv)
    if host is None or is_loopback(host):
        return None
    guard = ("MONAI Label's authentication is on, make sure only trusted clients can reach it" if auth_enabled
             else "it serves patient volumes without authentication")
    return (f"SemID: the server listens on {host}, which other machines can reach, and {guard}: start it with "
            "--host 127.0.0.1 unless it sits behind access control.")


def log_bind_address(argv: Sequence[str] | None = None) -> None:
    """Log where the server listens: a warning for a non-loopback address (see ``bind_warning``)."""
    from monailabel.config import settings

    argv = list(sys.argv if argv is None else argv)
    warning = bind_warning(argv, bool(settings.MONAI_LABEL_AUTH_ENABLE))
    if warning:
        logger.warning(warning)
    elif (host := bind_host(argv)) is not None:
        logger.info("SemID: the server listens on the loopback address %s only.", host)
