"""Feature encoders ``E`` of the pipeline (DESIGN.md §4 step 4): one interface, a bundled encoder, adapters.

Every encoder is an :class:`Encoder`: ``features(volume)`` maps a normalised head volume
``(B, 1, D, H, W)`` (air ~ 0, soft tissue ~ 1, as made by ``semid.facebox``) to one feature map per
level, ``(B, C_l, ceil(D / s_l), ceil(H / s_l), ceil(W / s_l))``, finest level first, and ``describe()``
says what it is for the de-identification record.

* ``bundled`` - :class:`PhantomPretextEncoder`, a small 3D CNN trained *here* on the phantom population
  with two medical pretext tasks (6-label segmentation and masked-cube reconstruction). It is honestly
  not a foundation model: it has seen phantoms only. Retrain with ``semid train encoder``.
* ``swinunetr:PATH`` - MONAI SwinUNETR self-supervised weights (``model_swinvit.pt``); features are the
  Swin-ViT hidden states.
* ``medicalnet:PATH`` - Tencent MedicalNet 3D ResNets (``resnet_10.pth``, ``resnet_50_23dataset.pth``, ...)
  in MONAI's ResNet; features are the outputs of layer1..layer4.
* ``torchscript:PATH`` - any TorchScript module whose forward returns the feature levels.
* ``bundle:DIR`` - a MONAI bundle's ``network_def`` with its ``models/model.pt``; features from forward
  hooks on named modules.

Nothing here downloads anything: every checkpoint is read from a local path, and checkpoints are read
with ``torch.load(weights_only=True)`` (tensors and plain containers only, no arbitrary unpickling).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from semid.errors import InputError

MODELS_DIR = Path(__file__).resolve().parents[1] / "data" / "models"
#: The committed weights of the bundled encoder.
BUNDLED_WEIGHTS = MODELS_DIR / "encoder_phantom.pt"
#: Phantom labels (``semid.phantoms.LABELS``) the segmentation pretext task predicts.
CLASS_NAMES = ("air", "brain", "other_head_tissue", "identity_region", "brain_lesion", "face_lesion")
N_CLASSES = len(CLASS_NAMES)
#: Seed of the phantom population the bundled encoder trains on (``semid.facebox.TRAIN_SEED``).
DATA_SEED = 5
#: Normalised intensity below which a voxel counts as air (used by intensity mappings of adapters).
AIR_THRESHOLD = 0.05

__all__ = [
    "BUNDLED_WEIGHTS",
    "CLASS_NAMES",
    "Encoder",
    "HookedEncoder",
    "MedicalNetEncoder",
    "PhantomPretextEncoder",
    "SwinViTEncoder",
    "TorchScriptEncoder",
    "load_bundle",
    "load_encoder",
    "load_medicalnet",
    "load_swinunetr_ssl",
    "load_torchscript",
    "main",
    "train",
]


# ------------------------------------------------------------------------------------------------ interface


def file_sha256(path: Path | str) -> str:
    """Hex SHA-256 of a file's bytes (identifies the exact weights in the record)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_volume(volume: Any) -> None:
    """Raise InputError unless ``volume`` is a finite float tensor shaped (B, 1, D, H, W)."""
    if not isinstance(volume, torch.Tensor):
        raise InputError(f"The encoder needs a torch.Tensor, not {type(volume).__name__}: convert the volume "
                         "with torch.from_numpy(array)[None, None].")
    if volume.ndim != 5 or volume.shape[1] != 1 or min(volume.shape) < 1:
        raise InputError(f"The encoder needs a volume shaped (B, 1, D, H, W), got {tuple(volume.shape)}: add the "
                         "batch and channel axes, e.g. volume[None, None] for a (D, H, W) array.")
    if not volume.is_floating_point():
        raise InputError(f"The encoder needs float intensities, got {volume.dtype}: normalise the volume (air 0, "
                         "soft tissue 1) and convert it with .float().")
    if not bool(torch.isfinite(volume).all()):
        raise InputError("The volume given to the encoder holds NaN or infinite values: fill or mask them first.")


