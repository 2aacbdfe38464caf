"""Residual re-identification risk of one volume after de-identification, as one number in [0, 1].

The pipeline's record (``Deidentifier.run(...).record``) carries, with the learned fill, a
``residual_risk`` block measured on the output (``semid.compensation.LearnedFill``):

- ``critic_similarity_output_to_input``: cosine similarity in [-1, 1] between the identity critic's
  embeddings of the output's and the input's face box (the critic is a Siamese network trained on the
  training phantoms to tell people apart; 1 = the same person to it);
- ``critic_similarity_block_only``: the same for the input with ``B_p`` emptied (for scale);
- ``identity_bits_left``: per feature level, identity bits per sample a linear reader still saves on
  the decoupled encoder features (a property of the decoupler, the same for every volume).

``risk_from_record`` reduces it to **the critic similarity of output to input, mapped from [-1, 1] to
[0, 1]** (``(1 + cosine) / 2``): 1 = the critic still sees the same person, 0.5 = no more alike than two
unrelated faces (cosine 0), below 0.5 = pushed away from its owner. (Formula 1 clipped the cosine at 0,
and the generator's outputs, pushed below 0, then all scored 0: no order left to review by.)
It ranks volumes (which to review first); it is not a probability of re-identification. The block-only
similarity and the identity bits do not enter: the first is a reference, the second does not differ
between volumes. A volume left untouched (level 0, or nothing blocked) has risk 1.0. A record without a
critic measurement (the plain surface fill, used when the learned weights are not installed) has no
risk: ``risk_from_record`` raises ``InputError``.

``model_version`` names what a risk depends on (SemID's version, this formula's version, the weights
files and the identity atlas), so stored scores can be recomputed when any of them changes.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from semid import __version__
from semid.errors import InputError

#: Version of the reduction below: part of ``model_version``, so changing it invalidates stored scores.
RISK_FORMULA = 2
#: Weights the risk depends on: the generator (with the identity critic), its encoder and decoupler,
#: and the identity network that shapes ``B_p``.
MODELS_DIR = Path(__file__).resolve().parent / "data" / "models"
MODEL_FILES: tuple[str, ...] = ("generator.pt", "encoder_phantom.pt", "decoupler_phantom.pt", "identity_unet.pt")

_HASHES: dict[tuple[str, int, int], str] = {}


def risk_from_record(record: dict[str, Any]) -> float:
    """The residual re-identification risk in [0, 1] that a de-identification record reports.

    Raises:
        InputError: the record holds no critic measurement (plain surface fill) although voxels were
            blocked.
    """
    if float(record.get("level", 0.0)) == 0.0 or int(record.get("blocked_voxels", 0)) == 0:
        return 1.0  # nothing was changed: the volume identifies its owner as well as before
    similarity = (record.get("residual_risk") or {}).get("critic_similarity_output_to_input")
    if similarity is None or not math.isfinite(float(similarity)):
        raise InputError("No residual risk was measured for this volume (the plain surface fill measures none): "
                         "install the learned compensation weights to score risk.")
    return min(1.0, max(0.0, 0.5 * (1.0 + float(similarity))))


def _file_hash(path: Path) -> str:
    """sha256 of a file, cached by path, size and modification time (weights are a few MB)."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def _atlas_version() -> str:
    from semid.data import data_dir

    try:
        return str(json.loads((data_dir() / "atlas" / "atlas.json").read_text())["version"])
    except (OSError, ValueError, KeyError):
        return "no-atlas"


def model_version(extra_files: Sequence[str | Path] = ()) -> str:
    """A short string that changes whenever a risk computed now could differ from one computed before.

    It combines SemID's version, ``RISK_FORMULA``, the sha256 of each of ``MODEL_FILES`` (a missing file
    counts as "missing") and of ``extra_files`` (e.g. identity weights an app published), and the atlas
    version. Form: ``"<semid version>+r<formula>+<12 hex digits>"``.
    """
    parts = [f"atlas={_atlas_version()}"]
    for path in [MODELS_DIR / name for name in MODEL_FILES] + [Path(p) for p in extra_files]:
        parts.append(f"{path.name}={_file_hash(path) if path.is_file() else 'missing'}")
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]
    return f"{__version__}+r{RISK_FORMULA}+{digest}"


@dataclass
class ResidualRisk:
    """What ``residual_risk`` returns.

    Attributes:
        risk: in [0, 1] (``risk_from_record``).
        level: the privacy level the volume was de-identified at.
        record: the de-identification record it was read from (JSON-ready).
    """

    risk: float
    level: float
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def critic_similarity(self) -> float | None:
        """The critic's raw cosine similarity of output to input (None when nothing was measured)."""
        return (self.record.get("residual_risk") or {}).get("critic_similarity_output_to_input")


def residual_risk(image: sitk.Image, level: str | float = "high", deidentifier: Any = None) -> ResidualRisk:
    """De-identify ``image`` at ``level`` and return its residual re-identification risk.

    Args:
        image: a 3D head volume (not modified).
        level: privacy level (preset name or number in [0, 1]); ignored when ``deidentifier`` is given.
        deidentifier: a configured ``semid.pipeline.Deidentifier`` to use instead of the default one
            (learned fill when its weights are installed).

    Raises:
        InputError: the volume cannot be de-identified (no head, not 3D, ...) or no risk was measured.
    """
    from semid.pipeline import Deidentifier, make_fill

    if deidentifier is None:
        deidentifier = Deidentifier(level=level, fill=make_fill("auto"))
    record = deidentifier.run(image).record
    return ResidualRisk(risk_from_record(record), float(record["level"]), dict(record))

