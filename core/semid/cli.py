"""The ``semid`` command line: deidentify, deidentify-dicom, batch, render, info, serve, bench, train, data.

Bad input ends with one sentence on stderr and exit code 2; an unexpected failure with one sentence
and exit code 1 (the traceback only with ``SEMID_DEBUG=1``). Outputs are written to temporary names
and renamed, so an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from semid import __version__
from semid.errors import InputError


class _Stages:
    """Progress over the named stages of a run, on stderr (a tqdm bar; silent with ``--quiet``)."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.bar = None
        if not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="step", file=sys.stderr, leave=False,
                            bar_format="{desc:<34} {bar} {n_fmt}/{total_fmt} [{elapsed}]")

    def __call__(self, stage: str) -> None:
        if self.bar is not None:
            if self.bar.desc:
                self.bar.update(1)
            self.bar.set_description_str(stage)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(self.bar.total - self.bar.n)
            self.bar.close()


def default_record_path(out: Path) -> Path:
    """``OUT``'s record: beside it, same stem, ``.json`` (for a DICOM folder: ``OUT.json``)."""
    from semid.io import volume_suffix

    suffix = volume_suffix(out)
    stem = out.name[: -len(suffix)] if suffix else out.name
    return out.with_name(stem + ".json")


def cmd_deidentify(args: argparse.Namespace) -> int:
    from semid.io import check_output_path, read_volume, require_volume_output, write_json, write_volume
    from semid.pipeline import Deidentifier, make_fill, parse_level

    level = parse_level(args.level)
    require_volume_output(args.output)
    if args.identity == "synthetic" and args.fill == "surface":
        raise InputError("--identity synthetic needs the learned fill: drop --fill surface (or --identity).")
    out = check_output_path(args.output, args.input)
    record_path = Path(args.record) if args.record else default_record_path(out)
    check_output_path(record_path, args.input)
    if args.qc:
        check_output_path(args.qc, args.input)
    started = time.perf_counter()
    stages = _Stages(8 if args.qc else 7, args.quiet)
    try:
        stages("reading the volume")
        image = read_volume(args.input)
        result = Deidentifier(level, fill=make_fill(args.fill, args.identity)).run(image, progress=stages)
        passed = result.record.get("no_face_present")
        if passed and args.no_passthrough:
            result.record["output_written"] = False
        else:
            stages("writing the output")
            write_volume(result.image, out)
        result.record["elapsed_s"] = round(time.perf_counter() - started, 3)
        write_json(result.record, record_path)
        if args.qc:
            from semid.render import qc_figure

            stages("drawing the QC picture")
            qc_figure(image, result.image, result.mask, args.qc, result.record)
    finally:
        stages.close()
    rec = result.record
    if not args.quiet:
        finding = rec.get("triage", {}).get("finding")
        if passed:
            print(f"{finding} {'No output was written (--no-passthrough).' if args.no_passthrough else ''}".strip())
        else:
            if rec.get("already_defaced"):
                print(finding)
            print(f"de-identified at level {rec['level']:g} ({rec['preset'] or 'custom'}): blocked "
                  f"{rec['blocked_ml']:.1f} ml, voxels changed outside the block: "
                  f"{rec['voxels_changed_outside_block']}, brain voxels changed: {rec.get('brain_voxels_changed', 0)}"
                  f" ({rec['elapsed_s']:.1f} s)")
        written = "" if passed and args.no_passthrough else f"output: {out}\n"
        print(f"{written}record: {record_path}" + (f"\nQC picture: {args.qc}" if args.qc else ""))
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from semid.io import check_output_path, read_volume
    from semid.render import VIEWS, save_render_png

    views = [v.strip() for v in args.views.split(",") if v.strip()]
    unknown = [v for v in views if v not in VIEWS]
    if unknown or not views:
        raise InputError(f"Unknown view {unknown[0] if unknown else ''!r}: use frontal, lateral or both.")
    out = check_output_path(args.png, args.input)
    if not args.quiet:
        print("rendering ...", file=sys.stderr)
    save_render_png(read_volume(args.input), out, views, size=args.size)
    if not args.quiet:
        print(f"render: {out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import numpy as np
    import SimpleITK as sitk

    from semid.identity import guess_modality, load_atlas
    from semid.io import geometry, modality_of, read_volume

    image = read_volume(args.input)
    stats = sitk.StatisticsImageFilter()
    stats.Execute(image)
    info = {
        **geometry(image),
        "pixel_type": image.GetPixelIDTypeAsString(),
        "modality": guess_modality(image, modality_of(image)),
        "modality_declared": bool(modality_of(image)),
        "min": stats.GetMinimum(),
        "max": stats.GetMaximum(),
        "volume_ml": float(np.prod(image.GetSize()) * np.prod(image.GetSpacing()) / 1000.0),
        "orientation": sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection()),
    }
    if not args.no_triage and stats.GetMinimum() != stats.GetMaximum():
        from semid.triage import assess

        triage = assess(image, load_atlas(), modality_of(image))
        info.update(triage=triage.kind, finding=triage.sentence, evidence=triage.evidence)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            if key == "evidence":
                value = json.dumps(value)
            elif isinstance(value, list):
                value = " ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in value)
            print(f"{key:18s} {value}")
    return 0


