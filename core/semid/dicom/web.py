"""DICOMweb access for SemID: list CT/MR series (QIDO-RS), download a series (WADO-RS), store a
de-identified series as new instances (STOW-RS). Used by the MONAI Label app's DICOMweb datastore and
reusable by batch runs over a PACS; it imports no server framework.

Every failure reaches the caller as one `InputError` sentence with no PHI and no URL (URLs may carry
credentials): `ServerUnreachable` (connection refused, timed out), `ServerError` (the server answered
with an HTTP error or refused instances), `SeriesNotFound`. Each carries ``http_status``, the status a
web front end should answer with (503, 502, 404).

SemID's own outputs are recognised so they are never listed as inputs again (a de-identified series
fed back in would be de-identified twice and, in a batch, again on every run): a series is SemID's
when its Patient ID is a SemID pseudonym (``SEMID-``, visible in the series query, so only those
series cost a closer look) AND one of its instances says Patient Identity Removed = YES with a
De-identification Method naming SemID (PS3.15 E.1.1; Orthanc's QIDO does not return these two, so they
are read from the instance's WADO-RS metadata). Requiring both means a real patient whose ID happens
to start with ``SEMID-`` is still listed, and so is a series another tool de-identified (its face may
still be there).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import requests

from semid.dicom.tree import pixel_data_complete
from semid.errors import InputError, TransientError

#: Modalities listed by default (one query each: Orthanc does not match multi-valued CS reliably).
DEFAULT_MODALITIES = ("CT", "MR")
#: Patient ID prefix of SemID's pseudonymous patients (`semid.dicom.profile.Profile.patient_pseudonym`).
SEMID_PATIENT_PREFIX = "SEMID-"
#: (connect, read) timeouts in seconds: a server that stops answering fails a request, never hangs it.
DEFAULT_TIMEOUT = (10.0, 300.0)
#: Instances per STOW-RS request, so a large series is not one huge request body.
STORE_BATCH = 64

_STUDY, _SERIES, _SOP = "0020000D", "0020000E", "00080018"
_MODALITY, _PATIENT_ID, _INSTANCES = "00080060", "00100020", "00201209"
_IDENTITY_REMOVED, _METHOD = "00120062", "00120063"


class DicomWebError(InputError):
    """A DICOMweb request failed; the message is one sentence for the user (no PHI, no URL)."""

    http_status = 502


class ServerUnreachable(DicomWebError, TransientError):
    """No answer: connection refused, name not resolved, or timed out."""

    http_status = 503


class ServerError(DicomWebError, TransientError):
    """The server answered with an HTTP error, or refused instances sent to it."""

    http_status = 502


class SeriesNotFound(DicomWebError):
    """The server has no series with that Series Instance UID."""

    http_status = 404


@dataclass(frozen=True)
class SeriesRef:
    """A series on the server: its UIDs, modality and instance count (None when not reported)."""

    study_uid: str
    series_uid: str
    modality: str
    instances: int | None = None


@dataclass(frozen=True)
class StoredSeries:
    """What a STOW-RS upload stored: the study and series UIDs and how many instances."""

    study_uid: str
    series_uid: str
    instances: int


class _TimeoutSession(requests.Session):
    """A requests session whose requests time out unless told otherwise (dicomweb-client sets none)."""

    def __init__(self, timeout: tuple[float, float]) -> None:
        super().__init__()
        self._timeout = timeout

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:  # noqa: D102
        kwargs.setdefault("timeout", self._timeout)
        return super().request(*args, **kwargs)


def connect(url: str, *, username: str | None = None, password: str | None = None,
            session: requests.Session | None = None, qido_prefix: str | None = None,
            wado_prefix: str | None = None, stow_prefix: str | None = None,
            timeout: tuple[float, float] = DEFAULT_TIMEOUT):
    """A `dicomweb_client.DICOMwebClient` for ``url`` (e.g. ``http://127.0.0.1:8042/dicom-web``).

    ``username``/``password`` add HTTP basic authentication; ``session`` replaces the default session
    (e.g. an authorised cloud session; then ``timeout`` and credentials are the session's business).
    Nothing is contacted here.
    """
    from dicomweb_client import DICOMwebClient

    if session is None:
        session = _TimeoutSession(timeout)
        if username and password:
            session.auth = (username, password)
    client = DICOMwebClient(url=url.rstrip("/"), session=session, qido_url_prefix=qido_prefix or None,
                            wado_url_prefix=wado_prefix or None, stow_url_prefix=stow_prefix or None)
    # dicomweb-client retries 503/504/429 five times with exponential back-off (about 15 s);
    # three quick tries keep an error answer prompt.
    client.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=250)
    return client


@contextlib.contextmanager
def _requests(action: str, not_found: str | None = None) -> Iterator[None]:
    """Turn transport and HTTP failures of ``action`` (e.g. "listing series") into one-sentence errors."""
    try:
        yield
    except (requests.ConnectionError, requests.Timeout):
        raise ServerUnreachable(
            f"The DICOMweb server cannot be reached while {action} (refused or timed out): check that it "
            "is running and that the URL is right, then try again.") from None
    except requests.HTTPError as error:
        status = error.response.status_code if error.response is not None else 0
        if status == 404 and not_found:
            raise SeriesNotFound(not_found) from None
        if status in (401, 403):
            raise ServerError(
                f"The DICOMweb server refused access (HTTP {status}) while {action}: check the user name and "
                "password the server expects.") from None
        raise ServerError(
            f"The DICOMweb server answered HTTP {status} while {action}: check the server's log and its "
            "DICOMweb URL, then try again.") from None
    except requests.RequestException:
        raise ServerError(f"The DICOMweb request failed while {action}: check the server and try again.") from None


def _value(item: dict, tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value") or [None]
    return values[0]


def _text(item: dict, tag: str) -> str:
    value = _value(item, tag)
    if isinstance(value, dict):  # PN in DICOM JSON
        value = value.get("Alphabetic", "")
    return "" if value is None else str(value).strip()


def _ref(item: dict) -> SeriesRef:
    count = _value(item, _INSTANCES)
    return SeriesRef(_text(item, _STUDY), _text(item, _SERIES), _text(item, _MODALITY),
                     int(count) if count not in (None, "") else None)


def is_semid_output(metadata: dict) -> bool:
    """Whether an instance's DICOM JSON metadata says SemID de-identified it (see the module docstring)."""
    return (_text(metadata, _IDENTITY_REMOVED).upper() == "YES"
            and _text(metadata, _METHOD).startswith("SemID"))


def _is_semid_series(client, item: dict) -> bool:
    if not _text(item, _PATIENT_ID).startswith(SEMID_PATIENT_PREFIX):
        return False
    study, series = _text(item, _STUDY), _text(item, _SERIES)
    with _requests("checking a series", not_found=None):
        instances = client.search_for_instances(study_instance_uid=study, series_instance_uid=series,
                                                fields=[_SOP], limit=1)
        if not instances:
            return False
        metadata = client.retrieve_instance_metadata(study, series, _text(instances[0], _SOP))
    return is_semid_output(metadata)


def list_series(client, modalities: Iterable[str] = DEFAULT_MODALITIES, *, extra_filters: dict | None = None,
                include_semid: bool = False, verdicts: dict[str, bool] | None = None) -> list[SeriesRef]:
    """The series of the given modalities, in the server's order, SemID's own outputs left out.

    Args:
        modalities: queried one at a time (Orthanc does not reliably match ``CT\\MR``).
        extra_filters: further QIDO-RS matching keys (e.g. ``{"StudyDate": "20240101-"}``); a
            ``Modality`` key there is ignored.
        include_semid: list SemID's outputs too.
        verdicts: a dict kept by the caller between calls, Series Instance UID -> whether it is
            SemID's output, so each series is judged once.

    Raises:
        DicomWebError: the server cannot be reached or answers with an error.
    """
    filters = {k: v for k, v in (extra_filters or {}).items() if k != "Modality"}
    verdicts = {} if verdicts is None else verdicts
    found: dict[str, SeriesRef] = {}
    for modality in dict.fromkeys(m.strip().upper() for m in modalities if m.strip()):
        with _requests("listing series"):
            items = client.search_for_series(search_filters={**filters, "Modality": modality},
                                             fields=[_PATIENT_ID, _INSTANCES], get_remaining=True)
        for item in items:
            ref = _ref(item)
            if not ref.series_uid or ref.series_uid in found or ref.modality.upper() != modality:
                continue  # the last test: a server that ignores the filter must not widen the listing
            if not include_semid:
                if ref.series_uid not in verdicts:
                    verdicts[ref.series_uid] = _is_semid_series(client, item)
                if verdicts[ref.series_uid]:
                    continue
            found[ref.series_uid] = ref
    return list(found.values())


def find_series(client, series_uid: str) -> SeriesRef:
    """The series with this Series Instance UID.

    Raises:
        SeriesNotFound: the server has no such series. DicomWebError: it cannot be asked.
    """
    with _requests("looking up a series"):
        items = client.search_for_series(search_filters={"SeriesInstanceUID": series_uid})
    items = [item for item in items if _text(item, _SERIES) == series_uid]
    if not items:
        raise SeriesNotFound("The DICOMweb server has no series with that Series Instance UID: "
                             "list the series again and choose one of them.")
    return _ref(items[0])


def download_series(client, series_uid: str, folder: str | Path, study_uid: str | None = None) -> Path:
    """Download every instance of a series into ``folder`` (created; must not exist or be empty).

    Files are named in the order they arrive (``IM00001.dcm``...), never after patient data; they are
    streamed into a temporary folder beside ``folder``, which is renamed into place when all have arrived.

    Raises:
        SeriesNotFound, DicomWebError: as `find_series`; InputError: ``folder`` is not empty, or an
        instance cannot be parsed or is damaged (uncompressed pixel data shorter than its image).
    """
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise InputError("The download folder exists and is not empty: choose a new folder.")
    study_uid = study_uid or find_series(client, series_uid).study_uid
    missing = ("The DICOMweb server has no series with that Series Instance UID: list the series again and "
               "choose one of them.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".semid-", dir=folder.parent))
    try:
        count = 0
        with _requests("downloading a series", not_found=missing):
            try:
                # streamed one instance at a time: a large series never sits in memory whole
                for ds in client.iter_series(study_uid, series_uid):
                    if not pixel_data_complete(ds):
                        raise InputError("An instance of the series is damaged (its pixel data is shorter than its "
                                         "image): repair or remove it in the archive and try again.")
                    count += 1
                    ds.save_as(staging / f"IM{count:05d}.dcm", write_like_original=False)
            except (requests.RequestException, InputError):
                raise
            except Exception:  # noqa: BLE001 - a part that does not parse as DICOM is a damaged instance
                raise InputError("An instance of the series could not be read (damaged DICOM): repair or remove "
                                 "it in the archive and try again.") from None
        if count == 0:
            raise SeriesNotFound(missing)
        with contextlib.suppress(OSError):
            folder.rmdir()  # an empty folder left for us
        try:
            os.replace(staging, folder)
        except OSError:
            if not (folder.is_dir() and any(folder.iterdir())):
                raise
            # another process (e.g. MONAI Label's scoring subprocess) downloaded it meanwhile: keep theirs
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def store_series(client, folder: str | Path) -> StoredSeries:
    """Store the DICOM files of ``folder`` (one series) as new instances through STOW-RS.

    Raises:
        InputError: the folder is empty, holds several series or a file that is not DICOM.
        DicomWebError: the server cannot be reached, answers with an error, or refuses an instance
        (instances stored before the failure stay on the server; they are de-identified).
    """
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise InputError("The series folder to store holds no files: write the de-identified series first.")
    headers = [_read(path, stop_before_pixels=True) for path in files]
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in headers}
    studies = {str(ds.get("StudyInstanceUID", "")) for ds in headers}
    if len(series) != 1 or len(studies) != 1 or "" in series | studies:
        raise InputError("The folder to store must hold the instances of exactly one series: give one series.")
    study_uid, series_uid = studies.pop(), series.pop()
    for start in range(0, len(files), STORE_BATCH):  # whole instances are read one batch at a time
        batch = [_read(path) for path in files[start:start + STORE_BATCH]]
        with _requests("storing the de-identified series"):
            response = client.store_instances(batch, study_instance_uid=study_uid)
        _check_stored(response, batch)
    return StoredSeries(study_uid, series_uid, len(files))


def _read(path: Path, stop_before_pixels: bool = False) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except Exception:  # noqa: BLE001 - any parse failure
        raise InputError("A file to store is not readable DICOM: write the series again.") from None


def _check_stored(response: pydicom.Dataset | None, batch: Sequence[pydicom.Dataset]) -> None:
    """Raise unless the STOW-RS response lists every instance of ``batch`` as stored."""
    failed = len(getattr(response, "FailedSOPSequence", None) or []) if response is not None else 0
    stored = {str(item.get("ReferencedSOPInstanceUID", ""))
              for item in (getattr(response, "ReferencedSOPSequence", None) or [])} if response is not None else set()
    missing = [ds for ds in batch if str(ds.SOPInstanceUID) not in stored]
    if failed or missing:
        raise ServerError(
            f"The DICOMweb server refused {max(failed, len(missing))} of {len(batch)} de-identified instances: "
            "check the server's log (storage full, or instances it cannot accept), then try again.")
