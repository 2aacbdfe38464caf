"""``semid bench``: the privacy-utility benchmark (DESIGN.md §6, issue 4).

Every method of ``semid.eval.baselines`` runs over a list of privacy levels on the same cases: visit 1
of each subject of a phantom population (``semid.phantoms``). The attackers' gallery is visit 0 of
the same subjects, untouched. For each (method, level) the benchmark measures

- privacy: attacker A1 (``attack_face``: face detection rate, rank-1, match rate at dlib's 0.6) and
  attacker A2 (``attack_reid``: verification ROC-AUC and rank-1; the *adaptive* A2, retrained on the
  method's outputs of the training subjects, at the highest level);
- utility: U1 (``utility``: Dice of the segmentation model per class, inside and outside the identity
  region) and U2 (bit-identical fraction outside the blocked region, brain voxels changed);
- speed: the method's seconds per volume, end to end from scratch (``time_method``); the rest of the
  run shares one head location per case between the methods that use SemID's (``baselines.locate``).

It writes ``bench.csv`` and ``bench.json`` (one row per method and level), ``curves.png`` and an
HTML QC report ``report.html`` with its pictures in ``report/``. Methods without a level (cut,
quickshear, radveil) run once and are plotted as single points.

The population's seed (2026 by default) is one that none of the trained attackers or the segmentation
model has seen: their training seeds are in their weight files.
"""

from __future__ import annotations

import csv
import html
import io
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from semid import __version__
from semid.io import atomic_path, write_json

#: Every method the benchmark knows, in the order of the table.
ALL_METHODS: tuple[str, ...] = ("semid", "semid-surface", "block", "blur", "pixelate", "cut", "quickshear", "radveil")
DEFAULT_LEVELS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
#: The population none of the committed models was trained on.
BENCH_SEED = 2026
#: U1 classes reported inside the identity region (the medicine a de-identifier could destroy) and
#: outside it (what must survive untouched).
U1_INSIDE: tuple[str, ...] = ("face_lesion", "identity")
U1_OUTSIDE: tuple[str, ...] = ("brain", "brain_lesion", "head")

Progress = Callable[[str], None]


@dataclass
class BenchConfig:
    """What one benchmark run covers.

    Args:
        methods: method names (``ALL_METHODS`` by default).
        levels: privacy levels in [0, 1] for the methods that have one.
        n_subjects, seed: the phantom population; case ``i`` is subject ``i``'s visit 1.
        modality: "MR" or "CT".
        gallery_yaws, gallery_pitches, probe_yaws, probe_pitches: A1's render views (degrees).
        adaptive: also run the adaptive A2 (retrained on each method's outputs at the highest level).
        adaptive_steps, adaptive_subjects, adaptive_visits: the adaptive A2's training: steps, training
            subjects, and which of their visits the method de-identifies (see ``ReidAttack.adapt``).
        report_cases: how many cases get pictures in the HTML report.
        timing_cases: how many cases each method is timed on, from scratch, at level 1 (``time_method``).
    """

    methods: tuple[str, ...] = ALL_METHODS
    levels: tuple[float, ...] = DEFAULT_LEVELS
    n_subjects: int = 16
    seed: int = BENCH_SEED
    modality: str = "MR"
    gallery_yaws: tuple[float, ...] = (-40.0, -20.0, 0.0, 20.0, 40.0)
    gallery_pitches: tuple[float, ...] = (-20.0, 0.0, 20.0)
    probe_yaws: tuple[float, ...] = (-40.0, -20.0, 0.0, 20.0, 40.0)
    # probes at level pitch only: every method and level renders them (15 views each made a full run
    # take about 10 minutes per method and level on 2 busy cores); the gallery keeps all 15 views
    probe_pitches: tuple[float, ...] = (0.0,)
    adaptive: bool = True
    adaptive_steps: int = 200
    adaptive_subjects: int = 20
    adaptive_visits: tuple[int, ...] = (1, 2)
    report_cases: int = 3
    timing_cases: int = 3

    @classmethod
    def quick(cls) -> BenchConfig:
        """The ``--quick`` configuration (under 15 minutes on 2 CPU cores): 10 subjects, levels 0, 0.5 and 1,
        9 gallery and 3 probe views for A1, a short adaptive A2 (45 steps on 6 training subjects)."""
        # the plain fill (semid-surface) is left to the full run, to keep this under 15 minutes
        return cls(methods=tuple(m for m in ALL_METHODS if m != "semid-surface"), levels=(0.0, 0.5, 1.0),
                   n_subjects=10, gallery_yaws=(-20.0, 0.0, 20.0),
                   gallery_pitches=(-10.0, 0.0, 10.0), probe_yaws=(-20.0, 0.0, 20.0), probe_pitches=(0.0,),
                   adaptive_steps=45, adaptive_subjects=6, adaptive_visits=(1,), report_cases=2, timing_cases=1)


