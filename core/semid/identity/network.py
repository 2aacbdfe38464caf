"""The learned identity map: a MONAI 3D U-Net that segments the identity region of a head, MR or CT,
and the brain that blocking must keep off.

The identity region is what the phantom population labels 3 (identity region: face soft tissue, nose,
lips, eyes, ears, a thin forehead shell; the atlas region warped onto each phantom face, inside the
head) and 5 (face-region lesions, which sit inside it). ``IdentityNetwork.predict`` gives the
probability of that region for every voxel of any head volume, on the volume's own grid;
``predict_maps`` gives it together with the second output, the brain (labels 1 and 4), from the same
pass. The pipeline keeps ``B_p`` off that brain as well as off the registered atlas brain: the atlas
brain is the template's, moved by a fit to the cranium, and where a subject's brain is shaped
differently it can reach past the atlas's margin (benchmarks/brain_margin.py).

Processing (``prepare``), the same for training and inference:

1. ``sitk.DICOMOrient(image, "RAS")``: the axes are permuted/flipped into RAS order (no interpolation);
2. the volume is resampled (linear, after anti-aliasing: block averaging plus a Gaussian for the rest,
   matched to each axis's spacing) onto a *world-aligned* RAS grid of ``SPACING_MM`` covering its
   physical extent. An oblique header therefore does not tilt the head in front of the network: the
   network sees the head as it lies in the scanner, which is how it was trained (phantom poses are
   within a few degrees; training adds +-12 degree rotations for tilted heads);
3. normalisation: MR is divided by the median of the voxels above 10 % of the 99.5th percentile (the
   head's median; the same rule as the re-identification crop), CT is ``(HU + 1000) / 1000`` (air 0,
   soft tissue about 1, bone about 2); both are clipped to [0, 5], so the background is 0 for both;
4. the network runs on the whole volume (padded to a multiple of 16); large fields of view use MONAI's
   sliding window;
5. the probability map is resampled (linear) back onto the input's grid: same size, spacing, origin and
   direction (values below 1e-3 become 0: only the box around the region is interpolated).

Why 4 mm: the identity region is a smooth shell 8-28 mm thick around the face whose extent is set by
where the face is in the head (brow line, ears, chin), which needs context from the whole head, not
fine detail. At 4 mm a whole head is about 64^3 voxels, so the network sees the whole head at once
(four 2x poolings reach 64 mm cells; its receptive field spans the head), trains on 1 CPU thread in
minutes, and predicts in a fraction of a second, leaving room in the 5 s end-to-end budget for a
256x256x176 head; the thinnest part (8 mm forehead shell) is still two voxels thick, and the
linearly-interpolated probability places the boundary between voxel centres on the input grid. The
held-out Dice is measured on the input (2 mm) grid, boundary losses included; a perfect 4 mm answer
(the label itself taken to 4 mm and back) would score 0.935.

The committed weights (defaults: 24 + 6 subjects x 2 visits x MR, CT = 120 volumes, 1800 steps of
2 volumes; 58 s of data and 9.4 min of training on one thread of a 2-core machine) score Dice
0.860 (MR) and 0.867 (CT) for the identity region on unseen seed-5 people, 0.861 and 0.870 on the
benchmark's (seed 2026, measured only), and 0.954 and 0.951 for the brain (seed-5 people). The
single-output weights before them scored 0.866 and 0.874: the brain output costs the region about
0.007 Dice.

Training (``train``, ``python -m semid.identity.network train`` or ``semid train identity``) uses
``semid.phantoms.Population(n, seed)`` visits, MR and CT, of the seed-5 population: never the
benchmark's (2026), attacker A2's (4242) or the U1 segmenter's (1). The committed weights
(``semid/data/models/identity_unet.pt``) record the command, the data seed, the steps and the
held-out Dice. The phantoms are all deformations of a few base heads (the real T1w head, and the
average head if ``--mean-subjects``): a head unlike them should be checked against the
registration-based atlas (``semid.identity.ranking.agreement``), which stays the fallback.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from semid.errors import InputError
from semid.grids import processing_grid, to_grid
from semid.io import plain_metadata

#: Isotropic spacing (mm) of the processing grid (see the module docstring for why).
SPACING_MM = 4.0
#: Phantom labels that make up the identity region: identity region (3) and face-region lesion (5).
REGION_LABELS: tuple[int, ...] = (3, 5)
#: Phantom labels of the brain (brain 1, brain lesion 4): the second output, which the pipeline keeps
#: ``B_p`` off (the registered atlas brain alone missed one benchmark subject's brain by more than its margin).
BRAIN_LABELS: tuple[int, ...] = (1, 4)
#: The outputs, in channel order (weights with one output channel predate the brain).
OUTPUTS: tuple[str, ...] = ("identity", "brain")
#: Committed weights.
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "data" / "models" / "identity_unet.pt"
#: Population seed of the training data, and the seeds it must never be.
TRAIN_SEED = 5
RESERVED_SEEDS: dict[int, str] = {2026: "the benchmark's population", 4242: "attacker A2's training population",
                                  1: "the U1 segmenter's training population"}
#: Training defaults (the committed weights were made with these unless their metadata says otherwise).
TRAIN_SUBJECTS, TRAIN_MEAN_SUBJECTS, TRAIN_VISITS, TRAIN_STEPS = 24, 6, 2, 1800
#: Training canvas (z, y, x) at SPACING_MM: 256 mm, a whole head.
CANVAS: tuple[int, int, int] = (64, 64, 64)
#: Augmentation ranges: rotation (degrees, each axis), isotropic scale, translation (mm, each axis).
AUG_DEG, AUG_SCALE, AUG_MM = 12.0, 0.1, 12.0
#: Intensity clip after normalisation (both modalities).
CLIP_MAX = 5.0
#: Fraction of the 99.5th percentile above which MR voxels count as head for the median.
MR_FOREGROUND_FRACTION = 0.1
#: Batch norm, not instance norm: at inference the whole (zero-padded) volume goes through at once, and
#: instance statistics would then differ from those of the 64^3 training canvas (cost 0.03 Dice in a trial).
ARCH: dict[str, Any] = {"spatial_dims": 3, "in_channels": 1, "out_channels": len(OUTPUTS),
                        "channels": (16, 32, 48, 64, 96), "strides": (2, 2, 2, 2), "num_res_units": 1, "norm": "batch"}
#: Volumes (voxels, at SPACING_MM) up to this size run in one window; larger ones in 96^3 windows.
WHOLE_VOLUME_VOXELS = 128**3
FORMAT = 1
NAME = "identity-unet"

Log = Callable[[str], None]


# ------------------------------------------------------------------------------------------ input checks


def check_volume(image: sitk.Image) -> sitk.Image:
    """The 3D scalar volume itself, or ``InputError`` in one sentence (2D, vector, 4D, constant, non-finite)."""
    from semid.io import require_3d_scalar

    if not isinstance(image, sitk.Image):
        raise InputError("The identity network needs a SimpleITK image of a 3D head volume.")
    image = require_3d_scalar(image)
    stats = sitk.StatisticsImageFilter()
    stats.Execute(image)
    if not np.isfinite(stats.GetSum()):
        raise InputError("The volume holds non-finite values (NaN or infinity): give a head CT or MR volume.")
    if stats.GetMinimum() == stats.GetMaximum():
        raise InputError("The volume is empty or constant: give a head CT or MR volume.")
    return image


def resolve_modality(image: sitk.Image, modality: str | None) -> str:
    """"MR" or "CT": the given modality (any case), else the header's, else guessed from the intensities."""
    from semid import identity as idm
    from semid.io import modality_of

    value = (modality or "auto").strip().upper()
    if value in ("MR", "CT"):
        return value
    if value not in ("AUTO", ""):
        raise InputError(f"Unknown modality {modality[:10]!r}: use MR or CT.")
    return idm.guess_modality(image, modality_of(image))


