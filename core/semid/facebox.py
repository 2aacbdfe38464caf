"""The face box: the atlas-space grid on which SemID's learned parts work, and their phantom samples.

Every head is brought into the identity atlas's frame by the affine fit that ``Deidentifier.locate``
already computes, so the learned networks (encoder, compensation generator) always see the face in
the same place and pose, at 2 mm, whatever the scanner's orientation and resolution. The box is the
atlas's identity region (face, ears, air margin) padded to ``BOX_SHAPE`` (divisible by 16 for a
4-level U-Net). Intensities are normalised per modality (``intensity_scale``): MR by the head's median,
CT by a fixed HU window; both map air to 0 and soft tissue to about 1.

``phantom_sample`` makes one training sample from a phantom visit: the box of the original, the box of
the same visit with another face (the ideal de-identified output: ``Subject.visit(face=...)``), labels,
and the identity codes; ``phantom_samples`` caches them on disk (training data is never committed).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from semid.errors import InputError

#: Box size (z, y, x) in voxels of ``BOX_SPACING`` mm, in the atlas frame.
BOX_SHAPE = (80, 96, 96)
BOX_SPACING = 2.0
#: Normalised intensities are clipped to [0, CLIP_MAX] (bright fat and bone stay below).
CLIP_MAX = 5.0


@functools.lru_cache(maxsize=2)
def box_reference(atlas_dir: str | None = None) -> sitk.Image:
    """The box grid: the atlas grid cropped (and padded) to ``BOX_SHAPE`` around its identity region."""
    from semid.identity import load_atlas

    atlas = load_atlas(Path(atlas_dir) if atlas_dir else None)
    score = sitk.GetArrayViewFromImage(atlas.score)
    nz = np.argwhere(score > 0)
    centre = (nz.min(axis=0) + nz.max(axis=0) + 1) / 2.0  # (z, y, x) index
    start_zyx = np.round(centre - np.array(BOX_SHAPE) / 2.0).astype(int)
    origin = atlas.score.TransformIndexToPhysicalPoint([int(v) for v in start_zyx[::-1]])
    ref = sitk.Image([int(v) for v in BOX_SHAPE[::-1]], sitk.sitkUInt8)
    ref.SetSpacing([BOX_SPACING] * 3)
    ref.SetOrigin(origin)
    ref.SetDirection(atlas.score.GetDirection())
    return ref


@functools.lru_cache(maxsize=2)
def box_atlas(atlas_dir: str | None = None) -> dict[str, np.ndarray]:
    """The atlas's blocking score (``Atlas.blocking_score``), identity region and brain on the box grid
    (z, y, x): the same for every head."""
    from semid.identity import load_atlas

    atlas = load_atlas(Path(atlas_dir) if atlas_dir else None)
    ref = box_reference(atlas_dir)
    score = sitk.GetArrayFromImage(sitk.Resample(atlas.blocking_score, ref, sitk.Transform(), sitk.sitkLinear, 0.0,
                                                 sitk.sitkFloat32))
    brain = sitk.GetArrayFromImage(sitk.Resample(atlas.brain, ref, sitk.Transform(), sitk.sitkNearestNeighbor,
                                                 0, sitk.sitkUInt8)) > 0
    return {"score": score, "region": (score > 0.02) & ~brain, "brain": brain}


@dataclass(frozen=True)
class IntensityScale:
    """``normalised = (raw - offset) / scale``: MR offset 0, scale = head median; CT offset -1000 HU, scale 1000."""

    offset: float
    scale: float

    def normalise(self, raw: np.ndarray) -> np.ndarray:
        return np.clip((np.asarray(raw, np.float32) - self.offset) / self.scale, 0.0, CLIP_MAX)

    def restore(self, normalised: np.ndarray) -> np.ndarray:
        raw = np.asarray(normalised, np.float32) * np.float32(self.scale)  # a new array: the add in place
        raw += np.float32(self.offset)
        return raw


def intensity_scale(image: sitk.Image, modality: str) -> IntensityScale:
    """How to normalise ``image``: CT by a fixed HU window; MR by the median of its bright voxels (those
    above 10 % of the 99.5th percentile: the head), so that scanner gain does not matter."""
    if modality == "CT":
        return IntensityScale(-1000.0, 1000.0)
    arr = sitk.GetArrayViewFromImage(image)
    sample = np.asarray(arr[::2, ::2, ::2], dtype=np.float32)
    high = float(np.percentile(sample, 99.5))
    fg = sample[sample > 0.1 * high]
    return IntensityScale(0.0, max(float(np.median(fg)), 1e-6) if fg.size and high > 0 else 1.0)


def to_box(image: sitk.Image, template_to_subject: sitk.Transform, interpolator: int = sitk.sitkLinear,
           default: float = 0.0, atlas_dir: str | None = None) -> np.ndarray:
    """``image`` resampled onto the box grid (z, y, x) through the atlas fit (template -> subject points)."""
    pixel = sitk.sitkUInt8 if interpolator == sitk.sitkNearestNeighbor else sitk.sitkFloat32
    out = sitk.Resample(image, box_reference(atlas_dir), template_to_subject, interpolator, default, pixel)
    return sitk.GetArrayFromImage(out)


def from_box(values: np.ndarray, reference: sitk.Image, subject_to_template: sitk.Transform,
             default: float = 0.0, atlas_dir: str | None = None) -> np.ndarray:
    """Box values (z, y, x) brought back onto ``reference``'s grid (e.g. the subject's ROI), linearly."""
    img = sitk.GetImageFromArray(np.asarray(values, np.float32))
    img.CopyInformation(box_reference(atlas_dir))
    return sitk.GetArrayFromImage(sitk.Resample(img, reference, subject_to_template, sitk.sitkLinear, default,
                                                sitk.sitkFloat32))


def rigid_part(template_to_subject: sitk.Transform) -> sitk.AffineTransform:
    """The pose of an affine fit: its matrix replaced by the nearest rotation (polar decomposition), same
    centre and translation, so the box centre lands where the fit puts it, with the atlas's size and
    proportions instead of the subject's."""
    affine = sitk.AffineTransform(template_to_subject)
    u, _, vt = np.linalg.svd(np.array(affine.GetMatrix()).reshape(3, 3))
    rot = u @ vt
    if np.linalg.det(rot) < 0:  # a mirrored fit keeps its reflection rather than flipping the face
        u[:, -1] *= -1
        rot = u @ vt
    out = sitk.AffineTransform(3)
    out.SetCenter(affine.GetCenter())
    out.SetMatrix(rot.ravel().tolist())
    out.SetTranslation(affine.GetTranslation())
    return out


