"""The panel's text: the de-identification record (level, blocked volume, residual risk, models) and
the segmentation check (Dice per class, pass/fail).

The record is `semid.pipeline.Deidentifier.run(...).record` as the server sends it; the residual risk
follows `semid.risk.risk_from_record` (critic similarity of output to input mapped to [0, 1], (1 + s) / 2; 1.0
when nothing was changed; none when the fill made no critic measurement, i.e. the plain surface fill).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .levels import format_level


def residual_risk(record: dict[str, Any]) -> float | None:
    """Residual re-identification risk in [0, 1], or None when the record has no measurement."""
    try:
        level = float(record.get("level", 0.0))
        blocked = int(record.get("blocked_voxels", 0))
    except (TypeError, ValueError):
        return None
    if level == 0.0 or blocked == 0:
        return 1.0  # nothing changed: the volume identifies its owner as well as before
    block = record.get("residual_risk")
    similarity = block.get("critic_similarity_output_to_input") if isinstance(block, dict) else block
    if isinstance(similarity, bool) or not isinstance(similarity, (int, float)) or not math.isfinite(similarity):
        return None
    return min(1.0, max(0.0, 0.5 * (1.0 + float(similarity))))


def models_used(record: dict[str, Any]) -> list[str]:
    """Short names of what produced the result, from the record's keys (no file paths)."""
    used: list[str] = []
    identity = record.get("identity_source")
    if isinstance(identity, str) and identity:
        used.append(f"identity region: {identity}")
    network = record.get("identity_network")
    if isinstance(network, dict) and network.get("name"):
        sha = str(network.get("sha256") or "")[:8]
        used.append(f"identity network {network['name']}" + (f" ({sha})" if sha else ""))
    compensation = record.get("compensation")
    if isinstance(compensation, dict) and compensation.get("generator"):
        sha = str(compensation.get("sha256") or "")[:8]
        used.append(f"compensation generator {compensation['generator']}" + (f" ({sha})" if sha else ""))
    elif isinstance(record.get("method"), str) and record["method"]:
        used.append(f"fill: {record['method']}")
    if isinstance(record.get("atlas"), str) and record["atlas"]:
        used.append(f"atlas {record['atlas']}")
    return used


def record_rows(record: dict[str, Any], level: float | None = None) -> list[tuple[str, str]]:
    """(label, value) rows of the record panel."""
    shown = record.get("level", level)
    try:
        level_text = format_level(float(shown)) if shown is not None else "unknown"
    except (TypeError, ValueError):
        level_text = "unknown"
    blocked = record.get("blocked_ml")
    tissue = record.get("blocked_tissue_ml")
    if isinstance(blocked, (int, float)):
        blocked_text = f"{float(blocked):.1f} ml"
        if isinstance(tissue, (int, float)):
            blocked_text += f" ({float(tissue):.1f} ml of it tissue)"
    else:
        blocked_text = "not reported"
    risk = residual_risk(record)
    if risk is None:
        risk_text = "not measured (this fill has no identity critic)"
    else:
        risk_text = f"{risk:.2f} (1 = the same person, 0.5 = no more alike than a stranger, 0 = opposite)"
    rows = [("Level", level_text), ("Blocked volume", blocked_text), ("Residual re-identification risk", risk_text)]
    changed_brain = record.get("brain_voxels_changed")
    if isinstance(changed_brain, int):
        rows.append(("Brain voxels changed", str(changed_brain)))
    rows.append(("Models used", "; ".join(models_used(record)) or "not reported"))
    return rows


def format_record(record: dict[str, Any], level: float | None = None) -> str:
    """The record panel as lines 'Label: value'."""
    return "\n".join(f"{label}: {value}" for label, value in record_rows(record, level))


@dataclass(frozen=True)
class SegcheckSummary:
    """The `segcheck` task's answer: Dice per class of the segmentations of original and result."""

    dice: dict[str, float | None]
    threshold: float
    passed: bool
    compared: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> SegcheckSummary:
        """Read the task's JSON; ValueError (one sentence) when it is not a segmentation check."""
        dice = payload.get("dice") if isinstance(payload, dict) else None
        if not isinstance(dice, dict) or not isinstance(payload.get("passed"), bool):
            raise ValueError("The server's answer is not a segmentation check: update the SemID server.")
        labels = payload.get("labels") if isinstance(payload.get("labels"), dict) else {}
        return cls(
            dice={str(k): (None if v is None else float(v)) for k, v in dice.items()},
            threshold=float(payload.get("threshold", 0.0)),
            passed=bool(payload["passed"]),
            compared=[str(c) for c in payload.get("compared_classes", [])],
            failed=[str(c) for c in payload.get("failed_classes", [])],
            labels={str(k): int(v) for k, v in labels.items()},
            record=payload.get("deidentification") if isinstance(payload.get("deidentification"), dict) else {},
        )

    def rows(self) -> list[tuple[str, str, str]]:
        """(class, Dice, verdict) per class: 'pass', 'FAIL', 'not checked' (reported only) or
        'too small' (under the size limit in both)."""
        out = []
        for name, value in self.dice.items():
            shown = "-" if value is None else f"{value:.3f}"
            if name in self.failed:
                verdict = "FAIL"
            elif name in self.compared:
                verdict = "pass"
            elif value is None:
                verdict = "too small"
            else:
                verdict = "not checked"
            out.append((name, shown, verdict))
        return out

    def verdict(self) -> str:
        """One line: passed or not, against which threshold."""
        if self.passed:
            return f"Segmentation check passed: every checked class has Dice >= {self.threshold:.2f}."
        return (f"Segmentation check NOT passed: {', '.join(self.failed) or 'a class'} below Dice "
                f"{self.threshold:.2f}; review the result before using it.")

    def table_text(self) -> str:
        """A fixed-width table (class, Dice, verdict) followed by the verdict line."""
        rows = [("Class", "Dice", "Result"), *self.rows()]
        width = max(len(r[0]) for r in rows)
        lines = [f"{c:<{width}}  {d:>5}  {v}" for c, d, v in rows]
        return "\n".join([*lines, self.verdict()])
