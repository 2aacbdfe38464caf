"""Compensation: the generator that fills the blocked region ``B_p`` (DESIGN.md §4 step 6).

``Generator`` is a 3D U-Net on the face box (``semid.facebox``: the atlas frame, 2 mm) that sees

- the blocked volume (normalised intensities, ``B_p`` set to 0) and ``B_p`` itself,
- three box coordinates (where in the face it is: the box is the same anatomy for every head),
- the modality (0 MR, 1 CT),
- the *decoupled* encoder features of the original volume (``semid.semantics``), injected at the
  generator's levels of the same stride: what the medicine inside ``B_p`` was (lesions, tissue), with
  the identity directions projected out,
- an identity code (``semid.phantoms.shape_code``: 14 face-shape amplitudes in [-1, 1]) at the
  bottleneck: the face to draw (SemID's default face, or a synthetic one),

and predicts the normalised intensities of the face it should draw, with the medicine in place. The
volume outside ``B_p`` is never taken from the generator: the pipeline copies the input there.

Training (``train``; ``semid train generator``) uses phantom samples where the ideal answer is known
(``facebox.phantom_sample``: the same visit rendered on another face, lesions where they were) at a
random level ``p`` each step, with three terms:

- **medical reconstruction**: L1 to the ideal output inside ``B_p``, weighted up on lesion voxels;
- **identity push-away**: an identity critic (a Siamese embedding of the box, trained on originals
  of the training population before the generator, never the benchmark's attacker) must not find the
  output closer to its source than ``PUSH_MARGIN`` (cosine similarity);
- **realism**: a small 3D patch discriminator (least-squares GAN) on the box.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch import nn

from semid import facebox as fb

MODELS_DIR = Path(__file__).resolve().parent / "data" / "models"
DEFAULT_WEIGHTS = MODELS_DIR / "generator.pt"
#: The canonical head's face boxes (``default_face_canvas``), written by ``semid train generator canvas``.
CANVAS_FILE = MODELS_DIR / "default_face_canvas.npz"
CODE_DIM = 14
#: Generator widths at strides 1, 2, 4, 8.
WIDTHS = (8, 24, 48, 64)
#: Lesion voxels weigh this much more than other voxels in the reconstruction term.
LESION_WEIGHT = 8.0
#: Cosine similarity to the source's identity-critic embedding above which the push-away term acts.
PUSH_MARGIN = 0.3
FORMAT = 1


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    # instance norm: the generator runs on one volume at a time, batch statistics would be noise
    return nn.Sequential(nn.Conv3d(c_in, c_out, 3, stride, 1), nn.InstanceNorm3d(c_out, affine=True),
                         nn.LeakyReLU(0.1, inplace=True))


class Generator(nn.Module):
    """G(blocked volume, B_p, decoupled features, identity code) -> normalised face intensities.

    A U-Net written out here rather than MONAI's ``UNet`` because the encoder's features enter at the
    generator's own levels (stride 2, 4, 8) and the identity code at the bottleneck, which MONAI's
    networks have no inputs for.

    Args:
        feature_channels: channels of the encoder's levels at strides 2, 4 and 8 (``Encoder.channels``).
        widths: generator channels at strides 1, 2, 4, 8.

    Shapes: ``blocked`` and ``mask`` (B, 1, D, H, W) with D, H, W divisible by 8; ``coords`` (B, 3, D, H, W)
    box coordinates (``box_coordinates``, cropped like the volume when training on patches);
    ``features`` a list of three maps (B, C_l, D/s, H/s, W/s) for s = 2, 4, 8; ``code`` (B, 14);
    ``modality`` (B,) 0 MR, 1 CT. Returns (B, 1, D, H, W), non-negative.
    """

    def __init__(self, feature_channels: Sequence[int] = (16, 32, 64), widths: Sequence[int] = WIDTHS) -> None:
        super().__init__()
        if len(feature_channels) != 3 or len(widths) != 4:
            raise ValueError("the generator takes encoder features at strides 2, 4, 8 and four widths")
        self.feature_channels, self.widths = tuple(int(c) for c in feature_channels), tuple(int(w) for w in widths)
        w0, w1, w2, w3 = self.widths
        f1, f2, f3 = self.feature_channels
        self.inc = nn.Sequential(_conv(6, w0), _conv(w0, w0))  # blocked, mask, 3 coords, modality
        self.down1 = nn.Sequential(_conv(w0, w1, 2), _conv(w1, w1))
        self.mix1 = _conv(w1 + f1, w1)
        self.down2 = nn.Sequential(_conv(w1, w2, 2), _conv(w2, w2))
        self.mix2 = _conv(w2 + f2, w2)
        self.down3 = nn.Sequential(_conv(w2, w3, 2), _conv(w3, w3))
        self.mix3 = _conv(w3 + f3 + CODE_DIM, w3)
        self.bottleneck = nn.Sequential(_conv(w3, w3), _conv(w3, w3))
        self.up3 = _conv(w3 + w2, w2)
        self.up2 = _conv(w2 + w1, w1)
        self.up1 = _conv(w1 + w0, w0)
        self.out = nn.Conv3d(w0, 1, 1)

    def forward(self, blocked: torch.Tensor, mask: torch.Tensor, coords: torch.Tensor,
                features: Sequence[torch.Tensor], code: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        b = blocked.shape[0]
        mod = modality.float().view(b, 1, 1, 1, 1).expand_as(blocked)
        x0 = self.inc(torch.cat([blocked, mask, coords, mod], 1))
        x1 = self.mix1(torch.cat([self.down1(x0), _fit_to(features[0], x0.shape[2:], 2)], 1))
        x2 = self.mix2(torch.cat([self.down2(x1), _fit_to(features[1], x1.shape[2:], 2)], 1))
        d3 = self.down3(x2)
        c = code.float().view(b, -1, 1, 1, 1).expand(-1, -1, *d3.shape[2:])
        x3 = self.bottleneck(self.mix3(torch.cat([d3, _fit_to(features[2], x2.shape[2:], 2), c], 1)))
        y = self.up3(torch.cat([F.interpolate(x3, size=x2.shape[2:], mode="trilinear"), x2], 1))
        y = self.up2(torch.cat([F.interpolate(y, size=x1.shape[2:], mode="trilinear"), x1], 1))
        y = self.up1(torch.cat([F.interpolate(y, size=x0.shape[2:], mode="trilinear"), x0], 1))
        return F.softplus(self.out(y))


def box_coordinates(shape: Sequence[int] = fb.BOX_SHAPE, device: torch.device | None = None) -> torch.Tensor:
    """(1, 3, D, H, W) coordinates of the face box's voxels, each axis in [-1, 1]."""
    axes = [torch.linspace(-1.0, 1.0, int(n), device=device) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]


