"""Attacker A2: a Siamese 3D CNN that re-identifies a person from the crop around the identity region.

DESIGN.md §6: a small 3D CNN embeds a fixed physical box around the face (the same box for originals
and de-identified outputs) into a 64-d unit vector; two volumes of the same person should be close
(cosine similarity), two people far apart. It is trained on *original* phantom visits with a
batch-hard triplet loss (soft margin), on subjects disjoint from the validation and test subjects and
from the benchmark's population (seed 2026). ``ReidAttack.evaluate`` reports the verification ROC-AUC
over every probe x gallery-identity pair and rank-1 identification; ``ReidAttack.adapt`` is the
*adaptive* attacker: the same network fine-tuned on de-identified outputs of the training subjects.

The committed artefacts (``semid/data/models``):

- ``reid_siamese.pt``: ``{"state_dict": ..., "meta": {...}}`` with only tensors and plain Python values,
  so ``torch.load(path, weights_only=True)`` reads it; ``meta`` holds the crop box, the base grid, the
  normalisation, the network's size, the training configuration and the metrics measured after training;
- ``reid_pairs.json``: the population seed, the subjects and visits of each split and the verification
  pairs of the validation and test splits, so the evaluation is repeatable.

Both are made by ``python -m semid.eval.attack_reid train --out semid/data/models`` (run from ``core``).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import sys
import time
from collections.abc import Callable, Hashable, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch import nn

from semid.io import MODALITY_KEY

MODELS_DIR = Path(__file__).resolve().parents[1] / "data" / "models"
WEIGHTS_FILE = "reid_siamese.pt"
PAIRS_FILE = "reid_pairs.json"

#: Population the attacker learns from. Not 2026 (the benchmark's population): its faces are
#: different people, and the training, validation and test subjects are disjoint index ranges of it.
TRAIN_SEED = 4242
#: Subjects per split, in this order from index 0 of the TRAIN_SEED population.
N_TRAIN, N_VAL, N_TEST = 64, 12, 16
TRAIN_VISITS = (0, 1, 2, 3)
#: Gallery and probe visits of the validation and test splits.
GALLERY_VISITS, VAL_PROBE_VISITS, TEST_PROBE_VISITS = (0,), (1,), (1, 2)
#: The crop: the base head's identity region grown by MARGIN_MM (pose: +-4 degrees about the head's
#: centre, +-4 mm, which moves the face by up to ~12 mm; identity deformation up to 24 mm), area-pooled
#: to CROP_SHAPE (z, y, x): about 4.4 mm voxels on the 2 mm base grid.
MARGIN_MM = 16.0
CROP_SHAPE = (48, 48, 48)
EMBED_DIM, WIDTH = 64, 16
#: MR: divided by the median of the head (voxels above 10 % of the 99.5th percentile); CT: a fixed
#: window, (HU + 1000) / 1000, so air is 0 and soft tissue about 1 (MR's head median maps to 1 too).
NORM_MR = "mr_head_median"
NORM_CT = "ct_hu_window"
CLIP_MAX = 5.0
#: Distance scale of the soft-margin triplet loss.
LOSS_SCALE = 1.0


# ------------------------------------------------------------------------------------------------ crop


@dataclass(frozen=True)
class CropSpec:
    """The fixed physical box: index ranges ``box`` ((z0, z1), (y0, y1), (x0, x1)) on a reference grid."""

    box: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    size: tuple[int, int, int]  # reference grid size, sitk order (x, y, z)
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    shape: tuple[int, int, int] = CROP_SHAPE

    def to_meta(self) -> dict[str, Any]:
        return {"box_zyx": [list(b) for b in self.box], "grid_size_xyz": list(self.size),
                "grid_spacing": list(self.spacing), "grid_origin": list(self.origin),
                "grid_direction": list(self.direction), "crop_shape_zyx": list(self.shape)}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> CropSpec:
        return cls(tuple(tuple(int(v) for v in b) for b in meta["box_zyx"]),  # type: ignore[arg-type]
                   tuple(int(v) for v in meta["grid_size_xyz"]),  # type: ignore[arg-type]
                   tuple(float(v) for v in meta["grid_spacing"]),  # type: ignore[arg-type]
                   tuple(float(v) for v in meta["grid_origin"]),  # type: ignore[arg-type]
                   tuple(float(v) for v in meta["grid_direction"]),
                   tuple(int(v) for v in meta["crop_shape_zyx"]))  # type: ignore[arg-type]

    def reference(self) -> sitk.Image:
        ref = sitk.Image([int(v) for v in self.size], sitk.sitkUInt8)
        ref.SetSpacing(self.spacing)
        ref.SetOrigin(self.origin)
        ref.SetDirection(self.direction)
        return ref

    def same_grid(self, image: sitk.Image) -> bool:
        return (tuple(image.GetSize()) == self.size
                and np.allclose(image.GetSpacing(), self.spacing, atol=1e-4)
                and np.allclose(image.GetOrigin(), self.origin, atol=1e-3)
                and np.allclose(image.GetDirection(), self.direction, atol=1e-5))


@functools.lru_cache(maxsize=1)
def default_spec() -> CropSpec:
    """The crop box derived from the "small" base head's identity labels (fits the atlas once per process)."""
    from semid import phantoms

    base = phantoms._load_base("small")
    region = np.argwhere(base.labels == phantoms.IDENTITY)
    spacing = np.array(base.image.GetSpacing())[::-1]  # (z, y, x)
    margin = np.ceil(MARGIN_MM / spacing).astype(int)
    lo = np.maximum(region.min(axis=0) - margin, 0)
    hi = np.minimum(region.max(axis=0) + 1 + margin, base.labels.shape)
    img = base.image
    return CropSpec(tuple((int(a), int(b)) for a, b in zip(lo, hi, strict=True)),  # type: ignore[arg-type]
                    tuple(int(v) for v in img.GetSize()),  # type: ignore[arg-type]
                    tuple(float(v) for v in img.GetSpacing()),  # type: ignore[arg-type]
                    tuple(float(v) for v in img.GetOrigin()),  # type: ignore[arg-type]
                    tuple(float(v) for v in img.GetDirection()))


