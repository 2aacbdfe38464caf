"""Identity saliency: where a re-identification network looks, by occlusion sensitivity of its embedding.

The re-identification network is the project's Siamese 3D CNN (``semid.eval.attack_reid``): it embeds a
fixed physical box around the face (the "crop", 48^3 voxels of about 4.4 mm) into a unit vector.
``identity_saliency`` occludes cubes of that crop, one at a time, with air (0: what blocking does to a
voxel) and measures how far the embedding moves, ``1 - cos(e, e_occluded)``. A voxel's saliency is the
mean movement over the cubes that cover it, smoothed (Gaussian, half a stride) so the cube edges do
not show, scaled by the largest value to [0, 1] and resampled (linear) onto the input's grid; outside
the crop box it is 0.

Occlusion grid (defaults): cubes of ``patch_mm`` = 32 mm (7 crop voxels) every ``stride_mm`` = 16 mm
(4 crop voxels; 12 positions per axis, 1728 in all), so every voxel away from the box's edge is covered
by about 8 cubes. Cubes that are (nearly) all air are not evaluated (occluding air with air moves nothing;
they count as 0), and with ``region`` only cubes that touch the region are. On a 2 mm phantom head that is
1172 forward passes (4.3 s on one CPU thread of a busy 2-core machine), or 675 with the identity
network's region (2.6 s); a 1 mm head costs about the same plus its resampling (5.4 s / 3.1 s), since
the crop is 48^3 whatever the input's spacing.

Honest benchmarking: the method must not use the benchmark's attacker (``reid_siamese.pt``, trained on
the seed-4242 population). The method's own network, ``semid/data/models/identity_reid.pt``, was
trained with the same code on the seed-5 population (``python -m semid.eval.attack_reid train --seed 5``);
``load_reid`` loads it and ``identity_saliency`` refuses weights whose training seed is 4242 or 2026
unless told otherwise. The re-identification networks are trained on MR only; on CT the crop is
normalised by its HU window and the map is less meaningful (the identity network's probability carries
CT). The crop box is a fixed physical box (as for the attacker): a head far from where the phantom heads
lie in world coordinates gets a map of whatever is in the box.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk
import torch

from semid.errors import InputError

if TYPE_CHECKING:
    from semid.eval.attack_reid import CropSpec, ReidAttack

#: The method's own re-identification network (seed-5 population; never the attacker's weights).
DEFAULT_REID = Path(__file__).resolve().parents[1] / "data" / "models" / "identity_reid.pt"
#: Population seeds whose re-identification networks the method must not use (attacker A2, benchmark).
FORBIDDEN_SEEDS: dict[int, str] = {4242: "attacker A2's", 2026: "the benchmark population's"}
PATCH_MM, STRIDE_MM = 32.0, 16.0
#: A cube is evaluated when at least this fraction of its crop voxels is tissue (normalised value > 0.2).
MIN_TISSUE_FRACTION = 0.02


def load_reid(path: Path | str | None = None, device: torch.device | str | None = None) -> ReidAttack:
    """The method-side re-identification network (default ``semid/data/models/identity_reid.pt``), on CPU
    unless ``device`` says otherwise.

    Raises:
        InputError: the weights file is missing.
    """
    from semid.eval.attack_reid import ReidAttack

    path = Path(path) if path is not None else DEFAULT_REID
    if not path.is_file():
        raise InputError(f"The identity re-identification network {path.name} is missing: train it with "
                         "`python -m semid.eval.attack_reid train --seed 5` and save it as identity_reid.pt.")
    return ReidAttack.load(path, torch.device(device) if device is not None else torch.device("cpu"))


def _training_seed(reid: ReidAttack) -> int | None:
    split = reid.meta.get("split", {}) if isinstance(reid.meta, dict) else {}
    seed = split.get("seed")
    return int(seed) if seed is not None else None


def crop_grid(spec: CropSpec) -> sitk.Image:
    """The physical grid (float32, zeros) of the pooled crop: ``spec.shape`` voxels covering ``spec.box``.

    ``attack_reid.crop`` area-pools the box of the reference grid to ``spec.shape``; pooled voxel ``k``
    along an axis of ``L`` reference voxels is centred at reference index ``start + (k + 0.5) L / n - 0.5``.
    """
    ref = spec.reference()
    box_xyz = spec.box[::-1]
    shape_xyz = spec.shape[::-1]
    lengths = [b - a for a, b in box_xyz]
    step = [length / n for length, n in zip(lengths, shape_xyz, strict=True)]
    first = [a + 0.5 * s - 0.5 for (a, _), s in zip(box_xyz, step, strict=True)]
    grid = sitk.Image([int(n) for n in shape_xyz], sitk.sitkFloat32)
    grid.SetSpacing([float(sp * s) for sp, s in zip(ref.GetSpacing(), step, strict=True)])
    grid.SetOrigin(ref.TransformContinuousIndexToPhysicalPoint(first))
    grid.SetDirection(ref.GetDirection())
    return grid


def _starts(n: int, patch: int, stride: int) -> list[int]:
    """Cube start indices along an axis of ``n`` voxels: every ``stride``, the last one flush with the end."""
    if patch >= n:
        return [0]
    starts = list(range(0, n - patch + 1, stride))
    if starts[-1] != n - patch:
        starts.append(n - patch)
    return starts


def occlusion_map(model: torch.nn.Module, crop: np.ndarray, patch: int, stride: int,
                  active: np.ndarray | None = None, device: torch.device | None = None, batch: int = 32
                  ) -> tuple[np.ndarray, int]:
    """Occlusion sensitivity of a crop's embedding (unnormalised).

    Args:
        model: the embedding tower (crop (n, 1, z, y, x) -> unit vectors (n, d)).
        crop: the normalised crop, float32 (z, y, x).
        patch, stride: cube side and step, in crop voxels.
        active: boolean like ``crop``; only cubes that contain an active voxel are evaluated (default: cubes
            with at least ``MIN_TISSUE_FRACTION`` tissue).
        device: where the model runs (default: its parameters' device).
        batch: occluded crops per forward pass.

    Returns:
        ``(map, n)``: float32 like ``crop``, the mean ``1 - cos`` over the cubes covering each voxel
        (unevaluated cubes count 0), and the number of cubes evaluated.
    """
    device = device or next(model.parameters()).device
    tissue = crop > 0.2
    cubes = []
    for z, y, x in itertools.product(*[_starts(n, patch, stride) for n in crop.shape]):
        sl = (slice(z, z + patch), slice(y, y + patch), slice(x, x + patch))
        keep = active[sl].any() if active is not None else tissue[sl].mean() >= MIN_TISSUE_FRACTION
        cubes.append((sl, bool(keep)))
    base = torch.from_numpy(np.ascontiguousarray(crop, np.float32))[None, None].to(device)
    todo = [sl for sl, keep in cubes if keep]
    moves: list[float] = []
    model.eval()
    with torch.inference_mode():
        e0 = model(base)
        for i in range(0, len(todo), batch):
            chunk = todo[i:i + batch]
            x = base.repeat(len(chunk), 1, 1, 1, 1)
            for k, sl in enumerate(chunk):
                x[(k, 0, *sl)] = 0.0
            e = model(x)
            moves += (1.0 - (e @ e0[0]).clamp(-1.0, 1.0)).float().cpu().tolist()
    total = np.zeros(crop.shape, np.float64)
    count = np.zeros(crop.shape, np.float64)
    for sl, _ in cubes:
        count[sl] += 1.0
    for sl, m in zip(todo, moves, strict=True):
        total[sl] += m
    return (total / np.maximum(count, 1.0)).astype(np.float32), len(todo)


def identity_saliency(image: sitk.Image, reid: ReidAttack | None = None, patch_mm: float = PATCH_MM,
                      stride_mm: float = STRIDE_MM, region: sitk.Image | None = None, modality: str = "auto",
                      batch: int = 32, allow_attacker_weights: bool = False) -> sitk.Image:
    """Identity saliency of a head volume, float32 in [0, 1] on ``image``'s own grid.

    Args:
        image: a 3D head volume, MR or CT, any grid (the crop is a fixed physical box).
        reid: a re-identification network (``load_reid()``; default: the committed method-side one).
        patch_mm, stride_mm: side and step of the occluding cubes, in mm (converted to crop voxels of
            about 4.4 mm, at least 1).
        region: optional mask (any grid; non-zero = inside): only cubes touching it are evaluated, which
            is faster and all the pipeline needs (saliency outside the identity region is not used).
        modality: "MR", "CT" or "auto" (the image's tag, else guessed from the values).
        batch: occluded crops per forward pass.
        allow_attacker_weights: let ``reid`` be a network trained on the attacker's (4242) or the
            benchmark's (2026) population: for experiments only, never for benchmark numbers.

    Returns:
        float32 image with exactly ``image``'s size, spacing, origin and direction; 0 outside the crop
        box, 1 at the most salient voxel (all 0 if no occlusion moved the embedding).

    Raises:
        InputError: not a 3D scalar volume, constant, or an unknown modality.
        ValueError: ``reid`` was trained on a forbidden population and ``allow_attacker_weights`` is False.
    """
    from semid.identity.network import check_volume, resolve_modality
    from semid.io import MODALITY_KEY

    image = check_volume(image)
    reid = reid if reid is not None else load_reid()
    seed = _training_seed(reid)
    if seed in FORBIDDEN_SEEDS and not allow_attacker_weights:
        raise ValueError(f"this re-identification network was trained on {FORBIDDEN_SEEDS[seed]} population "
                         f"(seed {seed}): the method must use its own (identity_reid.pt, seed 5)")
    modality = resolve_modality(image, modality)
    tagged = image
    if not image.HasMetaDataKey(MODALITY_KEY) or image.GetMetaData(MODALITY_KEY) != modality:
        tagged = sitk.Image(image)  # a copy: the caller's image keeps its metadata
        tagged.SetMetaData(MODALITY_KEY, modality)
    crop = reid.crop(tagged)
    grid = crop_grid(reid.spec)
    voxel = float(min(grid.GetSpacing()))
    patch = max(1, int(round(patch_mm / voxel)))
    stride = max(1, int(round(stride_mm / voxel)))
    active = None
    if region is not None:
        mask = sitk.Cast(sitk.NotEqual(region, 0), sitk.sitkFloat32)
        # linear + > 0: a crop voxel is active when any part of the region reaches into it
        active = sitk.GetArrayFromImage(sitk.Resample(mask, grid, sitk.Transform(), sitk.sitkLinear, 0.0)) > 0.0
    device = next(reid.model.parameters()).device
    smap, _ = occlusion_map(reid.model, crop, patch, stride, active, device, batch)
    small = sitk.GetImageFromArray(smap)
    small.CopyInformation(grid)
    # a Gaussian of half a stride removes the cube edges that the averaging leaves on a coarse grid
    small = sitk.SmoothingRecursiveGaussian(small, 0.5 * stride * voxel)
    smap = sitk.GetArrayFromImage(small)
    top = float(smap.max())
    smap = smap / top if top > 0 else smap
    small = sitk.GetImageFromArray(np.clip(smap, 0.0, 1.0).astype(np.float32))
    small.CopyInformation(grid)
    out = sitk.Resample(small, image, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    out.CopyInformation(image)
    return out
