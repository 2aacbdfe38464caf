"""Fine-tuning the identity network on reviewed labels, and the rule that keeps a worse model out.

A person reviews the identity region the network drew (MONAI Label's ``identity`` infer task, corrected
in Slicer's segment editor) and saves it as the image's ``final`` label. ``finetune`` continues training
the weights in use on those (image, label) pairs and publishes the result only if it segments the
validation volumes at least as well as the weights in use do (the key metric, below). MONAI Label's
``identity`` train task (``monailabel_app/lib/trainers/identity.py``) is a thin adapter over it.

Labels: any non-zero voxel of a label map is identity region (what Slicer saves for a one-segment
review); the label must lie on its image's voxel grid (same size, spacing, origin and direction, as
MONAI Label clients save them). Labels that cannot be read, lie on another grid, or hold less than
``MIN_REGION_ML`` of region (an empty or nearly empty label is a review mistake, not a face) are skipped
and counted in the report.

Data pipeline (MONAI): a ``CacheDataset`` of ``{"image": path, "label": path}`` dictionaries through
``LoadIdentityCased`` (deterministic, so cached once: both files onto the network's 4 mm processing
grid, see ``semid.identity.network.prepare``) and ``RandIdentityAugmentd`` (the training augmentation of
``network._augment`` onto the 64^3 canvas), batched by a MONAI ``DataLoader``.

Validation and the key metric: the mean Dice, on each validation volume's own grid, of
``predict(volume) > 0.5`` against its identity region, computed for the candidate and for the weights in
use on the *same* volumes; the candidate is published if and only if its Dice is at least the current
one. The validation volumes are

- ``"datastore"``: a held-out part of the labelled images (``ceil(20 %)``, at least one; which ones is
  a keyed hash of their file names, so it is stable between runs), used when there are at least
  ``MIN_LABELLED_FOR_SPLIT`` usable labelled images; they are never trained on;
- ``"phantoms"``: otherwise (or on request), phantom visits whose region is known by construction:
  subjects 24 (MR) and 25 (CT) of the identity network's training population (seed 5), the people the
  committed weights held out.

Held-out reviewed labels cannot catch labels that are wrong in the same way everywhere (saved with a
flipped orientation, drawn on the wrong structure): the held-out ones are wrong too. So every candidate
must also pass a sanity floor on the phantoms: Dice at least ``PHANTOM_FLOOR`` there. The floor is low on
purpose: a site may review the region with its own convention (say a margin of a few millimetres, which
costs about 0.15 Dice against the phantoms' own region), and that is a better model for that site.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from monai.transforms import MapTransform, RandomizableTransform

from semid.errors import InputError
from semid.identity import network as idnet
from semid.io import plain_metadata, read_volume

#: Smallest identity region (ml) a usable label holds; a head's region is a few hundred ml.
MIN_REGION_ML = 20.0
#: Usable labelled images needed before some are held out for validation (else phantoms validate).
MIN_LABELLED_FOR_SPLIT = 3
#: Share of the usable labelled images held out for validation (rounded up, at least one).
VALIDATION_FRACTION = 0.2
#: Phantom validation volumes: (subject, modality) of ``Population(seed=network.TRAIN_SEED)``, visit 0.
PHANTOM_VALIDATION: tuple[tuple[int, str], ...] = ((24, "MR"), (25, "CT"))
#: Geometry tolerance between a label and its image (mm for spacing and origin, cosines for direction).
GEOMETRY_TOL = 1e-3
#: Dice on the phantom validation volumes below which a candidate is kept out whatever its key metric.
PHANTOM_FLOOR = 0.5
VALIDATION_SOURCES = ("auto", "datastore", "phantoms")

Log = Callable[[str], None]


@dataclass(frozen=True)
class FinetuneConfig:
    """What ``finetune`` does.

    Attributes:
        steps: optimiser steps (each on ``batch`` augmented volumes); 0 only re-validates the weights in use.
        epochs: when above 0, passes over the training volumes instead of ``steps`` (``epochs`` x the
            batches of one pass).
        lr: Adam learning rate (constant; fine-tuning starts from trained weights, so no warm-up).
        batch: volumes per step.
        device: "auto" (CUDA when available), "cpu" or "cuda".
        validation: "auto", "datastore" or "phantoms" (see the module docstring).
        seed: seed of the augmentation and of the order of the volumes.
    """

    steps: int = 60
    lr: float = 1e-3
    batch: int = 2
    device: str = "auto"
    validation: str = "auto"
    seed: int = 0
    epochs: int = 0

    @classmethod
    def checked(cls, steps: Any = 60, lr: Any = 1e-3, batch: Any = 2, device: Any = "auto",
                validation: Any = "auto", seed: Any = 0, epochs: Any = 0) -> FinetuneConfig:
        """A config from loosely typed values (e.g. a JSON request); ``InputError`` in one sentence if one is bad."""
        def integer(name: str, value: Any, lo: int, hi: int) -> int:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise InputError(f"{name} must be a whole number from {lo} to {hi}.")
            try:
                number = float(value)
            except ValueError:
                raise InputError(f"{name} must be a whole number from {lo} to {hi}.") from None
            if not math.isfinite(number) or number != int(number) or not lo <= number <= hi:
                raise InputError(f"{name} must be a whole number from {lo} to {hi}.")
            return int(number)

        steps_i = integer("max_steps", steps, 0, 100_000)
        batch_i = integer("batch", batch, 1, 16)
        seed_i = integer("seed", seed, 0, 2**31 - 1)
        epochs_i = integer("max_epochs", epochs, 0, 10_000)
        try:
            lr_f = float(lr) if not isinstance(lr, bool) else math.nan
        except (TypeError, ValueError):
            lr_f = math.nan
        if not (math.isfinite(lr_f) and 0.0 <= lr_f <= 1.0):
            raise InputError("lr must be a number from 0 to 1 (e.g. 0.001).")
        dev = str(device).strip().lower()
        if dev not in ("auto", "cpu", "cuda"):
            raise InputError("device must be auto, cpu or cuda.")
        if dev == "cuda" and not torch.cuda.is_available():
            raise InputError("device cuda was asked for but this server has no usable CUDA GPU: use auto or cpu.")
        val = str(validation).strip().lower()
        if val not in VALIDATION_SOURCES:
            raise InputError("validation must be auto, datastore or phantoms.")
        return cls(steps_i, lr_f, batch_i, dev, val, seed_i, epochs_i)


# ------------------------------------------------------------------------------------------------- data


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=GEOMETRY_TOL)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=GEOMETRY_TOL)
            and np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=GEOMETRY_TOL))


def _header(path: str | Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


def read_region(label_path: str | Path, image_path: str | Path) -> sitk.Image:
    """The identity region of a label file (uint8, 1 = region) with its image's exact geometry.

    Raises:
        InputError: the label or image cannot be read, or the label is not on the image's voxel grid.
    """
    try:
        label = sitk.ReadImage(str(label_path))
        head = _header(image_path)
    except RuntimeError:
        raise InputError("A label or its image cannot be read as a volume.") from None
    ref = sitk.Image(head.GetSize(), sitk.sitkUInt8)
    ref.SetSpacing(head.GetSpacing())
    ref.SetOrigin(head.GetOrigin())
    ref.SetDirection(head.GetDirection())
    if label.GetNumberOfComponentsPerPixel() != 1 or label.GetDimension() != 3 or not _same_grid(label, ref):
        raise InputError("A label is not on its image's voxel grid: save it from the image it was drawn on.")
    region = sitk.GetImageFromArray((sitk.GetArrayViewFromImage(label) != 0).astype(np.uint8))
    region.CopyInformation(ref)  # the image's geometry exactly (the label's may differ by rounding)
    return region


def region_ml(region: sitk.Image) -> float:
    """Volume (ml) of the non-zero voxels of ``region``."""
    return float(np.count_nonzero(sitk.GetArrayViewFromImage(region))) * float(np.prod(region.GetSpacing())) / 1000.0


def region_fraction(region: sitk.Image, grid: sitk.Image) -> np.ndarray:
    """Soft training target on ``grid`` (the processing grid): the fraction of each voxel inside ``region``."""
    inside = sitk.Cast(region, sitk.sitkFloat32)
    return np.clip(sitk.GetArrayFromImage(idnet.to_grid(sitk.DICOMOrient(inside, "RAS"), grid, 0.0)), 0.0, 1.0)


class LoadIdentityCased(MapTransform):
    """``{"image": path, "label": path}`` -> network input and soft target on the 4 mm processing grid.

    Output: ``"image"`` float32 (z, y, x) in [0, 5] (``network.prepare``), ``"label"`` float32 (z, y, x)
    in [0, 1] (``region_fraction``), ``"modality"`` "MR" or "CT" (header, else guessed from the values).
    """

    def __init__(self, keys: Sequence[Hashable] = ("image", "label")) -> None:
        super().__init__(keys)
        self.image_key, self.label_key = keys

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = read_volume(d[self.image_key])
        region = read_region(d[self.label_key], d[self.image_key])
        modality = idnet.resolve_modality(image, "auto")
        x, grid = idnet.prepare(image, modality)
        d[self.image_key] = x
        d[self.label_key] = region_fraction(region, grid)
        d["modality"] = modality
        return d


class RandIdentityAugmentd(RandomizableTransform, MapTransform):
    """The identity network's training augmentation (``network._augment``: rotation, scale, shift, flip,
    intensity) of image and target together, onto the ``network.CANVAS`` canvas: tensors (1, 64, 64, 64)."""

    def __init__(self, keys: Sequence[Hashable] = ("image", "label")) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        MapTransform.__init__(self, keys)
        self.image_key, self.label_key = keys

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        # one numpy Generator per sample, drawn from MONAI's RandomState so set_random_state() fixes it
        rng = np.random.default_rng(int(self.R.randint(0, 2**31 - 1)))
        d[self.image_key], d[self.label_key] = idnet._augment(d[self.image_key], d[self.label_key], rng)
        return d


@dataclass
class ValidationCase:
    """One validation volume with its identity region (bool array on the volume's grid)."""

    image: sitk.Image
    region: np.ndarray
    modality: str


def usable_pairs(pairs: Sequence[tuple[str | Path, str | Path]], log: Log = print
                 ) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """The (image, label) pairs whose label is usable, and how many were skipped for what."""
    usable: list[tuple[str, str]] = []
    skipped = {"unreadable_or_off_grid": 0, "empty": 0}
    for image_path, label_path in pairs:
        try:
            region = read_region(label_path, image_path)
        except InputError:
            skipped["unreadable_or_off_grid"] += 1
            continue
        if region_ml(region) < MIN_REGION_ML:
            skipped["empty"] += 1
            continue
        usable.append((str(image_path), str(label_path)))
    if any(skipped.values()):
        log(f"skipped labels: {skipped}")
    return usable, skipped


def split(pairs: Sequence[tuple[str, str]], seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(training, validation): ``ceil(VALIDATION_FRACTION * n)`` pairs (at least one) held out by a keyed
    hash of the image file name, so the choice does not depend on the listing order."""
    order = sorted(pairs, key=lambda p: hashlib.sha256(f"{seed}:{Path(p[0]).name}".encode()).hexdigest())
    n_val = max(1, math.ceil(VALIDATION_FRACTION * len(order)))
    return order[n_val:], order[:n_val]


def datastore_validation(pairs: Sequence[tuple[str, str]]) -> list[ValidationCase]:
    """Validation cases from held-out (image, label) files."""
    cases = []
    for image_path, label_path in pairs:
        image = read_volume(image_path)
        region = sitk.GetArrayFromImage(read_region(label_path, image_path)) > 0
        cases.append(ValidationCase(image, region, idnet.resolve_modality(image, "auto")))
    return cases


def phantom_validation() -> list[ValidationCase]:
    """Validation cases from the phantom people the committed weights held out (``PHANTOM_VALIDATION``)."""
    from semid.phantoms import Population

    pop = Population(max(s for s, _ in PHANTOM_VALIDATION) + 1, seed=idnet.TRAIN_SEED, base="small")
    cases = []
    for subject, modality in PHANTOM_VALIDATION:
        visit = pop.subject(subject).visit(0, modality)
        region = np.isin(sitk.GetArrayViewFromImage(visit.labels), idnet.REGION_LABELS)
        cases.append(ValidationCase(visit.image, region, modality))
    return cases


def mean_dice(model: idnet.IdentityNetwork, cases: Sequence[ValidationCase]) -> float:
    """Mean over ``cases`` of the Dice of ``model.predict(image) > 0.5`` against the region (input grid)."""
    scores = [idnet.dice(sitk.GetArrayFromImage(model.predict(c.image, c.modality)) > 0.5, c.region)
              for c in cases]
    return float(np.mean(scores))


# --------------------------------------------------------------------------------------------- training


def _freeze_batch_norm(net: torch.nn.Module) -> None:
    """Keep batch-norm statistics as trained: a handful of reviewed volumes in batches of one or two would
    otherwise pull them towards those few heads."""
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


def finetune(pairs: Sequence[tuple[str | Path, str | Path]], out: Path | str,
             base_weights: Path | str | None = None, config: FinetuneConfig | None = None,
             log: Log = print) -> dict[str, Any]:
    """Fine-tune the identity network on reviewed (image, label) files; publish to ``out`` only if not worse.

    Args:
        pairs: (image file, label file) pairs, e.g. MONAI Label's ``datastore.datalist()`` with ``final`` labels.
        out: where the new weights go when they are published (written under a temporary name, then
            renamed over the old file, so readers never see half a file).
        base_weights: the weights in use, the starting point and the model to beat (None: the committed ones).
        config: steps, learning rate, batch, device, validation source, seed.
        log: progress lines (no paths, no ids: they may name patients).

    Returns:
        A JSON-ready report: ``published``, ``dice_candidate``, ``dice_current``, ``key_metric``,
        ``validation`` (source and number of volumes), ``training`` (volumes, skipped labels, steps, lr,
        batch, device, seconds) and ``weights`` (file name and sha256 of the weights in use afterwards).

    Raises:
        InputError: no usable labelled image, or ``validation="datastore"`` with too few of them.
    """
    from monai.data import CacheDataset, DataLoader
    from monai.losses import DiceLoss
    from monai.transforms import Compose

    config = config or FinetuneConfig()
    started = time.perf_counter()
    out = Path(out)
    usable, skipped = usable_pairs(pairs, log)
    if not usable:
        raise InputError(
            f"There is no usable reviewed identity label ({len(pairs)} final label(s), "
            f"{sum(skipped.values())} skipped as unreadable, off the image grid or empty): review the identity "
            "region of a few images and save it as their final label first."
        )
    source = config.validation
    if source == "auto":
        source = "datastore" if len(usable) >= MIN_LABELLED_FOR_SPLIT else "phantoms"
    if source == "datastore":
        if len(usable) < 2:
            raise InputError("Validation on the datastore needs at least 2 usable labelled images: label more, "
                             "or use validation phantoms.")
        train_pairs, val_pairs = split(usable, config.seed)
    else:
        train_pairs, val_pairs = list(usable), []
    batch = min(config.batch, len(train_pairs))
    steps = config.epochs * math.ceil(len(train_pairs) / batch) if config.epochs > 0 else config.steps
    log(f"{len(train_pairs)} labelled volume(s) to train on, {steps} steps; validation on {source}")

    device = idnet._device(config.device)
    current = idnet.IdentityNetwork.load(base_weights, device=device)
    phantoms = phantom_validation()
    cases = datastore_validation(val_pairs) if source == "datastore" else phantoms
    dice_current = mean_dice(current, cases)
    phantom_current = mean_dice(current, phantoms) if source == "datastore" else dice_current
    log(f"weights in use: validation Dice {dice_current:.4f} (phantoms {phantom_current:.4f})")

    transform = Compose([LoadIdentityCased(), RandIdentityAugmentd()]).set_random_state(seed=config.seed)
    dataset = CacheDataset([{"image": i, "label": lab} for i, lab in train_pairs], transform, num_workers=1,
                           progress=False)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=0,
                        generator=torch.Generator().manual_seed(config.seed))
    net = copy.deepcopy(current.net).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    dice_loss = DiceLoss(sigmoid=True, batch=True)
    net.train()
    _freeze_batch_norm(net)
    step, losses = 0, []
    while step < steps:
        for sample in loader:
            x, y = sample["image"].to(device), sample["label"].to(device)
            logits = net(x)
            loss = F.binary_cross_entropy_with_logits(logits[:, :1], y) + dice_loss(logits[:, :1], y)
            if logits.shape[1] > 1:
                # reviewed labels are identity regions only: the other outputs (the brain) are held to what
                # the weights in use predict on the same sample, so fine-tuning does not unlearn them
                with torch.no_grad():
                    kept = torch.sigmoid(current.net(x)[:, 1:])
                loss = loss + F.binary_cross_entropy_with_logits(logits[:, 1:], kept)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.item()))
            step += 1
            if step % 10 == 0 or step == steps:
                log(f"step {step}/{steps}: loss {np.mean(losses[-10:]):.4f}")
            if step >= steps:
                break
    candidate = idnet.IdentityNetwork(net, copy.deepcopy(current.meta), device)
    dice_candidate = mean_dice(candidate, cases)
    phantom_candidate = mean_dice(candidate, phantoms) if source == "datastore" else dice_candidate
    better = dice_candidate >= dice_current
    sane = phantom_candidate >= PHANTOM_FLOOR
    publish = better and sane
    log(f"candidate: validation Dice {dice_candidate:.4f} (phantoms {phantom_candidate:.4f}): "
        f"{'published' if publish else 'kept out'}")

    seconds = round(time.perf_counter() - started, 1)
    training = {"volumes": len(train_pairs), "skipped_labels": skipped, **asdict(config), "steps": steps,
                "batch": batch, "device": device.type,
                "seconds": seconds, "loss_last_10": round(float(np.mean(losses[-10:])), 5) if losses else None}
    validation = {"source": source, "volumes": len(cases),
                  "phantom_check": {"dice_candidate": round(phantom_candidate, 4),
                                    "dice_current": round(phantom_current, 4), "floor": PHANTOM_FLOOR}}
    if publish:
        meta = copy.deepcopy(current.meta)
        meta["finetuned"] = {"from_sha256": current.sha256, "data": "reviewed final labels", "training": training,
                             "validation": validation, "dice_before": round(dice_current, 4),
                             "dice_after": round(dice_candidate, 4)}
        state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        out.parent.mkdir(parents=True, exist_ok=True)
        idnet._save_atomic({**plain_metadata(meta), "state_dict": state}, out)
        sha = idnet.sha256(out)
    else:
        sha = current.sha256
    in_use = out if publish else Path(current.path) if current.path else None
    return {
        "published": bool(publish),
        "key_metric": "mean Dice of predict > 0.5 against the identity region on the validation volumes; "
                      "published if the candidate's is at least the current weights' and its Dice on the "
                      f"phantom validation volumes is at least {PHANTOM_FLOOR}",
        "dice_candidate": round(dice_candidate, 4),
        "dice_current": round(dice_current, 4),
        "validation": validation,
        "training": training,
        "weights": {"file": in_use.name if in_use else None, "sha256": sha},
        "message": ("The fine-tuned weights were published." if publish else
                    "The fine-tuned weights were kept out: they scored lower than the weights in use." if not better
                    else f"The fine-tuned weights were kept out: they no longer find the identity region of the "
                    f"phantom heads (Dice {phantom_candidate:.2f} < {PHANTOM_FLOOR}); check the labels' orientation."),
    }
