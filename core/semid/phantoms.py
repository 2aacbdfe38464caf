"""Synthetic heads for tests and the benchmark: ``ct_from_mr`` and the phantom population (DESIGN.md §5).

``ct_from_mr`` makes a CT-like volume in Hounsfield units from a T1w MR head by intensity class.

``Population(n_subjects, seed)`` is the benchmark's population, generated on the fly and never stored:

- a *subject* is a base head (the real T1w head; optionally the average head) deformed by a smooth
  random field of face shape modes (nose, chin, jaw, cheeks, eyes, brows, lips; face width, lower-face
  length, midface) plus a smooth random field, scaled by ``IDENTITY_SCALE``, confined to the identity
  region of the atlas fitted to the base: it fades to exactly zero
  ``FADE_MM`` outside that region, so the brain and the rest of the skull carry no identity;
- a *visit* adds a rigid pose, lesions (1-2 in the brain, 1 in the face region: sinus, orbit or facial
  soft tissue), an optional slice thickness, and for MR an intensity scale, a bias field and Rician
  noise (CT: tissue classes mapped to HU and Gaussian noise). MR and CT of one visit share pose,
  lesions and labels.

Labels (``LABELS``) are known by construction: they are warped by the same transforms as the image
(nearest neighbour). The base's atlas fit takes a few seconds once per process; a subject then takes
about a second and a visit well under one on the 2 mm base.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from semid import identity as idm
from semid.average_head import AVERAGE_HEAD
from semid.average_head import VERSION as AVERAGE_HEAD_VERSION
from semid.io import MODALITY_KEY


def ct_from_mr(mr: sitk.Image, seed: int = 0) -> sitk.Image:
    """A CT-like int16 head (HU) with the MR head's geometry, by tissue class (``_hu_from_tissue``, as the
    phantom population's CT): brain 8-38 HU, soft tissue 30-45 HU, fat -90 HU, bone 850 HU, air -1000 HU.

    The brain is the one ``semid.brain`` finds in the MR; the head is closed (``SKULL_CLOSING_MM``) and its
    holes filled, so the skull, dark in T1w and open to the air through the sinuses and ear canals, is
    inside it and becomes bone.
    """
    from scipy import ndimage

    from semid.brain import mr_brain

    rng = np.random.default_rng(seed)
    arr = sitk.GetArrayFromImage(mr).astype(np.float32)
    tissue = sitk.GetArrayFromImage(idm.head_mask(mr, idm.head_threshold(mr, "MR"), fill=False)) > 0
    radius = [max(1, int(round(SKULL_CLOSING_MM / s))) for s in mr.GetSpacing()[::-1]]
    ball = np.ones([2 * r + 1 for r in radius], bool)
    inside = idm.fill_holes(ndimage.binary_closing(np.pad(tissue, [(r, r) for r in radius]), ball)[
        tuple(slice(r, -r) for r in radius)] | tissue)
    found = mr_brain(mr)
    brain = found.on(mr) & inside
    labels = np.where(brain, BRAIN, np.where(inside, HEAD, BACKGROUND)).astype(np.uint8)
    head_img = sitk.GetImageFromArray(inside.astype(np.uint8))
    head_img.CopyInformation(mr)
    depth = -sitk.GetArrayFromImage(idm._signed_distance(head_img))
    hu = _hu_from_tissue(arr, labels, depth, float(np.median(arr[brain])) if brain.any() else 1.0,
                         float(np.median(arr[inside & ~brain])) if (inside & ~brain).any() else 1.0)
    # the vault: T1w shows its tables dark but its marrow bright, and at 2 mm the dark band breaks up;
    # a shell of SKULL_MM around the brain, under the scalp, is bone whatever its T1w value
    vault = found.on(mr, SKULL_MM[1]) & ~found.on(mr, SKULL_MM[0]) & inside & (depth > 2.0)
    hu[vault] = 850.0
    hu += rng.normal(0.0, 8.0, size=hu.shape).astype(np.float32)
    ct = sitk.GetImageFromArray(np.clip(np.rint(hu), -1024, 3071).astype(np.int16))
    ct.CopyInformation(mr)
    ct.SetMetaData(MODALITY_KEY, "CT")
    return ct


#: The skull vault ``ct_from_mr`` draws: from this far outside the brain's surface (CSF and meninges) to
#: this far (mm).
SKULL_MM = (2.0, 8.0)
#: Closing (mm) that seals a T1w head's openings (nostrils, ear canals, the sinuses' ostia) before its
#: skull is taken to be inside it (``ct_from_mr``).
SKULL_CLOSING_MM = 6.0


# ------------------------------------------------------------------------------------ phantom population

#: Label map of every phantom volume (uint8). Tissue labels come from the base head's atlas fit and
#: follow the subject's deformation and the visit's pose; lesion labels overwrite the tissue they sit in.
LABELS: dict[int, str] = {
    0: "background (air)",
    1: "brain",
    2: "other head tissue (skin, fat, muscle, bone)",
    3: "identity region (face soft tissue, nose, lips, eyes, ears: the atlas region warped to the subject)",
    4: "brain lesion",
    5: "face-region lesion (sinus, orbit, facial soft tissue)",
}
BACKGROUND, BRAIN, HEAD, IDENTITY, BRAIN_LESION, FACE_LESION = range(6)

#: Base heads: name -> (data file, grid spacing in mm or None to keep the file's grid).
BASES: dict[str, tuple[str, float | None]] = {
    "small": ("samples/t1w_small.nii.gz", None),  # the real T1w head at 2 mm (default, fast)
    "full": ("heads/t1w_real.nii.gz", None),  # the real T1w head at 1 mm (~8x slower)
    "mean": ("templates/mean_head.nii.gz", 2.0),  # pydeface's average head, resampled to 2 mm
    "average": (AVERAGE_HEAD, None),  # the population average of two average heads (semid.average_head)
}
#: The base of SemID's default face and of its synthetic identities: a population average, nobody's head.
DEFAULT_FACE_BASE = "average"
#: Identity deformation: largest displacement (mm), and the distance (mm) outside the identity region
#: over which it fades to exactly zero. The atlas keeps the region 8 mm from the brain, so a 6 mm fade
#: leaves the brain untouched.
MAX_DISPLACEMENT_MM = 8.0
FADE_MM = 6.0
#: Identity prior strength: multiplies every shape-mode amplitude, the random field and the cap
#: (so the largest displacement is IDENTITY_SCALE * MAX_DISPLACEMENT_MM). Tuned so that the
#: benchmark's population is re-identifiable at p = 0 (issue 4's validity check), with attacker A1 on
#: denoised renders: local modes only, rank-1 was 0.38-0.5 on 8 subjects at 1.0, 0.75-0.88 at 2.0 and
#: 0.6-0.9 on the 10 subjects of seed 2026 at 3.0; with the broad modes (face width, lower-face length,
#: midface) at 3.0 it was 1.0 (README, "Phantom population").
IDENTITY_SCALE = 3.0
#: Amplitude (mm) and correlation scale (mm) of the unstructured part of the identity field.
RANDOM_FIELD_MM, RANDOM_FIELD_SCALE_MM = 3.0, 10.0
#: Grid (mm) on which the smooth identity field is built before it is interpolated to the base grid.
FIELD_SPACING_MM = 4.0
#: Visit pose ranges: rotation (degrees, each axis) and translation (mm, each axis).
POSE_DEG, POSE_MM = 4.0, 4.0
MODALITIES = ("MR", "CT")

# LPS world axes; both bases are stored close to RAS-aligned, so these are the anatomical axes.
_ANTERIOR = np.array([0.0, -1.0, 0.0])
_LEFT = np.array([1.0, 0.0, 0.0])
_SUPERIOR = np.array([0.0, 0.0, 1.0])


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _image_like(arr: np.ndarray, reference: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(reference)
    return img


@dataclass(frozen=True)
class _Base:
    """A base head prepared once per process: image, labels, fade weight, landmarks (all on its grid)."""

    name: str
    image: sitk.Image  # float32 MR intensities
    labels: np.ndarray  # (z, y, x) uint8, labels 0-3
    weight: np.ndarray  # (z, y, x) float32 in [0, 1]: where the identity field may act
    coarse: sitk.Image  # FIELD_SPACING_MM reference grid for the smooth field
    landmarks: dict[str, np.ndarray]  # name -> LPS point (mm)
    centre: np.ndarray  # LPS centroid of the head (mm), the centre of the visit's rotation
    brain_median: float
    head_median: float


def _surface_point(pts: np.ndarray, x: float, z: float, depth: float, tol: float = 4.0) -> np.ndarray:
    """The most anterior head point near (x, z) (LPS mm), moved ``depth`` mm posterior (under the skin)."""
    near = pts[(np.abs(pts[:, 0] - x) < tol) & (np.abs(pts[:, 2] - z) < tol)]
    if len(near) == 0:
        near = pts[np.argsort(np.hypot(pts[:, 0] - x, pts[:, 2] - z))[:50]]
    tip = near[np.argmin(near[:, 1])]
    return tip - depth * _ANTERIOR


@functools.lru_cache(maxsize=4)
def _load_base(name: str) -> _Base:
    """Read a base head and fit the identity atlas to it (a few seconds, once per process)."""
    from semid.data import data_file

    if name not in BASES:
        raise ValueError(f"unknown base {name!r}: use one of {sorted(BASES)}")
    path, spacing = BASES[name]
    image = sitk.ReadImage(str(data_file(path)), sitk.sitkFloat32)
    if spacing is not None:
        image = idm._downsample(image, spacing)
    head = idm.head_mask(image, idm.head_threshold(image, "MR"))
    atlas = idm.load_atlas(None)
    head_2mm = head if min(image.GetSpacing()) >= 1.9 else idm._downsample(head, 2.0, sitk.sitkNearestNeighbor)
    fit = idm.fit_head_shape(atlas.head, head_2mm, atlas.features)
    to_atlas = fit.transform.GetInverse()
    score = sitk.Resample(atlas.score, image, to_atlas, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    brain_img = sitk.Resample(atlas.brain, image, to_atlas, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    inside = sitk.GetArrayFromImage(head) > 0
    brain = (sitk.GetArrayFromImage(brain_img) > 0) & inside
    region_all = (sitk.GetArrayFromImage(score) > 0.02) & ~brain  # includes the air margin before the face
    labels = np.zeros(inside.shape, np.uint8)
    labels[inside] = HEAD
    labels[brain] = BRAIN
    labels[region_all & inside] = IDENTITY

    # Fade weight: 1 in the identity region (air margin included, so a longer nose has room), falling
    # smoothly to exactly 0 at FADE_MM outside it, and forced to 0 (smoothly) at the brain's surface so
    # the brain carries no identity of its own even where the atlas margin is thin.
    out_dist = sitk.GetArrayFromImage(idm._signed_distance(_image_like(region_all.astype(np.uint8), image)))
    brain_dist = sitk.GetArrayFromImage(idm._signed_distance(_image_like(brain.astype(np.uint8), image)))
    weight = _smoothstep(1.0 - np.maximum(out_dist, 0.0) / FADE_MM) * _smoothstep(brain_dist / 4.0)

    arr = sitk.GetArrayViewFromImage(image)
    pts_img = image if min(image.GetSpacing()) >= 1.9 else idm._downsample(image, 2.0)
    lab_small = labels if pts_img is image else sitk.GetArrayFromImage(
        sitk.Resample(_image_like(labels, image), pts_img, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    points = idm._physical_points(pts_img)
    head_pts = points[lab_small > 0]
    face_pts = points[lab_small == IDENTITY]
    mid = float(np.median(head_pts[:, 0]))
    midline = face_pts[np.abs(face_pts[:, 0] - mid) < 5.0]
    nose = midline[np.argmin(midline[:, 1])]
    nz = float(nose[2])
    band = midline[(midline[:, 2] < nz - 35.0) & (midline[:, 2] > nz - 80.0)]
    chin = band[np.argmin(band[:, 1])] if len(band) else nose - 55.0 * _SUPERIOR
    landmarks = {"nose": nose, "chin": chin, "midline": np.array([mid, 0.0, 0.0]),
                 "lips": _surface_point(head_pts, mid, nz - 25.0, 3.0)}
    for side, sign in (("left", 1.0), ("right", -1.0)):
        landmarks[f"eye_{side}"] = _surface_point(head_pts, mid + sign * 32.0, nz + 35.0, 12.0)
        landmarks[f"cheek_{side}"] = _surface_point(head_pts, mid + sign * 45.0, nz + 5.0, 6.0)
        landmarks[f"jaw_{side}"] = _surface_point(head_pts, mid + sign * 48.0, nz - 45.0, 10.0)
        landmarks[f"brow_{side}"] = _surface_point(head_pts, mid + sign * 25.0, nz + 50.0, 3.0)
    centre = head_pts.mean(axis=0)
    return _Base(name, image, labels, weight.astype(np.float32), idm._downsample(image, FIELD_SPACING_MM),
                 landmarks, centre, float(np.median(arr[brain])), float(np.median(arr[inside])))


def _bump(points: np.ndarray, centre: np.ndarray, sigma: float) -> np.ndarray:
    d2 = np.sum((points - centre) ** 2, axis=-1)
    return np.exp(-d2 / (2.0 * sigma**2))[..., None]


#: Shape modes of the identity prior and their amplitude ranges (mm, before IDENTITY_SCALE), in the
#: order of an identity code (``shape_code``). The last three are broad modes (face width, lower-face
#: length, midface protrusion): the proportions a face recogniser keys on, which local bumps hardly change.
SHAPE_MODES: dict[str, float] = {
    "nose_length": 5, "nose_width": 4, "chin_forward": 6, "chin_down": 5, "eye_spacing": 4, "eye_depth": 3,
    "cheek_width": 5, "cheek_forward": 3, "jaw_width": 5, "brow": 3, "lips": 3,
    "face_width": 4, "face_length": 4, "midface": 3,
}


def draw_shape(rng: np.random.Generator, scale: float = IDENTITY_SCALE) -> dict[str, float]:
    """Shape-mode amplitudes (mm) of one face drawn from the identity prior (uniform in each range)."""
    return {k: scale * float(rng.uniform(-r, r)) for k, r in SHAPE_MODES.items()}


def shape_code(shape: dict[str, float], scale: float = IDENTITY_SCALE) -> np.ndarray:
    """A face's identity code: its shape-mode amplitudes divided by their ranges, each in [-1, 1]."""
    return np.array([shape[k] / (scale * r) for k, r in SHAPE_MODES.items()], np.float32)