def cmd_deidentify_dicom(args: argparse.Namespace) -> int:
    from semid.dicom import pseudonyms
    from semid.dicom.profile import Options
    from semid.dicom.tree import deidentify_tree, write_report
    from semid.pipeline import parse_level

    level = parse_level(args.level)
    options = Options.from_names(args.option or [])
    key, notice = pseudonyms.load_key(args.key_file)
    if notice and not args.quiet:
        print(f"semid: {notice}", file=sys.stderr)
    out = Path(args.output)
    report_path = Path(args.report) if args.report else out.with_name(out.name + "_report.json")
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=0, unit="file", file=sys.stderr, leave=False, desc="de-identifying")

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    try:
        report = deidentify_tree(args.input, out, level, options, key, ocr=not args.no_ocr,
                                 mapping_path=args.mapping, progress=progress,
                                 keep_undeidentified_pixels=args.keep_undeidentified_pixels)
    finally:
        if bar is not None:
            bar.close()
    write_report(report, report_path)
    problems = report.image_series_quarantined + report.image_series_written_undeidentified
    if not args.quiet:
        print(f"{report.files_written} of {report.files_seen} files written ({report.patients} patients, "
              f"{report.studies} studies, {report.series} series) in {report.elapsed_s:.1f} s; "
              f"{len(report.quarantined)} files quarantined (see the report)")
        defaced = report.image_series_already_defaced
        print(f"CT/MR volume series: {report.image_series_deidentified} de-identified"
              + (f" ({defaced} of them already defaced)" if defaced else "")
              + f", {report.image_series_passed_through} passed through (nothing identifying), "
              f"{report.image_series_quarantined} quarantined"
              + (f", {report.image_series_written_undeidentified} written NOT de-identified"
                 if report.image_series_written_undeidentified else ""))
        for item in report.image_series_passed + report.image_series_problems:
            outcome = item.get("outcome", "passed through")
            # input file names can carry identifiers: they stay in the report (outside OUT), not in the console
            print(f"  {outcome}: a series of {item['files']} files (its first file is in the report): {item['reason']}")
        print(f"output: {out}\nreport: {report_path}")
    # a head series that could not be de-identified ends the run non-zero: an automation must look at it
    return 3 if problems else 0


def cmd_batch(args: argparse.Namespace) -> int:
    from semid.batch import BatchOptions, run_batch

    def say(message: str) -> None:
        if not args.quiet:
            print(f"semid: {message}", file=sys.stderr, flush=True)

    summary = run_batch(BatchOptions(
        source=args.source, out=args.out, level=args.level, workers=args.workers, scheduler=args.scheduler,
        threads=args.threads,
        retries=args.retries, key_file=args.key_file, options=tuple(args.option or ()), ocr=not args.no_ocr,
        fill=args.fill, qc_sample=args.qc_sample, report_dir=args.report, work=args.work, quiet=args.quiet), say)
    print(summary.text())
    return 3 if summary.needs_attention else 0


def cmd_data(args: argparse.Namespace) -> int:
    from semid.data import data_dir, fetch

    root = Path(args.dir) if args.dir else data_dir()
    fetch(root)
    print(f"data ready in {root}")
    return 0


def _bench_levels(text: str) -> tuple[float, ...]:
    from semid.pipeline import parse_level

    try:
        levels = tuple(parse_level(v.strip()) for v in text.split(",") if v.strip())
    except InputError as exc:
        raise InputError(f"--levels: {exc}") from None
    if not levels:
        raise InputError("--levels is empty: give comma-separated levels such as 0,0.5,1.")
    return levels


