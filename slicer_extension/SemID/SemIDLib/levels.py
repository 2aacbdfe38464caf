"""Privacy levels: the named presets, parsing, and a one-line explanation for the user.

The level `p` is the fraction of the identity-bearing region (face, ears, scalp profile) that is
blocked and refilled: 0 leaves the volume untouched, 1 blocks the whole identity region.
These presets mirror the core library's; they are repeated here because the Slicer module must run
without the `semid` package installed.
"""

from __future__ import annotations

import math

PRESETS: dict[str, float] = {"off": 0.0, "low": 0.25, "medium": 0.5, "high": 0.75, "max": 1.0}


def parse_level(value: str | float | int) -> float:
    """Turn a preset name ("high") or a number in [0, 1] ("0.6", 0.6) into a float level.

    Raises ValueError with one sentence the user can act on.
    """
    if isinstance(value, bool):
        # bool is an int subclass; True would silently become level 1.0.
        raise ValueError(f"Privacy level {value!r} is not valid: use one of {preset_list()} or a number 0-1.")
    if isinstance(value, str):
        text = value.strip().lower()
        if text in PRESETS:
            return PRESETS[text]
        try:
            number = float(text)
        except ValueError:
            raise ValueError(
                f"Privacy level {value!r} is not valid: use one of {preset_list()} or a number 0-1."
            ) from None
    else:
        number = float(value)
    if not math.isfinite(number) or not 0.0 <= number <= 1.0:
        raise ValueError(f"Privacy level {value!r} is out of range: use a number between 0 and 1.")
    return number


def preset_list() -> str:
    """The preset names as the user types them, e.g. 'off, low, medium, high, max'."""
    return ", ".join(PRESETS)


def preset_name(level: float, tolerance: float = 1e-6) -> str | None:
    """The preset whose value equals `level`, or None for an in-between level."""
    for name, value in PRESETS.items():
        if abs(value - level) <= tolerance:
            return name
    return None


def format_level(level: float) -> str:
    """Short label such as 'high (0.75)' or '0.60'."""
    name = preset_name(level)
    return f"{name} ({level:.2f})" if name else f"{level:.2f}"


#: What remains visible after each partial preset (what the user weighs against the blocked part).
_REMAINS = {
    "low": "the other three quarters stay, so the person may still be recognised",
    "medium": "the less identifying half stays, so recognition is harder but not ruled out",
    "high": "only the least identifying quarter stays",
}


def explain_level(level: str | float) -> str:
    """One line saying what the level removes (and, for partial levels, what stays)."""
    level = parse_level(level)
    if level == 0.0:
        return "Nothing is blocked: the volume is returned unchanged, the face stays recognisable."
    if level == 1.0:
        return "Blocks the whole identity region (face, ears, scalp profile) and refills it; the brain is kept."
    # Blocking is ranked by identity, so a partial level removes the most identifying part first.
    line = (
        f"Blocks the most identifying {round(level * 100)} % of the face and ear region "
        "(nose, eyes and lips first) and refills it"
    )
    remains = _REMAINS.get(preset_name(level) or "")
    return line + (f"; {remains}" if remains else "") + "; the brain is kept."