def _fit_to(feature: torch.Tensor, finer_shape: Sequence[int], factor: int) -> torch.Tensor:
    """An encoder map resized to the generator's next-coarser level (same stride up to rounding)."""
    size = [max(1, (int(n) + factor - 1) // factor) for n in finer_shape]
    if list(feature.shape[2:]) == size:
        return feature
    return F.interpolate(feature, size=size, mode="trilinear")


class IdentityCritic(nn.Module):
    """Siamese embedding of a face box for the push-away loss: (B, 1, D, H, W) -> unit (B, 64).

    Trained on original phantom visits of the training population (``train_critic``), so it knows what
    makes two visits the same person; the generator is pushed away from its source under it. It is the
    method's own critic: the benchmark's attacker (A2) never takes part in training.
    """

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv(1, 16, 2), _conv(16, 32, 2), _conv(32, 48, 2), _conv(48, 64, 2),
                                  nn.AdaptiveAvgPool3d((3, 3, 3)), nn.Flatten(), nn.Linear(64 * 27, dim))

    def forward(self, box: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.body(box), dim=1)


class PatchCritic(nn.Module):
    """Realism discriminator: (B, 1, D, H, W) -> (B, 1, D/8, H/8, W/8) scores (least-squares GAN)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(1, 16, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
                                  nn.Conv3d(16, 32, 4, 2, 1), nn.InstanceNorm3d(32), nn.LeakyReLU(0.2, inplace=True),
                                  nn.Conv3d(32, 48, 4, 2, 1), nn.InstanceNorm3d(48), nn.LeakyReLU(0.2, inplace=True),
                                  nn.Conv3d(48, 1, 3, 1, 1))

    def forward(self, box: torch.Tensor) -> torch.Tensor:
        return self.body(box)


# ------------------------------------------------------------------------------------------- features


def pick_levels(strides: Sequence[int]) -> list[int]:
    """Indices of the encoder levels whose strides are nearest to the generator's 2, 4 and 8."""
    return [int(np.argmin([abs(np.log2(max(s, 1)) - np.log2(t)) for s in strides])) for t in (2, 4, 8)]


@dataclass
class Semantics:
    """The encoder and its decoupler: ``features(box)`` = decoupled maps at strides ~2, 4, 8."""

    encoder: Any
    decoupler: Any
    levels: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.levels:
            self.levels = pick_levels(self.encoder.strides)

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(int(self.encoder.channels[i]) for i in self.levels)

    @torch.no_grad()
    def features(self, box: torch.Tensor) -> list[torch.Tensor]:
        """(B, 1, D, H, W) normalised box -> three decoupled maps (B, C_l, ...)."""
        maps = self.decoupler.apply(self.encoder.features(box))
        return [maps[i] for i in self.levels]

    def describe(self) -> dict:
        return {"encoder": self.encoder.describe(), "decoupler": self.decoupler.describe(), "levels": self.levels}


def load_semantics(encoder: str | None = None, decoupler: str | Path | None = None,
                   device: torch.device | str = "cpu") -> Semantics:
    """The encoder named by ``encoder`` (``semid.semantics.encoders.load_encoder`` spec) with the decoupler
    saved at ``decoupler`` (default: the committed one for the bundled encoder, none for others)."""
    from semid.semantics import decoupling, encoders

    enc = encoders.load_encoder(encoder)
    enc.to(device)
    if decoupler is None and (encoder in (None, "bundled")) and decoupling.DEFAULT_WEIGHTS.exists():
        decoupler = decoupling.DEFAULT_WEIGHTS
    dec = decoupling.Decoupler.load(decoupler) if decoupler else decoupling.Decoupler.identity()
    return Semantics(enc, dec)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -------------------------------------------------------------------------------------------- training


def block_mask(level: float, atlas_dir: str | None = None) -> np.ndarray:
    """``B_p`` on the box grid (bool (D, H, W)): the pipeline's nested ranking of the atlas score."""
    from semid.pipeline import nested_block

    box = fb.box_atlas(atlas_dir)
    return nested_block(box["score"], box["region"], float(level))


def _patch_origin(mask: np.ndarray, patch: Sequence[int], rng: np.random.Generator) -> tuple[int, int, int]:
    """A patch corner (multiple of 8) whose patch holds part of ``mask`` (random voxel of it, jittered)."""
    shape = np.array(mask.shape)
    size = np.array(patch)
    where = np.argwhere(mask)
    centre = where[rng.integers(len(where))] if len(where) else shape // 2
    start = np.clip(centre - size // 2 + rng.integers(-8, 9, 3), 0, shape - size)
    return tuple(int(v) // 8 * 8 for v in start)  # type: ignore[return-value]


def train_critic(images: np.ndarray, subjects: np.ndarray, steps: int, device: torch.device, seed: int,
                 log: Callable[[str], None]) -> IdentityCritic:
    """The identity critic: batch-hard triplets on original boxes (N, D, H, W), halved in size."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    critic = IdentityCritic().to(device).train()
    opt = torch.optim.AdamW(critic.parameters(), lr=2e-3, weight_decay=1e-4)
    people = np.unique(subjects)
    by_person = {int(p): np.flatnonzero(subjects == p) for p in people}
    usable = [p for p, idx in by_person.items() if len(idx) >= 2]
    for step in range(1, steps + 1):
        who = rng.choice(usable, min(8, len(usable)), replace=False)
        pick = np.concatenate([rng.choice(by_person[int(p)], 2, replace=False) for p in who])
        x = F.avg_pool3d(torch.from_numpy(images[pick]).float()[:, None].to(device), 2)
        emb = critic(x)
        labels = torch.as_tensor(np.repeat(np.arange(len(who)), 2), device=device)
        dist = torch.cdist(emb, emb)
        same = labels[:, None] == labels[None]
        eye = torch.eye(len(labels), dtype=torch.bool, device=device)
        hardest_pos = dist.masked_fill(~same | eye, 0).max(1).values
        hardest_neg = dist.masked_fill(same, 1e3).min(1).values
        loss = F.softplus(hardest_pos - hardest_neg + 0.2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps:
            log(f"  identity critic step {step}/{steps}: loss {loss.item():.3f}")
    return critic.eval()


@dataclass
class TrainConfig:
    """What ``train`` does; the defaults made the committed ``generator.pt``."""

    samples: str = ""
    out: str = str(DEFAULT_WEIGHTS)
    encoder: str = "bundled"
    decoupler: str = ""
    steps: int = 900
    critic_steps: int = 300
    patch: tuple[int, int, int] = (48, 48, 48)
    lr: float = 2e-3
    push_weight: float = 0.5
    realism_weight: float = 0.05
    synthetic_fraction: float = 0.3
    validation_subjects: int = 6
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # CPU threads (0: torch's default); 1 when other jobs share the cores
    checkpoint_every: int = 100


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def fill_precision(device: torch.device) -> torch.dtype:
    """The number type the generator fills in on ``device``: bfloat16 where the device computes it natively
    (a CUDA GPU that supports it; a CPU with AVX-512 BF16), else float32. The environment variable
    ``SEMID_FILL_PRECISION`` (``auto``, the default; ``float32``; ``bfloat16``) overrides the choice.

    On 2 cores of an AVX-512 BF16 CPU the 80x96x96 face box fills in about half float32's time, and the
    filled voxels of the real 1 mm head differ from float32's by less than the output's integer rounding
    on average (``benchmarks/pipeline_parts.py`` prints both). Emulated bfloat16 would be slower than
    float32, hence float32 on other processors.
    """
    import os

    from semid.errors import InputError

    choice = os.environ.get("SEMID_FILL_PRECISION", "").strip().lower() or "auto"
    if choice not in ("auto", "float32", "bfloat16"):
        raise InputError(f"SEMID_FILL_PRECISION is {choice[:16]!r}: set it to auto, float32 or bfloat16 (or unset it).")
    if choice != "auto":
        return torch.float32 if choice == "float32" else torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    # torch has no public test for native bfloat16 on the CPU; its own private one, where it exists
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return torch.bfloat16 if device.type == "cpu" and native is not None and native() else torch.float32


def _load_pool(paths: Sequence[Path]) -> dict[str, np.ndarray]:
    keys = ("image", "target_default", "target_synthetic", "labels", "labels_default", "code_default",
            "code_synthetic", "subject", "modality")
    rows = [fb.load_sample(p) for p in paths]
    pool = {k: np.stack([r[k] for r in rows]) for k in keys}
    for k in ("image", "target_default", "target_synthetic"):
        pool[k] = pool[k].astype(np.float16)
    return pool


def train(config: TrainConfig, log: Callable[[str], None] = print) -> dict:
    """Train the identity critic, then the generator; write ``config.out`` (and a resumable checkpoint).

    Returns the validation report (also stored in the weights file).
    """
    from tqdm import tqdm

    device = _device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    paths = sorted(Path(config.samples).glob("facebox_*.npz"))
    if len(paths) < 8:
        raise SystemExit(f"only {len(paths)} face-box samples in {config.samples}: make them with "
                         "`semid train generator --make-samples` first")
    t0 = time.perf_counter()
    pool = _load_pool(paths)
    subjects = pool["subject"]
    val_people = np.unique(subjects)[-config.validation_subjects:]
    is_val = np.isin(subjects, val_people)
    train_idx, val_idx = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    log(f"{len(paths)} samples ({len(train_idx)} training, {len(val_idx)} validation) in "
        f"{time.perf_counter() - t0:.0f} s")

    semantics = load_semantics(config.encoder, config.decoupler or None, device)
    feats: list[list[torch.Tensor]] = []
    for i in range(len(paths)):
        maps = semantics.features(torch.from_numpy(pool["image"][i].astype(np.float32))[None, None].to(device))
        feats.append([m.half().cpu() for m in maps])
    log(f"encoder features of every sample ({time.perf_counter() - t0:.0f} s)")

    out = Path(config.out)
    ckpt = out.with_suffix(".ckpt")
    state = torch.load(ckpt, map_location=device, weights_only=False) if ckpt.exists() else None
    if state is None:
        critic = train_critic(pool["image"][train_idx].astype(np.float32), subjects[train_idx],
                              config.critic_steps, device, config.seed, log)
    else:  # resuming: the critic the generator was trained against so far
        critic = IdentityCritic().to(device).eval()
        critic.load_state_dict(state["critic"])
    for p in critic.parameters():
        p.requires_grad_(False)

    gen = Generator(semantics.channels).to(device)
    disc = PatchCritic().to(device)
    opt_g = torch.optim.AdamW(gen.parameters(), lr=config.lr, weight_decay=1e-5)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=config.lr / 2, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt_g, max_lr=config.lr, total_steps=config.steps, pct_start=0.05)
    start = 1
    if state is not None:
        gen.load_state_dict(state["generator"])
        disc.load_state_dict(state["discriminator"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        if state["sched"].get("total_steps") == config.steps:
            sched.load_state_dict(state["sched"])
        else:  # resumed with another step count: the same one-cycle schedule, stretched to the new length
            sched = torch.optim.lr_scheduler.OneCycleLR(opt_g, max_lr=config.lr, total_steps=config.steps,
                                                        pct_start=0.05, last_epoch=state["step"] - 1)
        rng = np.random.default_rng([config.seed, state["step"]])
        start = state["step"] + 1
        log(f"resuming from step {state['step']}")

    coords_full = box_coordinates(fb.BOX_SHAPE, device)
    pd, ph, pw = config.patch
    bar = tqdm(range(start, config.steps + 1), initial=start - 1, total=config.steps, file=sys.stderr,
               unit="step", disable=not sys.stderr.isatty())
    running: dict[str, float] = {}
    for step in bar:
        gen.train()
        i = int(rng.choice(train_idx))
        level = 1.0 if rng.random() < 0.4 else float(rng.uniform(0.1, 1.0))
        mask_np = block_mask(level)
        z0, y0, x0 = _patch_origin(mask_np, config.patch, rng)
        sl = (slice(z0, z0 + pd), slice(y0, y0 + ph), slice(x0, x0 + pw))
        synthetic = rng.random() < config.synthetic_fraction
        target_key, code_key = ("target_synthetic", "code_synthetic") if synthetic else ("target_default",
                                                                                          "code_default")
        image = torch.from_numpy(pool["image"][i].astype(np.float32)).to(device)[None, None]
        target = torch.from_numpy(pool[target_key][i][sl].astype(np.float32)).to(device)[None, None]
        lesion = torch.from_numpy(pool["labels"][i][sl] == 5).to(device)[None, None]
        mask = torch.from_numpy(mask_np).to(device)[None, None].float()
        mask_p = mask[(..., *sl)]
        image_p = image[(..., *sl)]
        f = [m[:, :, z0 // s:(z0 + pd) // s, y0 // s:(y0 + ph) // s, x0 // s:(x0 + pw) // s].float().to(device)
             for m, s in zip(feats[i], (2, 4, 8), strict=True)]
        code = torch.from_numpy(pool[code_key][i]).to(device)[None]
        modality = torch.as_tensor([int(pool["modality"][i])], device=device)
        pred = gen(image_p * (1 - mask_p), mask_p, coords_full[(..., *sl)], f, code, modality)
        composite_p = mask_p * pred + (1 - mask_p) * image_p

        weight = mask_p * (1.0 + (LESION_WEIGHT - 1.0) * lesion.float())
        rec = (weight * (pred - target).abs()).sum() / weight.sum().clamp_min(1.0)
        composite = image.clone()
        composite[(..., *sl)] = composite_p
        e_out = critic(F.avg_pool3d(composite, 2))
        e_src = critic(F.avg_pool3d(image, 2))
        cos = (e_out * e_src).sum(1)
        push = F.relu(cos - PUSH_MARGIN).mean()
        real_score = disc(composite_p)
        adv = ((real_score - 1.0) ** 2).mean()
        loss = rec + config.push_weight * push + config.realism_weight * adv
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
        sched.step()
        if config.realism_weight > 0:
            d_loss = ((disc(target) - 1.0) ** 2).mean() + (disc(composite_p.detach()) ** 2).mean()
            opt_d.zero_grad()
            d_loss.backward()
            opt_d.step()
        for k, v in (("rec", rec.item()), ("push", push.item()), ("cos", cos.mean().item()), ("adv", adv.item())):
            running[k] = v if k not in running else 0.95 * running[k] + 0.05 * v
        bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()})
        if step % config.checkpoint_every == 0 or step == config.steps:
            log(f"  generator step {step}/{config.steps}: " + ", ".join(f"{k} {v:.3f}" for k, v in running.items())
                + f" ({time.perf_counter() - t0:.0f} s)")
            tmp = ckpt.with_suffix(".ckpt.tmp")
            torch.save({"generator": gen.state_dict(), "discriminator": disc.state_dict(),
                        "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "sched": sched.state_dict(),
                        "critic": critic.state_dict(), "step": step}, tmp)
            tmp.replace(ckpt)

    report = validate(gen, critic, semantics, pool, val_idx, feats, device)
    log("validation (held-out subjects): " + json.dumps(report))
    meta = {"format": FORMAT, "feature_channels": list(semantics.channels), "widths": list(gen.widths),
            "semantics": semantics.describe(), "training": {
                **{k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(config).items()
                   if k not in ("out", "samples")},  # folders of the machine that trained: not in the file
                "samples": len(paths), "sample_seed": int(fb.TRAIN_SEED), "seconds": round(time.perf_counter() - t0),
                "command": "semid train generator " + " ".join(sys.argv[3:]) if len(sys.argv) > 3 else
                "semid train generator"}, "validation": report}
    tmp = out.with_suffix(".tmp")
    torch.save({"generator": gen.state_dict(), "critic": critic.state_dict(), "meta": meta}, tmp)
    tmp.replace(out)
    ckpt.unlink(missing_ok=True)
    return report


@torch.no_grad()
def validate(gen: Generator, critic: IdentityCritic, semantics: Semantics, pool: dict[str, np.ndarray],
             idx: np.ndarray, feats: list[list[torch.Tensor]], device: torch.device) -> dict:
    """Held-out L1 inside B_1 (all, lesion voxels) and the critic's similarity of output to source."""
    gen.eval()
    mask = torch.from_numpy(block_mask(1.0)).to(device)[None, None].float()
    coords = box_coordinates(fb.BOX_SHAPE, device)
    l1, l1_lesion, cos_out, cos_blocked = [], [], [], []
    for i in idx:
        image = torch.from_numpy(pool["image"][i].astype(np.float32)).to(device)[None, None]
        target = torch.from_numpy(pool["target_default"][i].astype(np.float32)).to(device)[None, None]
        lesion = torch.from_numpy(pool["labels"][i] == 5).to(device)[None, None] & (mask > 0)
        code = torch.from_numpy(pool["code_default"][i]).to(device)[None]
        pred = gen(image * (1 - mask), mask, coords, [m.float().to(device) for m in feats[i]], code,
                   torch.as_tensor([int(pool["modality"][i])], device=device))
        out = mask * pred + (1 - mask) * image
        inside = mask > 0
        l1.append(float((pred - target).abs()[inside].mean()))
        if lesion.any():
            l1_lesion.append(float((pred - target).abs()[lesion].mean()))
        src = critic(F.avg_pool3d(image, 2))
        cos_out.append(float((critic(F.avg_pool3d(out, 2)) * src).sum()))
        cos_blocked.append(float((critic(F.avg_pool3d(image * (1 - mask), 2)) * src).sum()))
    return {"n": int(len(idx)), "l1_in_block": round(float(np.mean(l1)), 4),
            "l1_lesion": round(float(np.mean(l1_lesion)), 4) if l1_lesion else None,
            "critic_similarity_output": round(float(np.mean(cos_out)), 4),
            "critic_similarity_block_only": round(float(np.mean(cos_blocked)), 4)}


# ------------------------------------------------------------------------------------------- inference


@dataclass
class Compensator:
    """A trained generator with its encoder, decoupler and identity critic, ready to fill face boxes.

    ``fill(box, mask, modality, code)`` takes and returns normalised (D, H, W) float32 box arrays.
    """

    generator: Generator
    critic: IdentityCritic
    semantics: Semantics
    meta: dict
    source: Path
    device: torch.device
    #: the number type of the generator's fill (``fill_precision``)
    precision: torch.dtype = torch.float32
    #: ``default_face_box``'s canonical boxes per modality and drawings per (modality, code)
    _canvas: dict = field(default_factory=dict, init=False, repr=False)
    _gate_canvas: dict = field(default_factory=dict, init=False, repr=False)
    _templates: dict = field(default_factory=dict, init=False, repr=False)
    _canvas_source: dict = field(default_factory=dict, init=False, repr=False)
    _canonical_fits: dict = field(default_factory=dict, init=False, repr=False)
    _synthetic_canvas: dict = field(default_factory=dict, init=False, repr=False)
    #: set by ``batch_calls``: concurrent ``fill``/``similarity`` calls share one forward pass
    _fill_batcher: Any = field(default=None, repr=False)
    _similarity_batcher: Any = field(default=None, repr=False)

    @classmethod
    def load(cls, path: str | Path | None = None, device: str = "auto") -> Compensator:
        from semid.errors import InputError

        path = Path(path) if path else DEFAULT_WEIGHTS
        if not path.exists():
            raise InputError(f"The compensation generator's weights {path.name} are missing: train them with "
                             "`semid train generator`, or use the plain fill (--fill surface).")
        dev = _device(device)
        try:
            state = torch.load(path, map_location=dev, weights_only=False)
            meta = state["meta"]
            sem_meta = meta["semantics"]
            enc_name = meta["training"].get("encoder") or "bundled"
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same sentence
            raise InputError(f"{path.name} is not a SemID generator checkpoint (it cannot be read as one): "
                             "give the file `semid train generator` wrote.") from exc
        dec_file = sem_meta["decoupler"].get("file")
        dec_path = (MODELS_DIR / dec_file) if dec_file else None
        semantics = load_semantics(enc_name, dec_path if dec_path and dec_path.exists() else None, dev)
        if list(semantics.channels) != list(meta["feature_channels"]):
            raise InputError(f"The generator {path.name} was trained on another encoder "
                             f"({sem_meta['encoder'].get('name')}): retrain it with `semid train generator`.")
        gen = Generator(meta["feature_channels"], meta["widths"]).to(dev).eval()
        critic = IdentityCritic().to(dev).eval()
        try:
            gen.load_state_dict(state["generator"])
            critic.load_state_dict(state["critic"])
        except (KeyError, RuntimeError) as exc:
            raise InputError(f"{path.name} does not fit SemID's generator (its weights have other names or "
                             "shapes): retrain it with `semid train generator`.") from exc
        return cls(gen, critic, semantics, meta, path, dev, fill_precision(dev))

    def fill(self, box: np.ndarray, mask: np.ndarray, modality: int, code: np.ndarray) -> np.ndarray:
        """The generator's box (D, H, W) for a normalised ``box`` and its block ``mask`` (bool)."""
        args = (box, mask, int(modality), code)
        return self._fill_batcher(args) if self._fill_batcher else self.fill_many([args])[0]

    @torch.no_grad()
    def fill_many(self, calls: Sequence[tuple[np.ndarray, np.ndarray, int, np.ndarray]]) -> list[np.ndarray]:
        """``fill`` for several (box, mask, modality, code) at once: one forward pass over (B, 1, D, H, W).

        The generator (instance norm), encoder and decoupler treat each box on its own, so a box's answer
        does not depend on the others in its batch (up to the rounding of batched kernels: float32's, or
        bfloat16's where ``precision`` is bfloat16).
        """
        x = torch.from_numpy(np.stack([np.asarray(c[0], np.float32) for c in calls])).to(self.device)[:, None]
        m = torch.from_numpy(np.stack([np.asarray(c[1], np.float32) for c in calls])).to(self.device)[:, None]
        code = torch.from_numpy(np.stack([np.asarray(c[3], np.float32) for c in calls])).to(self.device)
        modality = torch.as_tensor([int(c[2]) for c in calls], device=self.device)
        feats = self.semantics.features(x)
        coords = box_coordinates(x.shape[2:], self.device).expand(len(calls), -1, -1, -1, -1)
        with torch.autocast(self.device.type, dtype=self.precision, enabled=self.precision != torch.float32):
            pred = self.generator(x * (1 - m), m, coords, feats, code, modality)
        return list(pred[:, 0].float().cpu().numpy())

    def similarity(self, a: np.ndarray, b: np.ndarray) -> float:
        """The identity critic's cosine similarity of two normalised boxes (1 = same person to it)."""
        return self._similarity_batcher((a, b)) if self._similarity_batcher else self.similarity_many([(a, b)])[0]

    @torch.no_grad()
    def similarity_many(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[float]:
        """``similarity`` of several pairs in one forward pass of the critic."""
        x = torch.from_numpy(np.stack([np.asarray(v, np.float32) for pair in pairs for v in pair]))
        e = self.critic(F.avg_pool3d(x.to(self.device)[:, None], 2))
        return [float(v) for v in (e[0::2] * e[1::2]).sum(dim=1).cpu()]

    def batch_calls(self, max_batch: int, max_wait_s: float = 0.02) -> Compensator:
        """Let concurrent threads share forward passes (``semid.microbatch``): up to ``max_batch`` calls
        of ``fill`` (and of ``similarity``) that arrive within ``max_wait_s`` run as one batch. 1 turns
        it off. For a worker that runs several studies at once on one GPU (``semid batch --threads``)."""
        from semid.microbatch import MicroBatcher

        if max_batch <= 1:
            self._fill_batcher = self._similarity_batcher = None
        elif self._fill_batcher is None or self._fill_batcher.max_batch != max_batch:
            self._fill_batcher = MicroBatcher(self.fill_many, max_batch, max_wait_s)
            self._similarity_batcher = MicroBatcher(self.similarity_many, 2 * max_batch, max_wait_s)
        return self

    def describe(self) -> dict:
        return {"generator": self.source.name, "sha256": _sha256(self.source)[:16],
                "precision": str(self.precision).removeprefix("torch."),
                "trained": {k: self.meta["training"].get(k) for k in ("steps", "samples", "sample_seed", "seconds")},
                **self.semantics.describe()}


#: Calls of ``fill``/``similarity`` that concurrent threads of this process may share (``set_call_batching``).
_CALL_BATCH = 1
_LOAD_LOCK = threading.Lock()


def set_call_batching(max_batch: int) -> None:
    """From now on, the models ``load_cached`` returns batch up to ``max_batch`` concurrent calls
    (``Compensator.batch_calls``); a batch worker running ``max_batch`` studies on threads sets it."""
    global _CALL_BATCH
    _CALL_BATCH = max(1, int(max_batch))


def load_cached(path: str | Path | None = None, device: str = "auto") -> Compensator:
    """``Compensator.load`` once per process, weights file version and device: every fill of a process
    (e.g. a batch worker's, one study after another or several on threads, or the DICOM tree's one
    per series) shares one copy of the generator, on the GPU when ``device`` is "auto" and CUDA is
    available. The file's (inode, mtime, size) is part of the key, so weights replaced on disk are
    loaded again."""
    path = Path(path) if path else DEFAULT_WEIGHTS
    try:
        st = path.stat()
        version = (st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError:
        version = None  # missing: Compensator.load says so in one sentence
    with _LOAD_LOCK:  # threads starting together must not load two copies
        return _load_cached(str(path), version, str(_device(device))).batch_calls(_CALL_BATCH)


@functools.lru_cache(maxsize=2)
def _load_cached(path: str, version: tuple | None, device: str) -> Compensator:
    return Compensator.load(path, device)


#: Synthetic identities: tries before giving up, and the critic similarity a synthetic face must stay
#: below to count as a margin away from the source's (Montenegro et al.: a sampled identity, rejected
#: if too close to the real one).
SYNTHETIC_TRIES = 5
SYNTHETIC_MARGIN = 0.5
#: Band (mm) inside ``B_p`` over which the drawn face turns from the subject's fit into its pose
#: (``facebox.pose_frame``, ``frame="pose"``).
FRAME_BLEND_MM = 15.0
#: Context (mm) the plain fill of blocked voxels outside the face box sees around them: its blend
#: (``pipeline.BLEND_MM``, 12 mm) and its smoothing (1.5 mm) reach no further.
SURFACE_CONTEXT_MM = 20.0

#: What the learned fill keeps of the generator's drawing (``LearnedFill(drawing="gated")``): voxels where
#: the drawing departs from SemID's default face drawn on the canonical head (``default_face_box``) by more
#: than this many normalised units (MR: head medians; CT: 1000 HU), in tissue of both. The MR value was
#: chosen on the quick benchmark's population (seed 2026; README says how); the CT value (100 HU) is about
#: the same share of a CT face lesion's contrast against fat and has not been benchmarked (the
#: benchmark's phantoms are MR).
LESION_GATE = {0: 0.8, 1: 0.1}
#: Normalised value above which a box voxel is tissue, for the gate (air is 0 in both modalities).
GATE_TISSUE = 0.3
#: Smallest departure kept (box voxels of 2 mm): a lesion of the phantoms is 7-12 mm across.
GATE_MIN_VOXELS = 8
#: Box voxels the kept departures are grown by, so a lesion's fading rim comes with it.
GATE_GROW = 2


def lesion_gate(drawn: np.ndarray, template: np.ndarray, mask: np.ndarray, contrast: float) -> np.ndarray:
    """Where the learned fill keeps the generator's drawing: its departures from the default face.

    Voxels of ``mask`` that are tissue in both ``drawn`` and ``template`` and differ by more than
    ``contrast``, in connected parts of at least ``GATE_MIN_VOXELS`` voxels, grown by ``GATE_GROW``
    voxels and kept inside ``mask``. Everything else of the block shows the default face, which is the
    same for everyone in the atlas frame, so only these parts can carry the person's identity; the
    generator draws lesions as such departures (its target is the same visit on the default face).

    Args:
        drawn, template: normalised (D, H, W) face boxes (``Compensator.fill``, ``default_face_box``).
        mask: the block on the box (bool (D, H, W)).
        contrast: the departure (normalised units) that counts (``LESION_GATE``).

    Returns:
        bool (D, H, W).
    """
    from scipy import ndimage  # connected parts and growing on a 0.7-million-voxel box: scipy is enough

    mask = np.asarray(mask, bool)
    departs = mask & (drawn > GATE_TISSUE) & (template > GATE_TISSUE) & (np.abs(drawn - template) > contrast)
    labels, n = ndimage.label(departs)
    if n == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = (sizes >= GATE_MIN_VOXELS)[labels] & departs
    return ndimage.binary_dilation(keep, iterations=GATE_GROW) & mask


def _face_head(modality: int, code: np.ndarray | None = None, base: str | None = None) -> sitk.Image:
    """The phantom head of identity ``code`` (None: SemID's default face, the population-average head) on
    ``base`` (default ``phantoms.DEFAULT_FACE_BASE``), MR or its CT: no lesion, no pose, no noise
    (``phantoms.face_subject``)."""
    from semid import phantoms as ph

    mr = sitk.Cast(ph.face_subject(code, base=base or ph.DEFAULT_FACE_BASE).anatomy, sitk.sitkInt16)
    return ph.ct_from_mr(mr) if modality == 1 else mr


def _head_box(head: sitk.Image, fit: sitk.Transform, modality: int) -> np.ndarray:
    """``head`` brought into the face box by ``fit`` and normalised like any input: float32 (D, H, W)."""
    box = fb.to_box(head, fit, default=-1000.0 if modality == 1 else 0.0)
    return fb.intensity_scale(head, "CT" if modality == 1 else "MR").normalise(box).astype(np.float32)


#: The base head the generator's training targets were drawn on (``facebox.phantom_sample``): its drawing
#: of a face without a lesion is of this head with the default code, whatever face the block shows.
GENERATOR_TARGET_BASE = "small"


def gate_reference_canvas(modality: int) -> np.ndarray:
    """What the generator was trained to draw for SemID's default code, with no lesion: the default code's
    face on ``GENERATOR_TARGET_BASE``, in the face box by its own fit, normalised. Float32 (D, H, W).

    Only the lesion gate looks at it (``default_face_box`` draws on it): a lesion is where the generator's
    drawing departs from its drawing of this head, and this is the head it learnt to draw. It is never shown:
    the block shows the population-average head (``default_face_canvas``). (Against the first version of
    the average head the generator, trained on the other head, departed everywhere at the eyes and mouth:
    14,677 voxels of its drawing were kept on the sample head at ``high``, opening holes in the face; with
    this reference, 472.)"""
    from semid import phantoms as ph
    from semid.pipeline import Deidentifier

    head = _face_head(modality, ph.default_face_code(), GENERATOR_TARGET_BASE)
    mr = head if modality == 0 else _face_head(0, ph.default_face_code(), GENERATOR_TARGET_BASE)
    return _head_box(head, Deidentifier(1.0).locate(mr).fit.transform, modality)


def _canonical_fit() -> sitk.Transform:
    """The atlas fit of the default-face phantom's MR (template -> phantom points). Its CT (``ct_from_mr``) has
    the same geometry and takes the same fit."""
    from semid.pipeline import Deidentifier

    return Deidentifier(1.0).locate(_face_head(0)).fit.transform


def default_face_canvas(modality: int) -> np.ndarray:
    """SemID's canonical head in the face box: the default-face phantom, MR or CT (``_face_head``), brought
    into the box by its atlas fit (``_canonical_fit``) and normalised like any input. Float32 (D, H, W); a few
    seconds, as it makes the phantom and fits it (``CANVAS_FILE`` keeps both modalities' boxes)."""
    return _head_box(_face_head(modality), _canonical_fit(), modality)


def synthetic_face_canvas(model: Compensator, modality: int, code: np.ndarray) -> np.ndarray:
    """The phantom of synthetic identity ``code`` in the face box, as ``default_face_canvas`` but brought
    in by the default face's fit: the fit is refined on the cranium, which the identity does not change,
    so one fit (made once per model and modality, a few seconds) serves every code and each code costs
    only its phantom (about a second). Float32 (D, H, W); the last few codes are cached on ``model``."""
    fits = model._canonical_fits
    if modality not in fits:
        fits[modality] = _canonical_fit()
    key = (int(modality), np.asarray(code, np.float32).round(6).tobytes())
    cache = model._synthetic_canvas
    canvas = cache.get(key)
    if canvas is None:  # a local, so a batch thread's clear() between the two lines cannot lose it
        canvas = _head_box(_face_head(modality, code), fits[modality], modality)
        if len(cache) > 4:
            cache.clear()
        cache[key] = canvas
    return canvas


def write_canvas(path: Path = CANVAS_FILE) -> Path:
    """Write both modalities' ``default_face_canvas`` (float16) with the atlas and the default face they
    were made with (``phantoms.default_face_version``), to a temporary name renamed into place."""
    from semid import phantoms as ph
    from semid.identity import load_atlas

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    meta = {"atlas": load_atlas(None).version, "box_shape": list(fb.BOX_SHAPE),
            "face": ph.default_face_version(), "made_by": "semid train generator canvas"}
    np.savez_compressed(tmp, **{f"box_{m}": default_face_canvas(m).astype(np.float16) for m in (0, 1)},
                        **{f"gate_{m}": gate_reference_canvas(m).astype(np.float16) for m in (0, 1)},
                        meta=np.array(json.dumps(meta)))
    tmp.replace(path)
    return path


def _canvas(model: Compensator, modality: int) -> tuple[np.ndarray, np.ndarray]:
    """The canonical box of ``modality`` and the block drawn on it (the atlas's ``B_1`` grown by 2 voxels):
    from ``CANVAS_FILE`` when it was made with this atlas and this default face, else made here
    (``model._canvas_source`` says which, per modality; the record shows it)."""
    from scipy import ndimage

    from semid import phantoms as ph
    from semid.identity import load_atlas

    if modality not in model._canvas:
        box = gate = None
        if CANVAS_FILE.exists():
            with np.load(CANVAS_FILE) as data:
                meta = json.loads(str(data["meta"]))
                # made with this atlas and this default face (an older file shows an older face)
                if (meta.get("atlas") == load_atlas(None).version and f"box_{modality}" in data
                        and f"gate_{modality}" in data and meta.get("face") == ph.default_face_version()):
                    box = data[f"box_{modality}"].astype(np.float32)
                    gate = data[f"gate_{modality}"].astype(np.float32)
        model._canvas_source[modality] = (CANVAS_FILE.name if box is not None
                                          else "made at run time (no matching file)")
        if box is None:
            box, gate = default_face_canvas(modality), gate_reference_canvas(modality)
        model._gate_canvas[modality] = gate
        model._canvas[modality] = (box, ndimage.binary_dilation(block_mask(1.0), iterations=2))
    return model._canvas[modality]


def default_face_box(model: Compensator, modality: int, code: np.ndarray) -> np.ndarray:
    """The generator's drawing of identity ``code`` on the head it learnt to draw (``gate_reference_canvas``)
    blocked by the atlas's ``B_1`` grown by 2 voxels: normalised (D, H, W) float32, the same for every
    subject; the lesion gate's reference, never shown. Cached per modality and code on ``model``."""
    key = (int(modality), np.asarray(code, np.float32).round(6).tobytes())
    cache = model._templates
    template = cache.get(key)
    if template is None:  # a local, so a batch thread's clear() between the two lines cannot lose it
        _, block = _canvas(model, int(modality))
        box = model._gate_canvas[int(modality)]  # the head the generator learnt to draw (gate_reference_canvas)
        template = np.where(block, model.fill(box, block, int(modality), code), box).astype(np.float32)
        if len(cache) > 16:  # synthetic identities draw a new code per volume
            cache.clear()
        cache[key] = template
    return template



@dataclass
class LearnedFill:
    """SemID's learned fill (``pipeline.Fill``): the compensation generator on the face box.

    The subject's volume is brought into the face box through the atlas fit, the generator draws the
    face (``identity="default"``: SemID's default face; ``"synthetic"``: a face drawn from the identity
    prior with ``seed``, redrawn while the identity critic finds it closer than ``SYNTHETIC_MARGIN`` to
    the source) with the medicine the decoupled features carry, and its box is resampled back onto the
    subject's grid. Voxels of ``B_p`` that fall outside the box keep the plain surface fill.

    ``drawing="gated"`` (default) keeps the generator's drawing only where it departs from its drawing of
    SemID's default face on the canonical head like a lesion does (``lesion_gate`` against
    ``default_face_box``) and shows the canonical head itself (``default_face_canvas``) everywhere else
    in the block; with ``identity="synthetic"``, the phantom of the synthetic face
    (``synthetic_face_canvas``, about a second more per try). ``"full"`` keeps the whole drawing,
    which passes more of the person's identity (README, *Benchmark*).

    ``frame="fit"`` (default) maps the drawn box back by the atlas fit, which is refined on the cranium
    (``identity.fit_atlas``) and so carries the head's pose and size but not the face's proportions;
    ``"pose"`` maps it by the fit's rotation and position only deep inside ``B_p`` and by the fit where it
    meets the subject's tissue (``facebox.pose_frame``): the remedy of the version whose fit followed the
    face, kept for comparison.
    """

    weights: str | Path | None = None
    identity: str = "default"
    device: str = "auto"
    frame: str = "fit"
    drawing: str = "gated"
    name: str = "learned"
    description: str = ("SemID learned compensation: blocked identity region refilled by a generator from "
                        "decoupled medical-encoder features")
    _model: Compensator | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.identity not in ("default", "synthetic"):
            raise ValueError(f"identity must be 'default' or 'synthetic', not {self.identity!r}")
        if self.frame not in ("pose", "fit"):
            raise ValueError(f"frame must be 'pose' or 'fit', not {self.frame!r}")
        if self.drawing not in ("gated", "full"):
            raise ValueError(f"drawing must be 'gated' or 'full', not {self.drawing!r}")

    @property
    def model(self) -> Compensator:
        if self._model is None:
            self._model = load_cached(self.weights, self.device)
        return self._model

    def __call__(self, ctx: Any) -> Any:
        from semid import phantoms as ph
        from semid.pipeline import FillResult, SurfaceFill, _cast_like, boxes_around, join_skin

        model = self.model
        modality = 1 if ctx.modality == "CT" else 0
        fit = ctx.location.fit.transform
        scale = fb.intensity_scale(ctx.image, ctx.modality)
        background = -1000.0 if ctx.modality == "CT" else 0.0
        box = scale.normalise(fb.to_box(ctx.image, fit, default=background))
        # the block on the box: the subject's B_p brought into the atlas frame, grown by a voxel so that
        # the linear resampling back never mixes in unfilled box voxels
        blocked_img = sitk.GetImageFromArray(ctx.blocked.astype(np.uint8))
        blocked_img.CopyInformation(ctx.roi)
        mask = fb.to_box(blocked_img, fit, sitk.sitkNearestNeighbor) > 0
        mask = sitk.GetArrayFromImage(sitk.BinaryDilate(sitk.GetImageFromArray(mask.astype(np.uint8)), [1, 1, 1])) > 0

        rng = np.random.default_rng(ctx.seed)
        tries, similarity, code = 0, None, ph.default_face_code()
        while True:
            if self.identity == "synthetic":
                code = ph.shape_code(ph.draw_shape(rng))
            pred = model.fill(box, mask, modality, code)
            if self.drawing == "gated":
                template = default_face_box(model, modality, code)
                gate = lesion_gate(pred, template, mask, LESION_GATE[modality])
                # the face is shown as its phantom has it, not as the generator draws it (the drawing
                # grooves the skin: README, *Benchmark*)
                shown = (_canvas(model, modality)[0] if self.identity == "default"
                         else synthetic_face_canvas(model, modality, code))
                pred = np.where(gate, pred, shown)
            similarity = model.similarity(np.where(mask, pred, box), box)
            tries += 1
            if self.identity == "default" or similarity < SYNTHETIC_MARGIN or tries >= SYNTHETIC_TRIES:
                break
        blocked_only = model.similarity(np.where(mask, 0.0, box), box)
        if self.frame == "pose":  # the face keeps the atlas's proportions, not the subject's
            back = fb.pose_frame(ctx.roi, fit, ctx.blocked, ctx.head, FRAME_BLEND_MM)
        else:
            back = ctx.location.to_atlas
        values = scale.restore(fb.from_box(pred, ctx.roi, back, default=-1.0))
        inside_box = fb.from_box(np.ones(fb.BOX_SHAPE, np.float32), ctx.roi, back) > 0.99
        outside = ctx.blocked & ~inside_box
        # the drawing in this image's tissue levels (a T2, PD or FLAIR head, a windowed CT: semid.contrast)
        from semid.contrast import own_contrast

        values, contrast_record = own_contrast(values, ctx.roi_arr, ctx.region & inside_box)
        filled = values
        # blocked voxels outside the face box (at p -> 1, the tissue margin above and below it) get the
        # plain fill, computed only around them: on the whole ROI it took 1.7 s of a 1 mm head's 6.6 s
        for part in boxes_around(outside, ctx.roi.GetSpacing(), SURFACE_CONTEXT_MM):
            plain = np.asarray(SurfaceFill()(ctx.crop(part)), np.float32)
            filled[part] = np.where(outside[part], plain, filled[part])
        # the drawn head's skin, bent into the person's at the edge of B_p and into the plain fill's
        filled, skin_joined = join_skin(ctx, filled, outside, seed=ctx.seed)
        from semid.semantics.decoupling import identity_bits_left

        bits_left = identity_bits_left(model.semantics.decoupler)
        record = {"compensation": model.describe(), "identity_mode": self.identity, "drawing_frame": self.frame,
                  "identity_code_tries": tries, "drawing": self.drawing,
                  **({"drawn_box_voxels_kept": int((gate & mask).sum()),
                      "default_face_canvas": model._canvas_source.get(modality),
                      "face_shown": ("default face: the population-average head" if self.identity == "default"
                                     else "synthetic face: the average head deformed by its code")}
                   if self.drawing == "gated" else {}),
                  "residual_risk": {"critic_similarity_output_to_input": round(similarity, 4),
                                    "critic_similarity_block_only": round(blocked_only, 4),
                                    "identity_bits_left": bits_left},
                  "blocked_voxels_outside_face_box": int(outside.sum()), "skin_joined": skin_joined,
                  **contrast_record}
        return FillResult(_cast_like(filled, ctx.roi_arr.dtype), record)


# ---------------------------------------------------------------------------------------------- command


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m semid.compensation samples|canvas|train``: make the face-box samples, the canonical head's
    boxes, train the generator."""
    parser = argparse.ArgumentParser(prog="semid train generator", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("samples", help="make (or complete) the cached face-box training samples")
    s.add_argument("--out", default="", help="cache folder (default: fb.samples_folder())")
    s.add_argument("--subjects", type=int, default=48)
    s.add_argument("--visits", default="0,1")
    s.add_argument("--ct-subjects", type=int, default=24, help="subjects that also get a CT of visit 0")
    c = sub.add_parser("canvas", help="write the canonical head's face boxes the gated drawing shows")
    c.add_argument("--out", default=str(CANVAS_FILE))
    t = sub.add_parser("train", help="train the identity critic and the generator")
    t.add_argument("--make-samples", action="store_true",
                   help="first make (or complete) the face-box samples with the `samples` defaults")
    defaults = TrainConfig()
    for name, value in vars(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, tuple):
            t.add_argument(flag, type=lambda v: tuple(int(x) for x in v.split(",")), default=value)
        else:
            t.add_argument(flag, type=type(value), default=value)
    args = parser.parse_args(argv)

    if args.command == "samples":
        folder = Path(args.out) if args.out else fb.samples_folder()
        visits = tuple(int(v) for v in args.visits.split(","))
        fb.phantom_samples(folder, fb.TRAIN_SEED, range(args.subjects), visits, ("MR",))
        if args.ct_subjects:
            fb.phantom_samples(folder, fb.TRAIN_SEED, range(args.ct_subjects), (visits[0],), ("CT",))
        return 0
    if args.command == "canvas":
        print(f"wrote {write_canvas(Path(args.out))}")
        return 0
    config = TrainConfig(**{k: getattr(args, k) for k in vars(defaults)})
    if not config.samples:
        config.samples = str(fb.samples_folder())
    if args.make_samples:
        main(["samples", "--out", config.samples])
    train(config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