def _identity_field(base: _Base, rng: np.random.Generator, scale: float = 1.0,
                    shape: dict[str, float] | None = None) -> tuple[np.ndarray, dict[str, float]]:
    """A subject's identity displacement field (mm) on the base grid, shape (z, y, x, 3), LPS.

    The field is the sum of anatomical shape modes (nose length and width, chin, jaw and cheek width,
    eye spacing and depth, brow and lip protrusion; Gaussian bumps of random amplitude at landmarks
    found on the base) and a smooth random field, built on a coarse grid, interpolated to the base grid,
    capped at MAX_DISPLACEMENT_MM and multiplied by the base's fade weight (exactly 0 in the brain), and
    never draws the brain out into the face (``_not_from_the_brain``).
    With ``shape`` (amplitudes in mm, as ``draw_shape`` returns), those modes are used and there is no
    random field: the face is a function of its code.
    """
    pts = idm._physical_points(base.coarse)
    lm = base.landmarks
    mid = lm["midline"][0]
    lateral = np.sign(pts[..., 0:1] - mid) * _LEFT  # outward, on either side of the midline
    if shape is None:
        # drawn one by one in this order, so the populations of earlier versions stay the same people
        p = {k: scale * rng.uniform(-r, r) for k, r in SHAPE_MODES.items()}
    else:
        p = dict(shape)
    u = p["nose_length"] * _ANTERIOR * _bump(pts, lm["nose"], 12.0)
    # nose width: derivative-of-Gaussian across the midline, so the two sides move apart smoothly
    u = u + p["nose_width"] * ((pts[..., 0:1] - mid) / 10.0) * _LEFT * _bump(pts, lm["nose"] - 8 * _ANTERIOR, 10.0)
    u = u + (p["chin_forward"] * _ANTERIOR + p["chin_down"] * _SUPERIOR) * _bump(pts, lm["chin"], 16.0)
    u = u + p["lips"] * _ANTERIOR * _bump(pts, lm["lips"], 10.0)
    for side in ("left", "right"):
        u = u + (p["eye_spacing"] * lateral + p["eye_depth"] * _ANTERIOR) * _bump(pts, lm[f"eye_{side}"], 10.0)
        u = u + (p["cheek_width"] * lateral + p["cheek_forward"] * _ANTERIOR) * _bump(pts, lm[f"cheek_{side}"], 16.0)
        u = u + p["jaw_width"] * lateral * _bump(pts, lm[f"jaw_{side}"], 16.0)
        u = u + p["brow"] * _ANTERIOR * _bump(pts, lm[f"brow_{side}"], 12.0)
    face_centre = 0.5 * (lm["nose"] + lm["chin"])
    u = u + p["face_width"] * ((pts[..., 0:1] - mid) / 40.0) * _LEFT * _bump(pts, face_centre, 35.0)
    u = u + p["face_length"] * ((pts[..., 2:3] - lm["nose"][2]) / 40.0) * _SUPERIOR * _bump(pts, lm["chin"], 30.0)
    u = u + p["midface"] * _ANTERIOR * _bump(pts, lm["nose"] - 20.0 * _ANTERIOR, 25.0)
    if shape is None:
        noise = rng.standard_normal((3, *pts.shape[:3])).astype(np.float32)
        for k in range(3):
            smooth = sitk.SmoothingRecursiveGaussian(_image_like(noise[k], base.coarse), RANDOM_FIELD_SCALE_MM)
            noise[k] = sitk.GetArrayFromImage(smooth)
        noise *= scale * RANDOM_FIELD_MM / max(float(np.abs(noise).max()), 1e-6)
        u = u + np.moveaxis(noise, 0, -1)
    # interpolate each component to the base grid (the field is smooth at 4 mm), then confine it
    full = np.stack([sitk.GetArrayFromImage(sitk.Resample(_image_like(u[..., k].astype(np.float32), base.coarse),
                                                          base.image, sitk.Transform(), sitk.sitkLinear, 0.0))
                     for k in range(3)], axis=-1)
    norm = np.linalg.norm(full, axis=-1, keepdims=True)
    full *= np.minimum(1.0, scale * MAX_DISPLACEMENT_MM / np.maximum(norm, 1e-6))
    full *= base.weight[..., None]
    return _not_from_the_brain(base, full).astype(np.float32), {k: round(float(v), 3) for k, v in p.items()}


