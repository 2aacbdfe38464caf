"""The de-identifier: identity map, nested blocking at privacy level ``p``, fill, record.

``Deidentifier(level).run(image)`` returns the de-identified image (same geometry and pixel type,
voxels outside the blocked region ``B_p`` bit-identical), the mask ``B_p`` and a JSON-ready record.

This first version is non-learned: the identity map comes from the registered atlas
(``semid.identity``) and the fill is a plain one: ``B_p`` is set to air and a featureless head
surface (the average head smoothed until nose, eyes, lips and ears are gone, blended into the
subject's own skin at the border of ``B_p``) is filled with the subject's median soft-tissue value
plus the subject's own background noise. The learned compensation replaces the fill later behind the
same interface.

The fill is pluggable (``Deidentifier(level, fill=...)``): a ``Fill`` gets a ``FillContext`` (the input,
the identity region's box, ``B_p``, the head and brain masks, the registered atlas) and returns values
for that box, of which only ``B_p`` is used. The benchmark's baselines (``semid.eval.baselines``) are
such fills, so every method at a level ``p`` blocks the same ``B_p`` and differs only in what it puts
there. ``Deidentifier.locate`` (head mask and atlas registration) can be run once and passed to ``run``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from semid import __version__
from semid import identity as idm
from semid.errors import InputError
from semid.identity import ranking
from semid.identity.ranking import nested_block
from semid.io import MODALITY_KEY, modality_of, require_3d_scalar
from semid.triage import DEFACED, NOT_A_HEAD, Triage, assess

#: Privacy presets (DESIGN.md §4); any float in [0, 1] is accepted too.
LEVEL_PRESETS: dict[str, float] = {"off": 0.0, "low": 0.25, "medium": 0.5, "high": 0.75, "max": 1.0}
#: Width (mm) of the band inside ``B_p`` over which the fill surface blends from the subject's skin.
BLEND_MM = 12.0
METHOD = "atlas-registration identity map, nested blocking, featureless-surface fill (non-learned)"

Progress = Callable[[str], None]


def _lap_timer(timings: dict[str, float]) -> Callable[[str], None]:
    """``lap(name)`` records in ``timings`` the seconds since the previous lap (or since this call)."""
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    return lap


def parse_level(level: str | float | int) -> float:
    """A privacy level as a float in [0, 1], from a preset name or a number ("high", "0.6", 0.6).

    Raises:
        InputError: unknown preset name or a number outside [0, 1].
    """
    if isinstance(level, str):
        key = level.strip().lower()
        if key in LEVEL_PRESETS:
            return LEVEL_PRESETS[key]
        try:
            value = float(key)
        except ValueError:
            raise InputError(
                f"Unknown privacy level {level.strip()[:20]!r}: use off, low, medium, high, max, "
                "or a number from 0 to 1."
            ) from None
    elif isinstance(level, bool) or not isinstance(level, (int, float)):
        raise InputError("The privacy level must be off, low, medium, high, max, or a number from 0 to 1.")
    else:
        value = float(level)
    if not np.isfinite(value) or not 0.0 <= value <= 1.0:
        raise InputError(
            f"Privacy level {value:g} is out of range: use a number from 0 to 1, or off, low, medium, "
            "high, max."
        )
    return value


def preset_name(level: float) -> str | None:
    """The preset whose value is ``level``, if any."""
    return next((name for name, value in LEVEL_PRESETS.items() if abs(value - level) < 1e-9), None)


#: The identity atlas (``semid.identity.Atlas``), loaded once per folder (``semid.identity.load_atlas``).
Atlas = idm.Atlas
_cached_atlas = idm.load_atlas


@dataclass
class DeidResult:
    """What ``Deidentifier.run`` returns.

    Attributes:
        image: the de-identified volume, same geometry and pixel type as the input.
        mask: uint8 image of ``B_p`` on the input grid (1 = blocked and refilled).
        record: JSON-ready account of what was done and what was measured.
    """

    image: sitk.Image
    mask: sitk.Image
    record: dict = field(default_factory=dict)


@dataclass
class Location:
    """Where the head and its identity atlas sit in one volume (``Deidentifier.locate``); level-independent.

    Attributes:
        atlas: the identity atlas that was fitted.
        modality: "MR" or "CT".
        threshold: head/air intensity threshold.
        head_coarse: head mask on the atlas-spacing grid.
        fit: the affine fit of the atlas to the subject (``fit.transform``: template -> subject points); None
            for a volume that passes through (``triage``).
        timings: seconds per stage of the location.
        triage: what the volume is and what was measured to decide it (``semid.triage``).
    """

    atlas: Atlas
    modality: str
    threshold: float
    head_coarse: sitk.Image
    fit: idm.Fit | None
    timings: dict[str, float] = field(default_factory=dict)
    triage: Triage | None = None

    @property
    def to_atlas(self) -> sitk.Transform:
        """Subject points -> template points: the transform to resample atlas images onto the subject."""
        return self.fit.transform.GetInverse()

    def moved(self, shift_mm: Sequence[float]) -> Location:
        """This location with every atlas fit moved by ``shift_mm`` (LPS, mm) in the subject: a registration
        that is off, to check what blocking does then (tests, ``benchmarks/brain_margin.py``)."""
        def move(t: sitk.AffineTransform | None) -> sitk.AffineTransform | None:
            if t is None:
                return None
            out = sitk.AffineTransform(t)
            out.SetTranslation([a + float(b) for a, b in zip(t.GetTranslation(), shift_mm, strict=True)])
            return out

        fit = dataclasses.replace(self.fit, transform=move(self.fit.transform), whole_head=move(self.fit.whole_head))
        return dataclasses.replace(self, fit=fit)


@dataclass
class FillContext:
    """What a fill sees: the input and, on the identity region's box (``roi``), ``B_p`` and the masks.

    Every array is numpy (z, y, x) on the ``roi`` grid; ``roi_arr`` is a read-only view of the input.
    """

    image: sitk.Image
    roi: sitk.Image
    roi_slices: tuple[slice, slice, slice]
    roi_arr: np.ndarray
    head: np.ndarray
    blocked: np.ndarray
    region: np.ndarray
    brain: np.ndarray
    location: Location
    seed: int = 0
    #: The context this one was cropped from (``crop``), None for the whole ROI; what is worked out once
    #: per run (``person_skin``) is kept on it.
    parent: FillContext | None = field(default=None, repr=False, compare=False)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def atlas(self) -> Atlas:
        return self.location.atlas

    @property
    def to_atlas(self) -> sitk.Transform:
        return self.location.to_atlas

    @property
    def surface_to_atlas(self) -> sitk.Transform:
        """Subject -> atlas points for placing the featureless head (``Atlas.blank_sdf``): the whole-head
        outline fit where there is one. The cranium fit sits a long chin's 15-20 mm above it, and the plain
        skin, bent from the person's chin up to the blank one's, left a crease under the mouth that a face
        detector read as a lip (the real sample head at "max": dlib distance to the original 0.60 with it,
        0.66 without). The outline's affine is the head's silhouette, which stays in view around ``B_p``."""
        fit = self.location.fit
        if fit is not None and fit.whole_head is not None:
            return fit.whole_head.GetInverse()
        return self.location.to_atlas

    @property
    def modality(self) -> str:
        return self.location.modality

    def crop(self, box: tuple[slice, slice, slice]) -> FillContext:
        """The same context on a sub-box ``box`` (numpy (z, y, x) slices of the ROI grid)."""
        start = [b.start for b in box[::-1]]  # ITK (x, y, z)
        size = [b.stop - b.start for b in box[::-1]]
        roi = sitk.RegionOfInterest(self.roi, size, start)
        slices = tuple(slice(outer.start + inner.start, outer.start + inner.stop)
                       for outer, inner in zip(self.roi_slices, box, strict=True))
        return FillContext(self.image, roi, slices, self.roi_arr[box], self.head[box], self.blocked[box],
                           self.region[box], self.brain[box], self.location, self.seed, self.parent or self)

    def person_skin(self) -> sitk.Image:
        """Signed distance (mm, negative inside; float32 image on ``skin_cells`` of the whole ROI) to the
        person's own skin (``skin_distance`` of ``head``), worked out once per run and shared by crops."""
        whole = self.parent or self
        if "person_skin" not in whole._cache:
            grid, sdf = skin_distance(whole.head, whole.roi)
            whole._cache["person_skin"] = _on(grid, sdf.astype(np.float32))
        return whole._cache["person_skin"]