def identity_box() -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Index ranges ((z0, z1), (y0, y1), (x0, x1)) of the crop on the phantom base grid (array order)."""
    return default_spec().box


def _modality(image: sitk.Image) -> str:
    return image.GetMetaData(MODALITY_KEY) if image.HasMetaDataKey(MODALITY_KEY) else "MR"


def crop(image: sitk.Image, spec: CropSpec | None = None) -> np.ndarray:
    """The normalised, pooled crop of ``image`` around the identity region: float32 array ``spec.shape``.

    An image on another grid is first resampled (linear) onto the reference grid, so the box is the same
    physical box for any input. MR is divided by its head's median intensity, CT mapped by a fixed HU
    window (see NORM_MR / NORM_CT).
    """
    spec = spec or default_spec()
    ct = _modality(image).upper() == "CT"
    if not spec.same_grid(image):
        image = sitk.Resample(image, spec.reference(), sitk.Transform(), sitk.sitkLinear,
                              -1000.0 if ct else 0.0, sitk.sitkFloat32)
    arr = sitk.GetArrayViewFromImage(image)
    (z0, z1), (y0, y1), (x0, x1) = spec.box
    sub = np.asarray(arr[z0:z1, y0:y1, x0:x1], dtype=np.float32)
    if ct:
        sub = (sub + 1000.0) / 1000.0
    else:
        sample = np.asarray(arr[::2, ::2, ::2], dtype=np.float32)
        high = float(np.percentile(sample, 99.5))
        fg = sample[sample > 0.1 * high]
        scale = float(np.median(fg)) if fg.size and high > 0 else 1.0
        sub = sub / max(scale, 1e-6)
    sub = np.clip(sub, 0.0, CLIP_MAX)
    pooled = F.adaptive_avg_pool3d(torch.from_numpy(np.ascontiguousarray(sub))[None, None], spec.shape)
    return pooled[0, 0].numpy().astype(np.float32)


# --------------------------------------------------------------------------------------------- network


def _block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm3d(c_out),
                         nn.ReLU(inplace=True))


class EmbeddingTower(nn.Module):
    """The shared tower of the Siamese network: crop (n, 1, z, y, x) -> unit embedding (n, dim).

    Strided 3D convolutions down to a 3^3 map, kept spatial (flattened, not pooled: where a shape
    change is matters) and projected linearly to ``dim``.
    """

    def __init__(self, dim: int = EMBED_DIM, width: int = WIDTH, shape: Sequence[int] = CROP_SHAPE) -> None:
        super().__init__()
        c = width
        self.features = nn.Sequential(_block(1, c, 2), _block(c, 2 * c, 2), _block(2 * c, 2 * c),
                                      _block(2 * c, 4 * c, 2), _block(4 * c, 4 * c), _block(4 * c, 4 * c, 2))
        out = [math.ceil(s / 16) for s in shape]
        self.project = nn.Linear(4 * c * int(np.prod(out)), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.project(torch.flatten(self.features(x), 1)), dim=1)


def _batch_hard_loss(emb: torch.Tensor, ids: torch.Tensor, scale: float = LOSS_SCALE) -> torch.Tensor:
    """Batch-hard triplet loss, soft margin: mean softplus(scale * (hardest positive - hardest negative distance)).

    (Hermans et al., "In defense of the triplet loss".) With unit embeddings the loss sits near log 2
    for the first few hundred steps, the embeddings crowded together (cosine 0.999+) while their ranking
    already separates people; the committed 900-step run ends at ~0.4 with genuine pairs near 0.99 and
    impostors near 0. A scale of 10 learned no faster in a 400-step trial.
    """
    dist = torch.cdist(emb, emb).clamp_min(1e-9)
    same = ids[:, None] == ids[None, :]
    eye = torch.eye(len(ids), dtype=torch.bool, device=emb.device)
    hardest_pos = dist.masked_fill(~same | eye, 0.0).amax(dim=1)
    hardest_neg = dist.masked_fill(same, float("inf")).amin(dim=1)
    return F.softplus(scale * (hardest_pos - hardest_neg)).mean()


def _augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Cheap crop-space augmentation: intensity scale and gamma, a one-voxel shift, noise."""
    n = x.shape[0]
    scale = torch.from_numpy(rng.uniform(0.85, 1.15, (n, 1, 1, 1, 1)).astype(np.float32)).to(x.device)
    gamma = torch.from_numpy(rng.uniform(0.85, 1.15, (n, 1, 1, 1, 1)).astype(np.float32)).to(x.device)
    x = scale * x.clamp_min(0.0) ** gamma
    pad = F.pad(x, (1, 1, 1, 1, 1, 1), mode="replicate")
    out = torch.empty_like(x)
    d, h, w = x.shape[2:]
    for i in range(n):
        a, b, c = rng.integers(0, 3, 3)
        out[i] = pad[i, :, a:a + d, b:b + h, c:c + w]
    noise = torch.from_numpy(rng.standard_normal(out.shape).astype(np.float32)).to(x.device)
    return out + 0.02 * noise