@dataclass
class Case:
    """One benchmark case: a probe visit and what the metrics need to know about it."""

    subject_id: str
    image: sitk.Image
    labels: sitk.Image

    @property
    def label_array(self) -> np.ndarray:
        return sitk.GetArrayViewFromImage(self.labels)


@dataclass
class BenchResult:
    """Rows of the table (one per method and level) and where everything was written."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    elapsed_s: float = 0.0


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _round(value: Any, digits: int = 4) -> Any:
    return round(value, digits) if isinstance(value, float) and math.isfinite(value) else value


class _Attackers:
    """The attackers and the segmentation model, loaded once (A1 is skipped if its packages are missing)."""

    def __init__(self, config: BenchConfig, say: Progress) -> None:
        from semid.eval import attack_face, attack_reid, utility

        self.config = config
        try:
            attack_face.require()
            self.face_gallery = attack_face.FaceAttack(yaws=config.gallery_yaws, pitches=config.gallery_pitches)
            self.face_probe = attack_face.FaceAttack(yaws=config.probe_yaws, pitches=config.probe_pitches)
            self.a1_note = ""
        except attack_face.AttackUnavailable as exc:
            self.face_gallery = self.face_probe = None
            self.a1_note = f"A1 not run: {exc}"
            say(self.a1_note)
        self.reid = attack_reid.ReidAttack.load()
        self.seg = utility.SegmentationModel.load()
        self.utility = utility

    def a1(self, gallery: dict[str, list[sitk.Image]], probes: list[tuple[str, sitk.Image]]) -> dict[str, Any]:
        if self.face_probe is None:
            return {}
        # gallery views rendered once per subject with the gallery's views; probes with the probe views
        gal_views = {sid: self.face_gallery.gallery_views(sid, imgs) for sid, imgs in gallery.items()}
        self.face_probe._gallery_cache.update(gal_views)
        return self.face_probe.evaluate(gallery, probes)


def _cases(config: BenchConfig, say: Progress) -> tuple[dict[str, list[sitk.Image]], list[Case], Any]:
    from semid.phantoms import Population

    say(f"generating {config.n_subjects} phantom subjects (seed {config.seed}, {config.modality})")
    pop = Population(config.n_subjects, seed=config.seed, modalities=(config.modality,))
    gallery: dict[str, list[sitk.Image]] = {}
    cases: list[Case] = []
    for subject in pop:
        gallery[subject.subject_id] = [subject.visit(0, config.modality).image]
        probe = subject.visit(1, config.modality)
        cases.append(Case(subject.subject_id, probe.image, probe.labels))
    return gallery, cases, pop


def _u1_summary(per_case: list[dict[str, dict[str, float]]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for cls in U1_INSIDE:
        out[f"u1_inside_{cls}"] = _nanmean([c["inside"].get(cls, float("nan")) for c in per_case])
    for cls in U1_OUTSIDE:
        out[f"u1_outside_{cls}"] = _nanmean([c["outside"].get(cls, float("nan")) for c in per_case])
    return out


def _evaluate(attackers: _Attackers, gallery: dict[str, list[sitk.Image]], cases: list[Case],
              outputs: list[sitk.Image], masks: list[sitk.Image]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Privacy and utility of one method at one level over all cases: the table's columns and per-case values."""
    probes = [(c.subject_id, out) for c, out in zip(cases, outputs, strict=True)]
    a1 = attackers.a1(gallery, probes)
    a2 = attackers.reid.evaluate(gallery, probes)
    u1_cases, u2_cases = [], []
    for case, out, mask in zip(cases, outputs, masks, strict=True):
        lab = case.label_array
        region = np.isin(lab, (3, 5))
        u1_cases.append(attackers.utility.u1(attackers.seg, out, case.labels, region))
        u2_cases.append(attackers.utility.u2(case.image, out, mask, np.isin(lab, (1, 4))))
    row: dict[str, Any] = {}
    if a1:
        row.update({"a1_detection_rate": a1["detection_rate"]["any"], "a1_rank1": a1["rank1"],
                    "a1_match_rate": a1["match_rate"]})
    row.update({"a2_auc": a2["roc_auc"], "a2_rank1": a2["rank1"]})
    row.update(_u1_summary(u1_cases))
    row["u2_unchanged_outside"] = float(min(u["unchanged_fraction_outside_block"] for u in u2_cases))
    row["u2_brain_voxels_changed"] = int(sum(u["brain_voxels_changed"] for u in u2_cases))
    per_case = []
    for i, case in enumerate(cases):
        entry: dict[str, Any] = {"subject_id": case.subject_id,
                                 "u1_inside_face_lesion": u1_cases[i]["inside"].get("face_lesion"),
                                 "u2_unchanged_outside": u2_cases[i]["unchanged_fraction_outside_block"],
                                 "u2_brain_voxels_changed": u2_cases[i]["brain_voxels_changed"]}
        if a1:
            p = a1["probes"][i]
            entry.update({"a1_views_detected": p["views_detected"], "a1_true_distance": p["true_distance"],
                          "a1_predicted": p["predicted_id"]})
        per_case.append(entry)
    return row, per_case


