"""Utility measures U1 and U2 of the benchmark (DESIGN.md §6).

**U1, segmentation.** A small MONAI 3D U-Net (``SegmentationModel``) predicts the six phantom labels
(``semid.phantoms.LABELS``: background, brain, other head tissue, identity region, brain lesion,
face-region lesion). It is trained on *original* phantom MR visits of a population whose seed is not
the benchmark's (2026) and applied to de-identified outputs; ``u1`` reports Dice per class inside and
outside the ground-truth identity region. The committed weights (``semid/data/models/seg_unet.pt``)
were made by ``python -m semid.eval.utility train`` (its defaults; the file's ``"training"`` entry
records the seeds, steps and held-out Dice).

**U2, untouched voxels.** ``u2`` counts how much of a volume outside the blocked region ``B_p`` is
bit-identical to the original (must be 1.0) and how many brain voxels changed (must be 0).

Intensity normalisation (``normalise``) must not move when a de-identifier changes the face: MR is
divided by the median of the *deep* head voxels (at least half the largest depth under the head
surface, i.e. the middle of the brain), which a filled, blurred or emptied face does not reach; CT
uses a fixed HU window. The committed model is trained on MR only (the benchmark's main modality);
``predict`` refuses a CT volume unless the weights say they were trained on CT
(``train --modalities MR,CT``).

Both measures run on CPU and on CUDA when present (``SegmentationModel.load(device=...)``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from semid.io import MODALITY_KEY, plain_metadata

#: Label names, index = label value (``semid.phantoms.LABELS``); Dice is reported for 1..5.
LABEL_NAMES: tuple[str, ...] = ("background", "brain", "head", "identity", "brain_lesion", "face_lesion")
DICE_CLASSES: tuple[str, ...] = LABEL_NAMES[1:]
#: The committed weights.
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "data" / "models" / "seg_unet.pt"
#: The benchmark's population seed: never used for training.
BENCHMARK_SEED = 2026
#: Training defaults (``train``); the committed weights were made with these.
TRAIN_SEED, TRAIN_SUBJECTS, TRAIN_VISITS, TRAIN_STEPS = 1, 32, 2, 1600
PATCH = (48, 48, 48)
#: Patch sampling ratios per label for ``RandCropByLabelClassesd``: lesions are oversampled.
CROP_RATIOS = (0.3, 1.0, 1.0, 1.5, 3.0, 4.0)
ARCH: dict[str, Any] = {"spatial_dims": 3, "in_channels": 1, "out_channels": len(LABEL_NAMES),
                        "channels": (16, 32, 64, 128), "strides": (2, 2, 2), "num_res_units": 1, "norm": "batch"}
#: Normalisation parameters (stored in the weights file, read back by ``predict``).
NORM: dict[str, Any] = {"mr": "divide by the median of head voxels at >= 0.5 x the largest depth under the surface",
                        "mr_depth_fraction": 0.5, "mr_clip": 6.0, "ct_window_hu": (-1000.0, 2000.0),
                        "ct_scale_hu": 1000.0}
FORMAT = 1


# ------------------------------------------------------------------------------------------ normalisation

#: Volumes up to this many voxels are segmented in one window (the network is fully convolutional).
WHOLE_VOLUME_VOXELS = 160**3


def _modality(image: sitk.Image) -> str:
    return image.GetMetaData(MODALITY_KEY) if image.HasMetaDataKey(MODALITY_KEY) else "MR"


def normalise(image: sitk.Image, modality: str | None = None, norm: dict[str, Any] | None = None) -> np.ndarray:
    """The network input of ``image``: a float32 (z, y, x) array, brain about 1 for MR.

    MR: divided by the median of the head voxels that lie at least ``mr_depth_fraction`` of the
    largest depth under the head's surface (the centre of the head, i.e. brain), then clipped to
    ``[0, mr_clip]``. The face is near the surface, so replacing, blurring or removing it moves the
    reference only a little (a removed face brings the surface closer to the frontal brain, which only
    drops some brain voxels from the reference set). CT: HU clipped to ``ct_window_hu``, plus 1000, over
    ``ct_scale_hu`` (air 0, water 1, bone about 2).
    """
    from semid import identity as idm

    norm = {**NORM, **(norm or {})}
    modality = modality or _modality(image)
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    if modality == "CT":
        lo, hi = norm["ct_window_hu"]
        return ((np.clip(arr, lo, hi) + 1000.0) / norm["ct_scale_hu"]).astype(np.float32)
    if modality != "MR":
        raise ValueError(f"modality must be MR or CT, not {modality!r}")
    mask = idm.head_mask(image, idm.head_threshold(image, "MR"))
    depth = -sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(mask, insideIsPositive=False, squaredDistance=False,
                                                                 useImageSpacing=True))
    inside = depth > 0
    if not inside.any():
        scale = float(np.percentile(arr, 99)) or 1.0
    else:
        deep = depth >= norm["mr_depth_fraction"] * float(depth.max())
        scale = float(np.median(arr[deep])) or 1.0
    return np.clip(arr / scale, 0.0, norm["mr_clip"]).astype(np.float32)


# ---------------------------------------------------------------------------------------------- the model

def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _build(arch: dict[str, Any]) -> torch.nn.Module:
    from monai.networks.nets import UNet

    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in arch.items()}
    return UNet(**kwargs)


class SegmentationModel:
    """A trained 3D U-Net for the phantom labels (U1's segmenter), with its normalisation.

    Use ``SegmentationModel.load()`` for the committed weights; ``predict`` segments one volume.
    """

    def __init__(self, net: torch.nn.Module, meta: dict[str, Any], device: str | torch.device | None = None) -> None:
        self.device = _device(device)
        self.net = net.to(self.device).eval()
        self.meta = meta
        self.roi = tuple(meta.get("roi", (96, 96, 96)))

    @classmethod
    def load(cls, path: Path | None = None, device: str | torch.device | None = None) -> SegmentationModel:
        """Read weights saved by ``train`` (default: the committed ``semid/data/models/seg_unet.pt``).

        The file is read with ``torch.load(weights_only=True)``: a dict of ``state_dict`` and plain
        metadata (``arch``, ``norm``, ``labels``, ``modalities``, ``training``).
        """
        path = Path(path) if path is not None else DEFAULT_WEIGHTS
        if not path.exists():
            raise FileNotFoundError(f"no segmentation weights at {path}: run `python -m semid.eval.utility train`")
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("format") != FORMAT:
            raise ValueError(f"{path}: unknown weights format {blob.get('format')!r}")
        net = _build(blob["arch"])
        net.load_state_dict(blob["state_dict"])
        meta = {k: v for k, v in blob.items() if k != "state_dict"}
        return cls(net, meta, device)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.meta.get("modalities", ("MR",)))

    def predict_array(self, x: np.ndarray) -> np.ndarray:
        """Labels (uint8, (z, y, x)) of an already normalised volume (``normalise``)."""
        from monai.inferers import sliding_window_inference

        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None].to(self.device)
        # MONAI 1.5's sliding window indexes with a list, which this torch deprecates (harmless here)
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")
            # a small volume (the 2 mm phantoms) in one window: the same labels, half the time
            roi = (tuple(int(np.ceil(n / 16) * 16) for n in x.shape) if x.size <= WHOLE_VOLUME_VOXELS
                   else self.roi)
            logits = sliding_window_inference(t, roi, 1, self.net, overlap=0.25, mode="gaussian")
        return logits.argmax(1)[0].to(torch.uint8).cpu().numpy()

    def predict(self, image: sitk.Image) -> sitk.Image:
        """uint8 label map (values as ``semid.phantoms.LABELS``) with ``image``'s geometry.

        The modality comes from the image's ``semid.io.MODALITY_KEY`` metadata (MR when absent); a CT
        volume needs weights trained on CT.
        """
        modality = _modality(image)
        if modality not in self.modalities:
            raise ValueError(f"these weights were trained on {self.modalities}, not {modality}")
        labels = sitk.GetImageFromArray(self.predict_array(normalise(image, modality, self.meta.get("norm"))))
        labels.CopyInformation(image)
        return labels


# ---------------------------------------------------------------------------------------------- measures

def dice_per_class(pred: np.ndarray, truth: np.ndarray, region: np.ndarray | None = None) -> dict[str, float]:
    """Dice of each label 1..5 by name (brain, head, identity, brain_lesion, face_lesion).

    With ``region`` (a boolean array like ``pred``), only voxels inside it count. A class absent from
    both ``pred`` and ``truth`` (in the region) gets ``nan``: Dice is undefined there, and a mean over
    volumes should skip it (``np.nanmean``), rather than reward a class that was never there with 1.0.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"shapes differ: {pred.shape} vs {truth.shape}")
    if region is not None:
        region = np.asarray(region, bool)
        if region.shape != pred.shape:
            raise ValueError(f"region shape {region.shape} differs from {pred.shape}")
        pred, truth = pred[region], truth[region]
    out = {}
    for value, name in enumerate(LABEL_NAMES):
        if value == 0:
            continue
        p, t = pred == value, truth == value
        total = int(p.sum()) + int(t.sum())
        out[name] = 2.0 * int((p & t).sum()) / total if total else math.nan
    return out


