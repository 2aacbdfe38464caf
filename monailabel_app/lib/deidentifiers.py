"""The de-identifier that the app's segcheck, scoring and batch tasks run, configured like `deidentify`.

Identity weights: the app publishes a retrained identity network as `<app>/model/identity_unet.pt`
(the `identity` train task); when that file is there the de-identifier uses it, else the committed one.
"""

from __future__ import annotations

import os
from pathlib import Path

from semid.pipeline import Deidentifier, make_fill

#: File name of the identity weights the app publishes into its model folder.
PUBLISHED_IDENTITY_WEIGHTS = "identity_unet.pt"


def published_identity_weights(model_dir: str | Path | None) -> Path | None:
    """The identity weights published into `model_dir`, or None when there are none."""
    if not model_dir:
        return None
    path = Path(model_dir) / PUBLISHED_IDENTITY_WEIGHTS
    return path if os.path.isfile(path) else None


def make_deidentifier(level: float | str, model_dir: str | Path | None = None) -> Deidentifier:
    """A `Deidentifier` at `level` with the learned fill (when installed) and the app's identity weights."""
    weights = published_identity_weights(model_dir)
    if weights is None:
        return Deidentifier(level=level, fill=make_fill("auto"))
    return Deidentifier(level=level, fill=make_fill("auto"), identity_weights=weights)
