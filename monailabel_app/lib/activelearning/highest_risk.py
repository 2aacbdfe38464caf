"""MONAI Label active-learning strategy `highest_risk`: the riskiest unreviewed image next.

Unreviewed = no `final` label in the datastore (a person has not saved a reviewed label for it yet).
Among those, images whose `reid_risk` score (`lib.scoring.reid_risk`) was made at the app's level with
the weights in use now are served first, highest risk first (ties by id). Images without such a score
(not scored yet, scored with other weights or at another level, or not scoreable: `"risk": null`) come
after every scored one, in id order: the strategy never de-identifies on demand, which would hold the
client for seconds per image. MONAI Label runs the scoring method at server start and after every
active-learning request, so new images get their score in the background.

The answer carries `risk` (null for an unscored image) beside MONAI Label's `id`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.strategy import Strategy

from lib.scoring.reid_risk import current_model_version, stored_score
from semid.pipeline import parse_level

logger = logging.getLogger(__name__)


class HighestRisk(Strategy):
    """Serve the unreviewed image with the highest residual re-identification risk."""

    def __init__(self, level: str | float, model_dir: str | Path | None = None) -> None:
        self.level = parse_level(level)
        self.model_dir = model_dir
        super().__init__("Highest residual re-identification risk first (unreviewed images: no final label)")

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        """{"id": image id, "risk": its risk or None}; None when every image has a final label."""
        images = datastore.get_unlabeled_images(DefaultLabelTag.FINAL)
        if not images:
            return None
        version = current_model_version(self.model_dir)
        scored: list[tuple[float, str]] = []
        unscored: list[str] = []
        for image_id in images:
            entry = stored_score(datastore.get_image_info(image_id), self.level, version)
            if entry is not None and entry.get("risk") is not None:
                scored.append((float(entry["risk"]), image_id))
            else:
                unscored.append(image_id)
        if scored:
            risk, image_id = min(scored, key=lambda item: (-item[0], item[1]))
            logger.info("highest_risk: image %s, risk %.3f (%d scored, %d unscored)", image_id, risk,
                        len(scored), len(unscored))
            return {"id": image_id, "risk": risk}
        image_id = sorted(unscored)[0]
        logger.info("highest_risk: image %s, not scored yet (%d unscored)", image_id, len(unscored))
        return {"id": image_id, "risk": None}