class Encoder(nn.Module):
    """Base class of the feature encoders: a multi-scale map of a normalised head volume.

    Subclasses set the attributes below and implement ``forward`` (the raw levels, with gradients);
    callers use :meth:`features`.

    Attributes:
        name: short name of the encoder, e.g. ``"phantom-pretext-cnn"`` or ``"medicalnet-resnet10"``.
        kind: what it is, in words (says whether it is a foundation model).
        channels: channels ``C_l`` of each level.
        strides: downsampling factor ``s_l`` of each level relative to the input (voxels), ascending.
        pad_multiple: inputs are padded with air (0) at the high end of each spatial axis up to a multiple
            of this before the forward pass, so every level has exactly ``ceil(n / s_l)`` voxels along an
            axis of ``n`` input voxels (the padding is cropped off the outputs).
        foundation_model: True only for adapters of published medical foundation-model weights.
        source: file (or folder) name of the weights, without its directory; None if untrained.
        sha256: SHA-256 of the weight file; None if untrained or a folder (then see ``extra``).
        extra: further JSON-ready facts added to :meth:`describe`.
    """

    name: str = "encoder"
    kind: str = "encoder"
    foundation_model: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.channels: tuple[int, ...] = ()
        self.strides: tuple[int, ...] = ()
        self.pad_multiple: int = 1
        self.source: str | None = None
        self.sha256: str | None = None
        self.extra: dict[str, Any] = {}

    @property
    def device(self) -> torch.device:
        """Device of the encoder's weights (inputs are moved there; outputs stay there)."""
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Map normalised intensities (air 0, soft tissue 1) to what the network was trained on.

        Args:
            x: (B, 1, D, H, W) float, normalised intensities.

        Returns:
            (B, 1, D, H, W) float, the network's input. The base class returns ``x`` unchanged.
        """
        return x

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - abstract
        """Raw feature levels of a prepared, padded input (with gradients; use :meth:`features`)."""
        raise NotImplementedError

    def features(self, volume: torch.Tensor) -> list[torch.Tensor]:
        """Multi-scale features of a normalised volume, in eval mode and without gradients.

        Args:
            volume: (B, 1, D, H, W) float tensor of normalised intensities: air ~ 0, soft tissue ~ 1
                (``semid.facebox`` normalisation). Moved to the encoder's device.

        Returns:
            One float32 tensor per level, finest first: (B, C_l, ceil(D / s_l), ceil(H / s_l),
            ceil(W / s_l)) with ``C_l = channels[l]`` and ``s_l = strides[l]``, on the encoder's device.

        Raises:
            InputError: the volume is not a finite float tensor shaped (B, 1, D, H, W).
        """
        _check_volume(volume)
        self.eval()
        x = volume.to(device=self.device, dtype=torch.float32)
        size = tuple(int(n) for n in x.shape[2:])
        m = max(int(self.pad_multiple), 1)
        pad = [(-n) % m for n in size]
        if any(pad):
            # Air at the high end only, so voxel (0, 0, 0) stays aligned with every level's voxel (0, 0, 0).
            x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]), value=0.0)
        with torch.no_grad():
            levels = self.forward(self.prepare(x))
        if len(levels) != len(self.strides):
            raise RuntimeError(f"{self.name} returned {len(levels)} levels, expected {len(self.strides)}")
        out = []
        for level, s in zip(levels, self.strides, strict=True):
            crop = [math.ceil(n / s) for n in size]
            out.append(level[:, :, : crop[0], : crop[1], : crop[2]].float())
        return out

    def describe(self) -> dict[str, Any]:
        """JSON-ready description for the de-identification record.

        Returns:
            ``name``, ``kind``, ``foundation_model``, ``source`` (weight file name, no directory),
            ``sha256`` (of that file), ``channels``, ``strides`` and any adapter-specific ``extra`` facts.
        """
        return {"name": self.name, "kind": self.kind, "foundation_model": bool(self.foundation_model),
                "source": self.source, "sha256": self.sha256, "channels": [int(c) for c in self.channels],
                "strides": [int(s) for s in self.strides], **self.extra}


# ------------------------------------------------------------------------------------------ bundled encoder


def _conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """3x3x3 conv (no bias: the norm has one), instance norm, leaky ReLU."""
    return nn.Sequential(nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                         nn.InstanceNorm3d(c_out, affine=True), nn.LeakyReLU(0.01, inplace=True))


class PhantomPretextEncoder(Encoder):
    """Small 3D CNN trained here on phantom heads with medical pretext tasks. NOT a foundation model.

    Three levels at strides 2, 4, 8 (each: a strided 3x3x3 conv block and a 3x3x3 conv block); instance
    norm, so a volume's features do not depend on the rest of its batch. Trained by :func:`train`
    (6-label segmentation with Dice + cross-entropy, and L1 reconstruction of masked 8^3-voxel cubes)
    on ``semid.facebox`` samples of the phantom population with seed 5.

    Args:
        channels: channels of the three levels (default 16, 32, 64: about 215k weights, 0.9 MB).
    """

    name = "phantom-pretext-cnn"
    kind = "3D CNN trained here on phantom heads (segmentation + masked reconstruction); not a foundation model"
    foundation_model = False

    def __init__(self, channels: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__()
        self.channels = tuple(int(c) for c in channels)
        self.strides = tuple(2 ** (k + 1) for k in range(len(self.channels)))
        self.pad_multiple = self.strides[-1]
        stages, c_in = [], 1
        for c in self.channels:
            stages.append(nn.Sequential(_conv_block(c_in, c, 2), _conv_block(c, c, 1)))
            c_in = c
        self.stages = nn.ModuleList(stages)
        self.meta: dict[str, Any] = {}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Levels of x (B, 1, D, H, W), D, H, W multiples of 8: [(B, C_l, D / s_l, H / s_l, W / s_l)]."""
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out

    @classmethod
    def load(cls, path: Path | str | None = None, map_location: str | torch.device = "cpu"
             ) -> PhantomPretextEncoder:
        """The encoder with the weights written by :func:`train` (default: the committed ones).

        Raises:
            InputError: the file is missing or is not a weight file written by :func:`train`.
        """
        path = Path(path) if path is not None else BUNDLED_WEIGHTS
        hint = ("retrain it with `semid train encoder`" if path == BUNDLED_WEIGHTS
                else "give the path of a weight file written by `semid train encoder`")
        obj = _torch_load(path, "bundled encoder", hint)
        if not (isinstance(obj, dict) and obj.get("kind") == "PhantomPretextEncoder" and "state_dict" in obj):
            raise InputError(f"{path.name} is not a weight file of the bundled encoder: give one written by "
                             "`semid train encoder`.")
        arch = obj.get("arch", {})
        enc = cls(channels=arch.get("channels", (16, 32, 64)))
        try:
            enc.load_state_dict(obj["state_dict"], strict=True)
        except RuntimeError:
            raise InputError(f"The weights in {path.name} do not fit the bundled encoder's architecture: retrain "
                             "them with `semid train encoder`.") from None
        enc.to(map_location)
        enc.eval()
        enc.source, enc.sha256 = path.name, file_sha256(path)
        enc.meta = dict(obj.get("meta", {}))
        training = enc.meta.get("training", {})
        enc.extra = {"trained_on": f"phantom population, seed {training.get('data_seed', DATA_SEED)}",
                     "pretext_tasks": ["segmentation of 6 phantom labels", "masked 8^3-cube reconstruction"],
                     "input": "normalised intensities (air 0, soft tissue 1)"}
        return enc


