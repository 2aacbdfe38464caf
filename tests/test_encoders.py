"""semid.semantics.encoders: the bundled encoder and the adapters, on checkpoints in the published formats.

Each adapter test writes a randomly initialised checkpoint exactly as its publisher ships it (key names,
prefixes, containers), loads it through ``load_encoder`` and checks that the weights really arrived and
that ``features`` has the documented shapes and strides.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from semid.errors import InputError
from semid.semantics import encoders as E

torch.set_num_threads(1)


def _head(shape: tuple[int, ...]) -> torch.Tensor:
    """(1, 1, *shape) head-like volume: an ellipsoid of soft tissue (1.0) with a brighter core, in air."""
    axes = [torch.linspace(-1, 1, n) for n in shape]
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    r2 = zz ** 2 + yy ** 2 + xx ** 2
    return ((r2 < 0.7).float() + 0.3 * (r2 < 0.2).float())[None, None]


def _check_levels(enc: E.Encoder, volume: torch.Tensor) -> list[torch.Tensor]:
    levels = enc.features(volume)
    assert len(levels) == len(enc.channels) == len(enc.strides)
    assert list(enc.strides) == sorted(enc.strides)
    for level, c, s in zip(levels, enc.channels, enc.strides, strict=True):
        expected = (volume.shape[0], c, *(math.ceil(n / s) for n in volume.shape[2:]))
        assert tuple(level.shape) == expected
        assert level.dtype == torch.float32 and torch.isfinite(level).all()
    info = enc.describe()
    json.dumps(info)
    assert info["channels"] == list(enc.channels) and info["strides"] == list(enc.strides)
    return levels


# ------------------------------------------------------------------------------------------ bundled encoder


def test_bundled_encoder_committed_weights():
    enc = E.load_encoder(None)
    assert isinstance(enc, E.PhantomPretextEncoder)
    assert enc.strides == (2, 4, 8) and len(enc.channels) == 3 and 8 <= enc.channels[0] <= enc.channels[-1] <= 128
    levels = _check_levels(enc, _head((80, 96, 96)))
    assert [tuple(t.shape[2:]) for t in levels] == [(40, 48, 48), (20, 24, 24), (10, 12, 12)]
    info = enc.describe()
    assert info["foundation_model"] is False and "not a foundation model" in info["kind"]
    assert info["source"] == "encoder_phantom.pt" and info["sha256"] == E.file_sha256(E.BUNDLED_WEIGHTS)
    assert E.BUNDLED_WEIGHTS.stat().st_size < 3e6
    meta = enc.meta
    assert meta["training"]["data_seed"] == 5 and meta["training"]["steps"] > 0
    assert set(meta["metrics"]["val"]["dice"]) == set(E.CLASS_NAMES)
    # Odd sizes are padded with air and cropped back: ceil(n / s) voxels per axis.
    _check_levels(enc, _head((30, 33, 35)))
    assert E.load_encoder("bundled").describe()["sha256"] == info["sha256"]


def _fake_samples(folder: Path, subjects: int = 6, shape: tuple[int, int, int] = (16, 24, 24)) -> None:
    """Tiny stand-ins of semid.facebox samples (same keys and dtypes)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for s in range(subjects):
        img = _head(shape)[0, 0].numpy() + 0.05 * rng.standard_normal(shape)
        labels = np.zeros(shape, np.uint8)
        labels[img > 0.5] = 1
        labels[img > 1.1] = 4
        labels[:, :, :3][img[:, :, :3] > 0.5] = 3
        np.savez_compressed(folder / f"facebox_5_{s:04d}_0_MR.npz", image=img.astype(np.float16),
                            target_default=img.astype(np.float16), target_synthetic=img.astype(np.float16),
                            labels=labels, subject=np.int32(s), visit=np.int32(0), modality=np.int32(0))


def test_train_writes_loadable_weights_and_resumes(tmp_path, monkeypatch):
    samples = tmp_path / "samples"
    _fake_samples(samples)
    out = tmp_path / "enc.pt"
    real_validate = E._validate

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    # An interruption after the step-1 checkpoint leaves OUT.resume behind ...
    monkeypatch.setattr(E, "_validate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        E.train(samples, out, steps=2, batch=2, patch=16, checkpoint_every=1, val_subjects=2, channels=(4, 8, 8),
                progress=False, log=lambda _s: None)
    resume = tmp_path / "enc.pt.resume"
    assert resume.is_file() and not out.exists()
    # ... from which a second run goes on, writes the weights and removes it.
    monkeypatch.setattr(E, "_validate", real_validate)
    lines: list[str] = []
    val = E.train(samples, out, steps=3, resume=resume, checkpoint_every=1, val_subjects=2, progress=False,
                  command="test", log=lines.append)
    assert any("resuming at step 1" in s for s in lines)
    assert not resume.exists() and out.is_file()
    assert set(val["dice"]) == set(E.CLASS_NAMES) and val["masked_l1"] >= 0
    enc = E.load_encoder(f"bundled:{out}")
    assert enc.channels == (4, 8, 8)
    assert enc.meta["training"]["val_subjects"] == [4, 5] and enc.meta["training"]["steps"] == 3
    _check_levels(enc, _head((16, 24, 24)))