#: The least Jacobian determinant a face that SemID shows may have (``face_subject``, ``_unfolded``): below
#: it the identity field squeezes tissue to under a third of its volume, at 0 it folds tissue over itself.
MIN_JACOBIAN = 0.3
#: Width (mm, Gaussian sigma) of the window in which ``_unfolded`` relaxes a fold. Narrower windows make
#: new folds at their own edges, where the relaxed displacements fall off steeply (4 mm did not converge
#: on the default face in 12 rounds; 10 mm took 6 and moved 17 thousand of its 1.7 million voxels).
UNFOLD_WINDOW_MM = 10.0


def _jacobian(base: _Base, field: np.ndarray) -> np.ndarray:
    """The Jacobian determinant (z, y, x) of the map from point ``x`` to ``x + field[x]`` on the base grid."""
    field_img = sitk.GetImageFromArray(field.astype(np.float64), isVector=True)
    field_img.CopyInformation(base.image)
    return sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field_img))


def _unfolded(base: _Base, field: np.ndarray, rounds: int = 20) -> np.ndarray:
    """``field`` (z, y, x, 3) with its displacements relaxed where it folds, until its Jacobian determinant
    is at least ``MIN_JACOBIAN`` everywhere (or ``rounds`` are spent).

    Strong shape modes can fold tissue: the default face's receding chin pulled the lower lip over itself,
    a torn ring on every face SemID showed. Each round halves the displacements under a smooth window
    (``UNFOLD_WINDOW_MM``) around the folded voxels, so the face changes only near its folds; the brain
    guard (``_not_from_the_brain``) is applied again at the end.
    """
    out = field.astype(np.float32, copy=True)
    for _ in range(rounds):
        bad = _jacobian(base, out) < MIN_JACOBIAN
        if not bad.any():
            break
        window = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(
            _image_like(bad.astype(np.float32), base.image), UNFOLD_WINDOW_MM))
        window = np.maximum(window / max(float(window.max()), 1e-6), bad)
        out *= (1.0 - 0.5 * window)[..., None]
    return _not_from_the_brain(base, out)