#: Above this many separate parts, ``boxes_around`` gives one box around them all.
MAX_FILL_BOXES = 16


def boxes_around(mask: np.ndarray, spacing: Sequence[float], margin_mm: float) -> list[tuple[slice, slice, slice]]:
    """Index boxes (numpy (z, y, x) slices) that cover the parts of ``mask`` with ``margin_mm`` around each,
    boxes that overlap merged: where a fill needs to see around a few scattered voxels, these boxes hold
    a fraction of the whole grid. ``spacing`` is ITK's (x, y, z) in mm."""

    grow = [int(np.ceil(margin_mm / s)) for s in spacing[::-1]]
    boxes = [[max(sl.start - g, 0), min(sl.stop + g, n)] for part in ndimage.find_objects(
        ndimage.label(mask, structure=np.ones((3, 3, 3), bool))[0]) if part is not None
        for sl, g, n in zip(part, grow, mask.shape, strict=True)]
    boxes = [boxes[i:i + 3] for i in range(0, len(boxes), 3)]
    if len(boxes) > MAX_FILL_BOXES:  # scattered voxels: one box around them all (the merging below is cubic)
        boxes = [[[min(b[k][0] for b in boxes), max(b[k][1] for b in boxes)] for k in range(3)]]
    merged = True
    while merged:  # a few boxes: merge pairs until none overlap
        merged = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                if all(a[0] < b[1] and b[0] < a[1] for a, b in zip(boxes[i], boxes[j], strict=True)):
                    boxes[i] = [[min(a[0], b[0]), max(a[1], b[1])] for a, b in zip(boxes[i], boxes[j], strict=True)]
                    del boxes[j]
                    merged = True
                    break
            if merged:
                break
    return [tuple(slice(a, b) for a, b in box) for box in boxes]  # type: ignore[misc]


@dataclass
class FillResult:
    """A fill's values (ROI grid, input dtype) with what it measured, for the run's record."""

    values: np.ndarray
    record: dict = field(default_factory=dict)


class Fill(Protocol):
    """What goes into ``B_p``: values on the ROI grid, same dtype as the input (or a ``FillResult``);
    only ``B_p`` is used."""

    name: str
    description: str

    def __call__(self, ctx: FillContext) -> np.ndarray | FillResult: ...


#: Cells (mm) on which the fills work out skin surfaces (``skin_distance``): a surface that bends over
#: 12 mm needs no finer grid, and a 1 mm head's identity box has ten million voxels.
SKIN_CELL_MM = 2.0
#: Radius (mm) of the closing that seals a head's openings (nostrils, mouth, the gap of a thin scalp over
#: dark bone) before its skin is measured (``skin_distance``).
SKIN_CLOSING_MM = 6.0


def skin_cells(ref: sitk.Image) -> tuple[sitk.Image, list[int]]:
    """The grid of ``SKIN_CELL_MM`` cells over ``ref`` (blocks of whole voxels; its geometry only) and the
    block size (x, y, z)."""
    factors = [int(v) for v in np.maximum(1, np.round(SKIN_CELL_MM / np.array(ref.GetSpacing())))]
    return sitk.BinShrink(ref, factors), factors