def test_cli_train_knows_encoder():
    from semid import cli

    assert cli.TRAINABLE["encoder"] == "semid.semantics.encoders"
    with pytest.raises(SystemExit) as exc:
        E.main(["train", "--help"])
    assert exc.value.code == 0


# ---------------------------------------------------------------------------------------- SwinUNETR (SSL)


def _swin_checkpoint(path: Path, feature_size: int = 12) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """model_swinvit.pt format: {'state_dict': swinViT weights keyed 'module.<name>', MLP as fc1/fc2}."""
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(1)
    net = SwinUNETR(in_channels=1, out_channels=2, feature_size=feature_size)
    state = {"module." + k.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2."): v.clone()
             for k, v in net.swinViT.state_dict().items()}
    torch.save({"epoch": 100, "state_dict": state}, path)
    return net, state


def test_swinunetr_ssl_adapter(tmp_path):
    from monai.networks.nets import SwinUNETR

    path = tmp_path / "model_swinvit.pt"
    net, state = _swin_checkpoint(path)
    # The file is in the format MONAI's own loader reads.
    SwinUNETR(in_channels=1, out_channels=2, feature_size=12).load_from(torch.load(path, weights_only=True))

    enc = E.load_encoder(f"swinunetr:{path}")
    assert isinstance(enc, E.SwinViTEncoder) and enc.foundation_model
    key = "layers2.0.blocks.1.mlp.fc1.weight"
    assert torch.equal(enc.swinViT.layers2[0].blocks[1].mlp.linear1.weight, state["module." + key])
    assert torch.equal(enc.swinViT.patch_embed.proj.weight, state["module.patch_embed.proj.weight"])
    assert enc.channels == (12, 24, 48, 96, 192) and enc.strides == (2, 4, 8, 16, 32)
    assert enc.describe()["architecture"]["window_size"] == 7
    volume = _head((32, 32, 32))
    levels = _check_levels(enc, volume)
    # Same numbers as MONAI's own Swin-ViT on the prepared input.
    with torch.no_grad():
        reference = net.eval().swinViT(enc.prepare(volume), True)
    for ours, theirs in zip(levels, reference, strict=True):
        torch.testing.assert_close(ours, theirs)
    _check_levels(enc, _head((20, 36, 24)))  # padded to multiples of 32, cropped back


# --------------------------------------------------------------------------------------------- MedicalNet