def least_jacobian(subject: Subject) -> float:
    """The smallest Jacobian determinant of ``subject``'s identity map over its head: 1 where the face is
    not deformed, below 1 where it is squeezed, 0 or less where the field folds tissue over itself."""
    return float(_jacobian(subject.base, subject.displacement)[subject.anatomy_labels > 0].min())


def _not_from_the_brain(base: _Base, field: np.ndarray) -> np.ndarray:
    """``field`` (z, y, x, 3) shortened where a voxel outside the base's brain would show a point inside it.

    The fade weight makes the field 0 in the brain, but a strong face mode a few millimetres outside it
    can still reach in: the voxel then shows (and is labelled) brain, an island of brain in the face that
    no anatomy has (117 voxels of one benchmark subject, seed 2026's sub-013, up to 12 mm from the brain).
    Such a displacement is cut back in quarters until it lands outside the brain (at worst to 0: the
    voxel shows itself, and it is not brain). Every other voxel keeps its displacement exactly.
    """
    brain = base.labels == BRAIN
    idx = np.nonzero(np.any(field != 0.0, axis=-1) & ~brain)
    if idx[0].size == 0:
        return field
    origin, spacing = np.array(base.image.GetOrigin()), np.array(base.image.GetSpacing())
    direction = np.array(base.image.GetDirection()).reshape(3, 3)
    index_xyz = np.stack(idx[::-1], axis=-1).astype(np.float64)
    points = origin + (index_xyz * spacing) @ direction.T
    shift = field[idx].astype(np.float64)
    to_index = np.linalg.inv(direction).T / spacing  # (point - origin) @ to_index = continuous index (x, y, z)
    upper = np.array(brain.shape[::-1]) - 1
    factor = np.ones(len(shift))
    while True:
        # nearest neighbour, as the labels are resampled
        ijk = np.clip(np.rint((points + factor[:, None] * shift - origin) @ to_index), 0, upper).astype(int)
        bad = brain[ijk[:, 2], ijk[:, 1], ijk[:, 0]] & (factor > 0.0)
        if not bad.any():
            break
        factor[bad] = np.maximum(factor[bad] - 0.25, 0.0)
    out = field.copy()
    out[idx] = (factor[:, None] * shift).astype(field.dtype)
    return out