# ---------------------------------------------------------------------------------------- preprocessing

# ``processing_grid`` and ``to_grid`` (``semid.grids``): the world-aligned RAS grid the network works on.


def to_input_grid(prob: sitk.Image, image: sitk.Image, floor: float = 1e-3) -> sitk.Image:
    """``prob`` (on the processing grid) resampled (linear) onto ``image``'s grid, float32, exact geometry.

    Only the index box of ``image`` that holds ``prob > floor`` (plus one processing voxel) is
    interpolated; the rest is 0. On a 1 mm head that is a tenth of the volume.
    """
    arr = sitk.GetArrayViewFromImage(prob)
    out = np.zeros(image.GetSize()[::-1], np.float32)
    nz = np.argwhere(arr > floor)
    if nz.size:
        lo = np.maximum(nz.min(axis=0) - 1, 0)[::-1]  # (x, y, z) indices on the processing grid
        hi = np.minimum(nz.max(axis=0) + 1, np.array(arr.shape) - 1)[::-1]
        corners = [prob.TransformContinuousIndexToPhysicalPoint([float(v) for v in c])
                   for c in itertools.product(*zip(lo, hi, strict=True))]
        cont = np.array([image.TransformPhysicalPointToContinuousIndex(p) for p in corners])
        start = np.clip(np.floor(cont.min(axis=0)).astype(int), 0, image.GetSize())
        stop = np.clip(np.ceil(cont.max(axis=0)).astype(int) + 1, 0, image.GetSize())
        if np.all(stop > start):
            ref = sitk.Image([int(v) for v in stop - start], sitk.sitkFloat32)
            ref.SetSpacing(image.GetSpacing())
            ref.SetDirection(image.GetDirection())
            ref.SetOrigin(image.TransformIndexToPhysicalPoint([int(v) for v in start]))
            sub = sitk.Resample(prob, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
            (x0, y0, z0), (x1, y1, z1) = start, stop
            out[z0:z1, y0:y1, x0:x1] = sitk.GetArrayViewFromImage(sub)
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(image)
    return result


def normalise(arr: np.ndarray, modality: str) -> np.ndarray:
    """Network input from raw intensities (any shape): MR / head median, CT (HU + 1000) / 1000; clip [0, 5]."""
    arr = np.asarray(arr, dtype=np.float32)
    if modality == "CT":
        out = (arr + 1000.0) / 1000.0
    else:
        high = float(np.percentile(arr, 99.5))
        fg = arr[arr > MR_FOREGROUND_FRACTION * high] if high > 0 else arr[:0]
        scale = float(np.median(fg)) if fg.size else 1.0
        out = arr / max(scale, 1e-6)
    return np.clip(out, 0.0, CLIP_MAX).astype(np.float32)


def prepare(image: sitk.Image, modality: str) -> tuple[np.ndarray, sitk.Image]:
    """The network input of ``image`` and the grid it lies on.

    Returns:
        ``(x, grid)``: ``x`` float32 (z, y, x) in [0, 5] on ``grid``, the world-aligned RAS grid of
        ``SPACING_MM`` (``processing_grid``).
    """
    oriented = sitk.DICOMOrient(image, "RAS")
    grid = processing_grid(oriented, SPACING_MM)
    background = -1000.0 if modality == "CT" else 0.0
    x = sitk.GetArrayFromImage(to_grid(oriented, grid, background))
    return normalise(x, modality), grid


def region_target(labels: sitk.Image, grid: sitk.Image, which: Sequence[int] = REGION_LABELS) -> np.ndarray:
    """Training target on ``grid``: the fraction (0..1) of each voxel inside ``which`` labels (default the
    identity region, 3 or 5), float32 (z, y, x)."""
    inside = sitk.GetImageFromArray(np.isin(sitk.GetArrayViewFromImage(labels), which).astype(np.float32))
    inside.CopyInformation(labels)
    return np.clip(sitk.GetArrayFromImage(to_grid(sitk.DICOMOrient(inside, "RAS"), grid, 0.0)), 0.0, 1.0)


def targets(labels: sitk.Image, grid: sitk.Image) -> np.ndarray:
    """The training targets of every output (``OUTPUTS``) on ``grid``: float32 (C, z, y, x) fractions."""
    return np.stack([region_target(labels, grid, REGION_LABELS), region_target(labels, grid, BRAIN_LABELS)])


# --------------------------------------------------------------------------------------------- network


def _device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _build(arch: dict[str, Any]) -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(**{k: tuple(v) if isinstance(v, list) else v for k, v in arch.items()})


def scripted_path(digest: str) -> Path:
    """Where the TorchScript export of the weights with sha256 ``digest`` is kept: the data folder's
    ``models``, named by the weights' hash and the torch version (an export is only read by the torch
    that wrote it)."""
    from semid.data import data_dir

    return data_dir() / "models" / f"identity_unet-{digest[:16]}-torch{torch.__version__.split('+')[0]}.ts"


def _scripted(arch: dict[str, Any], state_dict: dict[str, torch.Tensor], digest: str) -> torch.nn.Module:
    """The U-Net as a TorchScript module, from the export of these weights when there is one.

    Why: ``import monai`` takes 6-10 s on a 2-core machine (it imports every submodule, ignite and
    torch.distributed included), more than the whole de-identification of a head; a TorchScript module
    runs the same MONAI U-Net with torch alone. The export is made from the MONAI network the first time
    the weights are loaded (written to a temporary name and renamed, so a concurrent reader never sees
    half a file); a folder that cannot be written only costs the MONAI import again next time.
    """
    path = scripted_path(digest)
    with warnings.catch_warnings():
        # torch 2.13 marks torch.jit deprecated in favour of torch.export, whose loader takes 2.2 s here
        # against 0.1 s (most of what the export saves); the export is per torch version, and a torch
        # without jit falls back to the MONAI network
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated")
        if path.is_file():
            try:
                return torch.jit.load(str(path), map_location="cpu")
            except Exception:  # noqa: BLE001 - an unreadable export is rebuilt from the weights below
                pass
        net = _build(arch)
        net.load_state_dict(state_dict)
        net.eval()
        try:
            scripted = torch.jit.script(net)
        except Exception:  # noqa: BLE001 - no TorchScript in this torch: the MONAI network itself
            return net
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            torch.jit.save(scripted, str(tmp))
            os.replace(tmp, path)
        except OSError:
            pass
    return scripted


def _pad_to(x: torch.Tensor, multiple: int = 16) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Zero-pad the last three dims of ``x`` up to a multiple of ``multiple`` (background is 0)."""
    shape = tuple(int(s) for s in x.shape[-3:])
    target = [int(math.ceil(s / multiple) * multiple) for s in shape]
    pad: list[int] = []
    for s, t in zip(reversed(shape), reversed(target), strict=True):
        pad += [0, t - s]
    return F.pad(x, pad), shape  # type: ignore[return-value]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class IdentityNetwork:
    """The trained identity-region U-Net with its preprocessing.

    Use ``IdentityNetwork.load()`` for the committed weights; ``predict`` maps one volume.
    """

    def __init__(self, net: torch.nn.Module, meta: dict[str, Any], device: str | torch.device | None = None,
                 path: Path | None = None) -> None:
        self.device = _device(device)
        self.net = net.to(self.device).eval()
        self.meta = meta
        self.path = path
        self.sha256: str | None = None  # of the loaded file (set by ``load``)

    @classmethod
    def load(cls, path: Path | str | None = None, device: str | torch.device | None = None,
             scripted: bool = False) -> IdentityNetwork:
        """Weights saved by ``train`` (default: the committed ``semid/data/models/identity_unet.pt``).

        Read with ``torch.load(weights_only=True)``: a dict of ``state_dict`` and plain metadata.
        ``scripted``: run the network as TorchScript (for inference: no MONAI import once the export
        exists, see ``_scripted``); off, ``net`` is the MONAI ``UNet`` itself (for training).

        Raises:
            InputError: the file is missing or is not identity-network weights.
        """
        path = Path(path) if path is not None else DEFAULT_WEIGHTS
        if not path.is_file():
            raise InputError(f"The identity network's weights {path.name} are missing: run `semid train identity`.")
        # read once: the hash in the record is then the hash of exactly the bytes that were loaded, even
        # when a new model is published over the file meanwhile
        data = path.read_bytes()
        try:
            blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception:  # any unreadable file gets the same one-sentence answer
            blob = None
        if not isinstance(blob, dict) or blob.get("format") != FORMAT or blob.get("name") != NAME:
            raise InputError(f"{path.name} is not an identity-network weights file (format {FORMAT}).")
        digest = hashlib.sha256(data).hexdigest()
        try:
            if scripted:
                net = _scripted(blob["arch"], blob["state_dict"], digest)
            else:
                net = _build(blob["arch"])
                net.load_state_dict(blob["state_dict"])
        except (KeyError, TypeError, RuntimeError) as exc:
            raise InputError(f"{path.name} does not fit the identity network (its weights have other names or "
                             "shapes): retrain it with `semid train identity`.") from exc
        model = cls(net, {k: v for k, v in blob.items() if k != "state_dict"}, device, path)
        model.sha256 = digest
        return model

    def describe(self) -> dict[str, Any]:
        """What the pipeline's record says about this model: name, file, sha256, training data and metrics."""
        training = self.meta.get("training", {})
        return {"name": NAME, "file": self.path.name if self.path else None,
                "sha256": self.sha256 or (sha256(self.path) if self.path else None),
                "spacing_mm": self.meta.get("spacing_mm", SPACING_MM),
                "training_data": training.get("data"), "steps": training.get("steps"),
                "heldout_dice": training.get("heldout", {}).get("dice"),
                "command": training.get("command"),
                # set on weights fine-tuned from reviewed labels (semid.identity.finetune)
                "finetuned": self.meta.get("finetuned")}

    @property
    def outputs(self) -> tuple[str, ...]:
        """The maps this network gives, in channel order: ``("identity",)`` or ``("identity", "brain")``."""
        return OUTPUTS[:int(self.meta.get("arch", ARCH).get("out_channels", 1))]

    def predict_maps_array(self, x: np.ndarray) -> np.ndarray:
        """Probabilities (float32, (C, z, y, x), one channel per ``outputs``) for a ``prepare``-d array."""
        self.net.eval()
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None].to(self.device)
        with torch.inference_mode(), warnings.catch_warnings():
            # MONAI 1.5's sliding window indexes with a list, which recent torch deprecates (harmless)
            warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")
            if x.size <= WHOLE_VOLUME_VOXELS:
                padded, shape = _pad_to(t)
                logits = self.net(padded)[..., :shape[0], :shape[1], :shape[2]]
            else:
                from monai.inferers import sliding_window_inference  # large fields of view only

                logits = sliding_window_inference(t, (96, 96, 96), 1, self.net, overlap=0.25, mode="gaussian")
        return torch.sigmoid(logits)[0].float().cpu().numpy()

    def predict_array(self, x: np.ndarray) -> np.ndarray:
        """Probability (float32, same shape) of the identity region for a ``prepare``-d (z, y, x) array."""
        return self.predict_maps_array(x)[0]

    def predict_maps(self, image: sitk.Image, modality: str = "auto", reference: sitk.Image | None = None,
                     outputs: Sequence[str] | None = None) -> dict[str, sitk.Image]:
        """Maps of one pass of the network, on ``image``'s (or ``reference``'s) grid as :meth:`predict`.

        Args:
            image, modality, reference: as :meth:`predict`.
            outputs: which maps (default: every one of ``outputs``): ``"identity"`` and ``"brain"``
                (probabilities), and for weights with the brain ``"brain_distance_mm"``: the signed
                distance in mm (negative inside) to the surface of the brain's largest connected piece at
                probability > 0.5. It is computed on the 4 mm processing grid and interpolated (linear):
                a fraction of the cost of an exact one on a 1 mm grid, and islands that are not the
                brain (a dark orbit taken for it) are left out.

        Returns:
            ``{name: float32 image}``.
        """
        wanted = tuple(self.outputs if outputs is None else outputs)
        unknown = set(wanted) - set(self.outputs) - ({"brain_distance_mm"} if "brain" in self.outputs else set())
        if unknown:
            raise ValueError(f"this network gives {self.outputs}, not {sorted(unknown)}")
        image = check_volume(image)
        modality = resolve_modality(image, modality)
        x, grid = prepare(image, modality)
        probs = dict(zip(self.outputs, self.predict_maps_array(x), strict=True))
        target = image if reference is None else reference
        maps = {}
        for name in wanted:
            if name == "brain_distance_mm":
                maps[name] = _brain_distance(probs["brain"], grid, target)
                continue
            prob = sitk.GetImageFromArray(probs[name])
            prob.CopyInformation(grid)
            maps[name] = to_input_grid(prob, target)
        return maps

    def predict(self, image: sitk.Image, modality: str = "auto", reference: sitk.Image | None = None) -> sitk.Image:
        """Probability of the identity region, float32 in [0, 1], on ``image``'s own grid.

        Args:
            image: a 3D head volume, MR (any units) or CT (HU), any orientation and spacing.
            modality: "MR", "CT", or "auto" (the ``semid.io`` modality tag, else guessed from the values).
            reference: another grid to give the probability on (e.g. a region of ``image``); its values
                are not read.

        Returns:
            float32 image with exactly ``image``'s (or ``reference``'s) size, spacing, origin and direction.

        Raises:
            InputError: not a 3D scalar volume, constant or non-finite, or an unknown modality.
        """
        image = check_volume(image)
        modality = resolve_modality(image, modality)
        x, grid = prepare(image, modality)
        prob = sitk.GetImageFromArray(self.predict_array(x))
        prob.CopyInformation(grid)
        return to_input_grid(prob, image if reference is None else reference)