#: Grid (mm) of the pose frame's displacement field; the field is smooth, 2 mm like the box.
FRAME_GRID_MM = 2.0


def pose_frame(reference: sitk.Image, template_to_subject: sitk.Transform, blocked: np.ndarray,
               head: np.ndarray, blend_mm: float) -> sitk.Transform:
    """Subject -> template points for drawing the box back onto ``reference`` (the subject's ROI) in the
    fit's *pose* rather than the fit itself, except where the drawing meets the subject's own tissue.

    The affine fit carries the subject's head proportions (width, height, depth of the face); a face
    drawn in the atlas frame and mapped back by it takes them on, and an adaptive attacker reads them
    (``benchmarks/generator_leak.py``: a fixed drawn face mapped by each fit is re-identified almost as
    well as the real fill). Here each point of ``B_p`` is mapped by a blend of the fit (weight 0) and
    its rotation-only part (``rigid_part``, weight 1), the weight growing from 0 at the head tissue
    outside ``B_p`` to 1 at ``blend_mm`` from it, so the drawn face joins the subject's cheeks, forehead
    and ears without a step and has the atlas's proportions inside. Outside ``B_p`` it is the fit.

    Args:
        reference: the ROI grid the values go to.
        template_to_subject: the atlas fit (``Location.fit.transform``).
        blocked, head: ``B_p`` and the head mask, boolean (z, y, x) on ``reference``.
        blend_mm: width of the band over which the frame turns from the fit into its pose.

    Returns:
        a displacement-field transform (on a ``FRAME_GRID_MM`` grid over ``reference``).
    """
    size = [max(2, int(np.ceil(n * s / FRAME_GRID_MM)) + 2) for n, s in
            zip(reference.GetSize(), reference.GetSpacing(), strict=True)]
    direction = np.array(reference.GetDirection()).reshape(3, 3)
    # one coarse voxel outside the reference on each side, so linear interpolation covers its edges
    origin = np.array(reference.GetOrigin()) - direction @ np.full(3, FRAME_GRID_MM)
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing([FRAME_GRID_MM] * 3)
    grid.SetOrigin(origin.tolist())
    grid.SetDirection(reference.GetDirection())

    def coarse(mask: np.ndarray) -> sitk.Image:
        img = sitk.GetImageFromArray(np.asarray(mask, np.uint8))
        img.CopyInformation(reference)
        return sitk.Resample(img, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)

    blocked_c = sitk.GetArrayFromImage(coarse(blocked)) > 0
    anchor = coarse(np.asarray(head, bool) & ~np.asarray(blocked, bool))
    if sitk.GetArrayViewFromImage(anchor).any():
        dist = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
            anchor, insideIsPositive=False, squaredDistance=False, useImageSpacing=True))
    else:  # no tissue outside B_p in view: nothing to join
        dist = np.full(blocked_c.shape, np.inf, np.float32)
    weight = np.where(blocked_c, np.clip(dist / blend_mm, 0.0, 1.0), 0.0)[..., None]

    index = np.stack(np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij"), axis=-1)[..., ::-1]
    points = origin + (index * FRAME_GRID_MM) @ direction.T  # (z, y, x, 3) world points of the grid

    def inverse_points(transform: sitk.AffineTransform) -> np.ndarray:
        matrix = np.array(transform.GetMatrix()).reshape(3, 3)
        centre, shift = np.array(transform.GetCenter()), np.array(transform.GetTranslation())
        return (points - centre - shift) @ np.linalg.inv(matrix).T + centre

    fit = sitk.AffineTransform(template_to_subject)
    target = (1.0 - weight) * inverse_points(fit) + weight * inverse_points(rigid_part(fit))
    field = sitk.GetImageFromArray((target - points).astype(np.float64), isVector=True)
    field.CopyInformation(grid)
    return sitk.DisplacementFieldTransform(field)


# ------------------------------------------------------------------------------------- phantom samples

#: Seed of the populations the learned parts train on (not the benchmark's 2026, not A2's 4242, not U1's 1).
TRAIN_SEED = 5
#: Version of the cached face-box samples, part of their folder's name: v2 brings the boxes in through
#: the atlas fit refined on the cranium (``identity.fit_atlas``), v1 (folder ``facebox``) through the
#: whole-head fit.
SAMPLES_VERSION = "v2"


def samples_folder() -> Path:
    """Default cache folder of the face-box samples: ``<data dir>/train/facebox-<SAMPLES_VERSION>``."""
    from semid.data import data_dir

    return data_dir() / "train" / f"facebox-{SAMPLES_VERSION}"


def phantom_sample(seed: int, subject: int, visit: int, modality: str = "MR", synthetic_seed: int = 0
                   ) -> dict[str, np.ndarray]:
    """One training sample on the box grid, from a phantom visit and the same visit on two other faces.

    Returns float16 normalised ``image`` (the original), ``target_default`` (the same visit on SemID's
    default face) and ``target_synthetic`` (on a face drawn from the identity prior with
    ``synthetic_seed``); uint8 ``labels`` and ``labels_default`` (``phantoms.LABELS``); float32 identity
    codes ``code_subject``, ``code_default``, ``code_synthetic``; ints ``subject``, ``visit``,
    ``modality`` (0 MR, 1 CT).
    """
    from semid import phantoms as ph
    from semid.pipeline import Deidentifier

    pop = ph.Population(subject + 1, seed)
    person = pop.subject(subject)
    original = person.visit(visit, modality)
    # the targets are drawn on the person's own base (a visit is rendered on its base's grid): the default
    # face's generator code and a synthetic code, each deforming that base
    default_face = ph.face_subject(ph.default_face_code(), base=pop.base_name)
    rng = np.random.default_rng([seed, subject, visit, synthetic_seed, 77])
    synthetic_code = ph.shape_code(ph.draw_shape(rng))
    synthetic_face = ph.face_subject(synthetic_code, base=pop.base_name)
    on_default = person.visit(visit, modality, face=default_face)
    on_synthetic = person.visit(visit, modality, face=synthetic_face)

    location = Deidentifier().locate(original.image)
    fit = location.fit.transform
    scale = intensity_scale(original.image, modality)
    background = -1000.0 if modality == "CT" else 0.0

    def box(img: sitk.Image) -> np.ndarray:
        return scale.normalise(to_box(img, fit, default=background)).astype(np.float16)

    def box_labels(img: sitk.Image) -> np.ndarray:
        return to_box(img, fit, sitk.sitkNearestNeighbor).astype(np.uint8)

    return {"image": box(original.image), "target_default": box(on_default.image),
            "target_synthetic": box(on_synthetic.image), "labels": box_labels(original.labels),
            "labels_default": box_labels(on_default.labels),
            "code_subject": ph.shape_code(person.shape), "code_default": ph.default_face_code(),
            "code_synthetic": synthetic_code, "subject": np.int32(subject), "visit": np.int32(visit),
            "modality": np.int32(ph.MODALITIES.index(modality))}


def phantom_samples(cache_dir: Path, seed: int, subjects: range | list[int], visits: tuple[int, ...] = (0, 1),
                    modalities: tuple[str, ...] = ("MR",), log=print) -> list[Path]:
    """``phantom_sample`` for every (subject, visit, modality), each cached as one .npz in ``cache_dir``.

    A sample already in the cache is not made again; files are written under a temporary name and
    renamed, so an interrupted run leaves no half-written sample. A visit the pipeline refuses (see
    ``Deidentifier.locate``) is skipped and remembered as such (a ``.skipped`` file with the reason).
    """
    import time

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths, t0, made = [], time.perf_counter(), 0
    todo = [(s, v, m) for s in subjects for v in visits for m in modalities]
    for k, (s, v, m) in enumerate(todo):
        path = cache_dir / f"facebox_{seed}_{s:04d}_{v}_{m}.npz"
        skip = path.with_suffix(".skipped")
        if skip.exists():
            continue
        if not path.exists():
            try:
                sample = phantom_sample(seed, s, v, m)
            except InputError as exc:
                # the pipeline itself refuses this visit (a strong face deformation can fail the face
                # check): it can never reach the generator, so it is no training sample either
                skip.write_text(str(exc))
                log(f"  face-box sample {path.stem} skipped: {exc}")
                continue
            tmp = path.with_suffix(".tmp.npz")
            np.savez_compressed(tmp, **sample)
            tmp.replace(path)
            made += 1
            if made % 10 == 0 or k + 1 == len(todo):
                log(f"  face-box samples: {k + 1}/{len(todo)} ({time.perf_counter() - t0:.0f} s)")
        paths.append(path)
    return paths


def load_sample(path: Path) -> dict[str, np.ndarray]:
    """A cached sample as a dict of arrays (images as float32)."""
    with np.load(path) as z:
        out = {k: z[k] for k in z.files}
    for k in ("image", "target_default", "target_synthetic"):
        out[k] = out[k].astype(np.float32)
    return out