def u1(model: SegmentationModel, output: sitk.Image, truth_labels: sitk.Image, identity_region: np.ndarray
       ) -> dict[str, dict[str, float]]:
    """U1: segment a de-identified ``output`` and score it against the original's ground truth.

    Args:
        model: the segmenter (``SegmentationModel.load()``).
        output: a de-identifier's output volume (same grid as the truth).
        truth_labels: the original visit's label map (``Visit.labels``).
        identity_region: boolean (z, y, x) array, the *ground-truth* identity region of the visit:
            voxels whose true label is 3 (identity) or 5 (face-region lesion), i.e.
            ``np.isin(sitk.GetArrayFromImage(visit.labels), (3, 5))``.

    Returns:
        ``{"inside": {class: dice}, "outside": {...}, "all": {...}}``: Dice per class
        (``dice_per_class``; nan where a class is absent from both prediction and truth) within the
        identity region, outside it, and over the whole volume.
    """
    truth = sitk.GetArrayFromImage(truth_labels)
    region = np.asarray(identity_region, bool)
    if region.shape != truth.shape:
        raise ValueError(f"identity_region shape {region.shape} differs from the labels' {truth.shape}")
    pred = sitk.GetArrayFromImage(model.predict(output))
    return {"inside": dice_per_class(pred, truth, region), "outside": dice_per_class(pred, truth, ~region),
            "all": dice_per_class(pred, truth)}