class _PretextHeads(nn.Module):
    """Training-only decoder of the pretext tasks: U-Net style up path to stride 2, two 1x1x1 heads.

    Outputs are upsampled (trilinear) from stride 2 to the input size: segmentation logits
    (B, 6, D, H, W) and reconstructed normalised intensities (B, 1, D, H, W).
    """

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        c = list(channels)
        self.up = nn.ModuleList(_conv_block(c[k + 1] + c[k], c[k], 1) for k in reversed(range(len(c) - 1)))
        self.seg = nn.Conv3d(c[0], N_CLASSES, 1)
        self.rec = nn.Conv3d(c[0], 1, 1)

    def forward(self, levels: list[torch.Tensor], size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        x = levels[-1]
        for block, skip in zip(self.up, reversed(levels[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        seg = F.interpolate(self.seg(x), size=tuple(size), mode="trilinear", align_corners=False)
        rec = F.interpolate(self.rec(x), size=tuple(size), mode="trilinear", align_corners=False)
        return seg, rec


# ------------------------------------------------------------------------------------------ checkpoint I/O


def _torch_load(path: Path, what: str, hint: str = "") -> Any:
    """``torch.load(weights_only=True)`` on CPU, with one-sentence InputErrors for the user."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"The {what} weight file {path.name} does not exist or is not a file: "
                         f"{hint or 'give the path of a local checkpoint (semid never downloads weights)'}.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any failure to read means the same thing to the user
        raise InputError(f"{path.name} is not a readable PyTorch checkpoint of tensors (semid loads weights with "
                         "torch.load(weights_only=True)): give the published checkpoint, or re-save its state_dict "
                         "with torch.save.") from None


def _state_dict_of(obj: Any, name: str, what: str) -> dict[str, torch.Tensor]:
    """The tensor dict of a checkpoint: ``obj['state_dict']``, ``obj['model']`` or ``obj`` itself."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "network"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
    raise InputError(f"{name} holds no state_dict of tensors: give a {what} checkpoint in its published format.")


def _strip_prefix(state: dict[str, torch.Tensor], prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    """Remove the first matching prefix of each key (``module.`` from DataParallel, etc.)."""
    out = {}
    for k, v in state.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


# ------------------------------------------------------------------------------------ MONAI SwinUNETR (SSL)


class SwinViTEncoder(Encoder):
    """MONAI Swin-ViT encoder (the ``swinViT`` of SwinUNETR) with self-supervised weights.

    Levels are the five hidden states of ``monai.networks.nets.swin_unetr.SwinTransformer`` (layer-normed
    per voxel as in SwinUNETR): strides 2, 4, 8, 16, 32, channels ``f, 2f, 4f, 8f, 16f`` for feature size
    ``f`` (48 in ``model_swinvit.pt``). Inputs are padded to multiples of 32.

    The SSL weights were pre-trained on CT scaled from [-1000, 1000] HU to [0, 1]; our normalisation maps
    -1000 HU to 0 and soft tissue to 1, so :meth:`prepare` multiplies by ``input_scale`` (0.5) and clips
    to [0, 1].
    """

    name = "monai-swinunetr-ssl"
    kind = "MONAI SwinUNETR Swin-ViT encoder, self-supervised pre-trained weights (medical foundation model)"
    foundation_model = True

    def __init__(self, swin: nn.Module, feature_size: int, input_scale: float = 0.5) -> None:
        super().__init__()
        self.swinViT = swin
        self.channels = tuple(feature_size * 2 ** k for k in range(5))
        self.strides = tuple(2 ** (k + 1) for k in range(5))
        self.pad_multiple = 32
        self.input_scale = float(input_scale)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) normalised -> the SSL pre-training range: ``clip(x * input_scale, 0, 1)``."""
        return (x * self.input_scale).clamp(0.0, 1.0)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Hidden states of x (B, 1, D, H, W), D, H, W multiples of 32: five (B, C_l, D/s_l, ...) maps."""
        return list(self.swinViT(x, True))


def load_swinunetr_ssl(path: Path | str, *, input_scale: float = 0.5, downsample: str = "merging") -> SwinViTEncoder:
    """A :class:`SwinViTEncoder` from MONAI's SwinUNETR self-supervised checkpoint (``model_swinvit.pt``).

    The published format (read by ``monai.networks.nets.SwinUNETR.load_from``) is a dict whose
    ``state_dict`` holds the Swin-ViT weights keyed ``module.patch_embed.proj.weight``,
    ``module.layers1.0.blocks.0.mlp.fc1.weight``, ...; ``swinViT.`` / ``swin_vit.`` prefixes (fine-tuned
    SwinUNETR checkpoints) are accepted too, other keys (SSL heads, decoder) are ignored. Feature size,
    depths, heads, window and MLP ratio are read off the tensor shapes.

    Args:
        path: local checkpoint file.
        input_scale: factor from our normalised intensities to the pre-training range (see the class).
        downsample: MONAI patch-merging variant, ``"merging"`` (the SSL weights) or ``"mergingv2"``.

    Raises:
        InputError: missing file, unreadable file, or not a Swin-ViT checkpoint.
    """
    from monai.networks.nets.swin_unetr import MERGING_MODE, SwinTransformer

    path = Path(path)
    state = _state_dict_of(_torch_load(path, "SwinUNETR"), path.name, "MONAI SwinUNETR self-supervised")
    state = _strip_prefix(state, ("module.swinViT.", "module.swin_vit.", "module.", "swinViT.", "swin_vit."))
    state = {k.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2."): v
             for k, v in state.items() if k.startswith(("patch_embed.", "layers"))}
    proj = state.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 5:
        raise InputError(f"{path.name} is not a SwinUNETR self-supervised checkpoint (no 3D "
                         "module.patch_embed.proj.weight in its state_dict): give MONAI's model_swinvit.pt.")
    feature_size, in_chans, patch = int(proj.shape[0]), int(proj.shape[1]), tuple(int(s) for s in proj.shape[2:])
    if in_chans != 1:
        raise InputError(f"{path.name} expects {in_chans} input channels; semid's volumes have one: give a "
                         "single-channel SwinUNETR checkpoint.")
    depths, heads = [], []
    for i in range(1, 5):
        blocks = {k.split(".")[3] for k in state if k.startswith(f"layers{i}.0.blocks.")}
        table = state.get(f"layers{i}.0.blocks.0.attn.relative_position_bias_table")
        if not blocks or table is None:
            raise InputError(f"{path.name} lacks the weights of Swin-ViT stage {i}: give a complete "
                             "SwinUNETR self-supervised checkpoint.")
        depths.append(len(blocks))
        heads.append(int(table.shape[1]))
    table0 = state["layers1.0.blocks.0.attn.relative_position_bias_table"]
    window = int(round((round(table0.shape[0] ** (1 / 3)) + 1) / 2))
    mlp_ratio = state["layers1.0.blocks.0.mlp.linear1.weight"].shape[0] / feature_size
    use_v2 = any(k.startswith("layers1c.") for k in state)
    swin = SwinTransformer(in_chans=1, embed_dim=feature_size, window_size=(window,) * 3, patch_size=patch,
                           depths=depths, num_heads=heads, mlp_ratio=mlp_ratio, qkv_bias=True,
                           norm_layer=nn.LayerNorm, spatial_dims=3, downsample=MERGING_MODE[downsample],
                           use_v2=use_v2)
    missing, unexpected = swin.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(f"{path.name} does not match a MONAI Swin-ViT (feature size {feature_size}, depths "
                         f"{tuple(depths)}): {len(missing)} weights missing, {len(unexpected)} unexpected; give "
                         "MONAI's model_swinvit.pt or a SwinUNETR checkpoint.")
    enc = SwinViTEncoder(swin, feature_size, input_scale)
    if patch != (2, 2, 2):
        enc.strides = tuple(patch[0] * 2 ** k for k in range(5))
        enc.pad_multiple = patch[0] * 16
    enc.eval()
    enc.source, enc.sha256 = path.name, file_sha256(path)
    enc.extra = {"architecture": {"feature_size": feature_size, "depths": depths, "num_heads": heads,
                                  "window_size": window, "patch_size": list(patch), "use_v2": use_v2},
                 "input": f"clip(normalised * {input_scale:g}, 0, 1)"}
    return enc


# ---------------------------------------------------------------------------------------- MedicalNet ResNets

#: (block, blocks per layer) -> depth of MedicalNet's ResNets.
_RESNET_DEPTHS = {("basic", (1, 1, 1, 1)): 10, ("basic", (2, 2, 2, 2)): 18, ("basic", (3, 4, 6, 3)): 34,
                  ("bottleneck", (3, 4, 6, 3)): 50, ("bottleneck", (3, 4, 23, 3)): 101,
                  ("bottleneck", (3, 8, 36, 3)): 152, ("bottleneck", (3, 24, 36, 3)): 200}


def _dilate(layer: nn.Sequential, dilation: int) -> None:
    """Turn a MONAI ResNet layer's stride-2 downsampling into MedicalNet's dilation (same weights).

    MedicalNet builds layer3 and layer4 with stride 1 and dilation 2 and 4 (every 3x3x3 conv of the layer,
    padding = dilation); MONAI builds them with stride 2. The weights are identical in shape, so the layer
    is converted in place to the geometry the weights were trained in.
    """
    for block in layer:
        for m in block.modules():
            if isinstance(m, nn.Conv3d) and m.kernel_size == (3, 3, 3):
                m.stride, m.dilation, m.padding = (1, 1, 1), (dilation,) * 3, (dilation,) * 3
        ds = getattr(block, "downsample", None)
        if isinstance(ds, nn.Sequential):
            ds[0].stride = (1, 1, 1)
        elif isinstance(ds, partial):
            block.downsample = partial(ds.func, *ds.args, **{**ds.keywords, "stride": 1})


class MedicalNetEncoder(Encoder):
    """A MedicalNet 3D ResNet (Tencent, Med3D) in MONAI's ``ResNet``; levels = outputs of layer1..layer4.

    Geometry as in MedicalNet: conv1 7x7x7 stride 2, max-pool stride 2, layer2 stride 2, layer3 and
    layer4 dilated (2, 4) instead of strided: strides 4, 8, 8, 8; channels 64, 128, 256, 512 (times 4
    for the bottleneck depths 50+).

    MedicalNet normalises each volume to zero mean and unit variance over its non-background voxels;
    :meth:`prepare` does the same over voxels above ``AIR_THRESHOLD`` and sets air to 0 (MedicalNet fills
    it with N(0, 1) noise, which would make features random).
    """

    kind = "Tencent MedicalNet 3D ResNet (Med3D) pre-trained on 23 medical data sets (medical foundation model)"
    foundation_model = True

    def __init__(self, net: nn.Module, depth: int) -> None:
        super().__init__()
        self.net = net
        self.depth = int(depth)
        self.name = f"medicalnet-resnet{depth}"
        _dilate(net.layer3, 2)
        _dilate(net.layer4, 4)
        expansion = 4 if depth >= 50 else 1
        self.channels = tuple(c * expansion for c in (64, 128, 256, 512))
        self.strides = (4, 8, 8, 8)
        self.pad_multiple = 8

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) normalised -> per-volume z-score over the head; air 0."""
        out = torch.zeros_like(x)
        for b in range(x.shape[0]):
            head = x[b] > AIR_THRESHOLD
            if bool(head.any()):
                values = x[b][head]
                out[b][head] = (values - values.mean()) / values.std().clamp_min(1e-6)
        return out

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of layer1..layer4 for x (B, 1, D, H, W): four (B, C_l, D/s_l, H/s_l, W/s_l) maps."""
        net = self.net
        x = net.act(net.bn1(net.conv1(x)))
        if not net.no_max_pool:
            x = net.maxpool(x)
        out = []
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            x = layer(x)
            out.append(x)
        return out


def load_medicalnet(path: Path | str, depth: int | None = None) -> MedicalNetEncoder:
    """A :class:`MedicalNetEncoder` from a MedicalNet checkpoint (``resnet_10.pth``, ``resnet_18_23dataset.pth``, ...).

    The published format is a dict whose ``state_dict`` holds ``module.conv1.weight``, ``module.bn1.*``,
    ``module.layer1.0.conv1.weight`` ... (DataParallel prefix); the segmentation head (``conv_seg``), if
    any, is ignored. Depth, block type, shortcut type (A: parameter-free, B: 1x1x1 conv) and the
    downsample bias are read off the keys.

    Args:
        path: local checkpoint file.
        depth: 10, 18, 34, 50, 101, 152 or 200; None infers it from the keys (checked if given).

    Raises:
        InputError: missing or unreadable file, not a MedicalNet ResNet, or a depth that does not match.
    """
    from monai.networks.nets import resnet as monai_resnet

    path = Path(path)
    state = _state_dict_of(_torch_load(path, "MedicalNet"), path.name, "MedicalNet ResNet")
    state = _strip_prefix(state, ("module.",))
    state = {k: v for k, v in state.items() if k.startswith(("conv1.", "bn1.", "layer1.", "layer2.", "layer3.",
                                                               "layer4."))}
    conv1 = state.get("conv1.weight")
    if conv1 is None or conv1.ndim != 5 or not all(f"layer{i}.0.conv1.weight" in state for i in range(1, 5)):
        raise InputError(f"{path.name} is not a MedicalNet 3D ResNet checkpoint (no module.conv1 / layer1..layer4 "
                         "3D weights in its state_dict): give a MedicalNet resnet_*.pth file.")
    if conv1.shape[1] != 1:
        raise InputError(f"{path.name} expects {conv1.shape[1]} input channels; semid's volumes have one: give a "
                         "single-channel MedicalNet checkpoint.")
    block = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    counts = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    inferred = _RESNET_DEPTHS.get((block, counts))
    if inferred is None:
        raise InputError(f"{path.name} has {block} blocks {counts} per layer, which is no MedicalNet ResNet depth: "
                         "give a MedicalNet resnet_*.pth file.")
    if depth is not None and int(depth) != inferred:
        raise InputError(f"{path.name} holds a ResNet-{inferred}, not the ResNet-{depth} asked for: give the "
                         "matching depth or leave it out.")
    shortcut = "B" if "layer2.0.downsample.0.weight" in state else "A"
    bias_downsample = "layer2.0.downsample.0.bias" in state
    net = getattr(monai_resnet, f"resnet{inferred}")(
        pretrained=False, spatial_dims=3, n_input_channels=1, feed_forward=False, shortcut_type=shortcut,
        bias_downsample=bias_downsample, conv1_t_size=7, conv1_t_stride=2)
    missing, unexpected = net.load_state_dict(state, strict=False)
    # MedicalNet was saved by PyTorch 0.4, whose BatchNorm had no num_batches_tracked counter.
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise InputError(f"{path.name} does not match MONAI's ResNet-{inferred} (shortcut {shortcut}): "
                         f"{len(missing)} weights missing, {len(unexpected)} unexpected; give a MedicalNet "
                         "resnet_*.pth file.")
    enc = MedicalNetEncoder(net, inferred)
    enc.eval()
    enc.source, enc.sha256 = path.name, file_sha256(path)
    enc.extra = {"architecture": {"depth": inferred, "block": block, "shortcut_type": shortcut,
                                  "bias_downsample": bias_downsample, "layer3_4": "dilated 2, 4 (as MedicalNet)"},
                 "input": "z-score over head voxels (normalised > 0.05), air 0"}
    return enc


# ---------------------------------------------------------------------------------------------- TorchScript

#: Edge lengths (voxels) of the probe volumes used to infer channels and strides, tried in order.
PROBE_SIZES = (64, 96, 128)


def _probe_volume(size: int) -> torch.Tensor:
    """(1, 1, size, size, size) head-like probe: a soft-tissue ball (1.0) in air (0), deterministic."""
    r = torch.linspace(-1.0, 1.0, size)
    zz, yy, xx = torch.meshgrid(r, r, r, indexing="ij")
    return ((zz ** 2 + yy ** 2 + xx ** 2) < 0.6).float()[None, None]


def _strides_of(shapes: Sequence[Sequence[int]], size: int, what: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(channels, strides) of 5D level shapes on a ``size``^3 probe; isotropic integer strides only."""
    channels, strides = [], []
    for shape in shapes:
        if len(shape) != 5 or shape[0] != 1:
            raise InputError(f"{what} returned a feature of shape {tuple(shape)} for a (1, 1, {size}, {size}, "
                             f"{size}) volume: each level must be (B, C, D, H, W).")
        ratios = {size / n for n in shape[2:]}
        s = round(next(iter(ratios)))
        if len(ratios) != 1 or s < 1 or abs(next(iter(ratios)) - s) > 1e-6:
            raise InputError(f"{what} returned a level of shape {tuple(shape)} for a {size}^3 volume: levels must "
                             "downsample every axis by the same integer factor.")
        channels.append(int(shape[1]))
        strides.append(int(s))
    return tuple(channels), tuple(strides)


class TorchScriptEncoder(Encoder):
    """A TorchScript module whose forward maps (B, 1, D, H, W) to a tensor or a list/tuple of level tensors.

    Channels and strides are read off the outputs for a probe volume (64^3, else 96^3, 128^3); levels are
    reordered finest first; inputs are padded to a multiple of the coarsest stride. The module receives
    the normalised intensities unchanged (wrap it if it needs another normalisation).
    """

    name = "torchscript"
    kind = "TorchScript feature module loaded from a local file"
    foundation_model = False

    def __init__(self, module: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.module = module
        self._order: list[int] = []
        last: Exception | None = None
        for size in PROBE_SIZES:
            try:
                with torch.no_grad():
                    levels = self._raw(module.eval()(_probe_volume(size)))
            except InputError:
                raise
            except Exception as exc:  # noqa: BLE001 - a probe size the module does not accept: try the next
                last = exc
                continue
            channels, strides = _strides_of([tuple(t.shape) for t in levels], size, "The TorchScript module")
            self._order = sorted(range(len(strides)), key=lambda i: strides[i])
            self.channels = tuple(channels[i] for i in self._order)
            self.strides = tuple(strides[i] for i in self._order)
            self.pad_multiple = max(self.strides)
            return
        raise InputError(f"The TorchScript module fails on (1, 1, n, n, n) float volumes for n in {PROBE_SIZES} "
                         f"({type(last).__name__}): give a module that takes a one-channel 3D volume.")

    @staticmethod
    def _raw(out: Any) -> list[torch.Tensor]:
        if isinstance(out, torch.Tensor):
            return [out]
        if isinstance(out, (list, tuple)) and out and all(isinstance(t, torch.Tensor) for t in out):
            return list(out)
        raise InputError(f"The TorchScript module returned {type(out).__name__}: its forward must return a "
                         "tensor or a list/tuple of tensors (the feature levels).")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The module's levels for x (B, 1, D, H, W), finest first."""
        levels = self._raw(self.module(x))
        return [levels[i] for i in self._order]


def load_torchscript(path: Path | str) -> TorchScriptEncoder:
    """A :class:`TorchScriptEncoder` from a ``torch.jit.save`` file (loaded on CPU).

    Raises:
        InputError: missing file, not a TorchScript archive, or a module that does not map a one-channel
            3D volume to 5D feature levels.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"The TorchScript file {path.name} does not exist or is not a file: give the path of a "
                         "local torch.jit.save archive.")
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception:  # noqa: BLE001
        raise InputError(f"{path.name} is not a TorchScript archive: save the module with torch.jit.save("
                         "torch.jit.script(model), path).") from None
    enc = TorchScriptEncoder(module)
    enc.source, enc.sha256 = path.name, file_sha256(path)
    return enc


# ------------------------------------------------------------------------------------------- MONAI bundle


class _StopForward(Exception):
    """Raised by the last hook: the levels are in, the rest of the network (decoder) need not run."""


class HookedEncoder(Encoder):
    """Features of any network from forward hooks on named submodules (used for MONAI bundles).

    Args:
        net: the network; its forward must take (B, 1, D, H, W).
        layers: names (as in ``net.named_modules()``) whose 5D outputs are the levels; None picks, on a
            probe volume, the last module output at each downsampling stride before the first upsampling
            (the encoder path of a U-Net-like network).
        name: encoder name for the record.

    Channels and strides are read off the probe; levels are ordered finest first. The forward stops as
    soon as the last level is computed.
    """

    kind = "network of a MONAI bundle, features from forward hooks"
    foundation_model = False

    def __init__(self, net: nn.Module, layers: Sequence[str] | None = None, name: str = "monai-bundle") -> None:
        super().__init__()
        self.net = net.eval()
        self.name = name
        modules = dict(net.named_modules())
        if layers is not None:
            layers = [str(n) for n in layers]
            unknown = [n for n in layers if n not in modules or n == ""]
            if unknown or not layers:
                some = ", ".join(n for n in list(modules)[1:8])
                raise InputError(f"The network has no module {unknown[0] if unknown else '(none given)'!r}: give "
                                 f"names from net.named_modules(), e.g. {some}.")
        last: Exception | None = None
        for size in PROBE_SIZES:
            try:
                picked, shapes = self._probe(layers, size)
            except InputError:
                raise
            except Exception as exc:  # noqa: BLE001 - a probe size the network does not accept: try the next
                last = exc
                continue
            channels, strides = _strides_of(shapes, size, "The network")
            order = sorted(range(len(picked)), key=lambda i: strides[i])
            self.layers = [picked[i] for i in order]
            self.channels = tuple(channels[i] for i in order)
            self.strides = tuple(strides[i] for i in order)
            # At least 32: many MONAI networks (SwinUNETR, 5-level U-Nets) need it before our last hook fires.
            self.pad_multiple = max(32, max(self.strides))
            self.extra = {"layers": list(self.layers), "input": "normalised intensities (air 0, soft tissue 1)"}
            return
        raise InputError(f"The network fails on (1, 1, n, n, n) float volumes for n in {PROBE_SIZES} "
                         f"({type(last).__name__}): it must take a one-channel 3D volume.")

    def _probe(self, layers: list[str] | None, size: int) -> tuple[list[str], list[tuple[int, ...]]]:
        """Names and output shapes of the levels on a ``size``^3 probe (auto-picked if ``layers`` is None)."""
        modules = dict(self.net.named_modules())
        names = layers if layers is not None else [n for n in modules if n]
        record: list[tuple[str, tuple[int, ...]]] = []

        def hook(name: str, _m: nn.Module, _inp: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and out.ndim == 5:
                record.append((name, tuple(int(s) for s in out.shape)))

        handles = [modules[n].register_forward_hook(partial(hook, n)) for n in names]
        try:
            with torch.no_grad():
                self.net(_probe_volume(size).to(self.device))
        finally:
            for h in handles:
                h.remove()
        if layers is not None:
            shapes = dict(record)
            missing = [n for n in layers if n not in shapes]
            if missing:
                raise InputError(f"Module {missing[0]!r} does not output a 5D (B, C, D, H, W) tensor: choose modules "
                                 "of the network's encoder path.")
            return list(layers), [shapes[n] for n in layers]
        best: dict[int, tuple[str, tuple[int, ...]]] = {}
        deepest = 1
        for name, shape in record:
            ratios = {size / n for n in shape[2:]}
            if len(ratios) != 1:
                continue  # channels-last or anisotropic: not a feature map
            s = next(iter(ratios))
            if s != round(s) or s < 1:
                continue
            s = int(round(s))
            if s < deepest:
                break  # the first upsampling: the decoder starts here
            deepest = s
            if s > 1:
                best[s] = (name, shape)  # hooks fire children first, so the enclosing block wins
        if not best:
            raise InputError("No downsampled 5D feature map was found in the network's forward: give the module "
                             "names of its encoder levels (layers=...).")
        picked = [best[s] for s in sorted(best)]
        return [n for n, _ in picked], [sh for _, sh in picked]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The hooked outputs for x (B, 1, D, H, W), finest first; the network stops after the last one."""
        modules = dict(self.net.named_modules())
        got: dict[str, torch.Tensor] = {}

        def hook(name: str, _m: nn.Module, _inp: Any, out: Any) -> None:
            got[name] = out
            if len(got) == len(self.layers):
                raise _StopForward

        handles = [modules[n].register_forward_hook(partial(hook, n)) for n in self.layers]
        try:
            self.net(x)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return [got[n] for n in self.layers]


def load_bundle(directory: Path | str, layers: Sequence[str] | None = None) -> HookedEncoder:
    """A :class:`HookedEncoder` from a MONAI bundle folder.

    Reads ``configs/inference.json`` (or ``.yaml`` / ``.yml``) with ``monai.bundle.ConfigParser`` and
    instantiates only ``network_def`` (nothing else of the config is run), then loads
    ``models/model.pt`` (a state_dict, or a dict holding one under ``model`` / ``state_dict``).

    Args:
        directory: the bundle's root folder.
        layers: module names whose outputs are the levels; None picks the encoder path automatically.

    Raises:
        InputError: no such folder, no inference config or ``network_def``, no or unfitting weights.
    """
    from monai.bundle import ConfigParser

    root = Path(directory)
    if not root.is_dir():
        raise InputError(f"The MONAI bundle folder {root.name} does not exist: give the bundle's root folder (with "
                         "configs/ and models/).")
    configs = [root / "configs" / f"inference.{ext}" for ext in ("json", "yaml", "yml")]
    config = next((c for c in configs if c.is_file()), None)
    if config is None:
        raise InputError(f"The bundle {root.name} has no configs/inference.json (or .yaml): give a MONAI bundle "
                         "folder.")
    weights = root / "models" / "model.pt"
    if not weights.is_file():
        extra = " (it has models/model.ts: use torchscript:PATH)" if (root / "models" / "model.ts").is_file() else ""
        raise InputError(f"The bundle {root.name} has no models/model.pt{extra}: put its trained weights there.")
    parser = ConfigParser()
    try:
        parser.read_config(str(config))
    except Exception:  # noqa: BLE001
        raise InputError(f"{config.name} of bundle {root.name} is not valid JSON/YAML: fix the config.") from None
    if "network_def" not in parser:
        raise InputError(f"{config.name} of bundle {root.name} defines no network_def: give a bundle whose "
                         "inference config defines its network.")
    parser["bundle_root"] = str(root)
    try:
        net = parser.get_parsed_content("network_def", instantiate=True)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"network_def of bundle {root.name} could not be built ({type(exc).__name__}): check its "
                         "config and that the network's package is installed.") from None
    if not isinstance(net, nn.Module):
        raise InputError(f"network_def of bundle {root.name} is not a torch module: give a bundle with a network.")
    state = _strip_prefix(_state_dict_of(_torch_load(weights, "bundle"), "models/model.pt", "MONAI bundle"),
                          ("module.",))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError:
        raise InputError(f"models/model.pt of bundle {root.name} does not fit its network_def: give the weights "
                         "trained with this config.") from None
    enc = HookedEncoder(net, layers, name=f"monai-bundle-{root.name}")
    enc.source, enc.sha256 = root.name, file_sha256(weights)
    enc.extra.update({"config": f"configs/{config.name}", "weights": "models/model.pt"})
    return enc


# ------------------------------------------------------------------------------------------------- loader

_SCHEMES = ("bundled", "swinunetr", "medicalnet", "torchscript", "bundle")


def load_encoder(spec: str | None = None, *, layers: Sequence[str] | None = None) -> Encoder:
    """The encoder named by ``spec``, in eval mode on CPU.

    Args:
        spec: ``None`` or ``"bundled"`` (the committed :class:`PhantomPretextEncoder`),
            ``"bundled:PATH"`` (other weights of it), ``"swinunetr:PATH"``, ``"medicalnet:PATH"``,
            ``"torchscript:PATH"`` or ``"bundle:DIR"``. Paths are local; nothing is downloaded.
        layers: module names for ``bundle:`` (see :class:`HookedEncoder`); ignored otherwise.

    Raises:
        InputError: unknown scheme, missing file, or a checkpoint that is not in the scheme's format.
    """
    text = "bundled" if spec is None else str(spec).strip()
    scheme, sep, rest = text.partition(":")
    scheme = scheme.strip().lower()
    if scheme not in _SCHEMES or (scheme != "bundled" and not rest.strip()):
        raise InputError(f"Unknown encoder {text!r}: use bundled, swinunetr:PATH, medicalnet:PATH, torchscript:PATH "
                         "or bundle:DIR.")
    path = Path(os.path.expanduser(rest.strip())) if rest.strip() else None
    if scheme == "bundled":
        return PhantomPretextEncoder.load(path)
    if scheme == "swinunetr":
        return load_swinunetr_ssl(path)
    if scheme == "medicalnet":
        return load_medicalnet(path)
    if scheme == "torchscript":
        return load_torchscript(path)
    return load_bundle(path, layers)


# ------------------------------------------------------------------------------------------------ training


def _cube_mask(shape: Sequence[int], rng: np.random.Generator, cube: int = 8, fraction: float = 0.4) -> np.ndarray:
    """Boolean mask of random ``cube``^3-voxel cubes on a randomly shifted grid covering ~``fraction``."""
    offset = rng.integers(0, cube, size=3)
    cells = [math.ceil((n + o) / cube) for n, o in zip(shape, offset, strict=True)]
    grid = rng.random(cells) < fraction
    full = grid.repeat(cube, 0).repeat(cube, 1).repeat(cube, 2)
    return full[offset[0]: offset[0] + shape[0], offset[1]: offset[1] + shape[1], offset[2]: offset[2] + shape[2]]


def _dice_ce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, ce_weights: torch.Tensor
             ) -> torch.Tensor:
    """Class-weighted soft Dice loss + weighted cross-entropy; logits (B, K, ...), labels (B, ...) int64."""
    ce = F.cross_entropy(logits, labels, weight=ce_weights)
    p = logits.softmax(1)
    onehot = F.one_hot(labels, N_CLASSES).movedim(-1, 1).to(p.dtype)
    dims = (0, *range(2, p.ndim))
    inter = (p * onehot).sum(dims)
    denom = p.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + 1e-3) / (denom + 1e-3)  # an absent class predicted absent scores ~1
    return ce + ((1 - dice) * weights).sum() / weights.sum()


#: Dice-loss weights of the classes: lesions (4, 5) count more.
CLASS_WEIGHTS = (0.5, 1.0, 1.0, 1.0, 2.0, 2.0)
#: Cross-entropy weights: lesions are 50-500 voxels of ~700k, so their voxels weigh much more.
CE_WEIGHTS = (1.0, 1.0, 1.0, 1.0, 20.0, 20.0)


class _Samples:
    """Cached ``semid.facebox`` samples in memory (image float16, labels uint8) and patch sampling."""

    def __init__(self, paths: Sequence[Path]) -> None:
        from semid.facebox import load_sample

        self.paths = list(paths)
        self.images, self.labels, self.subjects, self.modalities, self.lesions = [], [], [], [], []
        for p in self.paths:
            s = load_sample(p)
            self.images.append(s["image"].astype(np.float16))
            self.labels.append(s["labels"].astype(np.uint8))
            self.subjects.append(int(s["subject"]))
            self.modalities.append(int(s["modality"]))
            self.lesions.append(np.flatnonzero(s["labels"] >= 4))

    def __len__(self) -> int:
        return len(self.paths)

    def patch(self, k: int, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
        """A random ``size``^3 patch (half the time centred on a lesion voxel), randomly mirrored left-right."""
        img, lab = self.images[k], self.labels[k]
        ps = [min(size, n) for n in img.shape]
        if len(self.lesions[k]) and rng.random() < 0.5:
            centre = np.unravel_index(self.lesions[k][rng.integers(len(self.lesions[k]))], img.shape)
            start = [int(np.clip(c - p // 2 + rng.integers(-p // 4, p // 4 + 1), 0, n - p))
                     for c, p, n in zip(centre, ps, img.shape, strict=True)]
        else:
            start = [int(rng.integers(0, n - p + 1)) for p, n in zip(ps, img.shape, strict=True)]
        sl = tuple(slice(s, s + p) for s, p in zip(start, ps, strict=True))
        x, y = img[sl].astype(np.float32), lab[sl]
        if rng.random() < 0.5:  # the box's last axis is left-right: heads are nearly symmetric
            x, y = x[..., ::-1], y[..., ::-1]
        return np.ascontiguousarray(x * rng.uniform(0.9, 1.1)), np.ascontiguousarray(y)


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA device is available: use --device cpu or auto.")
    if name not in ("cpu", "cuda"):
        raise InputError(f"Unknown device {name!r}: use auto, cpu or cuda.")
    return torch.device(name)


def _validate(encoder: PhantomPretextEncoder, heads: _PretextHeads, data: _Samples, indices: Sequence[int],
              device: torch.device, seed: int) -> dict[str, Any]:
    """Dice per class (argmax, pooled over the volumes) and masked-cube L1 on whole held-out volumes."""
    encoder.eval()
    heads.eval()
    inter = np.zeros(N_CLASSES)
    total = np.zeros(N_CLASSES)
    l1_sum, l1_n = 0.0, 0
    with torch.no_grad():
        for j, k in enumerate(indices):
            img = torch.from_numpy(data.images[k].astype(np.float32))[None, None].to(device)
            lab = torch.from_numpy(data.labels[k].astype(np.int64)).to(device)
            size = img.shape[2:]
            pad = [(-n) % encoder.pad_multiple for n in size]
            padded = F.pad(img, (0, pad[2], 0, pad[1], 0, pad[0]))
            seg, _ = heads(encoder(padded), padded.shape[2:])
            pred = seg[0].argmax(0)[: size[0], : size[1], : size[2]]
            for c in range(N_CLASSES):
                p, t = pred == c, lab == c
                inter[c] += float((p & t).sum())
                total[c] += float(p.sum() + t.sum())
            mask = torch.from_numpy(_cube_mask(padded.shape[2:], np.random.default_rng([seed, 911, j]))).to(device)
            _, rec = heads(encoder(padded * ~mask), padded.shape[2:])
            l1_sum += float(((rec[0, 0] - padded[0, 0]).abs() * mask).sum())
            l1_n += int(mask.sum())
    dice = {name: (float(2 * inter[c] / total[c]) if total[c] > 0 else None) for c, name in enumerate(CLASS_NAMES)}
    present = [d for d in dice.values() if d is not None]
    return {"dice": dice, "mean_dice": float(np.mean(present)), "masked_l1": l1_sum / max(l1_n, 1),
            "volumes": len(indices)}


def _format_val(v: dict[str, Any]) -> str:
    dice = ", ".join(f"{k} {d:.3f}" if d is not None else f"{k} -" for k, d in v["dice"].items())
    return f"Dice {dice} (mean {v['mean_dice']:.3f}); masked-cube L1 {v['masked_l1']:.4f} ({v['volumes']} volumes)"


def _atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary name beside ``path``, then rename (no half-written file on interrupt)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(samples: Path | str | None = None, out: Path | str = BUNDLED_WEIGHTS, *, steps: int = 600, batch: int = 2,
          lr: float = 2e-3, seed: int = 0, patch: int = 64, device: str = "auto", resume: Path | str | None = None,
          checkpoint_every: int = 50, val_subjects: int = 8, channels: Sequence[int] = (16, 32, 64),
          command: str | None = None, progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the bundled encoder on cached phantom samples and write its weights with metadata.

    Each step draws ``batch`` random ``patch``^3 patches (half centred on lesions); every second patch
    has random 8^3-voxel cubes (~40%) set to air. Loss: class-weighted Dice + cross-entropy of the 6
    phantom labels on every patch, plus L1 between the reconstruction and the original intensities inside
    the masked cubes. AdamW with cosine decay. The last ``val_subjects`` subjects (by id) are held out;
    validation Dice per class and masked-cube L1 on their whole volumes are printed and saved.

    Args:
        samples: folder of ``facebox_5_*.npz`` (``semid.facebox.phantom_samples``, population seed 5);
            default ``semid.facebox.samples_folder()``.
        out: weight file to write (default: the committed ``encoder_phantom.pt``).
        steps, batch, lr, seed, patch: optimisation steps, patches per step, peak learning rate, seed of
            the initialisation and sampling, patch edge (voxels, a multiple of 8).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        resume: a checkpoint written by an interrupted run (``OUT.resume``) to continue from.
        checkpoint_every: write the resumable checkpoint ``OUT.resume`` every this many steps.
        val_subjects: how many subjects (the highest ids) to hold out.
        channels: channels of the encoder's three levels.
        command: the command line, kept in the metadata.

    Returns:
        The validation metrics saved in the metadata.

    Raises:
        InputError: too few samples, bad arguments, or a resume checkpoint that does not fit.
    """
    from tqdm import tqdm

    t_start = time.perf_counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if samples is None:
        from semid.facebox import samples_folder

        samples = samples_folder()
    samples = Path(samples)
    if steps < 1 or batch < 1 or lr <= 0 or patch < 8 or patch % 8:
        raise InputError("--steps and --batch must be positive, --lr > 0, --patch a multiple of 8.")
    dev = _pick_device(device)
    resume_path = out.with_name(out.name + ".resume")
    state = None
    if resume is not None:
        state = _torch_load(Path(resume), "resume", "give the OUT.resume file of an interrupted run")
        if not (isinstance(state, dict) and state.get("kind") == "PhantomPretextEncoder-resume"):
            raise InputError(f"{Path(resume).name} is not a resume checkpoint of `semid train encoder`: give the "
                             "OUT.resume file of an interrupted run.")
        files = [samples / n for n in state["files"]]
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise InputError(f"Sample {missing[0]} of the interrupted run is not in {samples.name}: give the same "
                             "--samples folder.")
        # The interrupted run's settings win (the schedule and sampling depend on them); --steps may grow.
        cfg = state["config"]
        channels, batch, lr, seed, patch = cfg["channels"], cfg["batch"], cfg["lr"], cfg["seed"], cfg["patch"]
    else:
        files = sorted(p for p in samples.glob(f"facebox_{DATA_SEED}_*.npz") if not p.name.endswith(".tmp.npz"))
    if len(files) < 4:
        raise InputError(f"Only {len(files)} cached samples in {samples.name}: make them with "
                         "semid.facebox.phantom_samples (population seed 5) first.")
    log(f"loading {len(files)} samples from {samples}")
    data = _Samples(files)
    subjects = sorted(set(data.subjects))
    if len(subjects) <= val_subjects:
        raise InputError(f"The samples cover {len(subjects)} subjects, not more than the {val_subjects} held out: "
                         "make more samples.")
    val_s = subjects[-val_subjects:]
    train_idx = [k for k, s in enumerate(data.subjects) if s not in val_s]
    val_idx = [k for k, s in enumerate(data.subjects) if s in val_s]
    log(f"train: {len(train_idx)} volumes of {len(subjects) - val_subjects} subjects; validation: {len(val_idx)} "
        f"volumes of subjects {val_s[0]}-{val_s[-1]}; device {dev}")

    torch.manual_seed(seed)
    encoder = PhantomPretextEncoder(channels).to(dev)
    heads = _PretextHeads(encoder.channels).to(dev)
    params = list(encoder.parameters()) + list(heads.parameters())
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    warmup = min(20, steps // 10 + 1)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_at)
    rng = np.random.default_rng([seed, 2718])
    history: list[dict[str, Any]] = []
    start = 0
    if state is not None:
        encoder.load_state_dict(state["encoder"])
        heads.load_state_dict(state["heads"])
        optim.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        history = list(state.get("history", []))
        start = int(state["step"])
        log(f"resuming at step {start}")
    weights = torch.tensor(CLASS_WEIGHTS, device=dev)
    ce_weights = torch.tensor(CE_WEIGHTS, device=dev)
    config = {"channels": list(encoder.channels), "steps": steps, "batch": batch, "lr": lr, "seed": seed,
              "patch": patch}

    def checkpoint(step: int) -> None:
        _atomic_save({"kind": "PhantomPretextEncoder-resume", "step": step, "config": config,
                      "files": [p.name for p in files], "encoder": encoder.state_dict(), "heads": heads.state_dict(),
                      "optimizer": optim.state_dict(), "scheduler": sched.state_dict(), "rng": rng.bit_generator.state,
                      "torch_rng": torch.get_rng_state(), "history": history}, resume_path)

    encoder.train()
    heads.train()
    running: float | None = None
    t_train = time.perf_counter()
    bar = tqdm(range(start, steps), initial=start, total=steps, unit="step", file=sys.stderr, disable=not progress,
               desc="training encoder")
    for step in bar:
        xs, ys, ms = [], [], []
        for i in range(batch):
            x, y = data.patch(train_idx[int(rng.integers(len(train_idx)))], rng, patch)
            masked = (step * batch + i) % 2 == 1
            ms.append(_cube_mask(x.shape, rng) if masked else np.zeros(x.shape, bool))
            xs.append(x)
            ys.append(y)
        x = torch.from_numpy(np.stack(xs))[:, None].to(dev)
        y = torch.from_numpy(np.stack(ys).astype(np.int64)).to(dev)
        m = torch.from_numpy(np.stack(ms))[:, None].to(dev)
        seg, rec = heads(encoder(x * ~m), x.shape[2:])
        loss_seg = _dice_ce(seg, y, weights, ce_weights)
        loss_rec = ((rec - x).abs() * m).sum() / m.sum().clamp_min(1)
        loss = loss_seg + loss_rec
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        sched.step()
        value = float(loss.detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        bar.set_postfix(loss=f"{running:.3f}", seg=f"{float(loss_seg.detach()):.3f}",
                        rec=f"{float(loss_rec.detach()):.3f}")
        done = step + 1
        if done % 50 == 0 or done == steps:
            history.append({"step": done, "loss": round(running, 5)})
        if checkpoint_every and done % checkpoint_every == 0 and done < steps:
            checkpoint(done)
    bar.close()
    wall_train = time.perf_counter() - t_train
    val = _validate(encoder, heads, data, val_idx, dev, seed)
    log(f"validation after {steps} steps: {_format_val(val)}")
    encoder.cpu().eval()
    meta = {
        "about": "PhantomPretextEncoder: small 3D CNN trained on phantom heads with medical pretext tasks "
                 "(segmentation of the 6 phantom labels, masked 8^3-cube reconstruction). Not a foundation model.",
        "training": {"command": command, "steps": steps, "batch": batch, "lr": lr, "seed": seed, "patch": patch,
                     "data_seed": DATA_SEED, "samples": len(files), "train_volumes": len(train_idx),
                     "val_volumes": len(val_idx), "val_subjects": val_s,
                     "modalities": sorted({("MR", "CT")[m] for m in data.modalities}),
                     "losses": "class-weighted Dice (weights " + ", ".join(f"{w:g}" for w in CLASS_WEIGHTS)
                               + ") + CE (weights " + ", ".join(f"{w:g}" for w in CE_WEIGHTS)
                               + "); L1 in masked cubes (8^3, ~40%, every second patch)",
                     "device": dev.type, "wall_s": round(time.perf_counter() - t_start, 1),
                     "wall_s_train": round(wall_train, 1), "torch": str(torch.__version__), "history": history},
        "metrics": {"val": val},
    }
    payload = {"format": 1, "kind": "PhantomPretextEncoder",
               "arch": {"channels": list(encoder.channels), "strides": list(encoder.strides), "norm": "instance",
                        "block": "conv3x3x3 s2 + conv3x3x3, InstanceNorm (affine), LeakyReLU 0.01"},
               "state_dict": {k: v.detach().cpu() for k, v in encoder.state_dict().items()}, "meta": meta}
    _atomic_save(payload, out)
    if resume_path.exists():
        resume_path.unlink()
    log(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) in {time.perf_counter() - t_start:.0f} s")
    return val


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m semid.semantics.encoders train ...`` (also ``semid train encoder ...``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m semid.semantics.encoders",
                                     description="Train the bundled phantom pretext encoder.")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", prog="semid train encoder",
                        help="train the bundled encoder on cached phantom samples; write its weights")
    tr.add_argument("--samples", type=Path, default=None,
                    help="folder of facebox_5_*.npz samples (default: <data dir>/train/facebox-v2)")
    tr.add_argument("--out", type=Path, default=BUNDLED_WEIGHTS, help="weight file (default: the committed one)")
    tr.add_argument("--steps", type=int, default=600)
    tr.add_argument("--batch", type=int, default=2)
    tr.add_argument("--lr", type=float, default=2e-3)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--patch", type=int, default=64, help="patch edge in voxels, a multiple of 8 (default 64)")
    tr.add_argument("--resume", type=Path, default=None, help="OUT.resume checkpoint of an interrupted run")
    tr.add_argument("--checkpoint-every", type=int, default=50, help="steps between resume checkpoints")
    tr.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    tr.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    tr.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(args.threads, 1))
    train(args.samples, args.out, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, patch=args.patch,
          device=args.device, resume=args.resume, checkpoint_every=args.checkpoint_every,
          command="semid train encoder " + shlex.join(argv[1:]), progress=not args.quiet,
          log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except InputError as exc:  # `semid train encoder` reports these itself; here, the same one sentence
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
