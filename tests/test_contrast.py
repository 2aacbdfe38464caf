"""``semid.contrast``: a drawing in the canvas's contrast is kept; in another it takes the image's levels."""

from __future__ import annotations

import numpy as np

from semid.contrast import KEEP_BELOW, own_contrast


def _tissues(rng: np.random.Generator, n: int = 20000) -> np.ndarray:
    """Three tissue classes (0, 1, 2) at random voxels."""
    return rng.integers(0, 3, n)


def test_same_contrast_keeps_the_drawing() -> None:
    rng = np.random.default_rng(0)
    cls = _tissues(rng)
    drawn = np.array([0.0, 300.0, 600.0])[cls] + rng.normal(0, 10, cls.size)
    person = np.array([0.0, 310.0, 590.0])[cls] + rng.normal(0, 10, cls.size)
    out, record = own_contrast(drawn, person, np.ones(cls.size, bool))
    assert out is drawn and record["fill_contrast_departure"] < KEEP_BELOW


def test_inverted_contrast_takes_the_images_levels() -> None:
    rng = np.random.default_rng(1)
    cls = _tissues(rng)
    drawn = np.array([0.0, 300.0, 600.0])[cls] + rng.normal(0, 10, cls.size)  # fat brightest (T1w-like)
    person = np.array([0.0, 700.0, 200.0])[cls] + rng.normal(0, 10, cls.size)  # class 1 brightest here
    learn = rng.random(cls.size) < 0.5  # learnt on half, applied to all
    out, record = own_contrast(drawn, person, learn)
    assert record["fill_contrast"].startswith("this image's tissue levels")
    for k, level in enumerate((0.0, 700.0, 200.0)):
        assert abs(float(np.median(out[cls == k])) - level) < 30.0, (k, float(np.median(out[cls == k])))


def test_too_few_voxels_keep_the_canvas() -> None:
    drawn = np.arange(100, dtype=np.float32)
    out, record = own_contrast(drawn, drawn[::-1].copy(), np.ones(100, bool))
    assert out is drawn and "too few voxels" in record["fill_contrast"]
