"""``semid bench``: the benchmark's own validity checks (issue 4) and its outputs.

- At p = 0 the quick population is re-identifiable by A1 (rank-1 >= 0.9): otherwise every privacy
  number after it would be meaningless.
- Block-only's privacy is monotone in p (A2 AUC and A1 rank-1 never rise with the level).
- A small run writes the table (CSV, JSON), the curves and an HTML report that a real browser
  (headless Chromium, Debian's ``chromium``) opens and shows with its pictures.

A2's and U1's own validity checks are in test_attack_reid.py and test_utility.py.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from semid.eval import attack_face as af
from semid.eval.bench import BenchConfig, run_bench

try:
    af.require()
    HAVE_A1 = True
except af.AttackUnavailable:
    HAVE_A1 = False


@pytest.mark.skipif(not HAVE_A1, reason="attacker A1 packages not installed")
def test_quick_population_is_reidentifiable_by_a1_at_p0() -> None:
    from semid.eval.bench import _cases

    config = BenchConfig.quick()
    gallery, cases, _ = _cases(config, lambda _m: None)
    gallery_attack = af.FaceAttack(yaws=config.gallery_yaws, pitches=config.gallery_pitches)
    probe_attack = af.FaceAttack(yaws=config.probe_yaws, pitches=config.probe_pitches)
    for sid, images in gallery.items():
        probe_attack._gallery_cache[sid] = gallery_attack.gallery_views(sid, images)
    result = probe_attack.evaluate(gallery, [(c.subject_id, c.image) for c in cases])
    assert result["detection_rate"]["any"] == 1.0
    assert result["rank1"] >= 0.9, result["probes"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A small benchmark: 4 subjects, SemID and block-only at three levels plus cut, one A1 view."""
    out = tmp_path_factory.mktemp("bench")
    config = BenchConfig(methods=("semid", "block", "cut"), levels=(0.0, 0.5, 1.0), n_subjects=4,
                         gallery_yaws=(0.0,), gallery_pitches=(0.0,), probe_yaws=(0.0,), probe_pitches=(0.0,),
                         adaptive=True, adaptive_steps=3, adaptive_subjects=3, adaptive_visits=(1,),
                         report_cases=1, timing_cases=1)
    result = run_bench(config, out)
    return out, {"rows": result.rows, "files": result.files}


def test_outputs_are_written(small_run: tuple[Path, dict]) -> None:
    out, result = small_run
    for name in ("bench.csv", "bench.json", "curves.png", "report.html"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(out / "bench.csv")))
    assert [(r["method"], r["level"]) for r in rows] == [
        ("none", "0.0"), ("semid", "0.0"), ("semid", "0.5"), ("semid", "1.0"),
        ("block", "0.0"), ("block", "0.5"), ("block", "1.0"), ("cut", "fixed")]
    data = json.loads((out / "bench.json").read_text())
    assert data["meta"]["population"]["seed"] == 2026
    assert all(float(r["seconds_per_volume"]) >= 0 for r in rows)
    # adaptive A2 at the top level only
    top = {(r["method"], r["level"]): r for r in result["rows"]}
    assert "a2_adaptive_auc" in top[("block", 1.0)] and "a2_adaptive_auc" not in top[("block", 0.5)]
    # U2 holds for the methods that keep everything outside their mask
    for r in result["rows"]:
        assert r["u2_unchanged_outside"] == 1.0 and r["u2_brain_voxels_changed"] == 0, r
    # p = 0 changes nothing: the levelled methods' p = 0 rows equal the originals' row
    assert top[("semid", 0.0)]["a2_auc"] == top[("none", 0.0)]["a2_auc"]


def test_block_only_privacy_is_monotone_in_p(small_run: tuple[Path, dict]) -> None:
    """A2's AUC and A1's rank-1 above chance never rise with the level.

    Rank-1 at or below chance (1 / number of subjects) identifies nobody, and among 4 subjects a lucky
    guess scores 0.25: so A1 is compared as rank-1 above chance, not raw.
    """
    _, result = small_run
    block = sorted((r for r in result["rows"] if r["method"] == "block"), key=lambda r: r["level"])
    chance = 1.0 / 4
    series = {"a2_auc": [r["a2_auc"] for r in block],
              "a1_rank1_above_chance": [max(r["a1_rank1"] - chance, 0.0) for r in block if "a1_rank1" in r]}
    for key, values in series.items():
        assert all(b <= a + 1e-9 for a, b in zip(values, values[1:], strict=False)), (key, values)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_report_opens_in_a_real_browser(small_run: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = small_run
    url = (out / "report.html").resolve().as_uri()
    common = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
              f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout
    assert "SemID benchmark report" in dom and dom.count("<img") >= 3 and "<table>" in dom
    shot = tmp_path / "shot.png"
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1400,4000", url], capture_output=True,
                   timeout=120, check=True)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    # the case pictures are drawn on black: a page whose pictures did not load is almost all white
    assert (pixels < 30).mean() > 0.05, (pixels < 30).mean()
