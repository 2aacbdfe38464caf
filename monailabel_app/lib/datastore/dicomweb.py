"""MONAI Label datastore over DICOMweb (Orthanc or any PACS with QIDO-RS, WADO-RS and STOW-RS).

A thin adapter over `semid.dicom.web` and `semid.dicom.tree.deidentify_series`, on top of MONAI Label's
`DICOMWebDatastore` (whose local cache, labels and datastore file it keeps). What it changes:

* lists CT and MR (app conf ``modalities``, default ``CT,MR``; MONAI Label's default search filter shows
  CT only), one query per modality, and never lists SemID's own de-identified series;
* converts a series to NIfTI with SemID's reader (`semid.io`), geometry kept;
* keeps no Patient ID, name or dates in the image info (MONAI Label's `_dicom_info` stores them);
* a label saved under the tag ``deid`` (the de-identified volume) becomes a NEW de-identified DICOM
  series (PS3.15 profile, pseudonymous patient, new UIDs, the source's slice geometry) stored through
  STOW-RS, its Series Instance UID recorded in the label info; the original study is never modified
  (nothing here deletes or overwrites on the server);
* a ``final`` label (a person's reviewed label) stays in the local cache only: MONAI Label uploads it as
  DICOM SEG with dcmqi's ``itkimage2segimage``, which it downloads from GitHub, and SemID's app never
  downloads anything at run time;
* a server that is down or answers with an error reaches the client as one sentence with 503/502,
  an image id that is not one of the listed series as 404, a series that cannot be read as a volume
  as 422 (no traceback, no PHI in the message or the log).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore

from lib import DEID_TAG
from semid.dicom import pseudonyms as ps
from semid.dicom import web
from semid.dicom.tree import deidentify_series
from semid.errors import InputError
from semid.io import read_volume, write_volume

logger = logging.getLogger(__name__)

#: Label tag under which de-identified volumes are saved (and stored back to the PACS as DICOM).
#: App conf key with the modalities to list (comma-separated).
MODALITIES_CONF = "modalities"
DEFAULT_MODALITIES = ",".join(web.DEFAULT_MODALITIES)
#: Status for a series that cannot be read as one volume (damaged instance, mixed geometry).
UNREADABLE_STATUS = 422

_UID = re.compile(r"^[0-9]+(\.[0-9]+)+$")
_NOT_FOUND = "There is no CT or MR series with that id on the DICOMweb server: list the images with /datastore/."


def http_error(error: InputError) -> HTTPException:
    """The HTTP answer for a library error: its own status (DICOMweb errors) or 422, its sentence as detail."""
    return HTTPException(status_code=getattr(error, "http_status", UNREADABLE_STATUS), detail=str(error))


def parse_modalities(text: str) -> tuple[str, ...]:
    """``"CT,MR"`` -> ``("CT", "MR")``; raises ValueError (at server start) when nothing is named."""
    modalities = tuple(dict.fromkeys(m.strip().upper() for m in text.split(",") if m.strip()))
    if not modalities or not all(m.isalnum() and len(m) <= 16 for m in modalities):
        raise ValueError("--conf modalities must name DICOM modalities separated by commas, e.g. CT,MR.")
    return modalities


class SemIDDicomWebDatastore(DICOMWebDatastore):
    """DICOMweb datastore that lists CT and MR and stores de-identified results back as new series."""

    def __init__(self, client: Any, modalities: Iterable[str] = web.DEFAULT_MODALITIES,
                 extra_filters: dict[str, Any] | None = None, cache_path: str | None = None,
                 key: ps.Key | None = None, listing_ttl_s: float = 7200.0) -> None:
        self._modalities = tuple(modalities)
        self._extra_filters = {k: v for k, v in (extra_filters or {}).items() if k != "Modality"}
        self._key = key
        self._listing_ttl_s = float(listing_ttl_s)
        self._listing: dict[str, web.SeriesRef] | None = None
        self._listed_at = 0.0
        self._verdicts: dict[str, bool] = {}  # series UID -> is SemID's own output (judged once)
        self._list_lock = threading.Lock()
        self._fetch_lock = threading.Lock()
        # one writer of the image table at a time: MONAI Label's file watcher reconciles it on its own
        # thread when a fetched series lands in the cache, while a request's thread refreshes and updates
        # it; two at once changed the table under an iteration ("dictionary changed size", a 500 in CI)
        self._table_lock = threading.RLock()
        super().__init__(client=client, search_filter={}, cache_path=cache_path, fetch_by_frame=False,
                         convert_to_nifti=True)
        # Files are staged beside the cache, not inside it: MONAI Label watches the cache folder and would
        # take a half-written *.nii.gz there for a new image.
        self._staging = Path(f"{self._datastore_path.rstrip(os.sep)}.staging")

    # ---------------------------------------------------------------------------------- listing

    def _series(self, refresh: bool = False) -> dict[str, web.SeriesRef]:
        with self._list_lock:
            expired = time.monotonic() - self._listed_at > self._listing_ttl_s
            if refresh or expired or self._listing is None:
                try:
                    refs = web.list_series(self._client, self._modalities, extra_filters=self._extra_filters,
                                           verdicts=self._verdicts)
                except InputError as error:
                    raise http_error(error) from None
                self._listing = {ref.series_uid: ref for ref in refs}
                self._listed_at = time.monotonic()
            return self._listing

    def list_images(self) -> list[str]:
        """Series Instance UIDs of the listed modalities (cached for MONAI_LABEL_DICOMWEB_CACHE_EXPIRY s)."""
        return list(self._series())

    def _dicom_info(self, series_id: str) -> dict[str, Any]:
        """Image info without PHI: UIDs, modality and instance count only (no patient ID, name or dates)."""
        ref = self._series().get(series_id)
        if ref is None:
            return {"SeriesInstanceUID": series_id}
        return {"SeriesInstanceUID": ref.series_uid, "StudyInstanceUID": ref.study_uid, "Modality": ref.modality,
                "instances": ref.instances}

    def _require(self, image_id: str) -> web.SeriesRef:
        """The listed series ``image_id``; 404 for anything else (a malformed id, another modality, SemID's
        own output, a series that is not there)."""
        if not isinstance(image_id, str) or len(image_id) > 64 or not _UID.match(image_id):
            raise HTTPException(status_code=404, detail=_NOT_FOUND)
        series = self._series()
        if image_id not in series:  # a series that arrived after the last listing
            series = self._series(refresh=True)
        if image_id not in series:
            raise HTTPException(status_code=404, detail=_NOT_FOUND)
        return series[image_id]

    # ----------------------------------------------------------------------------------- images

    def _series_dir(self, image_id: str) -> Path:
        return Path(self._datastore.image_path()) / image_id

    def _nifti(self, image_id: str) -> Path:
        return Path(self._datastore.image_path()) / f"{image_id}.nii.gz"

    def _fetch_series(self, image_id: str, ref: web.SeriesRef) -> Path:
        """The series' DICOM files in the cache, downloaded once (atomically)."""
        folder = self._series_dir(image_id)
        if not (folder.is_dir() and any(folder.iterdir())):
            try:
                web.download_series(self._client, image_id, folder, study_uid=ref.study_uid)
            except InputError as error:
                # downloads land whole (renamed into place), so a folder that appeared meanwhile, fetched by
                # MONAI Label's scoring or training subprocess, is complete
                if not (folder.is_dir() and any(folder.iterdir())):
                    raise http_error(error) from None
        return folder

    def get_image_uri(self, image_id: str) -> str:
        """The series as NIfTI in the local cache, downloaded and converted on first use."""
        if not isinstance(image_id, str) or not _UID.match(image_id or ""):
            raise HTTPException(status_code=404, detail=_NOT_FOUND)
        nifti = self._nifti(image_id)
        if nifti.is_file() and self.get_image_info(image_id):
            return str(nifti)
        ref = self._require(image_id)
        with self._fetch_lock:
            if not nifti.is_file():
                folder = self._fetch_series(image_id, ref)
                try:
                    image = read_volume(folder)
                except InputError as error:
                    # a damaged series is fetched again next time (it may be repaired on the server)
                    shutil.rmtree(folder, ignore_errors=True)
                    raise http_error(error) from None
                self._staging.mkdir(parents=True, exist_ok=True)
                staged = Path(tempfile.mkdtemp(prefix="nifti-", dir=self._staging)) / nifti.name
                try:
                    write_volume(image, staged)
                    os.replace(staged, nifti)
                finally:
                    shutil.rmtree(staged.parent, ignore_errors=True)
                logger.info("DICOMweb: series fetched (%s, %d slices)", ref.modality, image.GetSize()[2])
            with self._table_lock:
                if not self.get_image_info(image_id):
                    self.refresh()  # registers the new NIfTI in the datastore file
                self.update_image_info(image_id, self._dicom_info(image_id))
        return str(nifti)

    def refresh(self) -> None:
        """MONAI Label's reconcile of the image table with the cache folder, one thread at a time."""
        with self._table_lock:
            LocalDatastore.refresh(self)

    def json(self) -> dict[str, Any]:
        """The datastore with every listed series, fetched or not (info without PHI)."""
        data = LocalDatastore.json(self)
        objects = data.setdefault("objects", {})
        for series_id in self._series():
            objects.setdefault(series_id, {"image": {"ext": "", "info": self._dicom_info(series_id)}, "labels": {}})
        return data

    # ----------------------------------------------------------------------------------- labels

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """Labels live in the local cache (no DICOM SEG is fetched from the server)."""
        return LocalDatastore.get_label_uri(self, label_id, label_tag)

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        """Images with a `final` label in the local cache that are still listed."""
        listed = set(self._series())
        return [i for i in LocalDatastore.get_labeled_images(self, label_tag, labels) if i in listed]

    def get_unlabeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        labeled = set(self.get_labeled_images(label_tag, labels))
        return [i for i in self.list_images() if i not in labeled]

    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        """Image/`final` label pairs from the local cache (MONAI Label's version downloads DICOM SEG)."""
        return LocalDatastore.datalist(self, full_path)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any],
                   label_id: str = "") -> str:
        """Keep the label in the local cache; under `deid`, first store it as a new de-identified series.

        `final` and every other tag stay local: no DICOM SEG is uploaded (that needs dcmqi, see above).
        """
        self.get_image_uri(image_id)  # validates the id and makes sure the source is cached
        label_info = dict(label_info or {})
        if label_tag == DEID_TAG:
            label_info.update(self._store_deidentified(image_id, label_filename))
        with self._table_lock:
            return LocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info)

    def _store_deidentified(self, image_id: str, label_filename: str) -> dict[str, Any]:
        """Write the de-identified series for ``image_id`` from the volume in ``label_filename`` and STOW it."""
        folder = self._fetch_series(image_id, self._require(image_id))
        self._staging.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        try:
            volume = read_volume(label_filename)
            with tempfile.TemporaryDirectory(prefix="deid-", dir=self._staging) as tmp:
                written = deidentify_series(folder, volume, Path(tmp) / "series", key=self._key)
                stored = web.store_series(self._client, written.folder)
        except InputError as error:
            raise http_error(error) from None
        logger.info("DICOMweb: de-identified series stored (%d instances, %.1f s)", stored.instances,
                    time.perf_counter() - started)
        return {"SeriesInstanceUID": stored.series_uid, "StudyInstanceUID": stored.study_uid,
                "instances": stored.instances, "stored": "dicomweb"}


