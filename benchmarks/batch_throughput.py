"""Archive throughput of ``semid batch``: studies per hour on 1, 2 and 4 local Dask workers, with peers
timed in the same run as ratios.

The archive is made of phantom heads (``semid.phantoms``, 2 mm base by default; ``--base full`` for
1 mm): half of the studies as DICOM series with PHI in their headers, half as NIfTI volumes. Each
worker count de-identifies the whole archive from scratch into a fresh OUT (a separate ``semid batch``
process: interpreter start, Dask cluster start, model loading and the final report included), timed by
wall clock.

Peers, in the same run, on the same studies, one process each, one study after another:

- RadVeil and quickshear (``semid.eval.baselines``) de-identify every study's volume (NIfTI in and out);
- the DICOM header tools (dicognito, deid, dicom-anonymizer; their own venv, see ``dicom_headers.py``)
  de-identify the DICOM studies' headers only (they do not touch faces), timed on the command line.

Ratios are peer studies per hour over SemID's with 1 worker: the machine's load moves everything
alike, so read the ratios rather than the absolute numbers on a busy machine.

Run with the project's Python after ``make data`` (``make bench`` does), e.g.
``python benchmarks/batch_throughput.py --studies 8 --workers 1,2,4``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tables import write_table

KEY = "batch-throughput-benchmark-key-0001"


def build_archive(root: Path, n: int, base: str) -> dict[str, list[Path]]:
    """``n`` phantom studies under ``root``: even ones as DICOM series (with PHI), odd ones as NIfTI."""
    import pydicom

    from semid.io import write_volume
    from semid.phantoms import Population

    pop = Population(n, seed=404, base=base)
    made: dict[str, list[Path]] = {"dicom": [], "nifti": []}
    for i in range(n):
        image = pop.subject(i).visit(0, "MR").image
        if i % 2 == 0:
            folder = root / "archive" / f"patient{i:03d}" / "MR"
            write_volume(image, folder)
            for path in sorted(folder.iterdir()):
                ds = pydicom.dcmread(path)
                ds.PatientName, ds.PatientID, ds.PatientBirthDate = f"DOE^PATIENT{i}", f"ID{i:05d}", "19700101"
                for keyword in ("PatientIdentityRemoved", "DeidentificationMethod"):
                    if keyword in ds:
                        delattr(ds, keyword)
                ds.save_as(path, write_like_original=False)
            made["dicom"].append(folder)
        else:
            path = root / "archive" / "nifti" / f"subject{i:03d}.nii.gz"
            write_volume(image, path)
            made["nifti"].append(path)
    return made


def time_semid(archive: Path, out: Path, workers: int, level: str) -> dict:
    env = {**os.environ, "SEMID_KEY": KEY, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).with_name("semid")), "batch", str(archive), str(out), "--level", level,
           "--workers", str(workers), "--qc-sample", "0", "--quiet"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"semid batch failed with {workers} workers: {proc.stderr.strip()[-500:]}")
    return {"wall_s": wall}


def time_volume_peer(name: str, volumes: list[Path]) -> dict | None:
    """A levelless peer (radveil, quickshear) over every study's volume in one process, read and write included."""
    from semid.eval.baselines import get_method
    from semid.io import read_volume, write_volume

    try:
        method = get_method(name)
    except Exception as exc:  # noqa: BLE001 - a peer that is not installed is reported, not fatal
        print(f"{name}: not available ({type(exc).__name__})", file=sys.stderr)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        for k, path in enumerate(volumes):
            write_volume(method.run(read_volume(path), 1.0).image, Path(tmp) / f"{k}.nii.gz")
        return {"wall_s": time.perf_counter() - start, "studies": len(volumes)}


def time_dicom_peers(peers_venv: Path, studies: list[Path], work: Path) -> list[dict]:
    """The DICOM header tools of ``dicom_headers.py`` (its ``peer_tools``: same commands, same venv) over
    every DICOM study folder, one command per study (as a batch script would run them)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from dicom_headers import peer_tools

    if not (peers_venv / "bin" / "python").exists():
        print(f"DICOM header tools: no venv at {peers_venv} (make bench makes it)", file=sys.stderr)
        return []
    rows = []
    for tool in peer_tools(peers_venv):
        wall = 0.0
        for k, folder in enumerate(studies):
            log = work / f"{tool.name}-{k}.log"
            wall += tool.run(folder, work / f"{tool.name}-{k}", log)
            if "[benchmark] exit code" in log.read_text(errors="replace"):
                print(f"{tool.name}: failed on a study; left out", file=sys.stderr)
                break
        else:
            rows.append({"tool": f"{tool.name} {tool.version}", "what": "DICOM headers only", "wall_s": wall,
                         "studies": len(studies)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=8, help="phantom studies in the archive (default 8)")
    parser.add_argument("--workers", default="1,2,4", help="comma-separated local worker counts (default 1,2,4)")
    parser.add_argument("--level", default="high")
    parser.add_argument("--base", default="small", choices=["small", "full"], help="phantom base: 2 mm or 1 mm")
    parser.add_argument("--peers-venv", default=".venv-peers", help="venv with the DICOM header tools")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/batch_throughput.md")
    args = parser.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="semid-batch-bench-") as tmp:
        root = Path(tmp)
        print(f"building {args.studies} phantom studies ...", file=sys.stderr, flush=True)
        made = build_archive(root, args.studies, args.base)
        for n in workers:
            out = root / f"out{n}"
            result = time_semid(root / "archive", out, n, args.level)
            rows.append({"tool": f"SemID batch, {n} worker{'s' if n > 1 else ''}", "studies": args.studies,
                         "what": f"faces + headers, level {args.level}", **result})
            shutil.rmtree(out, ignore_errors=True)
            print(f"{rows[-1]['tool']}: {result['wall_s']:.1f} s", file=sys.stderr, flush=True)
        if not args.no_peers:
            volumes = list(made["nifti"])
            for folder in made["dicom"]:  # the DICOM studies' volumes too, so peers see every study
                from semid.io import read_volume, write_volume

                path = root / "peer_volumes" / f"{folder.parent.name}.nii.gz"
                write_volume(read_volume(folder), path)
                volumes.append(path)
            for name in ("radveil", "quickshear"):
                result = time_volume_peer(name, volumes)
                if result:
                    rows.append({"tool": name, "what": "face (volume), no headers", **result})
            (root / "peers").mkdir()
            rows += time_dicom_peers(Path(args.peers_venv), made["dicom"], root / "peers")
    for r in rows:
        r["studies_per_hour"] = 3600.0 * r["studies"] / r["wall_s"]
    base = rows[0]["studies_per_hour"] if rows else float("nan")
    lines = [f"`semid batch` throughput on {args.studies} phantom studies ({args.base} base; half DICOM, half "
             f"NIfTI), level {args.level}; {platform.machine()}, {os.cpu_count()} cores, Python "
             f"{platform.python_version()}. Peers in the same run; ratio = studies/hour over SemID with "
             f"{workers[0] if workers else 1} worker.", "",
             "| tool | what it does | studies | wall s | studies/hour | ratio |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tool']} | {r['what']} | {r['studies']} | {r['wall_s']:.1f} | "
                     f"{r['studies_per_hour']:.0f} | {r['studies_per_hour'] / base:.2f} |")
    write_table(lines, rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