def run_bench(config: BenchConfig, out_dir: str | Path, progress: Progress | None = None) -> BenchResult:
    """Run the benchmark and write its table, curves and HTML report into ``out_dir``."""
    from semid.eval.baselines import get_method

    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    out_dir = Path(out_dir)
    (out_dir / "report").mkdir(parents=True, exist_ok=True)
    methods = {name: get_method(name) for name in config.methods}  # unknown names fail before any work
    levels = tuple(sorted({float(v) for v in config.levels}))
    gallery, cases, pop = _cases(config, say)
    attackers = _Attackers(config, say)
    result = BenchResult()
    pictures: dict[str, list[tuple[str, str, str]]] = {c.subject_id: [] for c in cases[: config.report_cases]}
    per_case_all: dict[str, list[dict[str, Any]]] = {}

    speed = {}
    for name, method in methods.items():
        say(f"timing {name}")
        speed[name] = time_method(method, [c.image for c in cases[: config.timing_cases]])
    say("measuring the originals (p = 0)")
    base_row, base_cases = _evaluate(attackers, gallery, cases, [c.image for c in cases],
                                     [_empty_mask(c.image) for c in cases])
    result.rows.append({"method": "none", "level": 0.0, **base_row, "seconds_per_volume": 0.0, "blocked_ml": 0.0})
    per_case_all["none@0"] = base_cases

    for name, method in methods.items():
        method_levels = levels if method.levelled else (None,)
        for level in method_levels:
            say(f"{name} at level {level if level is not None else '(fixed)'}")
            outputs, masks, blocked = [], [], []
            for case in cases:
                res = method.run(case.image, 1.0 if level is None else level)
                outputs.append(res.image)
                masks.append(res.mask)
                blocked.append(float(res.record.get("blocked_ml") or 0.0))
            identical = all(_same_voxels(o, c.image) for o, c in zip(outputs, cases, strict=True))
            if identical:  # nothing changed (level 0): the originals' numbers are this row's numbers
                row, per_case = dict(base_row), base_cases
            else:
                row, per_case = _evaluate(attackers, gallery, cases, outputs, masks)
            top = level is None or level == max(levels)
            if config.adaptive and top and not identical:
                say(f"{name}: adaptive A2 (retrained on its outputs of the training subjects)")
                adapted = attackers.reid.adapt(deidentify=lambda img, m=method, lv=level: m.run(
                    img, 1.0 if lv is None else lv).image, steps=config.adaptive_steps,
                    n_subjects=config.adaptive_subjects, deid_visits=config.adaptive_visits)
                a2a = adapted.evaluate(gallery, [(c.subject_id, o) for c, o in zip(cases, outputs, strict=True)])
                row.update({"a2_adaptive_auc": a2a["roc_auc"], "a2_adaptive_rank1": a2a["rank1"]})
            result.rows.append({"method": name, "level": level, **row, "seconds_per_volume": speed[name],
                                "blocked_ml": float(np.mean(blocked))})
            key = f"{name}@{level if level is not None else 'fixed'}"
            per_case_all[key] = per_case
            if top:
                for case, out, mask in zip(cases[: config.report_cases], outputs, masks, strict=False):
                    png = out_dir / "report" / f"{case.subject_id}_{name}.png"
                    _case_figure(case, out, mask, png, f"{name} · level {level if level is not None else 'fixed'}")
                    pictures[case.subject_id].append((name, png.name, key))

    result.elapsed_s = time.perf_counter() - started
    meta = {"semid_version": __version__, "config": asdict(config), "elapsed_s": round(result.elapsed_s, 1),
            "machine": _machine(), "a1_note": attackers.a1_note,
            "population": {"n_subjects": config.n_subjects, "seed": config.seed, "base": pop.base_name,
                           "identity_scale": pop.identity_scale, "gallery": "visit 0, original",
                           "probes": "visit 1, after the method"}}
    rows = [{k: _round(v) for k, v in r.items()} for r in result.rows]
    result.rows = rows
    result.files["json"] = str(write_json({"meta": meta, "rows": rows, "per_case": per_case_all},
                                          out_dir / "bench.json"))
    result.files["csv"] = str(_write_csv(rows, out_dir / "bench.csv"))
    result.files["curves"] = str(plot_curves(rows, out_dir / "curves.png"))
    result.files["report"] = str(write_report(rows, meta, per_case_all, pictures, out_dir / "report.html"))
    return result