def cmd_bench(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from semid.eval.bench import ALL_METHODS, BenchConfig, run_bench, summary_text

    config = BenchConfig.quick() if args.quick else BenchConfig()
    changes: dict = {}
    if args.methods:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        unknown = [m for m in methods if m not in ALL_METHODS]
        if unknown or not methods:
            raise InputError(f"unknown method {', '.join(unknown) or '(none given)'}: choose from "
                             f"{', '.join(ALL_METHODS)}.")
        changes["methods"] = methods
    if args.levels:
        changes["levels"] = _bench_levels(args.levels)
    if args.subjects is not None:
        if args.subjects < 2:
            raise InputError("--subjects must be at least 2 (re-identification needs more than one person).")
        changes["n_subjects"] = args.subjects
    if args.seed is not None:
        changes["seed"] = args.seed
    if args.no_adaptive:
        changes["adaptive"] = False
    config = replace(config, **changes)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder: give a folder for the benchmark's results.")

    def say(message: str) -> None:
        if not args.quiet:
            print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    result = run_bench(config, out, progress=say)
    print(summary_text(result))
    return 0


#: ``semid train MODEL ...`` -> the module whose ``main(["train", ...])`` retrains that model's committed weights.
TRAINABLE = {"reid": "semid.eval.attack_reid", "segmentation": "semid.eval.utility",
             "generator": "semid.compensation", "encoder": "semid.semantics.encoders",
             "identity": "semid.identity.network", "decoupler": "semid.semantics.decoupling"}


def cmd_serve(args: argparse.Namespace) -> int:
    from semid.serve import serve

    conf = [tuple(pair) for pair in args.conf or []]
    if args.models:
        conf.append(("models", args.models))
    return serve(args.studies, host=args.host, port=args.port, conf=conf, app=args.app)


def cmd_train(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(TRAINABLE[args.model])
    rest = list(args.rest)
    # a model's other steps are named first (`semid train generator samples|canvas`); training is the default
    return int(module.main(rest if rest and not rest[0].startswith("-") else ["train", *rest]) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="semid", description="Adjustable, semantics-preserving de-identification of head CT and MRI.")
    parser.add_argument("--version", action="version", version=f"semid {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("deidentify", help="de-identify one volume (NIfTI, NRRD, MHA or a DICOM series folder)")
    p.add_argument("input", help="input volume file or DICOM series folder")
    p.add_argument("output", help="output file (.nii.gz, .nii, .nrrd, .mha) or a new folder for DICOM")
    p.add_argument("--level", default="high",
                   help="privacy level: off, low, medium, high, max, or a number 0..1 (default high)")
    p.add_argument("--fill", choices=["auto", "learned", "surface"], default="auto",
                   help="what fills the blocked region: the learned generator (auto: when its weights are there) "
                        "or the plain featureless surface")
    p.add_argument("--identity", choices=["default", "synthetic"], default="default",
                   help="learned fill: SemID's default face, or a synthetic face drawn from the identity prior")
    p.add_argument("--record", help="where to write the JSON record (default: beside OUT, .json)")
    p.add_argument("--qc", help="also write a QC picture (PNG): slices and renders, original beside output")
    p.add_argument("--no-passthrough", action="store_true",
                   help="write no output for a volume with nothing identifying to remove (skull-stripped, no face "
                        "part or ear in view); the record still says why (by default it is written unchanged)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or summary")
    p.set_defaults(func=cmd_deidentify)

    p = sub.add_parser("deidentify-dicom", help="de-identify a tree of DICOM files (headers, pixels, burned-in text)")
    p.add_argument("input", help="folder of DICOM files (any layout, any depth)")
    p.add_argument("output", help="output folder: <patient>/<study>/<series>/ pseudonymous layout")
    p.add_argument("--level", default="high", help="privacy level of head CT/MR image series (default high)")
    p.add_argument("--option", action="append", metavar="NAME",
                   help="profile option to turn on (retain_uids, retain_safe_private, retain_full_dates, ...) "
                        "or off (no-clean_descriptors); repeatable")
    p.add_argument("--key-file", help="secret key for UIDs, pseudonyms and date shifts (else $SEMID_KEY / "
                                      "$SEMID_KEY_FILE, else a key kept in ~/.config/semid/key)")
    p.add_argument("--report", help="JSON report path (default: beside OUT, OUT_report.json)")
    p.add_argument("--mapping", help="also write the original -> pseudonym table here (never inside OUT)")
    p.add_argument("--no-ocr", action="store_true", help="skip the burned-in text check")
    p.add_argument("--keep-undeidentified-pixels", action="store_true",
                   help="write CT/MR volume series whose pixels could not be de-identified (headers cleaned, pixels "
                        "as they were, the reason in the report) instead of quarantining them; exit code 3")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_deidentify_dicom)

    p = sub.add_parser("batch", help="de-identify an archive (folder tree or DICOMweb) on Dask, resumably; exit "
                                     "code 3 when some studies failed (listed at the end and in the manifest)")
    p.add_argument("source", help="archive folder (DICOM of any layout, NIfTI/NRRD/MHA files) or a DICOMweb URL")
    p.add_argument("out", help="output folder (holds the manifest semid_manifest.sqlite), or a DICOMweb URL to "
                               "store into (then give --work)")
    p.add_argument("--level", default="high", help="privacy level: off, low, medium, high, max or 0..1 (default high)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=1, help="local Dask worker processes (default 1)")
    where.add_argument("--scheduler", help="address of a running Dask scheduler (tcp://HOST:PORT) instead")
    p.add_argument("--threads", type=int, default=1,
                   help="studies in flight per worker, their generator calls batched into one forward pass "
                        "(default 1; e.g. 4 on a GPU worker; with --scheduler, start workers with as many threads)")
    p.add_argument("--retries", type=int, default=2, help="times a failed study is tried again (default 2)")
    p.add_argument("--key-file", help="secret key for pseudonyms (as in deidentify-dicom)")
    p.add_argument("--option", action="append", metavar="NAME", help="DICOM profile option (as in deidentify-dicom)")
    p.add_argument("--no-ocr", action="store_true", help="skip the burned-in text check")
    p.add_argument("--fill", choices=["auto", "learned", "surface"], default="auto",
                   help="fill of NIfTI/NRRD/MHA studies (DICOM studies use auto)")
    p.add_argument("--qc-sample", type=int, default=6, help="studies pictured in the QC report (default 6; 0: none)")
    p.add_argument("--report", help="QC report folder (default OUT_qc beside OUT; never inside OUT: it shows "
                                    "original faces)")
    p.add_argument("--work", help="folder for the manifest and staging when OUT is a DICOMweb URL")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("render", help="frontal and lateral 3D surface render of a volume to PNG")
    p.add_argument("input")
    p.add_argument("png")
    p.add_argument("--views", default="frontal,lateral", help="comma-separated: frontal, lateral")
    p.add_argument("--size", type=int, default=512, help="pixels per view side (default 512)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("info", help="geometry, pixel type, modality, and what the volume is (triage: a head with a "
                                    "face, defaced, skull-stripped, not a head) with the numbers that decide it")
    p.add_argument("input")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--no-triage", action="store_true", help="geometry and values only (no triage, instant)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bench", help="privacy-utility benchmark of SemID and the baselines on phantom heads")
    p.add_argument("--quick", action="store_true", help="the quick configuration (10 subjects, levels 0, 0.5, 1)")
    p.add_argument("--methods", help="comma-separated methods (default all: semid, block, blur, pixelate, cut, "
                                     "quickshear, radveil)")
    p.add_argument("--levels", help="comma-separated privacy levels (default 0,0.25,0.5,0.75,1; quick 0,0.5,1)")
    p.add_argument("--subjects", type=int, help="phantom subjects (default 16; quick 10)")
    p.add_argument("--seed", type=int, help="population seed (default 2026, unseen by the trained models)")
    p.add_argument("--no-adaptive", action="store_true", help="skip the adaptive re-identification attacker")
    p.add_argument("--out", default="bench", help="results folder (default ./bench)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("train", help="retrain a benchmark model's committed weights on phantoms (reid: attacker A2; "
                                     "segmentation: utility U1; encoder: the bundled feature encoder; "
                                     "identity: the identity-region network)")
    p.add_argument("model", choices=sorted(TRAINABLE))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of the model's trainer (see `semid train MODEL "
                                                           "--help`)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("serve", help="start the MONAI Label server with SemID's app (this environment's Python, "
                                     "loopback by default, private temporary folder); prints its URL and tasks")
    p.add_argument("studies", help="folder of volumes, or a DICOMweb URL (http://HOST:PORT/dicom-web)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                       "only; the server has no authentication of its own)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--models", help="comma-separated tasks (default: all): deidentify, identity, segcheck, "
                                    "dicomheader")
    p.add_argument("--conf", nargs=2, action="append", metavar=("KEY", "VALUE"),
                   help="an app setting (monailabel_app/main.py lists them), e.g. --conf level medium")
    p.add_argument("--app", help="the MONAI Label app folder (default: the checkout's monailabel_app)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("data", help="fetch the public sample heads and build the atlas")
    p.add_argument("action", choices=["fetch"])
    p.add_argument("--dir", help="data folder (default: $SEMID_DATA_DIR or .data in the checkout)")
    p.set_defaults(func=cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except InputError as exc:
        print(f"semid: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("semid: interrupted; nothing was written.", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the user gets one sentence, developers set SEMID_DEBUG
        if os.environ.get("SEMID_DEBUG"):
            raise
        print(f"semid: error: internal failure ({type(exc).__name__}); rerun with SEMID_DEBUG=1 and "
              "report the output.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