def create_dicomweb_datastore(url: str, conf: dict[str, str]) -> SemIDDicomWebDatastore:
    """The DICOMweb datastore for ``--studies URL``, honouring MONAI Label's DICOMweb settings.

    Settings used: MONAI_LABEL_DICOMWEB_USERNAME/_PASSWORD (or MONAI_LABEL_DATASTORE_USERNAME/_PASSWORD),
    MONAI_LABEL_QIDO_PREFIX/_WADO_PREFIX/_STOW_PREFIX, MONAI_LABEL_DICOMWEB_CACHE_PATH (or
    MONAI_LABEL_DATASTORE_CACHE_PATH), MONAI_LABEL_DICOMWEB_CACHE_EXPIRY (listing cache, s) and the
    non-Modality keys of MONAI_LABEL_DICOMWEB_SEARCH_FILTER (modalities come from ``--conf modalities``).
    Series are always converted to NIfTI and fetched whole (FETCH_BY_FRAME and CONVERT_TO_NIFTI are not
    used). The pseudonym key is SemID's (SEMID_KEY, SEMID_KEY_FILE or the user's key file).
    Nothing is downloaded and the server is not contacted here.
    """
    modalities = parse_modalities(conf.get(MODALITIES_CONF, DEFAULT_MODALITIES))
    session = None
    if "googleapis.com" in url:
        from dicomweb_client.ext.gcp.session_utils import create_session_from_gcp_credentials

        session = create_session_from_gcp_credentials()
    client = web.connect(
        url,
        username=settings.MONAI_LABEL_DICOMWEB_USERNAME or settings.MONAI_LABEL_DATASTORE_USERNAME or None,
        password=settings.MONAI_LABEL_DICOMWEB_PASSWORD or settings.MONAI_LABEL_DATASTORE_PASSWORD or None,
        session=session,
        qido_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
        wado_prefix=settings.MONAI_LABEL_WADO_PREFIX,
        stow_prefix=settings.MONAI_LABEL_STOW_PREFIX,
    )
    cache = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or settings.MONAI_LABEL_DATASTORE_CACHE_PATH or "").strip()
    key, notice = ps.load_key()
    if notice:
        logger.info(notice)
    logger.info("DICOMweb datastore: modalities %s", ", ".join(modalities))
    return SemIDDicomWebDatastore(client, modalities, extra_filters=settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER,
                                  cache_path=cache or None, key=key,
                                  listing_ttl_s=settings.MONAI_LABEL_DICOMWEB_CACHE_EXPIRY)