def _share_in_cells(mask: np.ndarray, ref: sitk.Image, factors: list[int]) -> np.ndarray:
    """Share of each cell's voxels in ``mask`` (z, y, x, on ``ref``), 0 to 8 (BinShrink averages)."""
    img = sitk.GetImageFromArray(mask.astype(np.uint8) * np.uint8(8))
    img.CopyInformation(ref)
    return sitk.GetArrayFromImage(sitk.BinShrink(img, factors))


def _signed_mm(mask: np.ndarray, grid: sitk.Image) -> np.ndarray:
    """Signed distance (mm, negative inside) to ``mask`` on ``grid``, held within +-1 m (no mask: 1 m)."""
    distance = ranking.distance_near(mask, grid.GetSpacing(), 1e3)
    return np.clip(distance, -1e3, 1e3, out=distance)  # in place: the map is a fresh array


def skin_distance(tissue: np.ndarray, ref: sitk.Image) -> tuple[sitk.Image, np.ndarray]:
    """Signed distance (mm, negative inside, on ``skin_cells(ref)``) to the skin of the head whose tissue
    is ``tissue`` (bool (z, y, x) on ``ref``): the head inside its skin, not its tissue.

    Tissue above a head threshold leaves out bone, the eyes and the sinuses, which would read as air
    under the skin; a closing by a ball of ``SKIN_CLOSING_MM`` seals the nostrils, the mouth and a thin
    scalp's gap over dark bone, and the holes are filled.
    """
    grid, factors = skin_cells(ref)
    spacing, reach = grid.GetSpacing(), SKIN_CLOSING_MM + max(grid.GetSpacing())
    inside = _share_in_cells(tissue, ref, factors) >= 4  # half the cell
    # the closing from two distance maps (exact Euclidean balls): a third of ITK's ball closing's time
    grown = ranking.distance_near(inside, spacing, reach) <= SKIN_CLOSING_MM
    closed = ranking.distance_near(~grown, spacing, reach) > SKIN_CLOSING_MM
    return grid, _signed_mm(idm.fill_holes(closed), grid)


