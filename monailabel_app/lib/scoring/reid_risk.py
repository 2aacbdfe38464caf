"""MONAI Label scoring method `reid_risk`: each image's residual re-identification risk, in its info.

For every image in the datastore the method de-identifies the volume at the app's default level
(`--conf level`, default `high`) and stores `semid.risk.risk_from_record` of the record (the identity
critic's similarity s of output to input, as (1 + s) / 2 in [0, 1]) in the image's info under `reid_risk`:

    {"risk": 0.583, "critic_similarity": 0.166, "level": 0.75, "model_version": "...", "ts": 1700000000}

An image that cannot be scored (not a head, unreadable) gets `"risk": null` and the one-sentence
`"error"`. Images already scored at the same level and model version (`semid.risk.model_version`:
SemID's version, the risk formula, the weights in use and the atlas) are skipped, failures included,
unless the request says `"force": true`. MONAI Label runs every scoring method at server start and
after each active-learning request (`MONAI_LABEL_AUTO_UPDATE_SCORING`, on by default), in a background
process; `POST /scoring/reid_risk` runs it on demand. Logs name image ids only.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

from lib.deidentifiers import make_deidentifier, published_identity_weights
from semid.errors import InputError
from semid.io import read_volume
from semid.pipeline import parse_level
from semid.risk import model_version, residual_risk

logger = logging.getLogger(__name__)

#: Key of the score in an image's datastore info.
INFO_KEY = "reid_risk"


def current_model_version(model_dir: str | Path | None) -> str:
    """`semid.risk.model_version` of the weights the app de-identifies with now."""
    published = published_identity_weights(model_dir)
    return model_version([published] if published else [])


def stored_score(info: dict[str, Any], level: float, version: str) -> dict[str, Any] | None:
    """The image's stored score entry when it was made at `level` with `version`, else None."""
    entry = info.get(INFO_KEY)
    if not isinstance(entry, dict) or entry.get("model_version") != version:
        return None
    try:
        same_level = abs(float(entry.get("level")) - level) < 1e-9
    except (TypeError, ValueError):
        return None
    return entry if same_level else None


def _truthy(value: Any) -> bool:
    return value is True or str(value).strip().lower() in ("1", "true", "yes")


def _store(datastore: Datastore, image_id: str, entry: dict[str, Any]) -> None:
    """Write one score into the image's info."""
    # MONAI Label's local datastore writes its whole JSON from memory: reload first what the server or
    # another task wrote meanwhile, so that this write does not undo theirs (it narrows, not closes, the
    # window; the datastore has no read-modify-write under one lock).
    if isinstance(datastore, LocalDatastore):
        datastore.refresh()
    datastore.update_image_info(image_id, {INFO_KEY: entry})


class ReidRiskScoring(ScoringMethod):
    """Residual re-identification risk of every image at the app's default privacy level."""

    def __init__(self, level: str | float, model_dir: str | Path | None = None) -> None:
        self.level = parse_level(level)  # a bad `--conf level` fails at server start
        self.model_dir = model_dir
        super().__init__(
            "Residual re-identification risk after de-identification at the app's level: the identity "
            "critic's similarity of output to input in [0, 1], stored in each image's info as reid_risk"
        )

    def info(self) -> dict[str, Any]:
        return {**super().info(), "level": self.level, "info_key": INFO_KEY}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        """Score the images not yet scored at this level and model version (all with `force`)."""
        started = time.perf_counter()
        version = current_model_version(self.model_dir)
        force = _truthy(request.get("force", False))
        image_ids = sorted(datastore.list_images())
        todo = [i for i in image_ids
                if force or stored_score(datastore.get_image_info(i), self.level, version) is None]
        logger.info("reid_risk: %d image(s), %d to score at level %.3f (model %s)",
                    len(image_ids), len(todo), self.level, version)
        scored: dict[str, float] = {}
        failed: dict[str, str] = {}
        for done, image_id in enumerate(todo, 1):
            entry: dict[str, Any] = {"level": self.level, "model_version": version}
            t0 = time.perf_counter()
            try:
                path = datastore.get_image_uri(image_id)
                if not path:
                    raise InputError("The image is no longer in the datastore.")
                result = residual_risk(read_volume(path), deidentifier=make_deidentifier(self.level, self.model_dir))
                entry.update(risk=round(result.risk, 4), critic_similarity=result.critic_similarity)
                scored[image_id] = entry["risk"]
            except InputError as error:
                entry.update(risk=None, error=str(error))
            except Exception as error:  # noqa: BLE001 - one image must not end the run for the others
                # the message may carry a file path (PHI in file names): log and store the type only
                entry.update(risk=None, error=f"Scoring failed with an internal error ({type(error).__name__}): "
                                              "see the server log.")
                logger.error("reid_risk: image %s failed with %s", image_id, type(error).__name__)
            if entry["risk"] is None:
                failed[image_id] = entry["error"]
            entry["ts"] = int(time.time())
            try:
                _store(datastore, image_id, entry)
            except Exception as error:  # noqa: BLE001 - e.g. the image was removed meanwhile
                failed[image_id] = "The score could not be stored in the datastore (the image may have been removed)."
                scored.pop(image_id, None)
                logger.warning("reid_risk: storing the score of %s failed with %s", image_id, type(error).__name__)
            outcome = f"risk {entry['risk']:.3f}" if entry["risk"] is not None else "not scored"
            logger.info("reid_risk: %d/%d scored (%s: %s, %.1f s)", done, len(todo), image_id, outcome,
                        time.perf_counter() - t0)
        return {
            "method": "reid_risk",
            "level": self.level,
            "model_version": version,
            "images": len(image_ids),
            "scored": scored,
            "failed": failed,
            "skipped": len(image_ids) - len(todo),
            "seconds": round(time.perf_counter() - started, 2),
        }