#: Distance (mm) given where the brain distance map is asked for off the processing grid.
FAR_MM = 1.0e4
#: Cell (mm) on which the brain distance is interpolated before it is spread over the finer voxels.
DISTANCE_CELL_MM = 2.0


def _brain_distance(prob: np.ndarray, grid: sitk.Image, target: sitk.Image) -> sitk.Image:
    """Signed distance (mm, negative inside) to the largest connected piece of ``prob > 0.5`` (on
    ``grid``), on ``target``'s grid; ``FAR_MM`` everywhere when there is no brain. Outside the piece (where
    the pipeline's keep-out is decided) it follows the exact distance to about 1 mm
    (``tests/test_identity_net.py``); inside it is only negative.

    Each voxel takes the value of its cell (``_brain_distance_cells``): the distance is off by at most
    half a cell's diagonal (1.7 mm on a 1 mm grid), and a 1 mm head's region box (ten million voxels)
    costs an eighth of an interpolation at every voxel.
    """
    at_cells = _brain_distance_cells(prob, grid, target)
    if at_cells is None:
        out = sitk.Image(target.GetSize(), sitk.sitkFloat32) + FAR_MM
        out.CopyInformation(target)
        return out
    # every voxel's nearest cell centre is its own cell's (it lies less than half a cell away): a
    # nearest-neighbour resample spreads the cells in ITK, with no numpy copies of the fine grid
    # (``benchmarks/pipeline_parts.py``)
    return sitk.Resample(at_cells, target, sitk.Transform(), sitk.sitkNearestNeighbor, FAR_MM, sitk.sitkFloat32)