def _on(grid: sitk.Image, arr: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(grid)
    return img


def _background(ctx: FillContext) -> np.ndarray:
    """The person's background (air) values around the head in the ROI, for fills' noise."""
    air = ctx.roi_arr[~ctx.head & ~ctx.blocked]
    return air.astype(np.float32) if air.size else np.array([float(ctx.roi_arr.min())], np.float32)


@dataclass
class SurfaceFill:
    """SemID's plain fill: a featureless head surface, soft tissue inside, the subject's air outside.

    The average head smoothed until nose, eyes, lips and ears are gone is blended into the subject's
    skin (``skin_distance``) over ``BLEND_MM`` inside ``B_p``, filled with the subject's median
    soft-tissue value plus the subject's own background noise.
    """

    name: str = "surface"
    description: str = METHOD

    def __call__(self, ctx: FillContext) -> np.ndarray:
        rng = np.random.default_rng(ctx.seed)
        roi, head_roi, blocked, region = ctx.roi, ctx.head, ctx.blocked, ctx.region
        values = ctx.roi_arr  # (no float copy of the ROI: this runs at the run's memory peak)
        tissue_vals = values[region & head_roi]
        tissue = float(np.median(tissue_vals)) if tissue_vals.size else float(np.median(values[head_roi]))
        air_vals = _background(ctx)
        air = rng.choice(air_vals, size=values.shape).astype(np.float32, copy=False)

        # the surface is worked out on cells (``skin_cells``) like ``join_skin``'s, which meets it
        grid, factors = skin_cells(roi)
        person = sitk.Resample(ctx.person_skin(), grid, sitk.Transform(), sitk.sitkLinear, 1e3, sitk.sitkFloat32)
        blank = sitk.Resample(ctx.atlas.blank_sdf, grid, ctx.surface_to_atlas, sitk.sitkLinear, 1e3,
                              sitk.sitkFloat32)
        depth_in_block = _signed_mm(_share_in_cells(~blocked, roi, factors) > 0, grid)
        weight = _on(grid, np.clip(depth_in_block / BLEND_MM, 0.0, 1.0).astype(np.float32))
        surface = weight * blank + (1.0 - weight) * person
        # a light smoothing removes the stair steps of the 2 mm atlas from the new skin
        surface = sitk.SmoothingRecursiveGaussian(surface, 1.5)
        inside = sitk.GetArrayFromImage(sitk.Resample(surface, roi, sitk.Transform(), sitk.sitkLinear, 1e3,
                                                      sitk.sitkFloat32) < 0.0).view(bool)
        # inside the new skin: soft tissue plus the person's own noise (air minus its median), outside: air
        air[inside] += np.float32(tissue - float(np.median(air_vals)))
        return _cast_like(air, ctx.roi_arr.dtype)


#: Band (mm) inside a drawn fill, from where it meets ``SurfaceFill``'s (blocked voxels outside the face
#: box), over which the drawn skin turns into that fill's (``join_skin``). 24 mm reached the drawn mouth
#: on the real head and broke its lips.
PLAIN_BLEND_MM = 12.0
#: Where the joined skin lies this close (mm) to the drawn one, ``join_skin`` leaves the drawing as it is.
SKIN_TOLERANCE_MM = 0.5


def join_skin(ctx: FillContext, values: np.ndarray, plain: np.ndarray, seed: int = 0) -> tuple[np.ndarray, dict]:
    """A drawn fill's skin bent into the plain fill's where the two meet.

    A face drawn on a canonical head (the learned fill) covers the face box only; blocked voxels outside
    it (above the forehead, under the chin) get ``SurfaceFill``, whose skin follows the person's at the
    edge of ``B_p`` and the featureless head deeper in. The two skins met with a ledge across the
    forehead and a seam under the chin. Here, over ``PLAIN_BLEND_MM`` from the plain fill, the drawn
    head's signed distance is blended into the plain fill's surface (``SurfaceFill``'s own formula), on
    ``SKIN_CELL_MM`` cells (``skin_distance``); voxels of the drawing that fall on the other side of the
    joined skin become tissue (the drawing's median tissue value by its skin plus the person's
    background noise) or air (the person's background). The drawing's cavities (sinuses, mouth) and
    everything farther from the plain fill are kept. (Blending into the person's skin at every edge of
    ``B_p`` as well was tried on the real head: the person's skin on 2 mm cells loses thin ears, and the
    drawing beside them cracked.)

    Args:
        ctx: the fill's context (``values`` is on its ``roi`` grid).
        values: the drawn fill's values, float (z, y, x), input units; changed in place and returned.
        plain: bool (z, y, x), the blocked voxels that hold the plain fill (left as they are).
        seed: seed of the background noise.

    Returns:
        ``(values, {"voxels_made_tissue": n, "voxels_made_air": m})``.
    """
    threshold = float(ctx.location.threshold)
    drawn_part = ctx.blocked & ~plain
    stats = {"voxels_made_tissue": 0, "voxels_made_air": 0}
    if not (drawn_part.any() and plain.any()):
        return values, stats
    tissue_now = values >= threshold
    grid, factors = skin_cells(ctx.roi)
    drawn_sdf = skin_distance(tissue_now, ctx.roi)[1]
    person_sdf = sitk.GetArrayFromImage(sitk.Resample(ctx.person_skin(), grid, sitk.Transform(), sitk.sitkLinear,
                                                      1e3, sitk.sitkFloat32))
    depth = _signed_mm(_share_in_cells(~ctx.blocked, ctx.roi, factors) > 0, grid)  # from the nearest voxel out of B_p
    from_plain = _signed_mm(_share_in_cells(plain, ctx.roi, factors) > 0, grid)
    blank = sitk.GetArrayFromImage(sitk.Resample(ctx.atlas.blank_sdf, grid, ctx.surface_to_atlas, sitk.sitkLinear, 1e3,
                                                 sitk.sitkFloat32))
    to_person = np.clip(depth / BLEND_MM, 0.0, 1.0)
    to_plain = np.clip(from_plain / PLAIN_BLEND_MM, 0.0, 1.0)
    plain_skin = to_person * blank + (1.0 - to_person) * person_sdf  # SurfaceFill's
    joined = to_plain * drawn_sdf + (1.0 - to_plain) * plain_skin
    # a light smoothing as in SurfaceFill
    joined = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(_on(grid, joined.astype(np.float32)), 1.5))
    drawn_sdf = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(_on(grid, drawn_sdf.astype(np.float32)), 1.5))
    # a voxel can change only in a cell, or next to one, where the joined and the drawn skin lie apart
    # (a voxel's linear reading lies between its neighbouring cells' values): those voxels alone are read
    lo, hi = np.minimum(joined, drawn_sdf), np.maximum(joined, drawn_sdf)
    apart = (lo < 0.0) & (hi >= 0.0) & (to_plain < 1.0)
    cells_apart = np.nonzero(ndimage.binary_dilation(apart, np.ones((3, 3, 3), bool)))
    step = np.array(factors[::-1], np.int32)
    block = np.stack(np.meshgrid(*[np.arange(f, dtype=np.int32) for f in step], indexing="ij"), -1).reshape(-1, 3)
    voxels = (np.stack(cells_apart, -1).astype(np.int32)[:, None, :] * step + block[None]).reshape(-1, 3)
    voxels = voxels[drawn_part[tuple(voxels.T)]]
    where = tuple(voxels.T)
    at = [(i - (f - 1) / 2.0) / f for i, f in zip(where, factors[::-1], strict=True)]  # on the cells
    skin = ndimage.map_coordinates(joined, at, order=1, mode="nearest")
    drawn_here = ndimage.map_coordinates(drawn_sdf, at, order=1, mode="nearest")
    tissue_here = tissue_now[where]
    # (within SKIN_TOLERANCE_MM of the drawn skin nothing changes: the drawing's own skin is measured on cells)
    apart_here = np.abs(skin - drawn_here) > SKIN_TOLERANCE_MM
    make_tissue = apart_here & (skin < 0.0) & ~tissue_here & (drawn_here >= 0.0)  # not the drawing's cavities
    make_air = apart_here & (skin >= 0.0) & tissue_here
    n_tissue, n_air = int(make_tissue.sum()), int(make_air.sum())
    if n_tissue + n_air == 0:
        return values, stats
    rng = np.random.default_rng(seed)
    air_vals = _background(ctx)
    near_skin = values[where][tissue_here]  # the drawing's tissue by its skin
    tissue = float(np.median(near_skin)) if near_skin.size else threshold
    values[tuple(i[make_tissue] for i in where)] = (tissue + rng.choice(air_vals, n_tissue)
                                                     - float(np.median(air_vals)))
    values[tuple(i[make_air] for i in where)] = rng.choice(air_vals, n_air)
    stats.update(voxels_made_tissue=n_tissue, voxels_made_air=n_air)
    return values, stats


#: Dice (inside the head) below which the identity network's region is not trusted and the atlas's is used.
MIN_NETWORK_AGREEMENT = 0.6
#: Distance (mm) ``B_p`` keeps from the surface of the identity network's own brain (its largest piece at
#: probability > 0.5, ``predict_maps``' ``brain_distance_mm``, measured on the network's 4 mm grid). The
#: network's brain edge lies up to a few mm inside the true one; the phantoms' identity region ends 4-6 mm
#: short of their brain. ``benchmarks/brain_margin.py``: with the atlas fits 12 mm off, 1231-1867 brain
#: voxels of B_1 became 42-88 at 4 mm, 12-29 at 5 mm, 4-6 at 6 mm; on the 16 benchmark heads fitted as
#: usual, 5 mm takes 184-739 voxels (15-159 of the identity region) from a B_1 of about 300 thousand,
#: 6 mm 458-1431 (128-414).
NETWORK_BRAIN_MARGIN_MM = 5.0


