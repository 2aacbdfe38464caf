"""Renders of the faces SemID draws: its default face and three synthetic faces, with where each came from.

The default face is the population-average head (``semid.average_head``: pydeface's mean head, MNI305 and
Conte69, averaged), undeformed; a synthetic face (``--identity synthetic``) is that head deformed by the
identity prior's shape modes with a code drawn from a seed (``phantoms.face_subject``). Each row is one
face, frontal and turned 40 degrees, skin surface as attacker A1 renders it.

Run it with the project's Python after ``make data``: ``python benchmarks/face_renders.py --out docs/faces.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw

from semid import average_head
from semid import phantoms as ph
from semid.eval.attack_face import render_views

#: Seeds of the three synthetic faces shown (any seed gives a face; these are the first three).
SYNTHETIC_SEEDS = (1, 2, 3)


def faces() -> list[tuple[str, sitk.Image]]:
    """(caption, MR head) of the default face and of the synthetic faces of ``SYNTHETIC_SEEDS``."""
    rows = [(f"default face: {average_head.describe()}", sitk.Cast(ph.face_subject().anatomy, sitk.sitkInt16))]
    for seed in SYNTHETIC_SEEDS:
        code = ph.shape_code(ph.draw_shape(np.random.default_rng(seed)))
        rows.append((f"synthetic face, seed {seed}: the average head deformed by the shape modes of code "
                     f"[{', '.join(f'{c:+.1f}' for c in code[:4])}, ...]",
                     sitk.Cast(ph.face_subject(code).anatomy, sitk.sitkInt16)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/faces.png"))
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    strips = []
    for caption, head in faces():
        views = render_views(head, yaws=(0.0, 40.0), pitches=(0.0,), size=args.size)
        strip = Image.fromarray(np.concatenate(list(views.values()), axis=1))
        band = Image.new("RGB", (strip.width, 28), "black")
        ImageDraw.Draw(band).text((4, 8), caption.split(":")[0], fill="white")  # the full line is printed
        strips.append(np.concatenate([np.asarray(band), np.asarray(strip)], axis=0))
        print(caption)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp.png")
    Image.fromarray(np.concatenate(strips, axis=0)).save(tmp)
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