# ------------------------------------------------------------------------------------------ the attack


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _embed_crops(model: nn.Module, crops: np.ndarray, device: torch.device, batch: int = 16) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(crops), batch):
            x = torch.from_numpy(np.ascontiguousarray(crops[i:i + batch], dtype=np.float32))[:, None].to(device)
            out.append(model(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.project.out_features), np.float32)


def _scores(gallery_emb: dict[Hashable, np.ndarray], probe_ids: Sequence[Hashable], probe_emb: np.ndarray
            ) -> dict[str, Any]:
    """Verification and identification from embeddings: cosine similarity to each identity's mean embedding."""
    from sklearn.metrics import roc_auc_score

    ids = list(gallery_emb)
    centres = np.stack([gallery_emb[k].mean(axis=0) for k in ids])
    centres /= np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
    sim = probe_emb @ centres.T  # (n_probes, n_ids)
    truth = np.array([[p == k for k in ids] for p in probe_ids], dtype=bool)
    known = truth.any(axis=1)
    result: dict[str, Any] = {"n_probes": len(probe_ids), "n_gallery_ids": len(ids),
                              "n_genuine_pairs": int(truth.sum()), "n_impostor_pairs": int((~truth).sum())}
    result["roc_auc"] = (float(roc_auc_score(truth.ravel(), sim.ravel()))
                         if 0 < truth.sum() < truth.size else float("nan"))
    best = sim.argmax(axis=1) if len(ids) else np.zeros(len(probe_ids), int)
    hits = truth[np.arange(len(probe_ids)), best] & known
    result["rank1"] = float(hits[known].mean()) if known.any() else float("nan")
    result["chance_rank1"] = 1.0 / max(len(ids), 1)
    result["mean_genuine_similarity"] = float(sim[truth].mean()) if truth.any() else float("nan")
    result["mean_impostor_similarity"] = float(sim[~truth].mean()) if (~truth).any() else float("nan")
    return result