def u2(original: sitk.Image, output: sitk.Image, blocked_mask: sitk.Image, brain: np.ndarray) -> dict[str, Any]:
    """U2: how much of the volume a de-identifier left untouched.

    Args:
        original, output: the volume before and after de-identification (same size).
        blocked_mask: ``B_p``, non-zero where the de-identifier may change voxels.
        brain: boolean (z, y, x) array of the brain (e.g. labels 1 and 4 of a phantom visit).

    Returns:
        ``unchanged_fraction_outside_block``: fraction of voxels outside ``B_p`` whose values are
        identical (1.0 when nothing outside changed, also when nothing lies outside);
        ``brain_voxels_changed``: number of brain voxels whose value changed (inside ``B_p`` or not);
        ``pixel_type_kept``: whether the output keeps the original's pixel type (values are compared
        exactly either way, so a type change alone changes no voxel).
    """
    a, b = sitk.GetArrayViewFromImage(original), sitk.GetArrayViewFromImage(output)
    block = sitk.GetArrayViewFromImage(blocked_mask) != 0
    brain = np.asarray(brain, bool)
    if not (a.shape == b.shape == block.shape == brain.shape):
        raise ValueError(f"shapes differ: original {a.shape}, output {b.shape}, mask {block.shape}, "
                         f"brain {brain.shape}")
    changed = a != b
    if changed.ndim > block.ndim:  # vector pixels: a voxel changed if any component did
        changed = changed.reshape(*block.shape, -1).any(-1)
    outside = ~block
    n_out = int(outside.sum())
    return {"unchanged_fraction_outside_block": 1.0 - int((changed & outside).sum()) / n_out if n_out else 1.0,
            "brain_voxels_changed": int((changed & brain).sum()),
            "pixel_type_kept": original.GetPixelID() == output.GetPixelID()}


# ---------------------------------------------------------------------------------------------- training

def _visits(n_subjects: int, seed: int, n_visits: int, modalities: Sequence[str], log=print
            ) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """(normalised image, labels, name) of every visit of a phantom population."""
    from semid.phantoms import Population

    pop = Population(n_subjects, seed=seed, modalities=tuple(modalities))
    out = []
    t0 = time.time()
    for i in range(n_subjects):
        subject = pop.subject(i)
        for j in range(n_visits):
            for m in modalities:
                v = subject.visit(j, m)
                name = f"{subject.subject_id}/{v.visit_id}/{m}"
                out.append((normalise(v.image, m), sitk.GetArrayFromImage(v.labels), name))
        log(f"  generated subject {i + 1}/{n_subjects} ({time.time() - t0:.0f} s)")
    return out


