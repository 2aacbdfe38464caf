"""Speed and peak memory of ``semid deidentify`` on the real 1 mm T1w head, per level and fill.

Each run is the command line as a user types it (a fresh process: interpreter start, imports, model
loading, reading, de-identifying and writing included), timed by wall clock; its peak resident memory
comes from the kernel's accounting of that child process (``os.wait4``). The record's own timings give
the pipeline's stages without start-up. A second measurement runs the same level in one long-lived
process (``run_warm``): seconds per volume once the interpreter, imports and models are paid, which is
what a batch worker or the server sees. Runs are repeated and the median is shown; the machine is
noisy, so read the learned fill against the plain one measured in the same run (the ratio column).

The issue's reference head is 256×256×176 voxels at 1 mm (``--size 176,256,256``, the default: the real
head resampled onto that grid about its centre, 0 outside); ``--size native`` keeps the file's grid.
Targets: at most 5 s and 2 GB per volume on 2 CPU cores (0.5 s on a GPU).

Run it with the project's Python after ``make data``: ``python benchmarks/volume_speed.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tables import write_table

LEVELS = ("low", "medium", "high", "max")
FILLS = ("surface", "learned")


def run_once(semid: str, src: Path, out: Path, level: str, fill: str) -> dict:
    """One ``semid deidentify`` process: wall seconds, peak RSS (MB) and the record's stage timings."""
    record = out.with_suffix("").with_suffix(".json")
    cmd = [semid, "deidentify", str(src), str(out), "--level", level, "--fill", fill, "--record", str(record),
           "--quiet"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ,
                                                                                        "OMP_NUM_THREADS": "2"})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"semid deidentify failed ({level}, {fill}): {err.strip()}")
    rec = json.loads(record.read_text())
    out.unlink()
    record.unlink()
    return {"wall_s": wall, "peak_mb": usage.ru_maxrss / 1024.0, "pipeline_s": sum(rec["timings_s"].values()),
            "timings_s": rec["timings_s"]}


PEER_CHILD = """
import sys, radveil
radveil.deface_auto(sys.argv[1], sys.argv[2])
"""


def run_peer(src: Path, out: Path) -> dict:
    """One fresh process running RadVeil's ``deface_auto`` (its defaults) on the same file: wall seconds and
    peak RSS (MB), measured as ``run_once`` measures SemID."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", PEER_CHILD, str(src), str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "2"})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"radveil deface_auto failed: {proc.stderr.read().decode().strip()[-300:]}")
    out.unlink(missing_ok=True)
    return {"wall_s": wall, "peak_mb": usage.ru_maxrss / 1024.0}


WARM_CHILD = """
import json, resource, sys, time
import SimpleITK as sitk
from semid.pipeline import Deidentifier, make_fill
image = sitk.ReadImage(sys.argv[1])
deid = Deidentifier(sys.argv[2], fill=make_fill(sys.argv[3]))
deid.run(image)  # the first volume loads the models
times = []
for _ in range(int(sys.argv[4])):
    start = time.perf_counter()
    deid.run(image)
    times.append(time.perf_counter() - start)
