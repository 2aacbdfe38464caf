"""The real-head robustness suite as a table: every case of ``semid.eval.real_heads`` with its expected class
and outcome, what SemID did, and the voxels it changed inside the brain it found in the image and inside an
independent brain (HD-BET, or the template's own mask).

Run it with the project's Python after ``make data`` (HD-BET comes with the `robustness` extra):
``python benchmarks/real_heads.py [--level high] [--cases a,b] [--out benchmarks/results/real_heads.md]``.
It exits 1 when a case does not get its expected class and outcome.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
from pathlib import Path

from tables import write_table

from semid.eval import real_heads as rh


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--level", default="high")
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--out", default="benchmarks/results/real_heads.md")
    parser.add_argument("--qc", default="", help="also write each case's QC picture into this folder")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    cases = [rh.case_named(n) for n in names] if names else list(rh.CASES)
    rows, lines = [], [
        f"Real-head robustness suite at level {args.level} ({len(cases)} cases; `python benchmarks/real_heads.py`; "
        f"{platform.processor() or platform.machine()}, CPU).",
        "",
        "| case | what it is | expected | SemID said | outcome | blocked ml | brain voxels changed (found in "
        "image) | changed in independent brain | independent brain | s | ok |",
        "|---|---|---|---|---|---:|---:|---:|---|---:|---|",
    ]
    for case in cases:
        got = rh.check(case, args.level, Path(args.qc) if args.qc else None)
        row = dataclasses.asdict(got) | {"ok": got.ok, "what": case.what, "expected_outcome": case.outcome}
        rows.append(row)
        brain = "-" if got.brain_voxels_changed is None else got.brain_voxels_changed
        indep = "-" if got.independent_brain_voxels_changed is None else got.independent_brain_voxels_changed
        line = (f"| {case.name} | {case.what} | {case.expected}, {case.outcome} | {got.got} | {got.outcome} | "
                f"{got.blocked_ml:.0f} | {brain} | {indep} | {got.independent_brain} | {got.seconds:.1f} | "
                f"{'yes' if got.ok else '**no**'} |")
        lines.append(line)
        print(line, file=sys.stderr, flush=True)
    known = {c.name: c.known_failure for c in cases if c.known_failure}
    if known:
        lines += ["", "Known failures (strict xfails in `tests/test_real_heads.py`):", ""]
        lines += [f"- {name}: {why}." for name, why in known.items()]
    failed = [r["case"] for r in rows if not r["ok"] and r["case"] not in known]
    lines += ["", f"{sum(r['ok'] for r in rows)} of {len(rows)} cases as expected"
              + (f"; not: {', '.join(failed)}" if failed else "") + "."]
    write_table(lines, rows, args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