@functools.lru_cache(maxsize=1)
def _cached_reid():  # noqa: ANN202
    from semid.identity.saliency import load_reid

    return load_reid()


def make_fill(kind: str = "auto", identity: str = "default", seed_weights: Path | None = None) -> Fill:
    """The fill named ``kind``: "learned" (the compensation generator), "surface" (the plain featureless
    surface), or "auto" (learned when its weights are installed, else surface)."""
    if kind not in ("auto", "learned", "surface"):
        raise InputError(f"unknown fill {kind!r}: use auto, learned or surface.")
    if kind == "surface":
        return SurfaceFill()
    try:
        from semid.compensation import DEFAULT_WEIGHTS, LearnedFill
    except ImportError as exc:  # the core install has no torch: the learned parts come with `.[server]`
        if kind == "auto":
            return SurfaceFill()
        raise InputError("The learned fill needs torch and MONAI: pip install 'semid[server]'.") from exc

    weights = seed_weights or DEFAULT_WEIGHTS
    if kind == "auto" and not Path(weights).exists():
        return SurfaceFill()
    return LearnedFill(weights, identity=identity)


@dataclass
class Deidentifier:
    """Non-learned de-identifier behind the interface the learned one fills later.

    Args:
        level: privacy level ``p`` in [0, 1] or a preset name (off, low, medium, high, max).
        atlas_dir: folder of the identity atlas (default: the data folder's ``atlas``).
        seed: seed of the fill's noise, so a run is reproducible.
        fill: what goes into ``B_p`` (default: ``SurfaceFill``, the featureless head surface; ``make_fill``
            gives the learned one).
        identity: where the identity region and ``s(x)`` come from: "network" (the identity network,
            checked against the atlas: below ``MIN_NETWORK_AGREEMENT`` the atlas is used and the record
            says so), "atlas" (the registered atlas only), "auto" (network when its weights are installed).
        saliency: order the region by the re-identification network's occlusion saliency (a few seconds
            more) instead of the atlas score.
        identity_weights: the identity network's weights file (e.g. a model retrained from reviewed labels
            and published by the MONAI Label app); None: the committed ones. Loaded once per file version
            (``semid.identity.network.load_cached``); the record names the file's sha256.
    """

    level: float | str = "high"
    atlas_dir: Path | None = None
    seed: int = 0
    fill: Fill = field(default_factory=SurfaceFill)
    identity: str = "auto"
    saliency: bool = False
    identity_weights: Path | str | None = None

    def __post_init__(self) -> None:
        self.level = parse_level(self.level)
        if self.identity not in ("auto", "network", "atlas"):
            raise InputError(f"unknown identity source {self.identity!r}: use auto, network or atlas.")

    def locate(self, image: sitk.Image, progress: Progress | None = None) -> Location:
        """Triage and atlas registration of one 3D volume (what ``run`` needs before blocking).

        A volume that passes through (skull-stripped, nothing identifying in view) is returned with its
        triage and no fit; ``run`` leaves it as it is.

        Raises:
            InputError: not a 3D scalar volume, empty/constant, not a head (the triage's sentence).
        """
        say = progress or (lambda _stage: None)
        image = require_3d_scalar(image)
        _require_not_constant(image)
        say("triage: head, brain and face")
        atlas = _cached_atlas(self.atlas_dir)
        triage = assess(image, atlas, modality_of(image))
        if triage.kind == NOT_A_HEAD:
            raise InputError(triage.sentence)
        values = triage.values
        return Location(atlas, values.modality, values.threshold, triage.head, triage.fit, dict(triage.timings),
                        triage)

    def run(self, image: sitk.Image, progress: Progress | None = None,
            location: Location | None = None) -> DeidResult:
        """De-identify one 3D head volume (any orientation, MR or CT).

        Args:
            image: the volume; never modified.
            progress: called with the name of each stage.
            location: ``self.locate(image)`` done earlier (skips the head mask and the registration).
        """
        say = progress or (lambda _stage: None)
        image = require_3d_scalar(image)
        if self.level == 0.0:
            return self._untouched(image)
        if location is None:
            location = self.locate(image, progress)
        else:
            _require_not_constant(image)
        triage = location.triage
        if triage is not None and triage.passes_through:
            return self._passed_through(image, location)
        timings: dict[str, float] = dict(location.timings)
        lap = _lap_timer(timings)

        atlas, modality, fit = location.atlas, location.modality, location.fit
        defaced = triage is not None and triage.kind == DEFACED
        say("mapping identity")
        # the ROI holds the region under both fits: the whole-head fit's region joins B_p below
        fits = [fit.transform] + ([fit.whole_head] if fit.whole_head is not None else [])
        roi_index, roi_size = _roi_of(atlas.blocking_score, fits, image)
        arr = sitk.GetArrayViewFromImage(image)
        out = np.array(arr, copy=True)
        mask = np.zeros(arr.shape, dtype=np.uint8)
        record_extra: dict = {"identity_region_ml": 0.0}
        fill_record: dict = {}
        identity_record: dict = {"identity_source": "atlas-registration"}
        net_keep_out: np.ndarray | None = None
        if roi_size is not None:
            roi = sitk.RegionOfInterest(image, roi_size, roi_index)
            to_atlas = location.to_atlas
            score = sitk.GetArrayFromImage(sitk.Resample(atlas.blocking_score, roi, to_atlas, sitk.sitkLinear,
                                                         0.0, sitk.sitkFloat32))
            brain = sitk.GetArrayFromImage(sitk.Resample(atlas.brain, roi, to_atlas,
                                                         sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)) > 0
            region = (score > 0.02) & ~brain  # the atlas's region and its tissue margin (idm.REGION_MARGIN_MM)
            sl = _roi_slices(roi_index, roi_size)
            roi_arr = arr[sl]
            head_roi = _head_in_roi(roi, location.threshold, location.head_coarse)
            # what the image itself says: its field of view and its brain (semid.triage, semid.brain)
            in_view = _in_view(triage, sl, region.shape)
            image_brain = image_keep_out = None
            if triage is not None and triage.brain is not None:
                image_brain, image_keep_out = triage.brain.within(roi, (0.0, IMAGE_BRAIN_MARGIN_MM))
            # the atlas's region itself (no margin) placed by the whole-head fit, which follows the face where
            # the cranium fit deliberately does not: the network is checked against it, and it joins the
            # region (ranked last), so B_1 still covers the face where the cranium fit sits off it
            face_fit = fit.whole_head.GetInverse() if fit.whole_head is not None else to_atlas
            face_region = sitk.GetArrayFromImage(sitk.Resample(atlas.score, roi, face_fit, sitk.sitkNearestNeighbor,
                                                               0.0, sitk.sitkFloat32)) > 0.02
            face_region &= ~brain
            # the atlas brain as the whole-head fit places it, with the atlas's brain margin: the region keeps off
            # it too (the two fits place the brain up to a centimetre apart at the skull base)
            whole_brain = None
            if fit.whole_head is not None:
                whole_brain = sitk.GetArrayFromImage(sitk.Resample(atlas.brain, roi, face_fit,
                                                                   sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)) > 0
                whole_brain = ranking.distance_near(whole_brain, roi.GetSpacing(), idm.BRAIN_MARGIN_MM) \
                    < idm.BRAIN_MARGIN_MM
            if self.identity != "atlas":
                learned = self._learned_identity(image, roi, sl, modality, score, region, face_region, brain,
                                                 head_roi)
                score_net, region_net, identity_record, net_keep_out = learned
                if score_net is not None:
                    score, region = score_net, region_net
            added = face_region & ~region
            score = np.where(added, np.float32(1e-9), score).astype(np.float32)
            region = region | added
            # what is not scanned is not blocked (a face cut off by the field of view is not drawn back)
            region &= in_view
            if defaced:
                # the face was cut away: what remains is blocked with the air just around it (so the plain fill can
                # smooth an ear or the rim of the cut away), not the cut-away volume, where nothing is drawn
                region &= ranking.distance_near(head_roi, roi.GetSpacing(), DEFACED_AIR_MM) <= DEFACED_AIR_MM
            if image_keep_out is not None:
                identity_record["region_voxels_kept_off_image_brain"] = int((region & image_keep_out).sum())
                region &= ~image_keep_out
            if whole_brain is not None:
                region &= ~whole_brain
            # the atlas brain is registered, so it can sit a little off the subject's; the network's brain
            # is the subject's own: B_p keeps off both (the keep-out does not depend on p, so B_p stays nested)
            identity_record["brain_keep_out"] = (f"registered atlas brain (+{idm.BRAIN_MARGIN_MM:g} mm"
                                                 + (", placed by both fits)" if whole_brain is not None else ")"))
            if image_keep_out is not None:
                identity_record["brain_keep_out"] = (f"brain found in the image (+{IMAGE_BRAIN_MARGIN_MM:g} mm), "
                                                     + identity_record["brain_keep_out"])
            if net_keep_out is not None:
                identity_record["brain_keep_out"] += f" and identity network's brain (+{NETWORK_BRAIN_MARGIN_MM:g} mm)"
                identity_record["region_voxels_kept_off_network_brain"] = int((region & net_keep_out).sum())
                region &= ~net_keep_out
            blocked = nested_block(score, region, self.level)
            # what made B_p is not needed by the fill: freed before it (the fill makes the run's memory peak)
            del score, face_region, whole_brain, in_view, image_keep_out, net_keep_out, added
            lap("identity_map")
            say("filling the blocked region")
            ctx = FillContext(image, roi, sl, roi_arr, head_roi, blocked, region, brain, location, self.seed)
            # a defaced head gets the plain fill: its remaining tissue smoothed into a featureless surface,
            # no face drawn where the face was cut away
            fill = SurfaceFill() if defaced else self.fill
            filled = fill(ctx)
            if isinstance(filled, FillResult):
                fill_record = filled.record
                filled = filled.values
            filled = np.asarray(filled)
            if filled.shape != roi_arr.shape:
                raise ValueError(f"fill {fill.name!r} returned shape {filled.shape}, expected {roi_arr.shape}")
            out[sl][blocked] = filled[blocked]
            mask[sl] = blocked
            voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
            changed_roi = out[sl] != roi_arr
            # the brain numbers are counted against the brain found in this image (the atlas brain, placed by a
            # fit, is a keep-out only)
            counted = image_brain if image_brain is not None else brain
            record_extra = {
                "identity_region_ml": round(float(region.sum()) * voxel_ml, 3),
                "blocked_tissue_ml": round(float((blocked & head_roi).sum()) * voxel_ml, 3),
                "brain_voxels_in_block": int((blocked & counted).sum()),
                "brain_voxels_changed": int((changed_roi & counted).sum()),
                "brain_counted_against": ("the brain found in this image" if image_brain is not None
                                          else "the registered atlas brain"),
            }
            lap("fill")

        say("writing the record")
        result = sitk.GetImageFromArray(out)
        result.CopyInformation(image)
        result.SetMetaData(MODALITY_KEY, modality_of(image))
        mask_img = sitk.GetImageFromArray(mask)
        mask_img.CopyInformation(image)
        changed = out != arr
        voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
        record = {
            "semid_version": __version__,
            "level": self.level,
            "preset": preset_name(self.level),
            "method": SurfaceFill.description if defaced else self.fill.description,
            **({"triage": triage.record()} if triage is not None else {}),
            "already_defaced": defaced,
            **identity_record,
            "atlas": atlas.version,
            "modality": modality,
            "registration_head_dice": round(fit.dice, 4),
            "registration_whole_head_fit_used": fit.whole_head is not None,
            "blocked_voxels": int(mask.sum()),
            "blocked_ml": round(float(mask.sum()) * voxel_ml, 3),
            **record_extra,
            "voxels_changed": int(changed.sum()),
            "voxels_changed_outside_block": int((changed & (mask == 0)).sum()),
            "unchanged_fraction_outside_block": _fraction_unchanged(changed, mask),
            "geometry_preserved": True,
            "pixel_type": image.GetPixelIDTypeAsString(),
            **fill_record,
            "timings_s": timings,
        }
        return DeidResult(result, mask_img, record)

    def _learned_identity(self, image: sitk.Image, roi: sitk.Image, sl: tuple[slice, slice, slice], modality: str,
                          atlas_score: np.ndarray, atlas_region: np.ndarray, atlas_core: np.ndarray,
                          brain: np.ndarray, head_roi: np.ndarray
                          ) -> tuple[np.ndarray | None, np.ndarray | None, dict, np.ndarray | None]:
        """``s(x)``, the region and the brain from the identity network (plus, with ``saliency``, the
        re-identification saliency; else the atlas score orders the region), on the ROI (``roi``, the
        slices ``sl`` of ``image``); no score and region (None) when the network is not installed or
        disagrees with the atlas region (then the atlas is used). The brain is the signed distance (mm) to
        the voxels within ``NETWORK_BRAIN_MARGIN_MM`` of the network's brain (``predict_maps``'
        ``brain_distance_mm``; bool, the ROI's shape), None for weights without it."""
        try:
            from semid.identity import network as idnet
        except ImportError as exc:  # the core install has no torch/MONAI
            if self.identity == "network":
                raise InputError("The identity network needs torch and MONAI: pip install 'semid[server]'.") from exc
            return None, None, {"identity_source": "atlas-registration (torch/MONAI not installed)"}, None

        if self.identity_weights is None and not idnet.DEFAULT_WEIGHTS.exists():
            if self.identity == "network":
                raise InputError("The identity network's weights are missing: train them with "
                                 "`semid train identity`, or use identity='atlas'.")
            return None, None, {"identity_source": "atlas-registration (no identity network installed)"}, None
        # weights named explicitly must be there: a missing file is an error, not a silent fallback
        net = idnet.load_cached(self.identity_weights)
        wanted = ("identity", "brain_distance_mm") if "brain" in net.outputs else ("identity",)
        maps = net.predict_maps(image, modality, reference=roi, outputs=wanted)
        prob = sitk.GetArrayFromImage(maps["identity"])
        # the brain is kept even where the region is not trusted below: a disagreement may be the atlas fit's
        # fault, and the brain only ever takes voxels out of B_p (islands of it are left out by predict_maps)
        # thresholded in ITK: a bool array of the ROI rather than a float copy of it (40 MB on a 1 mm head)
        net_keep_out = (sitk.GetArrayFromImage(sitk.Less(maps.pop("brain_distance_mm"), NETWORK_BRAIN_MARGIN_MM))
                        .view(bool) if "brain_distance_mm" in maps else None)
        # holes (sinus air, a dark orbit the network is unsure of) join the region: an unblocked island
        # inside a blocked face would keep a piece of the original in place
        tissue = idm.fill_holes(ranking.region_from_prob(prob))
        # the atlas keeps its region BRAIN_MARGIN_MM from the brain; the network's region keeps the same
        # distance, or its rim reaches into the true brain where the atlas brain is a little small
        near_brain = ranking.distance_near(brain, image.GetSpacing(), idm.BRAIN_MARGIN_MM) < idm.BRAIN_MARGIN_MM
        tissue &= ~near_brain
        check = ranking.agreement(tissue & head_roi, atlas_core & head_roi, image.GetSpacing())
        record: dict = {"identity_network": net.describe(), "identity_agreement_with_atlas": check}
        # (the region below is the union of the network's and the atlas's, so this check is about trust
        # in the network, not about what is blocked)
        if check["dice"] < MIN_NETWORK_AGREEMENT:
            record["identity_source"] = (f"atlas-registration (the network's region agreed with the atlas's "
                                         f"only at Dice {check['dice']:.2f} < {MIN_NETWORK_AGREEMENT})")
            return None, None, record, net_keep_out
        # the network segments tissue; the air in front of the face joins the region as in the atlas,
        # so a fill may draw a face that sticks out further than the original. The network adds to the
        # atlas's region and never removes from it: on the real head its region alone left enough of
        # the face for dlib to match the surface fill's output to the original (distance 0.40 < 0.6)
        region = (ranking.with_air_margin(tissue, head_roi, image.GetSpacing()) | atlas_region) & ~near_brain
        if self.saliency:
            from semid.identity import saliency as sal

            order = sitk.GetArrayFromImage(sal.identity_saliency(image, _cached_reid(), modality=modality))[sl]
            record["identity_source"] = "identity-network and atlas + re-identification saliency"
        else:
            order = np.clip(atlas_score / max(float(atlas_score.max()), 1e-6), 0.0, 1.0)
            record["identity_source"] = "identity-network and atlas (ordered by the atlas score)"
        # voxels of the air margin have no network probability: they rank by the order alone, last
        score = np.zeros(region.shape, np.float32)
        score[region] = np.maximum(ranking.combine(prob, order)[region], 1e-3 * order[region] + 1e-9)
        return score, region, record, net_keep_out

    def _passed_through(self, image: sitk.Image, location: Location) -> DeidResult:
        """A volume with nothing identifying to remove (skull-stripped, no face part or ear in view): the
        input as it is, nothing blocked, and the reason in the record (``no_face_present``)."""
        triage = location.triage
        mask = sitk.Image(image.GetSize(), sitk.sitkUInt8)
        mask.CopyInformation(image)
        record = {"semid_version": __version__, "level": self.level, "preset": preset_name(self.level),
                  "method": "none: nothing identifying to remove", "triage": triage.record(),
                  "no_face_present": triage.kind, "already_defaced": False,
                  "brain_source": triage.brain.method if triage.brain is not None else None,
                  "blocked_voxels": 0, "blocked_ml": 0.0, "identity_region_ml": None, "brain_voxels_changed": 0,
                  "brain_counted_against": "the brain found in this image", "voxels_changed": 0,
                  "voxels_changed_outside_block": 0, "unchanged_fraction_outside_block": 1.0,
                  "geometry_preserved": True, "pixel_type": image.GetPixelIDTypeAsString(),
                  "timings_s": dict(location.timings)}
        return DeidResult(image, mask, record)

    def _untouched(self, image: sitk.Image) -> DeidResult:
        """Level 0 (``off``): the input as it is, nothing blocked, no registration needed."""
        mask = sitk.Image(image.GetSize(), sitk.sitkUInt8)
        mask.CopyInformation(image)
        record = {"semid_version": __version__, "level": 0.0, "preset": "off", "method": self.fill.description,
                  "identity_source": "none (level 0)", "blocked_voxels": 0, "blocked_ml": 0.0,
                  "identity_region_ml": None, "brain_voxels_changed": 0, "voxels_changed": 0,
                  "voxels_changed_outside_block": 0, "unchanged_fraction_outside_block": 1.0,
                  "geometry_preserved": True, "pixel_type": image.GetPixelIDTypeAsString()}
        return DeidResult(image, mask, record)