print(json.dumps({"times_s": times, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}))
"""


def run_warm(src: Path, level: str, fill: str, repeats: int) -> dict:
    """Seconds per volume in one long-lived process after its first volume (how a batch worker or the
    server runs: interpreter, imports and models paid once), and that process's peak RSS (MB)."""
    proc = subprocess.run([sys.executable, "-c", WARM_CHILD, str(src), level, fill, str(repeats)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if proc.returncode != 0:
        raise SystemExit(f"warm run failed ({level}, {fill}): {proc.stderr.strip()[-300:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"warm_s": statistics.median(out["times_s"]), "warm_peak_mb": out["peak_mb"]}


def _radveil_version() -> str:
    import radveil

    return getattr(radveil, "__version__", "?")


def resample_to_size(image, size: list[int]):  # noqa: ANN001, ANN201 - SimpleITK images
    """``image`` resampled (linear, 1 mm) onto a grid of ``size`` (x, y, z) voxels with the same centre and
    direction; voxels outside the source are 0."""
    import numpy as np
    import SimpleITK as sitk

    direction = np.array(image.GetDirection()).reshape(3, 3)
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    origin = centre - direction @ (np.array(size, float) - 1) / 2
    out = sitk.Resample(image, [int(v) for v in size], sitk.Transform(), sitk.sitkLinear, origin.tolist(),
                        [1.0, 1.0, 1.0], image.GetDirection(), 0.0, image.GetPixelID())
    for key in image.GetMetaDataKeys():
        out.SetMetaData(key, image.GetMetaData(key))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/volume_speed.md")
    parser.add_argument("--size", default="176,256,256",
                        help="x,y,z voxels (1 mm) to resample the head onto, or 'native' (default 176,256,256)")
    parser.add_argument("--levels", default=",".join(LEVELS), help="comma-separated levels")
    parser.add_argument("--fills", default=",".join(FILLS), help="comma-separated fills")
    parser.add_argument("--no-peer", dest="peer", action="store_false",
                        help="leave out the RadVeil deface_auto row (the `peers` extra)")
    args = parser.parse_args(argv)
    from semid.data import data_file
    from semid.io import read_volume

    src = Path(data_file("heads/t1w_real.nii.gz"))
    image = read_volume(str(src))
    semid = str(Path(sys.executable).with_name("semid"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.size != "native":
            image = resample_to_size(image, [int(v) for v in args.size.split(",")])
            src = Path(tmp) / "head.nii.gz"
            from semid.io import write_volume

            write_volume(image, src)
        for level in [v for v in args.levels.split(",") if v]:
            for fill in [v for v in args.fills.split(",") if v]:
                runs = [run_once(semid, src, Path(tmp) / "out.nii.gz", level, fill) for _ in range(args.repeats)]
                rows.append({"level": level, "fill": fill,
                             "wall_s": statistics.median(r["wall_s"] for r in runs),
                             "pipeline_s": statistics.median(r["pipeline_s"] for r in runs),
                             "peak_mb": max(r["peak_mb"] for r in runs),
                             **run_warm(src, level, fill, args.repeats + 1),
                             "stages": runs[-1]["timings_s"]})
                print(f"{level:>7} {fill:>8}: {rows[-1]['wall_s']:.2f} s wall, {rows[-1]['pipeline_s']:.2f} s "
                      f"pipeline, {rows[-1]['warm_s']:.2f} s warm, {rows[-1]['peak_mb']:.0f} MB", file=sys.stderr,
                      flush=True)
        peer = None
        if args.peer:
            runs = [run_peer(src, Path(tmp) / "peer.nii.gz") for _ in range(args.repeats)]
            peer = {"wall_s": statistics.median(r["wall_s"] for r in runs), "peak_mb": max(r["peak_mb"] for r in runs)}
            rows.append({"level": "-", "fill": "radveil deface_auto", **peer})
            print(f"radveil deface_auto: {peer['wall_s']:.2f} s wall, {peer['peak_mb']:.0f} MB", file=sys.stderr)
    size = "×".join(str(v) for v in image.GetSize())
    lines = [f"`semid deidentify` on the real T1w head ({size} voxels, "
             f"{'×'.join(f'{v:g}' for v in image.GetSpacing())} mm), median of {args.repeats} runs; "
             f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}. "
             "Targets: ≤ 5 s and ≤ 2048 MB per volume on 2 CPU cores (≤ 0.5 s on a GPU). "
             "*wall* is a fresh `semid deidentify` process (start-up, imports, model loading, reading and "
             "writing included); *warm* is one volume in a long-lived process after its first (a batch "
             "worker, the server), median of repeats + 1.", "",
             "| level | fill | wall s (process) | pipeline s | warm s / volume | peak MB (process) | "
             "peak MB (warm) | learned / surface (wall) | stages (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    by = {(r["level"], r["fill"]): r for r in rows}
    for r in rows:
        if r["fill"] == "radveil deface_auto":
            continue
        ratio = r["wall_s"] / by.get((r["level"], "surface"), r)["wall_s"]
        stages = ", ".join(f"{k} {v:.2f}" for k, v in r["stages"].items())
        lines.append(f"| {r['level']} | {r['fill']} | {r['wall_s']:.2f} | {r['pipeline_s']:.2f} | {r['warm_s']:.2f} | "
                     f"{r['peak_mb']:.0f} | {r['warm_peak_mb']:.0f} | {ratio:.2f} | {stages} |")
    if peer is not None:
        lines += ["", f"Peer in the same run: RadVeil {_radveil_version()} `deface_auto` (its defaults), a fresh "
                  "process on the same file, median of the same repeats.", "",
                  "| tool | wall s (process) | peak MB (process) | SemID `--level max` (learned) / RadVeil (wall) |",
                  "|---|---|---|---|"]
        semid_max = by.get(("max", "learned"))
        ratio = f"{semid_max['wall_s'] / peer['wall_s']:.2f}" if semid_max else "-"
        lines.append(f"| radveil deface_auto | {peer['wall_s']:.2f} | {peer['peak_mb']:.0f} | {ratio} |")
    write_table(lines, rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