def _brain_distance_cells(prob: np.ndarray, grid: sitk.Image, target: sitk.Image) -> sitk.Image | None:
    """``_brain_distance`` interpolated (linear) at the centres of cells of about ``DISTANCE_CELL_MM``:
    blocks of whole voxels of ``target`` (a voxel that size or larger is its own cell), cell ``i``
    holding voxels ``i * stride`` to ``(i + 1) * stride - 1`` along each axis; None when there is no brain.
    """
    inside = sitk.GetImageFromArray((prob > 0.5).astype(np.uint8))
    inside.CopyInformation(grid)
    pieces = sitk.RelabelComponent(sitk.ConnectedComponent(inside), sortByObjectSize=True)
    brain = sitk.Equal(pieces, 1)
    if not sitk.GetArrayViewFromImage(brain).any():
        return None
    # ITK measures to the nearest voxel centre of the piece; its surface lies half a voxel further out
    dist = sitk.SignedMaurerDistanceMap(brain, insideIsPositive=False, squaredDistance=False,
                                        useImageSpacing=True) - 0.5 * max(grid.GetSpacing())
    spacing, size = np.array(target.GetSpacing()), np.array(target.GetSize())
    stride = np.maximum(1, np.round(DISTANCE_CELL_MM / spacing)).astype(int)  # (x, y, z)
    cells = sitk.Image([int(v) for v in -(-size // stride)], sitk.sitkFloat32)
    cells.SetSpacing((spacing * stride).tolist())
    cells.SetDirection(target.GetDirection())
    cells.SetOrigin(target.TransformContinuousIndexToPhysicalPoint(((stride - 1) / 2.0).tolist()))
    return sitk.Resample(dist, cells, sitk.Transform(), sitk.sitkLinear, FAR_MM, sitk.sitkFloat32)


_LOADED: dict[str, tuple[tuple[int, int, int], IdentityNetwork]] = {}
_LOADED_LOCK = threading.Lock()


def load_cached(path: Path | str | None = None) -> IdentityNetwork:
    """``IdentityNetwork.load(path)`` (default: the committed weights), loaded once per file version.

    The file's (inode, mtime, size) is part of the cache key, so weights replaced on disk (a retrained
    model published by renaming a new file over the old one) are loaded at the next call, while an
    unchanged file is not read again. One network per path is kept.

    Raises:
        InputError: the file is missing or is not identity-network weights.
    """
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    try:
        st = path.stat()
    except OSError:
        raise InputError(
            f"The identity network's weights {path.name} are missing: run `semid train identity`.") from None
    version = (st.st_ino, st.st_mtime_ns, st.st_size)
    key = str(path.resolve())
    with _LOADED_LOCK:  # the server may de-identify on several threads
        hit = _LOADED.get(key)
        if hit is not None and hit[0] == version:
            return hit[1]
        net = IdentityNetwork.load(path, scripted=True)
        _LOADED[key] = (version, net)
        return net


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean arrays (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


# -------------------------------------------------------------------------------------------- training


def _check_seed(seed: int) -> None:
    if int(seed) in RESERVED_SEEDS:
        raise ValueError(f"seed {seed} is {RESERVED_SEEDS[int(seed)]}: train the identity network on another "
                         f"seed (default {TRAIN_SEED})")


def _phantom_items(seed: int, subjects: Sequence[int], visits: Sequence[int], modalities: Sequence[str],
                   base: str = "small", log: Log = print) -> list[dict[str, Any]]:
    """Prepared training items: ``{"x", "y", "name"}`` per visit and modality on a 4 mm grid: ``x`` (z, y, x),
    ``y`` (C, z, y, x), the ``targets`` of every output."""
    from semid.phantoms import Population

    pop = Population(max(subjects) + 1, seed=seed, base=base, modalities=tuple(modalities))
    items = []
    t0 = time.time()
    for k, i in enumerate(subjects):
        subject = pop.subject(i)
        for j in visits:
            for m in modalities:
                v = subject.visit(j, m)
                x, grid = prepare(v.image, m)
                items.append({"x": x, "y": targets(v.labels, grid),
                              "name": f"{base}/{subject.subject_id}/{v.visit_id}/{m}"})
        log(f"  {base}: {k + 1}/{len(subjects)} subjects ({time.time() - t0:.0f} s)")
    return items


def _augment(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, canvas: Sequence[int] = CANVAS
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented sample on the training canvas: tensors (1, *canvas) for the image and (C, *canvas) for
    the soft targets ``y``, (C, z, y, x) or one target (z, y, x) (then C = 1).

    A random rotation (+-AUG_DEG about each axis), isotropic scale (1 +- AUG_SCALE), translation
    (+-AUG_MM) and left-right flip, applied to image and target together by one ``grid_sample``
    (trilinear, zero padding = background), then intensity scale and gamma (MR contrast, CT window
    drift) and a little noise on the image.
    """
    y = y[None] if y.ndim == x.ndim else y  # one target (a reviewed label) or one per output
    xt = torch.from_numpy(np.concatenate([x[None], y]))[None]  # (1, 1 + C, z, y, x)
    a = np.deg2rad(rng.uniform(-AUG_DEG, AUG_DEG, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(a[0]), -np.sin(a[0])], [0, np.sin(a[0]), np.cos(a[0])]])
    ry = np.array([[np.cos(a[1]), 0, np.sin(a[1])], [0, 1, 0], [-np.sin(a[1]), 0, np.cos(a[1])]])
    rz = np.array([[np.cos(a[2]), -np.sin(a[2]), 0], [np.sin(a[2]), np.cos(a[2]), 0], [0, 0, 1]])
    m = rx @ ry @ rz * rng.uniform(1.0 - AUG_SCALE, 1.0 + AUG_SCALE)
    if rng.random() < 0.5:
        m = m @ np.diag([-1.0, 1.0, 1.0])  # affine_grid's first coordinate is the array's last axis (R-L)
    # affine_grid works in normalised coordinates [-1, 1] of each tensor; convert through millimetres
    half_out = np.array(canvas[::-1], float) * SPACING_MM / 2.0  # (x, y, z) order
    half_in = np.array(x.shape[::-1], float) * SPACING_MM / 2.0
    shift = rng.uniform(-AUG_MM, AUG_MM, 3)
    theta = np.zeros((3, 4))
    theta[:, :3] = np.diag(1.0 / half_in) @ m @ np.diag(half_out)
    theta[:, 3] = shift / half_in
    grid = F.affine_grid(torch.from_numpy(theta).float()[None], [1, xt.shape[1], *canvas], align_corners=False)
    out = F.grid_sample(xt.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    img, target = out[:1], out[1:].clamp(0.0, 1.0)
    img = img.clamp_min(0.0) ** float(rng.uniform(0.8, 1.25)) * float(rng.uniform(0.85, 1.15))
    img = img + 0.02 * torch.from_numpy(rng.standard_normal(img.shape).astype(np.float32))
    return img.clamp(0.0, CLIP_MAX), target


def _lr(step: int, steps: int, lr: float, warmup: int = 20) -> float:
    """Linear warm-up then cosine decay to 2 % of ``lr`` (a function of the step, so resuming is exact)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0))))


def evaluate(model: IdentityNetwork, seed: int, subjects: Sequence[int], visits: Sequence[int] = (0,),
             modalities: Sequence[str] = ("MR", "CT"), base: str = "small", log: Log = print,
             output: str = "identity") -> dict[str, Any]:
    """Dice of the ``output`` map > 0.5 against its labels (identity: 3 | 5, brain: 1 | 4) on the visits'
    own 2 mm grid, per modality.

    Returns ``{modality: {"mean", "min", "n"}}`` plus ``"all"``.
    """
    labels_of = {"identity": REGION_LABELS, "brain": BRAIN_LABELS}[output]
    from semid.phantoms import Population

    pop = Population(max(subjects) + 1, seed=seed, base=base, modalities=tuple(modalities))
    scores: dict[str, list[float]] = {m: [] for m in modalities}
    for i in subjects:
        for j in visits:
            for m in modalities:
                v = pop.subject(i).visit(j, m)
                prob = sitk.GetArrayFromImage(model.predict_maps(v.image, m)[output])
                d = dice(prob > 0.5, np.isin(sitk.GetArrayViewFromImage(v.labels), labels_of))
                scores[m].append(d)
                log(f"  seed {seed} {base} subject {i} visit {j} {m}: {output} Dice {d:.4f}")
    out: dict[str, Any] = {}
    for key, vals in [*scores.items(), ("all", [d for v in scores.values() for d in v])]:
        out[key] = {"mean": round(float(np.mean(vals)), 4), "min": round(float(np.min(vals)), 4), "n": len(vals)}
    return out


def _save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary name beside ``path``, then rename: never a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(out: Path | str = DEFAULT_WEIGHTS, n_subjects: int = TRAIN_SUBJECTS, n_visits: int = TRAIN_VISITS,
          seed: int = TRAIN_SEED, steps: int = TRAIN_STEPS, *, mean_subjects: int = TRAIN_MEAN_SUBJECTS,
          modalities: Sequence[str] = ("MR", "CT"), batch: int = 2, lr: float = 3e-3,
          device: str | None = "auto", threads: int = 1, resume: bool = False, checkpoint: Path | None = None,
          checkpoint_every: int = 50, heldout_subjects: int = 4, command: str = "", progress: bool = True,
          log: Log = print) -> dict[str, Any]:
    """Train the identity U-Net on phantom visits and save it to ``out``; returns the saved metadata.

    Data: subjects ``0..n_subjects-1`` of ``Population(seed)`` on the real T1w base head and
    ``0..mean_subjects-1`` on the average head, visits ``0..n_visits-1``, every modality in
    ``modalities``; prepared once (``prepare``, 4 mm) and kept in memory. Each step draws ``batch``
    volumes, augments them (``_augment``) and minimises soft-target BCE + Dice (MONAI ``DiceLoss``);
    Adam with warm-up and cosine decay. Every ``checkpoint_every`` steps the state (network, optimiser,
    step, sampler state) goes to ``checkpoint`` (default ``out`` + ``.ckpt``) under a temporary name then
    renamed; ``resume=True`` continues from it. Held-out Dice (input grid, MR and CT) is measured on
    subjects ``n_subjects..n_subjects+heldout_subjects-1`` of the same seed (people not trained on) and on
    ``Population(heldout_subjects, 2026)`` (the benchmark's people; measured only, never used to choose).
    """
    from monai.losses import DiceLoss
    from monai.utils import set_determinism

    _check_seed(seed)
    torch.set_num_threads(max(1, int(threads)))
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, int(threads)))
    set_determinism(seed)
    dev = _device(device)
    out = Path(out)
    checkpoint = Path(checkpoint) if checkpoint is not None else out.with_name(out.name + ".ckpt")
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    log(f"generating phantoms of seed {seed}: {n_subjects} subjects (+{mean_subjects} on the average head) x "
        f"{n_visits} visits x {','.join(modalities)}")
    items = _phantom_items(seed, range(n_subjects), range(n_visits), modalities, "small", log)
    if mean_subjects > 0:
        items += _phantom_items(seed, range(mean_subjects), range(n_visits), modalities, "mean", log)
    t_data = time.time() - t_start
    log(f"{len(items)} training volumes ready in {t_data:.0f} s")

    net = _build(ARCH).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    dice_loss = DiceLoss(sigmoid=True, batch=True)
    rng = np.random.default_rng([seed, 1])
    step, losses, t_train_before = 0, [], 0.0
    if resume and checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        net.load_state_dict(state["state_dict"])
        opt.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["rng"]
        step, losses, t_train_before = int(state["step"]), list(state["losses"]), float(state["train_seconds"])
        log(f"resumed from {checkpoint} at step {step}")
    elif resume:
        log(f"no checkpoint at {checkpoint}: starting from step 0")

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=step, unit="step", file=sys.stderr, desc="identity U-Net", dynamic_ncols=True)
    net.train()
    t0 = time.time()
    running: list[float] = []
    while step < steps:
        pick = rng.choice(len(items), size=batch, replace=len(items) < batch)
        pairs = [_augment(items[k]["x"], items[k]["y"], rng) for k in pick]
        x = torch.stack([p[0] for p in pairs]).to(dev)
        y = torch.stack([p[1] for p in pairs]).to(dev)
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        logits = net(x)
        loss = F.binary_cross_entropy_with_logits(logits, y) + dice_loss(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        running.append(float(loss.item()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(running[-20:]):.4f}")
        if step % 25 == 0 or step == steps:
            losses.append(round(float(np.mean(running)), 5))
            log(f"step {step}/{steps}: loss {losses[-1]:.4f} ({time.time() - t0 + t_train_before:.0f} s)")
            running = []
        if checkpoint_every and (step % checkpoint_every == 0) and step < steps:
            _save_atomic({"state_dict": net.state_dict(), "optimizer": opt.state_dict(), "step": step,
                          "rng": rng.bit_generator.state, "losses": losses,
                          "train_seconds": time.time() - t0 + t_train_before}, checkpoint)
    if bar is not None:
        bar.close()
    t_train = time.time() - t0 + t_train_before

    meta: dict[str, Any] = {
        "format": FORMAT, "name": NAME, "network": "monai.networks.nets.UNet", "arch": dict(ARCH),
        "spacing_mm": SPACING_MM, "region_labels": list(REGION_LABELS), "brain_labels": list(BRAIN_LABELS),
        "outputs": list(OUTPUTS), "output": "sigmoid probability per output",
        "normalisation": {"MR": f"/ median of voxels > {MR_FOREGROUND_FRACTION} x p99.5", "CT": "(HU + 1000) / 1000",
                          "clip": [0.0, CLIP_MAX]},
        "training": {
            "command": command, "data": {"population_seed": int(seed), "subjects_real_head": int(n_subjects),
                                         "subjects_average_head": int(mean_subjects), "visits": int(n_visits),
                                         "modalities": list(modalities), "volumes": len(items)},
            "steps": int(steps), "batch": int(batch), "lr": lr, "canvas": list(CANVAS),
            "augmentation": {"rotation_deg": AUG_DEG, "scale": AUG_SCALE, "translation_mm": AUG_MM,
                             "lr_flip": True, "gamma": [0.8, 1.25], "intensity_scale": [0.85, 1.15]},
            "loss": "BCE (soft targets) + Dice", "loss_curve_every_25_steps": losses, "device": dev.type,
            "threads": int(threads), "data_seconds": round(t_data, 1), "train_seconds": round(t_train, 1),
            "monai": str(__import__("monai").__version__), "torch": str(torch.__version__)},
    }
    model = IdentityNetwork(net, meta, dev)
    held = list(range(n_subjects, n_subjects + heldout_subjects))
    log(f"held-out Dice (input 2 mm grid, prob > 0.5 vs labels 3|5): seed {seed} subjects {held[0]}-{held[-1]}")
    heldout = evaluate(model, seed, held, (0,), modalities, "small", log)
    log(f"benchmark population (measured only): Population({heldout_subjects}, seed=2026)")
    bench = evaluate(model, 2026, range(heldout_subjects), (0,), modalities, "small", log)
    meta["training"]["heldout"] = {"population": f"Population(seed={seed}) subjects {held[0]}-{held[-1]}, visit 0",
                                   "dice": heldout}
    meta["training"]["benchmark_population"] = {"population": f"Population({heldout_subjects}, seed=2026), visit 0",
                                                "dice": bench}
    log(f"held-out brain Dice (prob > 0.5 vs labels 1|4): seed {seed} subjects {held[0]}-{held[-1]}")
    brain = evaluate(model, seed, held, (0,), modalities, "small", log, output="brain")
    meta["training"]["heldout"]["brain_dice"] = brain
    for name, res in (("held-out", heldout), ("benchmark", bench), ("held-out brain", brain)):
        log(f"{name}: " + ", ".join(f"{k} mean {v['mean']:.4f} min {v['min']:.4f}" for k, v in res.items()))
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    _save_atomic({**plain_metadata(meta), "state_dict": state}, out)
    if checkpoint.is_file():
        checkpoint.unlink()
    log(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB); total {time.time() - t_start:.0f} s")
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m semid.identity.network train ...`` (also ``semid train identity ...``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m semid.identity.network", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train the identity-region (and brain) U-Net on phantoms and write its weights")
    tr.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS, help="weights file (default: the committed one)")
    tr.add_argument("--subjects", type=int, default=TRAIN_SUBJECTS, help="subjects on the real T1w base head")
    tr.add_argument("--mean-subjects", type=int, default=TRAIN_MEAN_SUBJECTS, help="subjects on the average head")
    tr.add_argument("--visits", type=int, default=TRAIN_VISITS, help="visits per subject (MR and CT each)")
    tr.add_argument("--seed", type=int, default=TRAIN_SEED, help="phantom population seed (not 2026, 4242 or 1)")
    tr.add_argument("--steps", type=int, default=TRAIN_STEPS)
    tr.add_argument("--batch", type=int, default=2)
    tr.add_argument("--lr", type=float, default=3e-3)
    tr.add_argument("--modalities", default="MR,CT", help="comma-separated (default MR,CT)")
    tr.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    tr.add_argument("--threads", type=int, default=1, help="torch and SimpleITK threads (default 1)")
    tr.add_argument("--checkpoint", type=Path, default=None, help="checkpoint file (default: OUT.ckpt)")
    tr.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    tr.add_argument("--resume", action="store_true", help="continue from the checkpoint if there is one")
    tr.add_argument("--heldout-subjects", type=int, default=4, help="held-out subjects for the Dice report")
    tr.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = parser.parse_args(argv)
    try:
        _check_seed(args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    train(args.out, args.subjects, args.visits, args.seed, args.steps, mean_subjects=args.mean_subjects,
          modalities=tuple(m.strip().upper() for m in args.modalities.split(",") if m.strip()), batch=args.batch,
          lr=args.lr, device=args.device, threads=args.threads, resume=args.resume, checkpoint=args.checkpoint,
          checkpoint_every=args.checkpoint_every, heldout_subjects=args.heldout_subjects,
          command="python -m semid.identity.network " + " ".join(argv),
          progress=not args.no_progress, log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