#: Distance (mm) ``B_p`` keeps from the brain found in the image (``semid.brain``: deepbet's first network on
#: MR, the inner table of the skull on CT, both on a grid of about 2 mm whose edge can sit a voxel inside the
#: true brain's). ``benchmarks/real_heads.py`` counts, per case, the voxels changed inside an independent
#: brain mask (ROBEX, or the template's own mask).
IMAGE_BRAIN_MARGIN_MM = 5.0


#: Air (mm) around the remaining tissue of an already defaced head that its region keeps (``Deidentifier.run``).
DEFACED_AIR_MM = 8.0


def _in_view(triage: Triage | None, sl: tuple[slice, slice, slice], shape: tuple[int, ...]) -> np.ndarray:
    """Bool (z, y, x) on the ROI ``sl``: inside the volume's field of view (all True without a triage)."""
    if triage is None or triage.fov.whole:
        return np.ones(shape, bool)
    out = np.zeros(shape, bool)
    inner = tuple(slice(max(lo - s.start, 0), max(min(hi, s.stop) - s.start, 0))
                  for (lo, hi), s in zip(triage.fov.box, sl, strict=True))
    out[inner] = True
    return out


def _require_not_constant(image: sitk.Image) -> None:
    stats = sitk.StatisticsImageFilter()
    stats.Execute(image)
    if not np.isfinite(stats.GetSum()) or stats.GetMinimum() == stats.GetMaximum():
        raise InputError("The volume is empty or constant: give a head CT or MR volume.")