class ReidAttack:
    """Attacker A2: embed crops with the Siamese tower; verification by cosine similarity.

    Args:
        model: the embedding tower (its weights).
        meta: the metadata saved with the weights (crop box and grid, normalisation, training config).
        device: where the network runs (CUDA when available, else CPU).
    """

    def __init__(self, model: EmbeddingTower, meta: dict[str, Any], device: torch.device | None = None) -> None:
        self.device = device or _device()
        self.model = model.to(self.device).eval()
        self.meta = meta
        self.spec = CropSpec.from_meta(meta["crop"])

    # ---- persistence

    @classmethod
    def load(cls, path: Path | str | None = None, device: torch.device | None = None) -> ReidAttack:
        """The attacker from ``path`` (a .pt file or a folder holding reid_siamese.pt); default: committed."""
        path = Path(path) if path is not None else MODELS_DIR
        if path.is_dir():
            path = path / WEIGHTS_FILE
        blob = torch.load(path, map_location="cpu", weights_only=True)
        meta = blob["meta"]
        net = meta["network"]
        model = EmbeddingTower(int(net["dim"]), int(net["width"]), meta["crop"]["crop_shape_zyx"])
        model.load_state_dict(blob["state_dict"])
        return cls(model, meta, device)

    def save(self, path: Path | str) -> None:
        state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        torch.save({"state_dict": state, "meta": self.meta}, Path(path))

    # ---- use

    def crop(self, image: sitk.Image) -> np.ndarray:
        return crop(image, self.spec)

    def embed(self, images: Sequence[sitk.Image]) -> np.ndarray:
        """Unit embeddings (n, d) of ``images`` (float32)."""
        crops = np.stack([self.crop(im) for im in images]) if len(images) else np.zeros((0, *self.spec.shape))
        return _embed_crops(self.model, crops, self.device)

    def evaluate(self, gallery: dict[Hashable, list[sitk.Image]], probes: Sequence[tuple[Hashable, sitk.Image]]
                 ) -> dict[str, Any]:
        """Verification ROC-AUC over every probe x gallery-identity pair, and rank-1 identification.

        A gallery identity is the mean of its images' embeddings; a pair's score is the cosine similarity.
        Probes whose identity is not in the gallery count as impostors only (and not in rank-1).

        Returns:
            ``roc_auc``, ``rank1``, ``n_probes``, ``n_gallery_ids``, ``n_genuine_pairs``,
            ``n_impostor_pairs``, ``chance_rank1``, ``mean_genuine_similarity``, ``mean_impostor_similarity``.
        """
        gallery_emb = {k: self.embed(list(v)) for k, v in gallery.items() if len(v)}
        probe_emb = self.embed([im for _, im in probes])
        return _scores(gallery_emb, [k for k, _ in probes], probe_emb)

    def adapt(self, deidentify: Callable[[sitk.Image], sitk.Image] | None = None, *, steps: int = 60,
              n_subjects: int = 16, deid_visits: Sequence[int] = (1, 2), anchor_visits: Sequence[int] = (0,),
              images: Sequence[tuple[Hashable, sitk.Image]] | None = None,
              cache: MutableMapping[Any, np.ndarray] | None = None, lr: float = 3e-4, seed: int = 0,
              log: Callable[[str], None] | None = None) -> ReidAttack:
        """The adaptive attacker: a copy of this network fine-tuned to match de-identified outputs to originals.

        With ``deidentify``, the training set is built from the first ``n_subjects`` subjects of the
        training split (``reid_pairs.json``; never the validation/test subjects nor the benchmark's
        population): their original ``anchor_visits`` and the de-identified outputs of their
        ``deid_visits`` (``n_subjects * len(deid_visits)`` calls to ``deidentify``, 32 by default).
        ``images`` adds (identity, image) pairs of your own (e.g. outputs the caller already has).
        Batches mix originals and outputs of each person; the loss is the training loss.

        Cost with the defaults, besides ``deidentify``: ~40 s to generate the 16 subjects' visits and
        ~0.4 s per step on one free CPU thread. On a loaded machine use ``torch.set_num_threads(1)``:
        two threads competing with other work ran 4x slower per step than one.

        Args:
            deidentify: ``image -> de-identified image`` (same grid).
            steps: optimisation steps (batch of 8 people x 4 volumes; ~0.5 s each on one CPU thread).
            cache: a mapping the caller keeps for this de-identifier (one per method and ``p``): the
                crops of its outputs are stored there under ``(subject, visit)`` and reused by the next
                call, so ``deidentify`` runs once per volume. Original crops are cached in the process.
            lr: Adam learning rate; seed: sampling seed; log: progress callback.

        Returns:
            A new ``ReidAttack`` (this one is unchanged).
        """
        log = log or (lambda _msg: None)
        groups: dict[Hashable, list[np.ndarray]] = {}
        kinds: dict[Hashable, list[bool]] = {}

        def add(key: Hashable, arr: np.ndarray, deid: bool) -> None:
            groups.setdefault(key, []).append(arr)
            kinds.setdefault(key, []).append(deid)

        if deidentify is not None:
            split = self.meta["split"]
            subjects = list(split["train_subjects"])[:n_subjects]
            t0 = time.perf_counter()
            for s in subjects:
                for j in anchor_visits:
                    add(("train", s), _original_crop(split["seed"], s, j, self.spec), False)
                for j in deid_visits:
                    key = (int(s), int(j))
                    if cache is not None and key in cache:
                        add(("train", s), cache[key], True)
                        continue
                    out = self.crop(deidentify(_visit(split["seed"], s, j).image))
                    if cache is not None:
                        cache[key] = out
                    add(("train", s), out, True)
            log(f"adapt: training set of {len(subjects)} subjects in {time.perf_counter() - t0:.1f} s")
        for key, im in images or ():
            add(("given", key), self.crop(im), True)
        people = [k for k, v in groups.items() if len(v) >= 2]
        if len(people) < 2:
            raise ValueError("adapt needs at least two people with two volumes each")
        pool = [np.stack(groups[k]) for k in people]
        is_deid = [np.array(kinds[k]) for k in people]
        model = copy.deepcopy(self.model)
        t0 = time.perf_counter()
        _fit(model, pool, steps=steps, lr=lr, seed=seed, device=self.device, deid=is_deid, log=log)
        log(f"adapt: {steps} steps in {time.perf_counter() - t0:.1f} s")
        meta = copy.deepcopy(self.meta)
        meta["adapted"] = {"steps": steps, "n_people": len(people), "n_volumes": int(sum(len(p) for p in pool)),
                           "deid_visits": list(deid_visits), "anchor_visits": list(anchor_visits), "lr": lr}
        return ReidAttack(model.eval(), meta, self.device)


