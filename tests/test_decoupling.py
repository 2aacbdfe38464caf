"""MDL feature decoupling (semid.semantics.decoupling): code lengths, INLP, the Decoupler, voxel sampling."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from semid.semantics.decoupling import (
    Decoupler,
    fit_decoupler,
    fit_from_samples,
    pool_voxel_features,
    prequential_code_length,
    sample_voxel_features,
    uniform_code_length,
)


def _planted(seed: int, n: int = 2400, c: int = 24, k_id: int = 8, k_med: int = 3, r_id: int = 3, r_med: int = 2,
             sep: float = 2.0) -> dict[str, np.ndarray]:
    """Gaussian features (n, c): identity class means in one random rank-``r_id`` subspace, medical class
    means in another, orthogonal one, unit isotropic noise elsewhere."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(c, c)))[0]
    id_dirs, med_dirs = basis[:, :r_id], basis[:, r_id:r_id + r_med]
    identity = rng.permutation(np.repeat(np.arange(k_id), n // k_id))
    medical = rng.integers(0, k_med, n)
    x = (rng.normal(size=(n, c)) + (rng.normal(size=(k_id, r_id)) * sep)[identity] @ id_dirs.T
         + (rng.normal(size=(k_med, r_med)) * sep)[medical] @ med_dirs.T)
    return {"x": x, "identity": identity, "medical": medical, "id_dirs": id_dirs, "med_dirs": med_dirs}


def _two_levels(seed: int = 0) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, list[np.ndarray]]:
    """Two 'levels' of the same samples: 24 channels (identity rank 3) and 16 channels (identity rank 5,
    more than one INLP step of 4 directions)."""
    a = _planted(seed, c=24, r_id=3)
    rng = np.random.default_rng(seed + 1)
    c, r_id = 16, 5
    basis = np.linalg.qr(rng.normal(size=(c, c)))[0]
    id_dirs, med_dirs = basis[:, :r_id], basis[:, r_id:r_id + 2]
    x = (rng.normal(size=(len(a["identity"]), c)) + (rng.normal(size=(8, r_id)) * 2.0)[a["identity"]] @ id_dirs.T
         + (rng.normal(size=(3, 2)) * 2.0)[a["medical"]] @ med_dirs.T)
    return [a["x"], x], a["identity"], a["medical"], [a["id_dirs"], id_dirs]


@pytest.fixture(scope="module")
def fitted() -> tuple[Decoupler, list[np.ndarray], np.ndarray, np.ndarray, list[np.ndarray]]:
    feats, identity, medical, id_dirs = _two_levels()
    return fit_decoupler(feats, identity, medical, tolerance=0.97), feats, identity, medical, id_dirs


# ------------------------------------------------------------------------------------------ code lengths


def test_uniform_code_length() -> None:
    assert uniform_code_length(100, 8) == pytest.approx(300.0)
    assert uniform_code_length(10, 1) == 0.0


def test_prequential_random_labels_is_uniform() -> None:
    """Features unrelated to the labels: the online code cannot beat the uniform code (and, with a probe
    that overfits small prefixes, costs a little more)."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(2000, 16)), rng.integers(0, 5, 2000)
    ratio = prequential_code_length(x, y, 5) / uniform_code_length(2000, 5)
    assert 0.97 <= ratio <= 1.15


def test_prequential_informative_is_short_and_deterministic() -> None:
    d = _planted(0, n=1200)
    bits = prequential_code_length(d["x"], d["identity"], 8)
    assert bits < 0.6 * uniform_code_length(1200, 8)
    assert prequential_code_length(d["x"], d["identity"], 8) == bits


def test_prequential_unseen_classes_stay_finite() -> None:
    """A class absent from every training prefix but the last block still gets p > 0."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 4))
    y = np.zeros(300, dtype=int)
    y[-1] = 2  # one sample of class 2; class 1 never occurs
    bits = prequential_code_length(x, y, 3, seed=0)
    assert math.isfinite(bits) and bits > 0


def test_prequential_torch_backend() -> None:
    """The fallback probe (no scikit-learn) gives the same kind of answer, deterministically."""
    d = _planted(0, n=400, c=8, k_id=4)
    bits = prequential_code_length(d["x"], d["identity"], 4, backend="torch")
    assert bits < 0.7 * uniform_code_length(400, 4)
    assert prequential_code_length(d["x"], d["identity"], 4, backend="torch") == bits
    sk = prequential_code_length(d["x"], d["identity"], 4, backend="sklearn")
    assert bits == pytest.approx(sk, rel=0.05)


# ------------------------------------------------------------------------------------------------- INLP


def test_fit_removes_identity_keeps_medical(fitted) -> None:
    dec, feats, identity, medical, id_dirs = fitted
    report = dec.report
    json.dumps(report)  # JSON-ready
    assert report["reached_uniform"]
    for level, entry in enumerate(report["levels"]):
        uniform = math.log2(8)
        assert entry["identity_uniform_bits"] == pytest.approx(uniform)
        assert entry["identity_bits_before"] < 0.6 * uniform  # far below: identity is decodable
        assert entry["identity_bits_after"] >= 0.97 * uniform
        # Medical content is kept: its code length costs at most 3 % more. It may get a little shorter
        # (the identity variance that confused the medical probe on small prefixes is gone).
        assert entry["medical_bits_after"] <= 1.03 * entry["medical_bits_before"]
        assert abs(entry["medical_change"]) < 0.1
        assert entry["removed_rank"] == dec.removed_rank[level] >= 1
        # The removed directions lie in the planted identity subspace (nothing much else is removed).
        removed = np.eye(len(id_dirs[level])) - dec.projections[level].double().numpy()
        outside = removed - id_dirs[level] @ (id_dirs[level].T @ removed)
        assert np.linalg.norm(outside) < 0.25 * math.sqrt(entry["removed_rank"])
        assert entry["removed_rank"] <= id_dirs[level].shape[1]
    assert report["levels"][1]["iterations"] >= 2  # rank 5 > 4 directions per step

    # Independent check on the projected features.
    for x, p in zip(feats, dec.projections, strict=True):
        xp = x @ p.double().numpy()
        assert prequential_code_length(xp, identity, 8) >= 0.97 * uniform_code_length(len(identity), 8)


def test_projections_are_orthogonal_projections(fitted) -> None:
    dec = fitted[0]
    for p in dec.projections:
        assert p.dtype == torch.float32
        assert torch.equal(p, p.T)
        torch.testing.assert_close(p @ p, p, atol=1e-5, rtol=0)


def test_pooled_view_and_unlabelled_samples() -> None:
    """A pooled view is honoured, and samples with identity -1 (medical only) are left out of the identity
    probe; identity classes are balanced so that uniform is the right target."""
    d = _planted(4, n=1600)
    identity = d["identity"].copy()
    identity[:200] = -1
    rng = np.random.default_rng(5)
    pooled_identity = np.repeat(np.arange(8), 50)
    pooled = (rng.normal(size=(400, 24)) * 0.5 + (rng.normal(size=(8, 2)) * 3.0)[pooled_identity]
              @ d["med_dirs"].T)  # pooled identity lives where voxel identity does not
    dec = fit_decoupler([d["x"]], identity, d["medical"], pooled_features=[pooled], pooled_identity=pooled_identity)
    entry = dec.report["levels"][0]
    assert dec.report["pooled"]
    assert entry["pooled_bits_before"] < 0.6 * entry["pooled_uniform_bits"]
    assert entry["pooled_bits_after"] >= 0.97 * entry["pooled_uniform_bits"]
    assert entry["identity_bits_after"] >= 0.97 * entry["identity_uniform_bits"]
    assert entry["n_identity_samples"] == 8 * int(np.bincount(identity[identity >= 0]).min())


def test_max_rank_stops() -> None:
    d = _planted(6, n=1200, r_id=4)
    dec = fit_decoupler([d["x"]], d["identity"], d["medical"], max_rank=2)
    entry = dec.report["levels"][0]
    assert entry["removed_rank"] == 2 and entry["stopped"] == "max_rank"
    assert not dec.report["reached_uniform"]


# -------------------------------------------------------------------------------------------- Decoupler


def test_apply_is_channel_matmul(fitted) -> None:
    dec = fitted[0]
    gen = torch.Generator().manual_seed(0)
    maps = [torch.randn(2, 24, 4, 5, 6, generator=gen), torch.randn(2, 16, 2, 3, 3, generator=gen)]
    out = dec.apply(maps)
    for f, p, o in zip(maps, dec.projections, out, strict=True):
        expected = (p @ f.reshape(2, f.shape[1], -1)).reshape(f.shape)
        assert o.shape == f.shape and o.dtype == f.dtype
        torch.testing.assert_close(o, expected)
    with pytest.raises(ValueError):
        dec.apply(maps[:1])
    with pytest.raises(ValueError):
        dec.apply([maps[1], maps[0]])


def test_identity_decoupler_passes_through() -> None:
    dec = Decoupler.identity()
    f = [torch.ones(1, 3, 2, 2, 2)]
    assert dec.apply(f)[0] is f[0]
    assert dec.is_identity and dec.describe()["removed_rank"] == [] and dec.describe()["sha256"] is None


def test_save_load_round_trip(fitted, tmp_path: Path) -> None:
    dec = fitted[0]
    dec.metadata = {"encoder": "test", "strides": [1, 2]}
    path = dec.save(tmp_path / "sub" / "decoupler.pt")
    assert path.exists() and not list(path.parent.glob("*.tmp"))
    back = Decoupler.load(path)
    assert len(back.projections) == len(dec.projections)
    for a, b in zip(dec.projections, back.projections, strict=True):
        assert torch.equal(a, b)
    assert back.report == dec.report and back.metadata == dec.metadata
    desc = back.describe()
    assert desc["file"] == "decoupler.pt"
    assert desc["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert desc["removed_rank"] == [lv["removed_rank"] for lv in dec.report["levels"]]
    torch.save({"format": "other"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError):
        Decoupler.load(tmp_path / "bad.pt")


# ---------------------------------------------------------------------------------------------- sampling


def _coded_maps(b: int, c: int, shape: tuple[int, int, int], strides: list[int]) -> list[torch.Tensor]:
    """Feature maps whose every value encodes (volume, channel, level position) uniquely."""
    maps = []
    for s in strides:
        d, h, w = (math.ceil(n / s) for n in shape)
        bb, cc, zz, yy, xx = np.meshgrid(*(np.arange(n) for n in (b, c, d, h, w)), indexing="ij")
        maps.append(torch.from_numpy((((bb * 100 + cc) * 100 + zz) * 100 + yy) * 100 + xx).double())
    return maps


def test_sample_voxel_features_reads_the_right_vectors() -> None:
    shape, strides, c = (8, 9, 10), [1, 2, 4], 3
    maps = _coded_maps(2, c, shape, strides)
    rng = np.random.default_rng(0)
    mask = rng.random((2, *shape)) < 0.3
    mask[1] = False
    mask[1, 5, 6, 7] = True  # a single voxel: fewer than n_per_volume
    labels = np.broadcast_to(np.arange(np.prod(shape)).reshape(shape), (2, *shape))  # label = flat position
    vecs, lab, vol = sample_voxel_features(maps, strides, mask, labels, 20, rng)
    assert [v.shape for v in vecs] == [(21, c)] * 3 and lab.shape == (21,) and vol.shape == (21,)
    assert (vol[:20] == 0).all() and vol[20] == 1
    assert len(np.unique(lab[:20])) == 20  # without replacement
    for i in range(21):
        z, y, x = np.unravel_index(lab[i], shape)
        assert mask[vol[i], z, y, x]
        for v, s in zip(vecs, strides, strict=True):
            expected = [(((vol[i] * 100 + ch) * 100 + z // s) * 100 + y // s) * 100 + x // s for ch in range(c)]
            np.testing.assert_array_equal(v[i], np.asarray(expected, np.float32))


def test_pool_voxel_features_means() -> None:
    shape, strides = (8, 8, 8), [1, 2, 4]
    maps = [torch.randn(2, 3, 8 // s, 8 // s, 8 // s, generator=torch.Generator().manual_seed(s)) for s in strides]
    mask = np.zeros((2, *shape), bool)
    mask[:, 2:6, 1:7, 3:8] = True
    vecs, vol = pool_voxel_features(maps, strides, mask, 4, np.random.default_rng(0))
    assert [v.shape for v in vecs] == [(8, 3)] * 3 and list(vol) == [0] * 4 + [1] * 4
    zyx = np.argwhere(mask[1])
    for v, f, s in zip(vecs, maps, strides, strict=True):
        full = f[1].numpy()[:, zyx[:, 0] // s, zyx[:, 1] // s, zyx[:, 2] // s].mean(axis=1)
        np.testing.assert_allclose(v[4], full, rtol=1e-5, atol=1e-6)


class _TinyEncoder:
    """Any object with ``features`` and ``strides`` will do: shifted copies of the image, then pooled."""

    strides = [1, 2]
    channels = [4, 4]

    def features(self, volume: torch.Tensor) -> list[torch.Tensor]:
        level0 = torch.cat([volume, volume.roll(1, -1), volume.roll(1, -2), volume**2], dim=1)
        return [level0, torch.nn.functional.avg_pool3d(level0, 2)]


def test_fit_from_samples_with_any_encoder(tmp_path: Path) -> None:
    shape = (8, 12, 12)
    region = np.zeros(shape, bool)
    region[:, :, 8:] = True
    rng = np.random.default_rng(0)
    paths = []
    for subject in range(3):
        face = rng.normal(size=shape[:2] + (4,))  # each subject's own face pattern
        for visit in range(2):
            image = rng.normal(size=shape).astype(np.float32) * 0.1
            image[:, :, 8:] += face
            labels = np.full(shape, 2, np.uint8)
            labels[:, :, :4] = 1
            labels[:, :, 8:] = 3
            labels[2, 2, 2] = 4
            path = tmp_path / f"s{subject}_{visit}.npz"
            np.savez(path, image=image.astype(np.float16), target_default=image.astype(np.float16),
                     target_synthetic=image.astype(np.float16), labels=labels, subject=np.int32(subject))
            paths.append(path)
    dec = fit_from_samples(_TinyEncoder(), paths, n_identity=60, n_medical=20, n_pooled=4, region=region, log=None)
    assert dec.channels == [4, 4]
    assert dec.metadata["encoder"] == "_TinyEncoder" and dec.metadata["n_subjects"] == 3
    assert dec.report["pooled"] and len(dec.report["levels"]) == 2
    json.dumps(dec.report)
    out = dec.apply(_TinyEncoder().features(torch.zeros(1, 1, *shape)))
    assert [tuple(o.shape) for o in out] == [(1, 4, 8, 12, 12), (1, 4, 4, 6, 6)]