def _cast_like(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        rounded = np.rint(values)  # one temporary, clipped in place (a 1 mm head's ROI is ~50 MB of float32)
        return np.clip(rounded, info.min, info.max, out=rounded).astype(dtype)
    return values.astype(dtype)


def _fraction_unchanged(changed: np.ndarray, mask: np.ndarray) -> float:
    outside = mask == 0
    n = int(outside.sum())
    return 1.0 if n == 0 else float((~changed & outside).sum()) / n


def _roi_of(score: sitk.Image, templates_to_subject: Sequence[sitk.Transform],
            image: sitk.Image) -> tuple[list[int], list[int] | None]:
    """Index box of the subject grid that holds the identity region warped by each of the transforms
    (None if out of view)."""
    arr = sitk.GetArrayViewFromImage(score)
    nz = np.nonzero(arr > 0)
    if nz[0].size == 0:
        return [0, 0, 0], None
    lo = [int(v.min()) for v in nz[::-1]]
    hi = [int(v.max()) for v in nz[::-1]]
    corners = [
        transform.TransformPoint(score.TransformIndexToPhysicalPoint([c[0], c[1], c[2]]))
        for transform in templates_to_subject
        for c in np.array(np.meshgrid(*zip(lo, hi, strict=True), indexing="ij")).reshape(3, -1).T.tolist()
    ]
    cont = np.array([image.TransformPhysicalPointToContinuousIndex(p) for p in corners])
    margin = [int(np.ceil(idm.ATLAS_SPACING * 2 / s)) for s in image.GetSpacing()]
    start = np.maximum(np.floor(cont.min(axis=0)).astype(int) - margin, 0)
    stop = np.minimum(np.ceil(cont.max(axis=0)).astype(int) + margin + 1, image.GetSize())
    if np.any(stop <= start):
        return [0, 0, 0], None
    return start.tolist(), (stop - start).tolist()


def _roi_slices(index: list[int], size: list[int]) -> tuple[slice, slice, slice]:
    """numpy (z, y, x) slices of an ITK (x, y, z) index box."""
    return tuple(slice(i, i + n) for i, n in zip(index[::-1], size[::-1], strict=True))


def _head_in_roi(roi: sitk.Image, threshold: float, head_coarse: sitk.Image) -> np.ndarray:
    """Full-resolution head mask inside the ROI: above threshold and near the coarse head mask."""
    near = sitk.BinaryDilate(head_coarse, [2, 2, 2])
    near_roi = sitk.GetArrayFromImage(sitk.Resample(near, roi, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    above = sitk.GetArrayViewFromImage(roi) >= threshold
    return idm.fill_holes(above & (near_roi > 0))