# ---------------------------------------------------------------------------------------------- training


@functools.lru_cache(maxsize=2)
def _population(seed: int) -> Any:
    from semid.phantoms import Population

    return Population(10**6, seed=seed, modalities=("MR",))  # subjects are made on demand: no cost


def _visit(seed: int, subject: int, visit: int) -> Any:
    return _population(int(seed)).subject(int(subject)).visit(int(visit), "MR")


_ORIGINALS: dict[tuple, np.ndarray] = {}


def _original_crop(seed: int, subject: int, visit: int, spec: CropSpec) -> np.ndarray:
    key = (int(seed), int(subject), int(visit), spec)
    if key not in _ORIGINALS:
        _ORIGINALS[key] = crop(_visit(seed, subject, visit).image, spec)
    return _ORIGINALS[key]


def _crops(seed: int, subjects: Sequence[int], visits: Sequence[int], spec: CropSpec, log: Callable[[str], None],
           cache_dir: Path | None = None, name: str = "") -> np.ndarray:
    """Crops (n_subjects, n_visits, z, y, x) of original MR visits, optionally cached on disk (float16)."""
    path = None
    if cache_dir is not None:
        tag = f"{seed}_{min(subjects)}-{max(subjects)}_{len(subjects)}_v{''.join(map(str, visits))}"
        path = Path(cache_dir) / f"reid_crops_{tag}_{abs(hash(spec)) % 10**8}.npy"
        if path.exists():
            return np.load(path).astype(np.float32)
    out = np.zeros((len(subjects), len(visits), *spec.shape), np.float32)
    t0 = time.perf_counter()
    for a, s in enumerate(subjects):
        for b, j in enumerate(visits):
            out[a, b] = crop(_visit(seed, s, j).image, spec)
        if (a + 1) % 8 == 0 or a + 1 == len(subjects):
            log(f"  {name}: {a + 1}/{len(subjects)} subjects ({time.perf_counter() - t0:.0f} s)")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, out.astype(np.float16))
    return out