def time_method(method: Any, images: Sequence[sitk.Image], level: float = 1.0) -> float:
    """Mean seconds per volume of ``method`` at ``level``, each run from scratch (end to end, its head
    location or registration included: the cache the benchmark shares between methods is cleared)."""
    from semid.eval.baselines import clear_location_cache

    seconds = []
    for image in images:
        clear_location_cache()
        t0 = time.perf_counter()
        method.run(image, level)
        seconds.append(time.perf_counter() - t0)
    clear_location_cache()
    return float(np.mean(seconds))


def _empty_mask(image: sitk.Image) -> sitk.Image:
    mask = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    mask.CopyInformation(image)
    return mask


def _same_voxels(a: sitk.Image, b: sitk.Image) -> bool:
    return np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))


def _machine() -> dict[str, Any]:
    import os

    return {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(terse=True)}


#: Table columns, in order (a column missing from every row is left out).
COLUMNS: tuple[str, ...] = (
    "method", "level", "a1_detection_rate", "a1_rank1", "a1_match_rate", "a2_auc", "a2_rank1",
    "a2_adaptive_auc", "a2_adaptive_rank1", *(f"u1_inside_{c}" for c in U1_INSIDE),
    *(f"u1_outside_{c}" for c in U1_OUTSIDE), "u2_unchanged_outside", "u2_brain_voxels_changed", "blocked_ml",
    "seconds_per_volume",
)


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    return [c for c in COLUMNS if any(c in r for r in rows)]