def _medicalnet_checkpoint(path: Path, depth: int) -> dict[str, torch.Tensor]:
    """MedicalNet format: {'state_dict': 'module.'-prefixed conv1/bn1/layer1..4 (+ conv_seg head)}."""
    from monai.networks.nets import resnet

    bias_downsample, shortcut = resnet.get_medicalnet_pretrained_resnet_args(depth)
    torch.manual_seed(2)
    net = getattr(resnet, f"resnet{depth}")(spatial_dims=3, n_input_channels=1, feed_forward=False,
                                            shortcut_type=shortcut, bias_downsample=bias_downsample)
    for m in net.modules():  # non-trivial running statistics, so a load that skipped them would show
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = {"module." + k: v.clone() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["module.conv_seg.0.weight"] = torch.zeros(32, 512, 2, 2, 2)  # MedicalNet's segmentation head: ignored
    torch.save({"ecpoch": 10, "batch_id": 0, "state_dict": state}, path)
    return state


def test_medicalnet_adapter_resnet10(tmp_path):
    path = tmp_path / "resnet_10.pth"
    state = _medicalnet_checkpoint(path, 10)
    enc = E.load_encoder(f"medicalnet:{path}")
    assert isinstance(enc, E.MedicalNetEncoder) and enc.name == "medicalnet-resnet10"
    assert torch.equal(enc.net.layer3[0].conv2.weight, state["module.layer3.0.conv2.weight"])
    assert torch.equal(enc.net.bn1.running_var, state["module.bn1.running_var"])
    assert enc.describe()["architecture"]["shortcut_type"] == "B"
    assert enc.channels == (64, 128, 256, 512) and enc.strides == (4, 8, 8, 8)
    levels = _check_levels(enc, _head((40, 48, 48)))
    assert tuple(levels[-1].shape) == (1, 512, 5, 6, 6)
    with pytest.raises(InputError, match="ResNet-10, not the ResNet-18"):
        E.load_medicalnet(path, depth=18)


def test_medicalnet_adapter_resnet18_shortcut_a(tmp_path):
    path = tmp_path / "resnet_18_23dataset.pth"
    state = _medicalnet_checkpoint(path, 18)
    enc = E.load_encoder(f"medicalnet:{path}")
    assert enc.depth == 18 and enc.describe()["architecture"]["shortcut_type"] == "A"
    assert torch.equal(enc.net.layer4[1].conv1.weight, state["module.layer4.1.conv1.weight"])
    _check_levels(enc, _head((24, 24, 24)))


# -------------------------------------------------------------------------------------------- TorchScript


class _TwoLevels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv3d(1, 3, 3, stride=2, padding=1)
        self.b = nn.Conv3d(3, 5, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fine = torch.relu(self.a(x))
        return self.b(fine), fine  # coarse first on purpose: the adapter orders levels finest first


def test_torchscript_adapter(tmp_path):
    torch.manual_seed(3)
    module = _TwoLevels()
    path = tmp_path / "features.pt"
    torch.jit.save(torch.jit.script(module), str(path))
    enc = E.load_encoder(f"torchscript:{path}")
    assert isinstance(enc, E.TorchScriptEncoder)
    assert torch.equal(enc.module.b.weight, module.b.weight)
    assert enc.channels == (3, 5) and enc.strides == (2, 4)
    volume = _head((20, 24, 18))
    levels = _check_levels(enc, volume)
    torch.testing.assert_close(levels[0], torch.relu(module.a(volume)).detach())


# ------------------------------------------------------------------------------------------- MONAI bundle


def _bundle(root: Path) -> nn.Module:
    """A MONAI bundle folder: configs/inference.json with network_def, models/model.pt (a state_dict)."""
    from monai.bundle import ConfigParser

    config = {"imports": ["$import torch"], "bundle_root": ".", "device": "$torch.device('cpu')",
              "network_def": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                              "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1},
              "network": "$@network_def.to(@device)",
              "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32]}}
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    torch.manual_seed(4)
    net = parser.get_parsed_content("network_def")
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return net


def test_bundle_adapter(tmp_path):
    root = tmp_path / "toy_bundle"
    net = _bundle(root)
    enc = E.load_encoder(f"bundle:{root}")
    assert isinstance(enc, E.HookedEncoder)
    written = torch.load(root / "models" / "model.pt", weights_only=True)
    name, value = next((k, v) for k, v in written.items() if k.endswith("weight") and v.ndim == 5)
    assert torch.equal(dict(enc.net.named_parameters())[name], value)
    assert enc.strides == (2, 4) and enc.describe()["layers"] == enc.layers
    _check_levels(enc, _head((24, 32, 20)))
    # Named layers: the hooks return exactly those modules' outputs.
    chosen = E.load_bundle(root, layers=["model.0"])
    assert chosen.strides == (2,) and chosen.channels == (4,)
    volume = _head((32, 32, 32))
    with torch.no_grad():
        torch.testing.assert_close(chosen.features(volume)[0], net.eval().model[0](volume))
    with pytest.raises(InputError, match="no module 'nope'"):
        E.load_bundle(root, layers=["nope"])


# ------------------------------------------------------------------------------------------------- errors


def test_bad_specs_and_files(tmp_path):
    with pytest.raises(InputError, match="Unknown encoder 'clip:x'"):
        E.load_encoder("clip:x")
    with pytest.raises(InputError, match="Unknown encoder"):
        E.load_encoder("medicalnet:")
    with pytest.raises(InputError, match="does not exist"):
        E.load_encoder(f"medicalnet:{tmp_path / 'resnet_10.pth'}")
    with pytest.raises(InputError, match="does not exist"):
        E.load_encoder(f"bundled:{tmp_path / 'none.pt'}")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a readable PyTorch checkpoint"):
        E.load_encoder(f"swinunetr:{junk}")
    with pytest.raises(InputError, match="not a TorchScript archive"):
        E.load_encoder(f"torchscript:{junk}")
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"module.fc.weight": torch.zeros(2, 2)}}, other)
    with pytest.raises(InputError, match="not a SwinUNETR self-supervised checkpoint"):
        E.load_encoder(f"swinunetr:{other}")
    with pytest.raises(InputError, match="not a MedicalNet 3D ResNet checkpoint"):
        E.load_encoder(f"medicalnet:{other}")
    with pytest.raises(InputError, match="not a weight file of the bundled encoder"):
        E.load_encoder(f"bundled:{other}")
    (tmp_path / "empty_bundle").mkdir()
    with pytest.raises(InputError, match="no configs/inference.json"):
        E.load_encoder(f"bundle:{tmp_path / 'empty_bundle'}")


def test_bad_volumes():
    enc = E.load_encoder()
    with pytest.raises(InputError, match=r"\(B, 1, D, H, W\)"):
        enc.features(torch.zeros(8, 8, 8))
    with pytest.raises(InputError, match="torch.Tensor"):
        enc.features(np.zeros((1, 1, 8, 8, 8), np.float32))
    with pytest.raises(InputError, match="float"):
        enc.features(torch.zeros(1, 1, 8, 8, 8, dtype=torch.int16))
    bad = torch.zeros(1, 1, 8, 8, 8)
    bad[0, 0, 1, 2, 3] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        enc.features(bad)