def _hu_from_tissue(mr: np.ndarray, labels: np.ndarray, head_depth: np.ndarray, brain_median: float,
                    head_median: float) -> np.ndarray:
    """CT (HU, float32) of an MR anatomy by tissue class: brain, soft tissue/fat, bone, air.

    T1w contrast is inverted for the brain (CSF dark -> ~8 HU, grey ~38 HU, white ~28 HU); bright fat
    maps to about -90 HU; the dark shell 2-25 mm under the skin outside the brain (skull, facial bones)
    to ~850 HU; everything outside the head to -1000 HU. Sinus air is dark in T1w too, so it becomes
    bone, not air (a known limitation of a T1w-derived CT).
    """
    hu = np.full(mr.shape, -1000.0, np.float32)
    brain = (labels == BRAIN) | (labels == BRAIN_LESION)
    other = (labels > 0) & ~brain
    t_brain = mr[brain] / (1.15 * brain_median)
    hu[brain] = np.interp(t_brain, [0.35, 0.6, 0.9], [8.0, 38.0, 28.0])
    t_head = mr[other] / head_median
    hu[other] = np.interp(t_head, [0.3, 0.8, 1.8], [30.0, 45.0, -90.0])
    # half the head median, not ct_from_mr's third: at 2 mm the thin skull is partial-volumed with its
    # neighbours and a third keeps too little of it
    bone = other & (mr < head_median / 2.0) & (head_depth > 2.0) & (head_depth < 25.0)
    hu[bone] = 850.0
    return hu


@dataclass
class Visit:
    """One acquisition of a phantom subject.

    Attributes:
        image: int16 volume on the base head's grid (MR: arbitrary units; CT: Hounsfield units), with
            the modality in its metadata (``semid.io.MODALITY_KEY``).
        labels: uint8 label map on the same grid, values as in ``LABELS``.
        subject_id, visit_id: ``"sub-003"``, ``"ses-01"`` style identifiers.
        modality: "MR" or "CT".
        pose: rigid transform mapping this visit's grid points to subject-space points (what the
            resampling used); its inverse undoes the visit's head position.
        lesions: one dict per lesion (label, kind, centre in LPS mm, radii in mm).
        slice_thickness_mm: simulated slice thickness (mm) and ``slice_axis`` (index axis x=0, y=1, z=2),
            or None when the visit keeps the base resolution.
    """

    image: sitk.Image
    labels: sitk.Image
    subject_id: str
    visit_id: str
    modality: str
    pose: sitk.Euler3DTransform
    lesions: list[dict] = field(default_factory=list)
    slice_thickness_mm: float | None = None
    slice_axis: int | None = None