def _write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=_columns(rows), extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("fixed" if k == "level" and r.get(k) is None else r.get(k, "")) for k in
                             _columns(rows)})
    return path


def format_table(rows: list[dict[str, Any]]) -> str:
    """The table as Markdown (what the CLI prints and the README shows)."""
    cols = _columns(rows)

    def cell(row: dict[str, Any], col: str) -> str:
        v = row.get(col)
        if col == "level" and v is None:
            return "fixed"
        if v is None or v == "":
            return "–"
        if isinstance(v, float):
            return "nan" if math.isnan(v) else (f"{v:.1f}" if col in ("blocked_ml",) else f"{v:.3g}"
                                                 if col == "seconds_per_volume" else f"{v:.2f}")
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r, c) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _curve_points(rows: list[dict[str, Any]], method: str) -> list[dict[str, Any]]:
    base = next((r for r in rows if r["method"] == "none"), None)
    own = [r for r in rows if r["method"] == method]
    if own and own[0]["level"] is not None and base is not None and all(r["level"] != 0.0 for r in own):
        own = [{**base, "method": method}, *own]
    return own


def plot_curves(rows: list[dict[str, Any]], png: Path) -> Path:
    """Four panels: A1 rank-1, A2 AUC and U1 face-lesion Dice against the level, and privacy against utility."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "none"]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.8))
    panels = (("a1_rank1", "A1 rank-1 (face recognition)"), ("a2_auc", "A2 ROC-AUC (3D re-identification)"),
              ("u1_inside_face_lesion", "U1 Dice, face-region lesions"))
    colours = plt.get_cmap("tab10")
    for k, method in enumerate(methods):
        pts = _curve_points(rows, method)
        style = {"color": colours(k % 10), "label": method}
        for ax, (col, title) in zip(axes[:3], panels, strict=True):
            ys = [p.get(col) for p in pts]
            if pts and pts[0]["level"] is None:
                ax.scatter([1.0], ys, marker="x", s=60, **style)
            else:
                ax.plot([p["level"] for p in pts], ys, marker="o", **style)
            ax.set_title(title)
            ax.set_xlabel("privacy level p")
            ax.set_ylim(-0.05, 1.05)
        xs = [p.get("a2_adaptive_auc", p.get("a2_auc")) if p["level"] in (None, 1.0) else p.get("a2_auc") for p in pts]
        axes[3].plot(xs, [p.get("u1_inside_face_lesion") for p in pts], marker="o" if pts and pts[0]["level"]
                     is not None else "x", linestyle="-" if len(pts) > 1 else "none", **style)
    axes[3].set_title("privacy-utility (A2 AUC; adaptive at p = 1)")
    axes[3].set_xlabel("A2 ROC-AUC (0.5 = chance: more private to the left)")
    axes[3].set_ylabel("U1 Dice, face-region lesions")
    axes[3].set_xlim(0.4, 1.02)
    axes[3].set_ylim(-0.05, 1.05)
    axes[0].legend(loc="best", fontsize=8)
    fig.tight_layout()
    from semid.render import save_figure

    return save_figure(fig, png)


def _case_figure(case: Case, output: sitk.Image, mask: sitk.Image, png: Path, title: str) -> Path:
    """The QC picture of one case (``semid.render.qc_figure``), the identity region outlined too."""
    from semid.render import qc_figure

    region = sitk.Cast(sitk.BinaryThreshold(case.labels, 3, 3) | sitk.BinaryThreshold(case.labels, 5, 5),
                       sitk.sitkUInt8)
    return qc_figure(case.image, output, mask, png, size=256, region=region, title=f"{case.subject_id} · {title}")


def write_report(rows: list[dict[str, Any]], meta: dict[str, Any], per_case: dict[str, list[dict[str, Any]]],
                 pictures: dict[str, list[tuple[str, str, str]]], path: Path) -> Path:
    """The HTML QC report: the table, the curves, and per case the pictures and metrics of every method."""
    esc = html.escape
    cols = _columns(rows)
    parts = [
        f"<p class='note'>SemID {esc(str(meta['semid_version']))} · population: {meta['population']['n_subjects']} "
        f"phantom subjects, seed {meta['population']['seed']}, base {esc(meta['population']['base'])}, identity "
        f"scale {meta['population']['identity_scale']}; gallery {esc(meta['population']['gallery'])}, probes "
        f"{esc(meta['population']['probes'])} · run time {meta['elapsed_s']} s on {meta['machine']['cpus']} CPUs.</p>",
    ]
    if meta.get("a1_note"):
        parts.append(f"<p class='note'>{esc(meta['a1_note'])}</p>")
    parts.append("<h2>Table</h2><table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in cols) + "</tr>")
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            text = "fixed" if c == "level" and v is None else ("–" if v is None else
                                                               f"{v:.3f}" if isinstance(v, float) else str(v))
            cells.append(f"<td>{esc(text)}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    parts.append("<h2>Privacy-utility curves</h2><img src='curves.png' alt='privacy-utility curves'>")
    parts.append("<h2>Cases</h2><p class='note'>Top row of each picture: the original; bottom: the method's "
                 "output at its highest level. Yellow: the identity region (ground truth); red: what the method "
                 "blocked or changed.</p>")
    for subject_id, pics in pictures.items():
        parts.append(f"<section><h3>{esc(subject_id)}</h3>")
        for method, png, key in pics:
            metrics = next((pc for pc in per_case.get(key, []) if pc["subject_id"] == subject_id), {})
            text = ", ".join(f"{k} {(_round(v, 3) if isinstance(v, float) else v)}" for k, v in metrics.items()
                             if k != "subject_id")
            parts.append(f"<h4>{esc(method)}</h4><p class='note'>{esc(text)}</p>"
                         f"<img src='report/{esc(png)}' alt='{esc(subject_id)} {esc(method)}'>")
        parts.append("</section>")
    return write_html_report("SemID benchmark report", parts, path)


#: The QC reports' look (the benchmark's and the batch run's: ``semid.batch``).
REPORT_STYLE = ("<style>body{font-family:sans-serif;margin:2em;background:#fafafa}table{border-collapse:collapse;"
                "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#eee}"
                "img{max-width:100%;border:1px solid #999}section{margin-bottom:2.5em}.note{color:#555}</style>")


def write_html_report(title: str, body: Sequence[str], path: Path) -> Path:
    """Write an HTML QC report page atomically: ``title`` as its heading, then the ``body`` fragments
    (already escaped HTML) in order. Pictures are referenced relative to ``path``'s folder."""
    esc = html.escape
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>",
             REPORT_STYLE + "</head><body>", f"<h1>{esc(title)}</h1>", *body, "</body></html>"]
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(parts), encoding="utf-8")
    return Path(path)


def summary_text(result: BenchResult) -> str:
    """What the CLI prints at the end: the table and the files written."""
    buf = io.StringIO()
    buf.write(format_table(result.rows) + "\n\n")
    for kind, path in result.files.items():
        buf.write(f"{kind}: {path}\n")
    buf.write(f"elapsed: {result.elapsed_s:.0f} s\n")
    return buf.getvalue()


__all__ = ["ALL_METHODS", "BenchConfig", "BenchResult", "format_table", "plot_curves", "run_bench",
           "summary_text", "write_html_report", "write_report"]