def evaluate(model: SegmentationModel, data: Sequence[tuple[np.ndarray, np.ndarray, str]], log=print
             ) -> dict[str, dict[str, float]]:
    """Per-class Dice over held-out volumes: {class: {"mean", "min"}} plus per-volume rows (``"volumes"``)."""
    rows = []
    for x, y, name in data:
        t = time.time()
        d = dice_per_class(model.predict_array(x), y)
        rows.append(d)
        log(f"  {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in d.items()) + f" ({time.time() - t:.1f} s)")
    summary: dict[str, Any] = {}
    for k in DICE_CLASSES:
        vals = np.array([r[k] for r in rows], float)
        summary[k] = {"mean": round(float(np.nanmean(vals)), 4), "min": round(float(np.nanmin(vals)), 4)}
    return summary


def train(out: Path, n_subjects: int = TRAIN_SUBJECTS, seed: int = TRAIN_SEED, steps: int = TRAIN_STEPS,
          n_visits: int = TRAIN_VISITS, modalities: Sequence[str] = ("MR",), batch_volumes: int = 2,
          samples_per_volume: int = 2, lr: float = 2e-3, device: str | None = None, threads: int = 1,
          heldout_subjects: int = 4, log=print) -> dict[str, Any]:
    """Train the U1 segmenter on original phantom visits and save it to ``out``; returns the metadata.

    The training population is ``Population(n_subjects, seed)`` (``seed`` must not be the benchmark's
    2026), visits ``0..n_visits-1``; generated once and kept in memory. Patches of ``PATCH`` voxels are
    drawn by ``RandCropByLabelClassesd`` with lesions oversampled (``CROP_RATIOS``), flipped left-right
    and rescaled a little in intensity; the loss is Dice + cross-entropy; Adam with a cosine schedule.
    Held-out Dice is measured on ``Population(heldout_subjects, 2026)`` visits 0 and 1.
    """
    from monai.data import CacheDataset, DataLoader
    from monai.losses import DiceCELoss
    from monai.transforms import (
        ClassesToIndicesd,
        Compose,
        RandCropByLabelClassesd,
        RandFlipd,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )
    from monai.utils import set_determinism

    if seed == BENCHMARK_SEED:
        raise ValueError(f"seed {BENCHMARK_SEED} is the benchmark's population: train on another seed")
    torch.set_num_threads(threads)
    set_determinism(seed)
    dev = _device(device)
    t_start = time.time()
    log(f"generating {n_subjects} subjects x {n_visits} visits ({','.join(modalities)}), seed {seed}")
    data = _visits(n_subjects, seed, n_visits, modalities, log)
    items = [{"image": x[None], "label": y[None]} for x, y, _ in data]
    t_data = time.time() - t_start
    transforms = Compose([
        ClassesToIndicesd("label", num_classes=len(LABEL_NAMES)),
        RandCropByLabelClassesd(["image", "label"], "label", PATCH, ratios=list(CROP_RATIOS),
                                num_classes=len(LABEL_NAMES), num_samples=samples_per_volume,
                                indices_key="label_cls_indices", allow_smaller=False),
        RandFlipd(["image", "label"], prob=0.5, spatial_axis=2),
        RandScaleIntensityd("image", factors=0.15, prob=0.8),
        RandShiftIntensityd("image", offsets=0.05, prob=0.5),
    ])
    if len(items) < batch_volumes:
        raise ValueError(f"{len(items)} training volumes: need at least batch_volumes={batch_volumes}")
    ds = CacheDataset(items, transforms, cache_rate=1.0, num_workers=0, progress=False)
    loader = DataLoader(ds, batch_size=batch_volumes, shuffle=True, num_workers=0, drop_last=True)
    net = _build(ARCH).to(dev)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    step, t0, running = 0, time.time(), []
    net.train()
    while step < steps:
        for batch in loader:
            x, y = batch["image"].to(dev), batch["label"].to(dev).long()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), y)
            loss.backward()
            opt.step()
            sched.step()
            running.append(loss.item())
            step += 1
            if step % 50 == 0 or step == steps:
                log(f"step {step}/{steps}: loss {np.mean(running):.4f} ({time.time() - t0:.0f} s)")
                running = []
            if step >= steps:
                break
    t_train = time.time() - t0
    meta: dict[str, Any] = {
        "format": FORMAT, "network": "monai.networks.nets.UNet", "arch": dict(ARCH), "norm": dict(NORM),
        "labels": list(LABEL_NAMES), "modalities": list(modalities), "roi": [96, 96, 96],
        "training": {"population_seed": seed, "subjects": n_subjects, "visits": n_visits, "steps": steps,
                     "patch": list(PATCH), "crop_ratios": list(CROP_RATIOS), "batch_volumes": batch_volumes,
                     "samples_per_volume": samples_per_volume, "lr": lr, "loss": "DiceCELoss(softmax, batch)",
                     "device": dev.type, "threads": threads, "data_seconds": round(t_data, 1),
                     "train_seconds": round(t_train, 1), "monai": __import__("monai").__version__,
                     "torch": torch.__version__},
    }
    model = SegmentationModel(net, meta, dev)
    log(f"held-out Dice on Population({heldout_subjects}, seed={BENCHMARK_SEED}) visits 0-1 (MR):")
    held = _visits(heldout_subjects, BENCHMARK_SEED, 2, ("MR",), lambda *_: None)
    summary = evaluate(model, held, log)
    meta["training"]["heldout"] = {"population": f"Population({heldout_subjects}, seed={BENCHMARK_SEED})",
                                   "visits": [0, 1], "dice": summary}
    for k, v in summary.items():
        log(f"  {k:13s} mean {v['mean']:.3f}  min {v['min']:.3f}")
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**plain_metadata(meta), "state_dict": state}, out)
    log(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB); total {time.time() - t_start:.0f} s")
    return meta