def _fit(model: nn.Module, pool: Sequence[np.ndarray], *, steps: int, lr: float, seed: int, device: torch.device,
         people: int = 8, per_person: int = 4, deid: Sequence[np.ndarray] | None = None,
         log: Callable[[str], None] = print, validate: Callable[[int], None] | None = None,
         every: int = 0) -> None:
    """Batch-hard triplet training on ``pool`` (one array of crops per person), P x K batches.

    With ``deid`` (a mask per person: which crops are de-identified outputs), each person's K volumes
    hold at least one original and one output when the person has both.
    """
    rng = np.random.default_rng(seed)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    p = min(people, len(pool))
    running = None
    for step in range(1, steps + 1):
        who = rng.choice(len(pool), p, replace=False)
        xs, ids = [], []
        for w in who:
            n = len(pool[w])
            if deid is not None and deid[w].any() and (~deid[w]).any():
                first = [int(rng.choice(np.flatnonzero(~deid[w]))), int(rng.choice(np.flatnonzero(deid[w])))]
                rest = rng.choice(n, per_person - 2, replace=n < per_person)
                pick = np.array(first + list(rest))
            else:
                pick = rng.choice(n, per_person, replace=n < per_person)
            xs.append(pool[w][pick])
            ids += [int(w)] * per_person
        x = torch.from_numpy(np.concatenate(xs).astype(np.float32))[:, None].to(device)
        x = _augment(x, rng)
        loss = _batch_hard_loss(model(x), torch.tensor(ids, device=device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        value = loss.item()
        running = value if running is None else 0.9 * running + 0.1 * value
        if step % 25 == 0 or step == steps:
            log(f"  step {step}/{steps}: loss {running:.4f}")
        if validate is not None and every and (step % every == 0 or step == steps):
            validate(step)
            model.train()
    model.eval()


def _split_scores(model: nn.Module, crops: np.ndarray, gallery_visits: Sequence[int], device: torch.device,
                  ) -> dict[str, Any]:
    """Scores of a split: crops (subjects, visits, ...) with the first len(gallery_visits) as the gallery."""
    n_s, n_v = crops.shape[:2]
    emb = _embed_crops(model, crops.reshape(n_s * n_v, *crops.shape[2:]), device).reshape(n_s, n_v, -1)
    g = len(gallery_visits)
    gallery = {s: emb[s, :g] for s in range(n_s)}
    probe_ids = [s for s in range(n_s) for _ in range(n_v - g)]
    return _scores(gallery, probe_ids, emb[:, g:].reshape(-1, emb.shape[-1]))


def _pairs(subjects: Sequence[int], gallery_visits: Sequence[int], probe_visits: Sequence[int]) -> list[list[int]]:
    """Every probe x gallery-identity pair: [gallery subject, gallery visit, probe subject, probe visit, genuine]."""
    return [[int(g), int(gv), int(p), int(pv), int(g == p)]
            for p in subjects for pv in probe_visits for g in subjects for gv in gallery_visits]


def train(out_dir: Path | str, n_train_subjects: int = N_TRAIN, seed: int = TRAIN_SEED, *, steps: int = 900,
          lr: float = 2e-3, train_seed: int = 0, cache_dir: Path | str | None = None,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the attacker on original visits and write ``reid_siamese.pt`` and ``reid_pairs.json``.

    Subjects ``0 .. n-1`` of ``Population(seed)`` train (visits 0-3), the next N_VAL validate (the
    checkpoint with the best validation AUC, then rank-1, is kept), the next N_TEST test; gallery is
    visit 0, probes are visits 1 (val) and 1-2 (test). Returns the metrics saved in the metadata.
    """
    from semid import phantoms

    if seed == 2026:
        raise ValueError("seed 2026 is the benchmark's population: train on other people")
    t_start = time.perf_counter()
    torch.manual_seed(train_seed)
    device = _device()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir is not None else None
    spec = default_spec()
    train_s = list(range(n_train_subjects))
    val_s = list(range(n_train_subjects, n_train_subjects + N_VAL))
    test_s = list(range(n_train_subjects + N_VAL, n_train_subjects + N_VAL + N_TEST))
    log(f"crop box (z, y, x) {spec.box} -> {spec.shape}; generating visits of population seed {seed}")
    train_c = _crops(seed, train_s, TRAIN_VISITS, spec, log, cache, "train")
    val_c = _crops(seed, val_s, GALLERY_VISITS + VAL_PROBE_VISITS, spec, log, cache, "val")
    test_c = _crops(seed, test_s, GALLERY_VISITS + TEST_PROBE_VISITS, spec, log, cache, "test")
    t_data = time.perf_counter() - t_start
    log(f"data ready in {t_data:.0f} s; training {steps} steps")

    model = EmbeddingTower()
    best: dict[str, Any] = {"key": (-1.0, -1.0)}

    def validate(step: int) -> None:
        r = _split_scores(model, val_c, GALLERY_VISITS, device)
        log(f"  val @ {step}: AUC {r['roc_auc']:.4f}, rank-1 {r['rank1']:.3f}")
        key = (r["roc_auc"], r["rank1"])
        if key >= best["key"]:
            best.update(key=key, step=step, state=copy.deepcopy(model.state_dict()), val=r)

    t0 = time.perf_counter()
    _fit(model, list(train_c), steps=steps, lr=lr, seed=train_seed, device=device, log=log, validate=validate,
         every=50)
    t_train = time.perf_counter() - t0
    model.load_state_dict(best["state"])
    model.eval()
    test = _split_scores(model, test_c, GALLERY_VISITS, device)
    log(f"best val @ step {best['step']}: AUC {best['val']['roc_auc']:.4f}, rank-1 {best['val']['rank1']:.3f}")
    log(f"test ({len(test_s)} subjects, gallery visit 0, probes visits 1-2): AUC {test['roc_auc']:.4f}, "
        f"rank-1 {test['rank1']:.3f}")
    keep = ("roc_auc", "rank1", "n_probes", "n_gallery_ids", "mean_genuine_similarity", "mean_impostor_similarity")
    meta: dict[str, Any] = {
        "format": 1,
        "crop": spec.to_meta() | {"margin_mm": MARGIN_MM, "base": "small"},
        "normalisation": {"MR": NORM_MR, "CT": NORM_CT, "clip_max": CLIP_MAX},
        "network": {"kind": "EmbeddingTower", "dim": EMBED_DIM, "width": WIDTH, "distance": "1 - cosine"},
        "split": {"seed": int(seed), "train_subjects": train_s, "val_subjects": val_s, "test_subjects": test_s},
        "training": {"steps": steps, "best_step": int(best["step"]), "lr": lr, "train_seed": train_seed,
                     "loss": f"batch-hard triplet, soft margin, scale {LOSS_SCALE}", "batch": "8 people x 4 visits",
                     "train_visits": list(TRAIN_VISITS), "modality": "MR",
                     "wall_s_data": round(t_data, 1), "wall_s_train": round(t_train, 1),
                     "torch": str(torch.__version__)},
        "metrics": {"val": {k: best["val"][k] for k in keep}, "test": {k: test[k] for k in keep}},
    }
    attack = ReidAttack(model, meta, device)
    attack.save(out_dir / WEIGHTS_FILE)
    pairs = {
        "about": "Attacker A2 (semid.eval.attack_reid): patient-disjoint splits of the MR phantom population "
                 "Population(n, seed) and the verification pairs of the val/test splits: "
                 "[gallery subject, gallery visit, probe subject, probe visit, genuine (1) or impostor (0)].",
        "population": {"seed": int(seed), "base": "small", "modality": "MR",
                       "identity_scale": float(phantoms.IDENTITY_SCALE)},
        "splits": {"train": {"subjects": train_s, "visits": list(TRAIN_VISITS)},
                   "val": {"subjects": val_s, "gallery_visits": list(GALLERY_VISITS),
                           "probe_visits": list(VAL_PROBE_VISITS)},
                   "test": {"subjects": test_s, "gallery_visits": list(GALLERY_VISITS),
                            "probe_visits": list(TEST_PROBE_VISITS)}},
        "pairs": {"val": _pairs(val_s, GALLERY_VISITS, VAL_PROBE_VISITS),
                  "test": _pairs(test_s, GALLERY_VISITS, TEST_PROBE_VISITS)},
    }
    (out_dir / PAIRS_FILE).write_text(json.dumps(pairs, separators=(",", ":")) + "\n")
    log(f"wrote {out_dir / WEIGHTS_FILE} and {out_dir / PAIRS_FILE} in {time.perf_counter() - t_start:.0f} s")
    return meta["metrics"]


def evaluate_pairs(attack: ReidAttack, split: str = "test", pairs_path: Path | str | None = None
                   ) -> dict[str, float]:
    """ROC-AUC over the saved verification pairs of ``split`` (cosine similarity of the two visits)."""
    from sklearn.metrics import roc_auc_score

    info = json.loads(Path(pairs_path or MODELS_DIR / PAIRS_FILE).read_text())
    seed = info["population"]["seed"]
    pairs = info["pairs"][split]
    keys = sorted({(g, gv) for g, gv, *_ in pairs} | {(p, pv) for _, _, p, pv, _ in pairs})
    crops = np.stack([_original_crop(seed, s, v, attack.spec) for s, v in keys])
    emb = dict(zip(keys, _embed_crops(attack.model, crops, attack.device), strict=True))
    sim = np.array([float(emb[(g, gv)] @ emb[(p, pv)]) for g, gv, p, pv, _ in pairs])
    truth = np.array([t for *_, t in pairs])
    return {"roc_auc": float(roc_auc_score(truth, sim)), "n_pairs": len(pairs), "n_genuine": int(truth.sum())}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m semid.eval.attack_reid", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train on original phantom visits; write reid_siamese.pt and reid_pairs.json")
    tr.add_argument("--out", type=Path, default=MODELS_DIR, help="output folder (default: the committed models)")
    tr.add_argument("--subjects", type=int, default=N_TRAIN, help="training subjects")
    tr.add_argument("--seed", type=int, default=TRAIN_SEED, help="population seed (not 2026)")
    tr.add_argument("--steps", type=int, default=900)
    tr.add_argument("--lr", type=float, default=2e-3)
    tr.add_argument("--threads", type=int, default=1, help="torch and SimpleITK threads")
    tr.add_argument("--cache", type=Path, default=None, help="folder to cache the generated crops in")
    ev = sub.add_parser("eval", help="scores of saved weights on the test pairs and Population(8, seed=2026)")
    ev.add_argument("--weights", type=Path, default=None)
    ev.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    if args.command == "train":
        t0 = time.perf_counter()
        train(args.out, args.subjects, args.seed, steps=args.steps, lr=args.lr, cache_dir=args.cache)
        weights = args.out / WEIGHTS_FILE
    else:
        t0 = time.perf_counter()
        weights = args.weights
    attack = ReidAttack.load(weights)
    if args.command == "eval":
        folder = MODELS_DIR if weights is None else Path(weights) if Path(weights).is_dir() else Path(weights).parent
        pairs = folder / PAIRS_FILE
        for split in ("val", "test"):
            r = evaluate_pairs(attack, split, pairs)
            print(f"{split} pairs ({r['n_pairs']}, {r['n_genuine']} genuine): AUC {r['roc_auc']:.4f}")
    r = benchmark_check(attack)
    print(f"Population(8, seed=2026), gallery visit 0, probes visit 1: AUC {r['roc_auc']:.4f}, "
          f"rank-1 {r['rank1']:.3f}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


def benchmark_check(attack: ReidAttack, n: int = 8, seed: int = 2026) -> dict[str, Any]:
    """The p = 0 validity check on the benchmark's quick population: gallery visit 0, probes visit 1."""
    from semid.phantoms import Population

    pop = Population(n, seed=seed, modalities=("MR",))
    gallery, probes = {}, []
    for s in pop:
        gallery[s.subject_id] = [s.visit(0, "MR").image]
        probes.append((s.subject_id, s.visit(1, "MR").image))
    return attack.evaluate(gallery, probes)


if __name__ == "__main__":
    sys.exit(main())