class Subject:
    """A phantom person: a base head with its own face (a smooth deformation confined to the face).

    Attributes:
        index: position in the population; ``subject_id`` its identifier.
        displacement: (z, y, x, 3) float32 identity displacement field in mm (LPS), on the base grid:
            subject point ``x`` shows base point ``x + displacement[x]``; exactly 0 in the brain.
        shape: the drawn shape-mode amplitudes in mm (nose_length, chin_forward, ...).
        anatomy: float32 MR image of the subject without any visit effect (no pose, lesion, noise).
        anatomy_labels: (z, y, x) uint8 labels 0-3 of ``anatomy``.
    """

    def __init__(self, base: _Base, index: int, seed: int, identity_scale: float = 1.0,
                 shape: dict[str, float] | None = None, unfold: bool = False) -> None:
        self.base = base
        self.index = index
        self.seed = seed
        self.subject_id = f"sub-{index:03d}"
        rng = np.random.default_rng([seed, index, 0])
        self.displacement, self.shape = _identity_field(base, rng, identity_scale, shape)
        if unfold:
            self.displacement = _unfolded(base, self.displacement)
        field_img = sitk.GetImageFromArray(self.displacement.astype(np.float64), isVector=True)
        field_img.CopyInformation(base.image)
        warp = sitk.DisplacementFieldTransform(field_img)
        self.anatomy = sitk.Resample(base.image, base.image, warp, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        labels = sitk.Resample(_image_like(base.labels, base.image), base.image, warp, sitk.sitkNearestNeighbor, 0)
        self.anatomy_labels = sitk.GetArrayFromImage(labels)
        self._mr = sitk.GetArrayFromImage(self.anatomy)
        self._ct: np.ndarray | None = None
        brain = (self.anatomy_labels == BRAIN).astype(np.uint8)
        self._brain_depth = -sitk.GetArrayFromImage(idm._signed_distance(_image_like(brain, base.image)))
        head = (self.anatomy_labels > 0).astype(np.uint8)
        self._head_depth = -sitk.GetArrayFromImage(idm._signed_distance(_image_like(head, base.image)))

    def _ct_anatomy(self) -> np.ndarray:
        if self._ct is None:
            self._ct = _hu_from_tissue(self._mr, self.anatomy_labels, self._head_depth, self.base.brain_median,
                                       self.base.head_median)
        return self._ct

    # ------------------------------------------------------------------------------------------ lesions

    def _ellipsoid(self, rng: np.random.Generator, centre_index: np.ndarray, radii_mm: np.ndarray
                   ) -> tuple[tuple[slice, ...], np.ndarray]:
        """Soft ellipsoid (alpha in [0, 1], (z, y, x) sub-block) of random orientation around a voxel."""
        spacing = np.array(self.base.image.GetSpacing())[::-1]  # (z, y, x)
        half = np.ceil(1.2 * radii_mm.max() / spacing).astype(int) + 1
        lo = np.maximum(centre_index - half, 0)
        hi = np.minimum(centre_index + half + 1, self._mr.shape)
        sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        grid = np.stack(np.meshgrid(*[(np.arange(a, b) - c) * s for a, b, c, s in
                                      zip(lo, hi, centre_index, spacing, strict=True)], indexing="ij"), axis=-1)
        rot, _ = np.linalg.qr(rng.standard_normal((3, 3)))
        r = np.sqrt(np.sum(((grid @ rot) / radii_mm) ** 2, axis=-1))
        # alpha is 1 inside the ellipsoid and ramps to 0 over 20% of its radius: a lesion edge, not a step
        return sl, np.clip((1.2 - r) / 0.2, 0.0, 1.0).astype(np.float32)

    def _draw_lesions(self, rng: np.random.Generator) -> list[tuple[tuple[slice, ...], np.ndarray, dict]]:
        lesions = []
        labels = self.anatomy_labels
        spacing = np.array(self.base.image.GetSpacing())[::-1]
        deep_brain = np.argwhere((labels == BRAIN) & (self._brain_depth > 10.0))
        for _ in range(int(rng.integers(1, 3))):
            centre = deep_brain[rng.integers(len(deep_brain))]
            radii = rng.uniform(4.0, 9.0, size=3)
            sl, alpha = self._ellipsoid(rng, centre, radii)
            kind = str(rng.choice(["hypointense", "hyperintense"]))
            lesions.append((sl, alpha, {"label": BRAIN_LESION, "kind": kind, "radii_mm": radii.round(2).tolist(),
                                        "centre_index_zyx": centre.tolist()}))
        face = labels == IDENTITY
        dark = self._mr < self.base.head_median / 3.0
        eye_idx = [np.array(self.base.image.TransformPhysicalPointToIndex(
            self.base.landmarks[f"eye_{s}"].tolist()))[::-1] for s in ("left", "right")]
        zyx = np.indices(labels.shape, sparse=True)
        near_eye = np.zeros(labels.shape, bool)
        for e in eye_idx:
            near_eye |= sum(((g - c) * s) ** 2 for g, c, s in zip(zyx, e, spacing, strict=True)) < 10.0**2
        candidates = {"sinus": face & dark & (self._head_depth > 12.0), "orbit": face & near_eye,
                      "facial soft tissue": face & ~dark & (self._head_depth > 4.0) & (self._head_depth < 15.0)
                      & (self._mr < self.base.brain_median)}  # muscle and skin, not fat (see visit())
        kinds = [k for k, m in candidates.items() if m.sum() > 20]
        kind = str(rng.choice(kinds))
        where = np.argwhere(candidates[kind])
        centre = where[rng.integers(len(where))]
        radii = rng.uniform(7.0, 12.0, size=3)
        sl, alpha = self._ellipsoid(rng, centre, radii)
        lesions.append((sl, alpha, {"label": FACE_LESION, "kind": kind, "radii_mm": radii.round(2).tolist(),
                                    "centre_index_zyx": centre.tolist()}))
        return lesions

    # ------------------------------------------------------------------------------------------- visits

    def visit(self, j: int, modality: str = "MR", face: Subject | None = None) -> Visit:
        """Visit ``j`` of this subject as MR or CT (same pose, lesions and labels for both).

        Args:
            j: visit number (>= 0); any number of visits is defined.
            modality: "MR" (T1w-like, arbitrary units) or "CT" (Hounsfield units).
            face: render the same visit (pose, lesions, acquisition) on another subject's face, e.g.
                ``face_subject(code)``: what a de-identifier should ideally output. Lesions stay where
                they are in this subject's visit, with the same appearance; everything outside the
                identity region's fade margin is identical to the plain visit.

        Returns:
            A ``Visit``: int16 image and uint8 labels on the base grid (e.g. 104 x 128 x 128 voxels of
            2 mm for the "small" base), with pose, lesion and acquisition details.
        """
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, not {modality!r}")
        if j < 0:
            raise ValueError("visit numbers start at 0")
        geo = np.random.default_rng([self.seed, self.index, j + 1, 1])
        # pose: a few degrees and millimetres about the head's centre; maps visit points to subject points
        pose = sitk.Euler3DTransform()
        pose.SetCenter(self.base.centre.tolist())
        pose.SetRotation(*np.deg2rad(geo.uniform(-POSE_DEG, POSE_DEG, 3)).tolist())
        pose.SetTranslation(geo.uniform(-POSE_MM, POSE_MM, 3).tolist())
        thickness = float(geo.choice([3.0, 4.0, 5.0])) if geo.random() < 0.5 else None
        axis = int(geo.integers(3))
        lesion_draws = self._draw_lesions(geo)

        canvas = self if face is None else face
        anatomy = (canvas._mr if modality == "MR" else canvas._ct_anatomy()).copy()
        labels = canvas.anatomy_labels.copy()
        # lesions are placed by this subject's tissue (and by the lesions painted before them)
        own_labels = labels if face is None else self.anatomy_labels.copy()
        look = np.random.default_rng([self.seed, self.index, j + 1, 2])  # lesion appearance, both modalities
        records = []
        for sl, alpha, info in lesion_draws:
            tissue = BRAIN if info["label"] == BRAIN_LESION else IDENTITY
            inside = own_labels[sl] == tissue
            a = alpha * inside  # a lesion never leaves its tissue: its label and its intensity agree
            if info["label"] == BRAIN_LESION:
                hypo = info["kind"] == "hypointense"
                target = (self.base.brain_median * look.uniform(0.4, 0.55) if hypo else
                          self.base.brain_median * look.uniform(1.45, 1.7)) if modality == "MR" else (
                    look.uniform(10, 16) if hypo else look.uniform(62, 75))
            else:
                # a face lesion stands out from the tissue it sits in (MR): dark in bright fat or orbit,
                # bright in muscle, sinus or skin; one fixed brightness was invisible in fat
                around = np.median(self._mr[sl][(alpha > 0) & inside]) if a.any() else 0.0
                if modality == "MR":
                    target = self.base.brain_median * (look.uniform(0.25, 0.4) if around > self.base.brain_median
                                                       else look.uniform(1.6, 1.9))
                else:
                    target = look.uniform(45, 65)
            anatomy[sl] = anatomy[sl] * (1.0 - a) + a * target
            labels[sl][(alpha >= 1.0) & inside] = info["label"]
            own_labels[sl][(alpha >= 1.0) & inside] = info["label"]
            centre_lps = self.base.image.TransformIndexToPhysicalPoint([int(v) for v in info["centre_index_zyx"][::-1]])
            records.append({**info, "centre_lps_mm": [round(c, 2) for c in centre_lps],
                            "volume_ml": round(float(((alpha >= 1.0) & inside).sum()) * float(
                                np.prod(self.base.image.GetSpacing())) / 1000.0, 3)})

        ref = self.base.image
        background = 0.0 if modality == "MR" else -1000.0
        img = sitk.Resample(_image_like(anatomy, ref), ref, pose, sitk.sitkLinear, background, sitk.sitkFloat32)
        lab = sitk.Resample(_image_like(labels, ref), ref, pose, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        if thickness is not None:
            # thick slices: a Gaussian along one axis whose FWHM makes up the missing thickness
            spacing = ref.GetSpacing()[axis]
            sigma = np.sqrt(max(thickness**2 - spacing**2, 0.0)) / 2.3548
            img = sitk.RecursiveGaussian(img, float(sigma), False, sitk.RecursiveGaussianImageFilter.ZeroOrder, axis)
        arr = sitk.GetArrayFromImage(img)
        noise = np.random.default_rng([self.seed, self.index, j + 1, 3 + MODALITIES.index(modality)])
        if modality == "MR":
            shape = arr.shape
            coords = [np.linspace(-1.0, 1.0, n, dtype=np.float32).reshape([-1 if d == k else 1 for d in range(3)])
                      for k, n in enumerate(shape)]
            # smooth multiplicative bias: exp of a random quadratic polynomial, about +-20% over the head
            c = noise.uniform(-0.12, 0.12, 9)
            log_bias = (c[0] * coords[0] + c[1] * coords[1] + c[2] * coords[2] + c[3] * coords[0] * coords[1]
                        + c[4] * coords[0] * coords[2] + c[5] * coords[1] * coords[2]
                        + c[6] * coords[0] ** 2 + c[7] * coords[1] ** 2 + c[8] * coords[2] ** 2)
            arr = arr * np.exp(log_bias) * noise.uniform(0.8, 1.25)
            sigma = noise.uniform(0.01, 0.03) * self.base.brain_median
            # Rician noise: magnitude of a complex signal with Gaussian noise in both channels
            n1 = noise.standard_normal(shape, dtype=np.float32)
            n2 = noise.standard_normal(shape, dtype=np.float32)
            arr = np.sqrt((arr + sigma * n1) ** 2 + (sigma * n2) ** 2)
            out = np.clip(np.rint(arr), 0, 32767).astype(np.int16)
        else:
            arr = arr + noise.normal(0.0, noise.uniform(4.0, 10.0), arr.shape).astype(np.float32)
            out = np.clip(np.rint(arr), -1024, 3071).astype(np.int16)
        image = _image_like(out, ref)
        image.SetMetaData(MODALITY_KEY, modality)
        return Visit(image, lab, self.subject_id, f"ses-{j:02d}", modality, pose, records, thickness,
                     axis if thickness is not None else None)


class Population:
    """A deterministic phantom population (DESIGN.md §5): ``n_subjects`` faces on one base head.

    Everything is a function of ``(n_subjects, seed, base)`` and is generated on demand; nothing is
    written to disk. Subject ``i`` and visit ``j`` are the same whatever else was generated before.

    Args:
        n_subjects: number of subjects.
        seed: population seed.
        base: "small" (the real T1w head at 2 mm, default), "full" (the same at 1 mm, slower),
            "mean" (pydeface's average head at 2 mm) or "average" (SemID's population-average head, 2 mm).
        modalities: modalities that ``visits`` yields.

    Example:
        >>> pop = Population(8, seed=0)
        >>> v = pop.subject(3).visit(1, "CT")  # v.image: int16 HU, v.labels: uint8 (see LABELS)
    """

    def __init__(self, n_subjects: int, seed: int, base: str = "small",
                 modalities: tuple[str, ...] = MODALITIES, identity_scale: float = IDENTITY_SCALE) -> None:
        if n_subjects < 1:
            raise ValueError("a population needs at least one subject")
        if base not in BASES:
            raise ValueError(f"unknown base {base!r}: use one of {sorted(BASES)}")
        bad = [m for m in modalities if m not in MODALITIES]
        if bad:
            raise ValueError(f"unknown modalities {bad}: use {MODALITIES}")
        self.n_subjects, self.seed, self.base_name, self.modalities = n_subjects, seed, base, tuple(modalities)
        self.identity_scale = float(identity_scale)
        self._cache: OrderedDict[int, Subject] = OrderedDict()

    def __len__(self) -> int:
        return self.n_subjects

    def subject(self, i: int) -> Subject:
        """Subject ``i`` (0 <= i < n_subjects); the last few are kept in memory."""
        if not 0 <= i < self.n_subjects:
            raise IndexError(f"subject {i} outside 0..{self.n_subjects - 1}")
        if i not in self._cache:
            self._cache[i] = Subject(_load_base(self.base_name), i, self.seed, self.identity_scale)
            while len(self._cache) > 4:
                self._cache.popitem(last=False)
        self._cache.move_to_end(i)
        return self._cache[i]

    def __iter__(self) -> Iterator[Subject]:
        return (self.subject(i) for i in range(self.n_subjects))

    def visits(self, n_visits: int = 2) -> Iterator[Visit]:
        """Every subject's visits 0..n_visits-1 in every modality of the population, subject by subject."""
        for subject in self:
            for j in range(n_visits):
                for modality in self.modalities:
                    yield subject.visit(j, modality)


#: Seed of the identity code the generator draws SemID's default face with (``default_face_code``). The
#: code conditions the generator only; the face shown is the population-average head (``face_subject``
#: with no code), whose drawing the generator departs from only where a lesion is (``compensation``).
DEFAULT_FACE_SEED = 31337


def default_face_version() -> str:
    """What makes SemID's default face: files made from it (the generator's canvas) keep this, and are
    made again when it changes."""
    return (f"population-average head v{AVERAGE_HEAD_VERSION} (base {DEFAULT_FACE_BASE!r}), undeformed; "
            f"generator code seed {DEFAULT_FACE_SEED}")


def default_face_code(scale: float = IDENTITY_SCALE) -> np.ndarray:
    """The identity code (``shape_code``) the generator is given for SemID's default face."""
    return shape_code(draw_shape(np.random.default_rng(DEFAULT_FACE_SEED), scale), scale)


def face_subject(code: np.ndarray | None = None, base: str = DEFAULT_FACE_BASE,
                 scale: float = IDENTITY_SCALE) -> Subject:
    """A face on a base head, with no random field and unfolded (``_unfolded``): the canvas for
    ``Subject.visit(face=...)``.

    Args:
        code: an identity code (``shape_code`` values in [-1, 1]): the base deformed by those shape modes (a
            synthetic identity); None: the base itself, undeformed (SemID's default face: on the default
            base, the population average, nobody's face).
        base: a ``BASES`` name (default: the population-average head).
    """
    if code is None:
        code = np.zeros(len(SHAPE_MODES), np.float32)
    code = np.asarray(code, np.float32)
    if code.shape != (len(SHAPE_MODES),):
        raise ValueError(f"an identity code has {len(SHAPE_MODES)} values, not {code.shape}")
    shape = {k: float(c) * scale * r for c, (k, r) in zip(code, SHAPE_MODES.items(), strict=True)}
    subject = Subject(_load_base(base), 0, DEFAULT_FACE_SEED, scale, shape=shape, unfold=bool(np.any(code)))
    subject.subject_id = "face-" + "".join(f"{int(round(10 * float(c))):+d}" for c in code[:3])
    return subject