def face_to_air(image: sitk.Image, labels: sitk.Image) -> sitk.Image:
    """The block-only worst case: voxels whose true label is 3 or 5 set to air (MR 0, CT -1000)."""
    arr = sitk.GetArrayFromImage(image)
    lab = sitk.GetArrayFromImage(labels)
    arr[np.isin(lab, (3, 5))] = -1000 if _modality(image) == "CT" else 0
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(image)
    for key in image.GetMetaDataKeys():
        out.SetMetaData(key, image.GetMetaData(key))
    return out


def _report(weights: Path | None, n_subjects: int, seed: int, n_visits: int, log=print) -> None:
    """Held-out Dice per class on originals and with the face set to air, and U1 inside/outside."""
    from semid.phantoms import Population

    model = SegmentationModel.load(weights)
    pop = Population(n_subjects, seed=seed, modalities=("MR",))
    rows: dict[str, list[dict[str, float]]] = {"original": [], "face_to_air": [], "original_inside": [],
                                               "face_to_air_inside": []}
    times = []
    for i in range(n_subjects):
        for j in range(n_visits):
            v = pop.subject(i).visit(j, "MR")
            truth = sitk.GetArrayFromImage(v.labels)
            region = np.isin(truth, (3, 5))
            t = time.time()
            r0 = u1(model, v.image, v.labels, region)
            times.append(time.time() - t)
            r1 = u1(model, face_to_air(v.image, v.labels), v.labels, region)
            rows["original"].append(r0["all"])
            rows["face_to_air"].append(r1["all"])
            rows["original_inside"].append(r0["inside"])
            rows["face_to_air_inside"].append(r1["inside"])
            log(f"{v.subject_id}/{v.visit_id}: original " + ", ".join(f"{k} {x:.3f}" for k, x in r0["all"].items())
                + " | face->air " + ", ".join(f"{k} {x:.3f}" for k, x in r1["all"].items()))
    for name, rs in rows.items():
        log(f"{name}:")
        for k in DICE_CLASSES:
            vals = np.array([r[k] for r in rs], float)
            if np.isnan(vals).all():
                continue
            log(f"  {k:13s} mean {np.nanmean(vals):.3f}  min {np.nanmin(vals):.3f}")
    log(f"inference (normalise + sliding window) per volume: mean {np.mean(times):.2f} s on {model.device}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m semid.eval.utility train|report``: retrain the committed weights, or report Dice."""
    parser = argparse.ArgumentParser(prog="python -m semid.eval.utility", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train the U1 segmenter on original phantoms and write its weights")
    tr.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS)
    tr.add_argument("--subjects", type=int, default=TRAIN_SUBJECTS)
    tr.add_argument("--visits", type=int, default=TRAIN_VISITS)
    tr.add_argument("--seed", type=int, default=TRAIN_SEED)
    tr.add_argument("--steps", type=int, default=TRAIN_STEPS)
    tr.add_argument("--modalities", default="MR", help="comma-separated, e.g. MR or MR,CT")
    tr.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    tr.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    rp = sub.add_parser("report", help="held-out Dice per class, originals and face set to air")
    rp.add_argument("--weights", type=Path, default=None)
    rp.add_argument("--subjects", type=int, default=4)
    rp.add_argument("--visits", type=int, default=2)
    rp.add_argument("--seed", type=int, default=BENCHMARK_SEED)
    rp.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.command == "train":
        train(args.out, args.subjects, args.seed, args.steps, args.visits,
              tuple(m.strip() for m in args.modalities.split(",") if m.strip()), device=args.device,
              threads=args.threads, log=lambda s: print(s, flush=True))
    else:
        torch.set_num_threads(args.threads)
        _report(args.weights, args.subjects, args.seed, args.visits, log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
