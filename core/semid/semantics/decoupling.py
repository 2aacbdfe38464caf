"""MDL feature decoupling: remove the identity subspace from each feature level (DESIGN.md §4, step 5).

The encoder's features feed the generator that fills the blocked face region. They must keep the
medical content (tissue classes, lesions) and lose identity (which person). Per feature level we build
a linear orthogonal projection ``P`` (C_l x C_l) that removes the directions in which identity is
linearly decodable, by iterative nullspace projection (INLP, Ravfogel et al. 2020):

    repeat: train a linear identity probe on the projected features ``x P``; take the dominant
            directions of its weight rows; add them to the removed basis ``Q`` (orthonormalised);
            ``P = I - Q Q^T``
    until:  identity is no longer compressible from ``x P``, or a maximum removed rank is reached.

"No longer compressible" is measured by the prequential (online) code length of the identity labels
given the projected features (Voita & Titov 2020, "Information-Theoretic Probing with Minimum
Description Length"): the number of bits needed to transmit the labels when each block of samples is
coded by a linear probe trained on all the samples before it. A code length at the uniform code length
(``log2 K`` bits per sample for K identities) means the features do not help: the labels are not
compressible from them. The same code length for the medical labels (tissue / lesion class) is reported
before and after: it should barely move, since the removed directions are the identity ones.

The online code of features that carry nothing about the labels comes out a little *above* the uniform
code (the probes trained on the first, small blocks overfit: about +5-10 % on synthetic data), so the
stopping rule ``code >= tolerance x uniform`` with ``tolerance`` just below 1 can accept a small residue;
``tolerance=1.0`` is the strict setting, and the report gives the ratio reached per level.

Why a code length and not probe accuracy: accuracy of one probe says little about how *easily*
identity can be extracted; the online code length also charges for the data the probe needs, so it
is small when identity is both present and easy to learn, and it reaches the uniform code only when a
linear reader can gain nothing.

Samples (``sample_voxel_features``) are voxel positions drawn at full resolution; each level's vector
is read at the position divided by that level's stride, so each sample has one vector per level and
one identity label (the subject of its volume) and one medical label (the voxel's tissue class).
Per-voxel vectors alone can miss identity that is spread thinly over the face: each voxel carries a
little, and a linear probe on one voxel does not see it, but a mean over the face region does. So a
second, cheaper view, ``pool_voxel_features``, pools each level over (random subsets of) the identity
region per volume; with ``pooled_features`` given, ``fit_decoupler`` removes the directions found by
either probe and stops only when both views are at the uniform code. The projection is linear, so the
pooled vector of projected features is the projection of the pooled vector: one ``P`` serves both.

``Decoupler`` holds the per-level projections, applies them on the channel dimension of any feature
map, and saves / loads them (one torch ``.pt`` file with the report and metadata) as the decoupling model.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import numbers
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: ``format`` key of a saved decoupler, and the version of its layout.
FORMAT = "semid-decoupler"
FORMAT_VERSION = 1

#: Block boundaries of the online code, in % of the samples (Voita & Titov 2020): the first block is
#: coded with the uniform code, each following block by a probe trained on all the blocks before it.
DEFAULT_BLOCKS: tuple[float, ...] = (0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.25, 12.5, 25.0, 50.0, 100.0)

#: Default fraction of the uniform code length at which identity counts as not compressible.
DEFAULT_TOLERANCE = 0.97

Log = Callable[[str], None]
Stride = int | Sequence[int]


# --------------------------------------------------------------------------------------- linear probe


class _Probe:
    """A multinomial logistic-regression probe on centred, isotropically scaled features.

    ``classes`` (k,) are the labels it was trained on (a subset of all classes when the training prefix
    misses some); ``weight`` (k, C) and ``bias`` (k,) act on ``(x - mean) / scale``. One scalar scale
    (not a per-channel one) keeps the feature space's geometry: the probe's weight rows, divided by
    ``scale``, are directions in the features' own coordinates, where ``P`` must be orthogonal.
    """

    def __init__(self, classes: np.ndarray, weight: np.ndarray, bias: np.ndarray, mean: np.ndarray, scale: float):
        self.classes, self.weight, self.bias, self.mean, self.scale = classes, weight, bias, mean, scale

    def log_proba(self, x: np.ndarray) -> np.ndarray:
        """Natural-log class probabilities (n, k) over ``classes``."""
        logits = ((x - self.mean) / self.scale) @ self.weight.T + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))

    def directions(self) -> np.ndarray:
        """The weight rows (k, C) as directions in the original feature coordinates."""
        return self.weight / self.scale


def _resolve_backend(backend: str) -> str:
    if backend not in ("auto", "sklearn", "torch"):
        raise ValueError(f"backend must be 'auto', 'sklearn' or 'torch', not {backend!r}")
    if backend != "auto":
        return backend
    try:
        import sklearn.linear_model  # noqa: F401
    except ImportError:  # scikit-learn is not a core dependency (MONAI Label brings it)
        return "torch"
    return "sklearn"


def _single_threaded_blas() -> contextlib.AbstractContextManager:
    """BLAS limited to one thread while probing: the probes are many small solves, for which BLAS's
    worker threads only spin, and on a busy machine that makes them 10-50x slower (measured)."""
    try:
        from threadpoolctl import threadpool_limits  # comes with scikit-learn
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def feature_scale(x: np.ndarray) -> float:
    """RMS per channel of the centred features ``x`` (N, C): the one scalar the probes divide by."""
    x = np.asarray(x, dtype=np.float64)
    scale = float(np.sqrt(((x - x.mean(axis=0)) ** 2).sum(axis=1).mean() / max(x.shape[1], 1))) if len(x) else 0.0
    return scale if scale > 1e-12 else 1.0


def _fit_probe(x: np.ndarray, y: np.ndarray, *, c_reg: float, max_iter: int, backend: str,
               scale: float | None = None) -> _Probe:
    """Fit a linear probe on ``x`` (n, C) float64, ``y`` (n,) int; ``scale`` None: ``feature_scale(x)``.

    Objective (both backends): ``sum_i CE(y_i) + ||W||^2 / (2 c_reg)`` (bias not penalised), i.e.
    scikit-learn's ``LogisticRegression(C=c_reg)``; lbfgs from zero weights, so it is deterministic.
    """
    classes = np.unique(y)
    c = x.shape[1]
    mean = x.mean(axis=0)
    centred = x - mean
    scale = feature_scale(x) if scale is None else float(scale)
    if classes.size == 1:
        # One class seen so far: the probe can only say "that class" (smoothing keeps others > 0).
        return _Probe(classes, np.zeros((1, c)), np.zeros(1), mean, scale)
    z = centred / scale
    y_idx = np.searchsorted(classes, y)
    if backend == "sklearn":
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        with warnings.catch_warnings():
            # A probe that has not fully converged is still a valid (slightly worse) code.
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = LogisticRegression(C=c_reg, max_iter=max_iter, tol=1e-4).fit(z, y_idx)
        weight, bias = model.coef_.astype(np.float64), model.intercept_.astype(np.float64)
        if classes.size == 2:  # binary: sigmoid(w.z + b) == softmax([-(w.z + b)/2, (w.z + b)/2])
            weight, bias = np.concatenate([-weight / 2, weight / 2]), np.concatenate([-bias / 2, bias / 2])
    else:
        weight, bias = _fit_torch(z, y_idx, classes.size, c_reg=c_reg, max_iter=max_iter)
    return _Probe(classes, weight, bias, mean, scale)


@contextlib.contextmanager
def _torch_single_thread() -> Iterator[None]:
    """torch on one intra-op thread for the probe's tiny tensors (50x faster on a busy machine, measured);
    the previous setting is restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _fit_torch(z: np.ndarray, y_idx: np.ndarray, k: int, *, c_reg: float, max_iter: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression with L2 by full-batch L-BFGS in float64 (deterministic on CPU)."""
    x = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float64))
    y = torch.from_numpy(np.asarray(y_idx, dtype=np.int64))
    weight = torch.zeros(k, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-6,
                            tolerance_change=1e-10, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, y, reduction="sum")
        loss = loss + 0.5 / c_reg * (weight**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad(), _torch_single_thread():
        opt.step(closure)
    return weight.detach().numpy().copy(), bias.detach().numpy().copy()


# ------------------------------------------------------------------------------------- code lengths


def uniform_code_length(n: int, k: int) -> float:
    """Bits to transmit ``n`` labels of ``k`` classes with the uniform code: ``n log2 k``."""
    if k < 1:
        raise ValueError(f"k must be >= 1, not {k}")
    return float(n) * math.log2(k)


def _block_ends(n: int, blocks: Sequence[float]) -> list[int]:
    """Sample counts at the block boundaries (increasing, unique, the last one ``n``)."""
    ends = {min(n, max(1, int(round(f / 100.0 * n)))) for f in blocks}
    ends.add(n)
    return sorted(ends)


def prequential_code_length(x: np.ndarray, y: np.ndarray, n_classes: int, *,
                            blocks: Sequence[float] = DEFAULT_BLOCKS, seed: int = 0, c_reg: float = 1.0,
                            max_iter: int = 100, smoothing: float = 1e-3, backend: str = "auto",
                            scale: float | None = None) -> float:
    """Online (prequential) code length, in bits, of labels ``y`` given features ``x``.

    ``x`` (N, C), ``y`` (N,) ints in ``[0, n_classes)``. The samples are shuffled with ``seed`` and split at
    ``blocks`` (% of N). The first block is sent with the uniform code (``log2 n_classes`` bits per
    sample); each next block with a linear probe (multinomial logistic regression, L2 ``1 / c_reg``)
    trained on all samples before it, costing ``-log2 p(y)`` per sample. The probe's probabilities are
    mixed with the uniform distribution, ``(1 - smoothing) p + smoothing / n_classes``, so a class the
    training prefix has not seen yet still has ``p > 0`` (it costs about ``log2(n_classes / smoothing)``
    bits, an honest price for a surprise). Features are centred and divided by one scalar, ``scale``
    (default: each training prefix's ``feature_scale``); ``fit_decoupler`` passes the unprojected level's
    scale, so that removing directions does not change the probe's regularisation of the others and
    the medical code lengths before and after compare like with like.

    Compare with ``uniform_code_length(N, n_classes)``: a code length at (or above) it means the labels
    are not compressible from the features, i.e. a linear reader gains nothing from them. Far below it
    means the labels are linearly decodable, and cheaply so (few samples needed).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y).astype(np.int64)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"need x (N, C) and y (N,), got {x.shape} and {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes})")
    if not 0.0 < smoothing < 1.0:
        raise ValueError("smoothing must be in (0, 1)")
    n = x.shape[0]
    if n == 0 or n_classes == 1:
        return 0.0
    backend = _resolve_backend(backend)
    order = np.random.default_rng(seed).permutation(n)
    x, y = x[order], y[order]
    ends = _block_ends(n, blocks)
    bits = uniform_code_length(ends[0], n_classes)
    with _single_threaded_blas():
        for start, end in zip(ends[:-1], ends[1:], strict=True):
            probe = _fit_probe(x[:start], y[:start], c_reg=c_reg, max_iter=max_iter, backend=backend, scale=scale)
            p_seen = np.exp(probe.log_proba(x[start:end]))
            p = np.zeros((end - start, n_classes))
            p[:, probe.classes] = p_seen
            p_true = (1.0 - smoothing) * p[np.arange(end - start), y[start:end]] + smoothing / n_classes
            bits += float(-np.log2(p_true).sum())
    return bits


# --------------------------------------------------------------------------- iterative nullspace projection


def _extend_basis(q: np.ndarray, directions: np.ndarray, limit: int, tol: float = 1e-6) -> np.ndarray:
    """``q`` (C, r) orthonormal, extended by up to ``limit`` orthonormalised columns of ``directions`` (C, m).

    Directions already (numerically) inside ``span(q)`` are dropped, so the removed rank is honest.
    """
    for v in directions.T[:max(limit, 0)]:
        v = v - q @ (q.T @ v)
        v = v - q @ (q.T @ v)  # twice: Gram-Schmidt loses orthogonality once r is large
        norm = float(np.linalg.norm(v))
        if norm > tol:
            q = np.concatenate([q, (v / norm)[:, None]], axis=1)
    return q


def _projection(q: np.ndarray) -> np.ndarray:
    """``I - Q Q^T`` (C, C), symmetrised so that the float32 copy is exactly symmetric."""
    p = np.eye(q.shape[0]) - q @ q.T
    return (p + p.T) / 2.0


def _top_directions(probe: _Probe, q: np.ndarray, rank: int, rel_sv: float) -> np.ndarray:
    """The dominant directions (C, <= rank) of the probe's weight rows, outside ``span(q)``.

    INLP (Ravfogel et al.) removes the whole row span of the probe. With many identities (K - 1 >= C
    is common: dozens of subjects, 16-64 channels) that span is the whole space and one step would
    remove everything, medical content included. So each step removes only the top singular
    directions of the weight matrix, those with singular value >= ``rel_sv`` x the largest: where the
    probe's logits change most per unit of feature; the loop then re-probes what is left. Weights on
    directions without identity are the probe's overfit noise, which on synthetic data with a planted
    identity subspace reach 0.2-0.5 x the largest once few identity directions are left; 0.5 (the
    default) rarely takes one, and the top direction is always taken, so the loop still progresses.
    """
    w = probe.directions()
    w = w - (w @ q) @ q.T
    _, s, vt = np.linalg.svd(w, full_matrices=False)
    if s.size == 0 or s[0] <= 1e-12:
        return np.zeros((w.shape[1], 0))
    keep = s >= rel_sv * s[0]
    return vt[keep][:rank].T


def _balanced(labels: np.ndarray, rng: np.random.Generator, limit: int | None) -> np.ndarray:
    """Indices of a class-balanced subset of the labelled (>= 0) samples, at most ``limit`` in all.

    Balanced so that "no information" really is the uniform code: with unequal class counts a probe
    that only learns the label frequencies would already beat ``log2 K`` and the target would be wrong.
    """
    classes, counts = np.unique(labels[labels >= 0], return_counts=True)
    if classes.size == 0:
        return np.zeros(0, dtype=np.int64)
    per_class = int(counts.min())
    if limit is not None:
        per_class = max(1, min(per_class, limit // classes.size))
    picked = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in classes]
    return np.sort(np.concatenate(picked))


def _subset(labels: np.ndarray, rng: np.random.Generator, limit: int | None) -> np.ndarray:
    """Indices of the labelled (>= 0) samples, a random ``limit`` of them when there are more."""
    idx = np.flatnonzero(labels >= 0)
    if limit is not None and idx.size > limit:
        idx = np.sort(rng.choice(idx, limit, replace=False))
    return idx


def _dense(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels remapped to ``0..K-1`` (the subject ids or classes need not be contiguous), and K."""
    classes, dense = np.unique(labels, return_inverse=True)
    return dense.astype(np.int64), int(classes.size)


def fit_decoupler(level_features: Sequence[np.ndarray], identity: np.ndarray, medical: np.ndarray, *,
                  pooled_features: Sequence[np.ndarray] | None = None, pooled_identity: np.ndarray | None = None,
                  tolerance: float = DEFAULT_TOLERANCE, max_rank: int | Sequence[int] | None = None,
                  rank_per_iter: int = 4, rel_sv: float = 0.5, max_iter: int = 64, c_reg: float = 1.0,
                  probe_iter: int = 100, smoothing: float = 1e-3, blocks: Sequence[float] = DEFAULT_BLOCKS,
                  max_samples: int | None = 20000, seed: int = 0, backend: str = "auto",
                  metadata: dict[str, Any] | None = None, log: Log | None = None) -> Decoupler:
    """Fit one identity-removing orthogonal projection per feature level by INLP with an MDL stop.

    Inputs: ``level_features[l]`` (N, C_l) per level, the same N samples at every level;
    ``identity`` (N,) subject ids (-1: no identity label, e.g. a sample drawn for the medical classes
    only); ``medical`` (N,) medical classes (-1: none). Optionally a pooled view: ``pooled_features[l]``
    (M, C_l) with ``pooled_identity`` (M,) (see ``pool_voxel_features``).

    Per level: identity samples are class-balanced (see ``_balanced``) and at most ``max_samples``
    are used for each probe and code length. The loop stops when the identity code length is
    >= ``tolerance`` x the uniform code length (for the pooled view too, if given); or when the removed
    rank reaches ``max_rank`` (default: half the channels, so that a level whose identity cannot be
    removed linearly keeps half its content: the report then says ``reached_uniform: false``); or after
    ``max_iter`` steps; or when the probes find no new direction. Each step removes at most
    ``rank_per_iter`` directions per probe (see ``_top_directions``). Probe regularisation ``c_reg``,
    ``probe_iter`` lbfgs iterations, ``smoothing``, ``blocks`` and ``backend`` are those of
    ``prequential_code_length``.

    Code lengths in the report are in bits per sample; ``*_uniform_bits`` is ``log2 K``.
    """
    n_levels = len(level_features)
    if n_levels == 0:
        raise ValueError("need at least one feature level")
    identity = np.asarray(identity).astype(np.int64)
    medical = np.asarray(medical).astype(np.int64)
    n = identity.shape[0]
    if medical.shape != (n,) or any(np.asarray(f).shape[0] != n for f in level_features):
        raise ValueError("level_features, identity and medical must have the same number of samples")
    if (pooled_features is None) != (pooled_identity is None):
        raise ValueError("pooled_features and pooled_identity go together")
    if pooled_features is not None and len(pooled_features) != n_levels:
        raise ValueError("pooled_features needs one array per level")
    if not 0.0 < tolerance <= 1.0:
        raise ValueError("tolerance must be in (0, 1]")
    if max_rank is None or isinstance(max_rank, numbers.Integral):
        max_ranks = [max_rank] * n_levels
    else:
        max_ranks = list(max_rank)
        if len(max_ranks) != n_levels:
            raise ValueError("max_rank needs one value per level")
    backend = _resolve_backend(backend)
    say = log or (lambda _msg: None)
    rng = np.random.default_rng(seed)

    # The same sample subsets at every level: the levels are views of the same voxels.
    id_idx = _balanced(identity, rng, max_samples)
    med_idx = _subset(medical, rng, max_samples)
    y_id, k_id = _dense(identity[id_idx])
    y_med, k_med = _dense(medical[med_idx])
    if k_id < 2:
        raise ValueError("need identity labels of at least two subjects")
    pooled_idx = y_pool = None
    k_pool = 0
    if pooled_identity is not None:
        pooled_identity = np.asarray(pooled_identity).astype(np.int64)
        pooled_idx = _balanced(pooled_identity, rng, max_samples)
        y_pool, k_pool = _dense(pooled_identity[pooled_idx])
        if k_pool < 2:
            raise ValueError("the pooled view needs identity labels of at least two subjects")

    code_kw = dict(blocks=blocks, seed=seed, c_reg=c_reg, max_iter=probe_iter, smoothing=smoothing, backend=backend)

    def bits_per_sample(x: np.ndarray, y: np.ndarray, k: int, scale: float) -> float:
        return prequential_code_length(x, y, k, scale=scale, **code_kw) / len(y) if len(y) else float("nan")

    projections, levels = [], []
    for level, feats in enumerate(level_features):
        feats = np.asarray(feats, dtype=np.float64)
        c = feats.shape[1]
        limit = c // 2 if max_ranks[level] is None else int(min(max_ranks[level], c))
        x_id, x_med = feats[id_idx], feats[med_idx]
        x_pool = np.asarray(pooled_features[level], np.float64)[pooled_idx] if pooled_features is not None else None
        target_id = tolerance * math.log2(k_id)
        target_pool = tolerance * math.log2(k_pool) if k_pool else 0.0
        # One scale per level (and view), from the unprojected features: see prequential_code_length.
        scale = feature_scale(feats)
        pool_scale = feature_scale(x_pool) if x_pool is not None else 1.0

        q = np.zeros((c, 0))
        id_bits = id_before = bits_per_sample(x_id, y_id, k_id, scale)
        pool_bits = pool_before = bits_per_sample(x_pool, y_pool, k_pool, pool_scale) if x_pool is not None else None
        med_before = bits_per_sample(x_med, y_med, k_med, scale) if k_med >= 2 else 0.0
        say(f"  level {level} ({c} ch): identity {id_before:.3f} / {math.log2(k_id):.3f} bits per sample"
            + (f", pooled {pool_before:.3f}" if pool_before is not None else ""))
        iterations, stopped = 0, "uniform"
        while True:
            id_ok = id_bits >= target_id
            pool_ok = pool_bits is None or pool_bits >= target_pool
            if id_ok and pool_ok:
                stopped = "uniform"
                break
            if q.shape[1] >= limit:
                stopped = "max_rank"
                break
            if iterations >= max_iter:
                stopped = "max_iter"
                break
            p = _projection(q)
            found = []
            probe_kw = dict(c_reg=c_reg, max_iter=probe_iter, backend=backend)
            # Probe only the views still compressible: a view at the uniform code has no direction to give.
            with _single_threaded_blas():
                if not id_ok:
                    probe = _fit_probe(x_id @ p, y_id, scale=scale, **probe_kw)
                    found.append(_top_directions(probe, q, rank_per_iter, rel_sv))
                if not pool_ok:
                    probe = _fit_probe(x_pool @ p, y_pool, scale=pool_scale, **probe_kw)
                    found.append(_top_directions(probe, q, rank_per_iter, rel_sv))
            new_q = _extend_basis(q, np.concatenate(found, axis=1), limit - q.shape[1])
            if new_q.shape[1] == q.shape[1]:
                stopped = "no_directions"
                break
            q, iterations = new_q, iterations + 1
            p = _projection(q)
            id_bits = bits_per_sample(x_id @ p, y_id, k_id, scale)
            if x_pool is not None:
                pool_bits = bits_per_sample(x_pool @ p, y_pool, k_pool, pool_scale)
            say(f"    step {iterations}: removed rank {q.shape[1]}, identity {id_bits:.3f} bits per sample"
                + (f", pooled {pool_bits:.3f}" if pool_bits is not None else ""))
        p = _projection(q)
        med_after = bits_per_sample(x_med @ p, y_med, k_med, scale) if k_med >= 2 else 0.0
        projections.append(torch.from_numpy(p.astype(np.float32)))
        entry: dict[str, Any] = {
            "level": level, "channels": c, "removed_rank": int(q.shape[1]), "max_rank": limit,
            "iterations": iterations, "stopped": stopped, "reached_uniform": stopped == "uniform",
            "n_identity_samples": int(len(y_id)), "n_identities": k_id,
            "identity_uniform_bits": math.log2(k_id), "identity_bits_before": id_before,
            "identity_bits_after": id_bits, "identity_ratio_after": id_bits / math.log2(k_id),
            "n_medical_samples": int(len(y_med)), "n_medical_classes": k_med,
            "medical_uniform_bits": math.log2(k_med) if k_med >= 1 else 0.0,
            "medical_bits_before": med_before, "medical_bits_after": med_after,
            "medical_change": (med_after - med_before) / med_before if med_before > 0 else 0.0,
        }
        if x_pool is not None:
            entry.update({"n_pooled_samples": int(len(y_pool)), "pooled_identities": k_pool,
                          "pooled_uniform_bits": math.log2(k_pool) if k_pool >= 1 else 0.0,
                          "pooled_bits_before": pool_before, "pooled_bits_after": pool_bits})
        levels.append(entry)
        say(f"  level {level}: removed rank {q.shape[1]} ({stopped}); identity {id_before:.3f} -> {id_bits:.3f}, "
            f"medical {med_before:.3f} -> {med_after:.3f} bits per sample")

    report = {
        "method": "INLP with prequential (online) MDL stop",
        "units": "bits per sample",
        "tolerance": tolerance,
        "pooled": pooled_features is not None,
        "options": {"rank_per_iter": rank_per_iter, "rel_sv": rel_sv, "max_iter": max_iter, "c_reg": c_reg,
                    "probe_iter": probe_iter, "smoothing": smoothing, "blocks": [float(b) for b in blocks],
                    "max_samples": max_samples, "seed": seed, "backend": backend,
                    "max_rank": [lv["max_rank"] for lv in levels]},
        "reached_uniform": all(lv["reached_uniform"] for lv in levels),
        "levels": levels,
    }
    return Decoupler(projections, report=report, metadata=metadata)


# ------------------------------------------------------------------------------------------ decoupler


class Decoupler:
    """Per-level orthogonal projections (C_l x C_l, float32) that remove identity from encoder features.

    ``apply`` multiplies every level's channel vector by its ``P`` (``P`` is symmetric, so ``x P`` =
    ``P x``). ``Decoupler.identity()`` has no projection and passes features through: it stands in for
    an encoder without a fitted decoupler. ``report`` is the fit's JSON-ready report; ``metadata`` is
    whatever the fitting code recorded (encoder name, channels, strides, data).
    """

    def __init__(self, projections: Sequence[torch.Tensor | np.ndarray] = (), report: dict[str, Any] | None = None,
                 metadata: dict[str, Any] | None = None, path: Path | None = None):
        mats = []
        for level, p in enumerate(projections):
            t = torch.as_tensor(p).detach().to("cpu", torch.float32).contiguous()
            if t.ndim != 2 or t.shape[0] != t.shape[1]:
                raise ValueError(f"projection {level} must be square (C, C), got {tuple(t.shape)}")
            mats.append(t)
        self.projections: list[torch.Tensor] = mats
        self.report: dict[str, Any] = dict(report or {})
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.path = Path(path) if path is not None else None

    @classmethod
    def identity(cls, metadata: dict[str, Any] | None = None) -> Decoupler:
        """A decoupler that removes nothing (for encoders without a fitted one)."""
        return cls((), report={"method": "identity (no projection)", "levels": []}, metadata=metadata)

    @property
    def is_identity(self) -> bool:
        return not self.projections

    @property
    def channels(self) -> list[int]:
        return [int(p.shape[0]) for p in self.projections]

    @property
    def removed_rank(self) -> list[int]:
        """Removed directions per level: ``C - trace(P)`` (an orthogonal projection's trace is its rank)."""
        return [int(round(p.shape[0] - float(torch.trace(p.double())))) for p in self.projections]

    def apply(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Project each level (B, C_l, ...) on its channel dimension; any number of spatial dims.

        Returns new tensors of the input's dtype and device. An identity decoupler returns the inputs.
        """
        if self.is_identity:
            return list(features)
        if len(features) != len(self.projections):
            raise ValueError(f"decoupler has {len(self.projections)} levels, features have {len(features)}")
        out = []
        for level, (f, p) in enumerate(zip(features, self.projections, strict=True)):
            if f.ndim < 2 or f.shape[1] != p.shape[0]:
                raise ValueError(f"level {level}: expected (B, {p.shape[0]}, ...), got {tuple(f.shape)}")
            out.append(torch.einsum("ij,bj...->bi...", p.to(device=f.device, dtype=f.dtype), f))
        return out

    __call__ = apply

    def _payload(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": FORMAT_VERSION, "projections": [p.clone() for p in self.projections],
                "report": self.report, "metadata": self.metadata}

    def save(self, path: str | Path) -> Path:
        """Write one torch ``.pt`` file (matrices, report, metadata); atomically: temporary name, then rename."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            torch.save(self._payload(), tmp)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path) -> Decoupler:
        """Read a file written by ``save`` (tensors and plain Python values only: ``weights_only``)."""
        path = Path(path)
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path} is not a SemID decoupler file")
        if int(data.get("version", 0)) > FORMAT_VERSION:
            raise ValueError(f"{path}: decoupler format version {data['version']} is newer than this SemID's")
        return cls(data["projections"], report=data.get("report"), metadata=data.get("metadata"), path=path)

    def sha256(self) -> str | None:
        """sha256 of the saved file; of the serialised payload when not saved; ``None`` for the identity."""
        if self.is_identity and self.path is None:
            return None
        if self.path is not None and self.path.exists():
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        buf = io.BytesIO()
        torch.save(self._payload(), buf)
        return hashlib.sha256(buf.getvalue()).hexdigest()

    def describe(self) -> dict[str, Any]:
        """A short description for the de-identification record."""
        return {"file": self.path.name if self.path is not None else None, "sha256": self.sha256(),
                "identity": self.is_identity, "levels": len(self.projections), "channels": self.channels,
                "removed_rank": self.removed_rank, "reached_uniform": self.report.get("reached_uniform")}

    def __repr__(self) -> str:
        if self.is_identity:
            return "Decoupler.identity()"
        return f"Decoupler(channels={self.channels}, removed_rank={self.removed_rank})"


# ------------------------------------------------------------------------------------------- sampling


def _stride3(stride: Stride) -> np.ndarray:
    s = np.broadcast_to(np.asarray(stride, dtype=np.int64), (3,)).copy()
    if (s < 1).any():
        raise ValueError(f"strides must be >= 1, got {stride}")
    return s


def _level_flat_index(zyx: np.ndarray, stride: Stride, shape: Sequence[int]) -> np.ndarray:
    """Flat index into a level's (d, h, w) grid of full-resolution positions ``zyx`` (n, 3).

    A level of stride s holds at index i the features of input voxels [i s, (i + 1) s): ``i = pos // s``;
    clipped, because a level's size is ``ceil`` or ``floor`` of ``D / s`` depending on its padding.
    """
    idx = zyx // _stride3(stride)
    idx = np.minimum(idx, np.asarray(shape, dtype=np.int64) - 1)
    return np.ravel_multi_index(tuple(idx.T), tuple(shape))


def _check_levels(features: Sequence[torch.Tensor], strides: Sequence[Stride], mask: np.ndarray) -> None:
    if len(features) != len(strides):
        raise ValueError(f"{len(features)} feature levels but {len(strides)} strides")
    if mask.ndim != 4:
        raise ValueError(f"mask must be (B, D, H, W), got {mask.shape}")
    for level, f in enumerate(features):
        if f.ndim != 5 or f.shape[0] != mask.shape[0]:
            raise ValueError(f"level {level}: expected (B={mask.shape[0]}, C, d, h, w), got {tuple(f.shape)}")


def sample_voxel_features(features: Sequence[torch.Tensor], strides: Sequence[Stride], mask: np.ndarray,
                          labels: np.ndarray, n_per_volume: int, rng: np.random.Generator | int
                          ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Feature vectors of random voxels inside ``mask``, one vector per level.

    ``features[l]`` (B, C_l, d_l, h_l, w_l); ``strides[l]`` an int or (z, y, x) ints; ``mask`` (B, D, H, W)
    bool at full resolution; ``labels`` (B, D, H, W) ints. Per volume, ``min(n_per_volume, mask.sum())``
    positions are drawn without replacement inside the mask, and each level's vector is read at
    ``position // stride``. Returns ``([vectors (N, C_l) float32 per level], labels (N,), volume index (N,))``;
    the caller turns the volume index into an identity label (the volume's subject).
    """
    rng = np.random.default_rng(rng)
    mask = np.asarray(mask, dtype=bool)
    labels = np.asarray(labels)
    _check_levels(features, strides, mask)
    if labels.shape != mask.shape:
        raise ValueError(f"labels {labels.shape} and mask {mask.shape} differ")
    out: list[list[np.ndarray]] = [[] for _ in features]
    lab, vol = [], []
    for b in range(mask.shape[0]):
        flat = np.flatnonzero(mask[b])
        if flat.size == 0:
            continue
        flat = np.sort(rng.choice(flat, min(n_per_volume, flat.size), replace=False))
        zyx = np.stack(np.unravel_index(flat, mask.shape[1:]), axis=1)
        for level, (f, s) in enumerate(zip(features, strides, strict=True)):
            idx = torch.from_numpy(_level_flat_index(zyx, s, f.shape[2:]))
            vec = f[b].detach().reshape(f.shape[1], -1)[:, idx.to(f.device)]  # (C, n)
            out[level].append(vec.T.float().cpu().numpy())
        lab.append(labels[b].reshape(-1)[flat])
        vol.append(np.full(flat.size, b, dtype=np.int64))
    if not lab:
        empty = [np.zeros((0, f.shape[1]), np.float32) for f in features]
        return empty, np.zeros(0, labels.dtype), np.zeros(0, np.int64)
    return [np.concatenate(v) for v in out], np.concatenate(lab), np.concatenate(vol)


def pool_voxel_features(features: Sequence[torch.Tensor], strides: Sequence[Stride], mask: np.ndarray,
                        n_per_volume: int, rng: np.random.Generator | int, subset_fraction: float = 0.5
                        ) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-volume means of each level over ``mask`` (the pooled view of identity).

    Per volume, vector 0 is the mean over the whole mask; vectors 1.. ``n_per_volume - 1`` are means over
    random ``subset_fraction`` subsets of the mask's voxels, so that a probe has several samples per
    volume to learn from (one mean per volume would leave one sample per subject and visit). Means are
    over full-resolution voxels: a coarse level's cell counts as many times as it holds mask voxels.
    Caveat: subsets of one volume share everything about that volume (its lesions too), so with one or
    two volumes per subject a probe can tell subjects apart by volume-specific content; the directions
    it finds may then carry medical content, which the medical code lengths in the report would show.
    Returns ``([vectors (M, C_l) float32 per level], volume index (M,))``.
    """
    rng = np.random.default_rng(rng)
    mask = np.asarray(mask, dtype=bool)
    _check_levels(features, strides, mask)
    if not 0.0 < subset_fraction <= 1.0:
        raise ValueError("subset_fraction must be in (0, 1]")
    out: list[list[np.ndarray]] = [[] for _ in features]
    vol = []
    for b in range(mask.shape[0]):
        flat = np.flatnonzero(mask[b])
        if flat.size == 0 or n_per_volume < 1:
            continue
        zyx = np.stack(np.unravel_index(flat, mask.shape[1:]), axis=1)
        subsets = [np.arange(flat.size)]
        size = max(1, int(round(subset_fraction * flat.size)))
        subsets += [rng.choice(flat.size, size, replace=False) for _ in range(n_per_volume - 1)]
        for level, (f, s) in enumerate(zip(features, strides, strict=True)):
            cells = _level_flat_index(zyx, s, f.shape[2:])
            n_cells = int(np.prod(f.shape[2:]))
            # Voxel counts per cell as weights: a mean over voxels, without gathering every voxel's vector.
            weights = np.stack([np.bincount(cells[sub], minlength=n_cells) / sub.size for sub in subsets])
            fb = f[b].detach().reshape(f.shape[1], -1).double()
            w = torch.from_numpy(weights).to(device=fb.device)
            out[level].append((w @ fb.T).float().cpu().numpy())  # (n, C)
        vol.append(np.full(len(subsets), b, dtype=np.int64))
    if not vol:
        return [np.zeros((0, f.shape[1]), np.float32) for f in features], np.zeros(0, np.int64)
    return [np.concatenate(v) for v in out], np.concatenate(vol)


# ----------------------------------------------------------------------------------- fit from samples


def _encoder_device(encoder: Any) -> torch.device:
    params = getattr(encoder, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def fit_from_samples(encoder: Any, sample_paths: Sequence[str | Path], *, n_identity: int = 512,
                     n_medical: int = 64, pooled: bool = True, n_pooled: int = 8, seed: int = 0,
                     region: np.ndarray | None = None, device: str | torch.device | None = None,
                     log: Log | None = print, **options: Any) -> Decoupler:
    """Fit a ``Decoupler`` for ``encoder`` on cached face-box samples (``semid.facebox.load_sample``).

    ``encoder``: any object with ``features(volume (1, 1, D, H, W)) -> list[Tensor (1, C_l, d, h, w)]`` and
    ``strides`` (one int or (z, y, x) per level). Per sample (``image`` (D, H, W) float32, ``labels``
    uint8 (D, H, W): 0 air, 1 brain, 2 other head tissue, 3 identity region, 4 brain lesion, 5 face-region
    lesion; ``subject`` int):

    - ``n_identity`` voxels inside the identity ``region`` (default: the atlas's,
      ``semid.facebox.box_atlas()["region"]``, bool (D, H, W)): identity label = the subject, medical
      label = the voxel's class. Air voxels of the region are kept: the face profile is encoded in the
      features of the air next to the skin as much as in the skin's.
    - ``n_medical`` voxels of each class present anywhere in the box (stratified, since lesions are rare
      and the medical code length should see them): medical label only (identity -1).
    - with ``pooled``: ``n_pooled`` region means per volume (``pool_voxel_features``), identity = subject.

    The medical labels are the classes as stored (0-5): what the generator must keep. ``options`` go to
    ``fit_decoupler`` (``tolerance``, ``max_rank``, ...). Returns the fitted ``Decoupler`` (not saved).
    """
    from semid.facebox import load_sample

    if not sample_paths:
        raise ValueError("no samples")
    if region is None:
        from semid.facebox import box_atlas

        region = box_atlas()["region"]
    region = np.asarray(region, dtype=bool)
    strides = list(encoder.strides)
    device = torch.device(device) if device is not None else _encoder_device(encoder)
    if isinstance(encoder, torch.nn.Module):
        encoder.eval()
    rng = np.random.default_rng(seed)
    say = log or (lambda _msg: None)

    levels: list[list[np.ndarray]] | None = None
    pooled_levels: list[list[np.ndarray]] | None = None
    identity, medical, pooled_identity, subjects = [], [], [], set()
    for i, path in enumerate(sample_paths):
        sample = load_sample(Path(path))
        image, labels, subject = sample["image"], sample["labels"].astype(np.int64), int(sample["subject"])
        if image.shape != region.shape or labels.shape != region.shape:
            raise ValueError(f"{path}: image {image.shape} / labels {labels.shape} do not match the region "
                             f"{region.shape}")
        subjects.add(subject)
        with torch.inference_mode():
            feats = encoder.features(torch.from_numpy(np.ascontiguousarray(image, np.float32))[None, None].to(device))
        feats = [f.detach() for f in feats]
        if levels is None:
            levels = [[] for _ in feats]
            pooled_levels = [[] for _ in feats]
        lab = labels[None]
        vecs, med, _ = sample_voxel_features(feats, strides, region[None], lab, n_identity, rng)
        for lv, v in zip(levels, vecs, strict=True):
            lv.append(v)
        identity.append(np.full(len(med), subject, np.int64))
        medical.append(med)
        for cls in np.unique(labels):
            vecs, med, _ = sample_voxel_features(feats, strides, (labels == cls)[None], lab, n_medical, rng)
            for lv, v in zip(levels, vecs, strict=True):
                lv.append(v)
            identity.append(np.full(len(med), -1, np.int64))
            medical.append(med)
        if pooled:
            vecs, vol = pool_voxel_features(feats, strides, region[None], n_pooled, rng)
            for lv, v in zip(pooled_levels, vecs, strict=True):
                lv.append(v)
            pooled_identity.append(np.full(len(vol), subject, np.int64))
        del feats
        if (i + 1) % 10 == 0 or i + 1 == len(sample_paths):
            say(f"  decoupling samples: {i + 1}/{len(sample_paths)} volumes")

    assert levels is not None and pooled_levels is not None
    level_features = [np.concatenate(v) for v in levels]
    metadata = {
        "encoder": getattr(encoder, "name", type(encoder).__name__),
        "channels": [int(f.shape[1]) for f in level_features],
        "strides": [np.asarray(s).tolist() for s in strides],
        "n_volumes": len(sample_paths), "n_subjects": len(subjects),
        "sampling": {"n_identity": n_identity, "n_medical": n_medical, "pooled": pooled, "n_pooled": n_pooled,
                     "seed": seed},
    }
    metadata.update(options.pop("metadata", None) or {})
    pooled_kw: dict[str, Any] = {}
    if pooled:
        pooled_kw = {"pooled_features": [np.concatenate(v) for v in pooled_levels],
                     "pooled_identity": np.concatenate(pooled_identity)}
    options.setdefault("seed", seed)
    return fit_decoupler(level_features, np.concatenate(identity), np.concatenate(medical), metadata=metadata,
                         log=log, **pooled_kw, **options)


# ---------------------------------------------------------------------------------------------- command

#: The decoupler fitted on the bundled encoder (``semid train decoupler``), used by the generator.
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "data" / "models" / "decoupler_phantom.pt"


def identity_bits_left(decoupler: Decoupler) -> list[float] | None:
    """Per level, the identity bits per sample a linear reader still saves on the projected features
    (uniform code minus online code, at least 0); None for a decoupler without a report."""
    levels = (decoupler.report or {}).get("levels")
    if not levels:
        return None
    return [round(max(0.0, float(lv["identity_uniform_bits"]) - float(lv["identity_bits_after"])), 4)
            for lv in levels]


def main(argv: Sequence[str] | None = None) -> int:
    """``semid train decoupler``: fit the decoupling model of an encoder on the cached face-box samples."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="semid train decoupler", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="fit and save the decoupler")
    t.add_argument("--encoder", default="bundled", help="encoder spec (semid.semantics.encoders.load_encoder)")
    t.add_argument("--samples", default="", help="face-box sample folder (default: the data folder's "
                                                 "train/facebox-v2; `semid train generator samples` makes it)")
    t.add_argument("--out", default=str(DEFAULT_WEIGHTS))
    t.add_argument("--validation-subjects", type=int, default=6,
                   help="the last subjects are left out (the generator validates on them)")
    t.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    t.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from semid.facebox import samples_folder
    from semid.semantics.encoders import load_encoder

    torch.set_num_threads(max(1, torch.get_num_threads()))
    folder = Path(args.samples) if args.samples else samples_folder()
    paths = sorted(folder.glob("facebox_*.npz"))
    subjects = sorted({int(p.name.split("_")[2]) for p in paths})
    keep = set(subjects[:-args.validation_subjects]) if args.validation_subjects else set(subjects)
    paths = [p for p in paths if int(p.name.split("_")[2]) in keep]
    if len(keep) < 4:
        raise SystemExit(f"{len(keep)} training subjects in {folder}: make more samples first")
    encoder = load_encoder(args.encoder)
    decoupler = fit_from_samples(encoder, paths, seed=args.seed, tolerance=args.tolerance)
    decoupler.metadata.update({"encoder_spec": args.encoder, "samples": len(paths), "subjects": len(keep),
                               "command": "semid train decoupler " + " ".join(argv or [])})
    decoupler.save(args.out)
    print(json.dumps({"file": Path(args.out).name, "removed_rank": decoupler.removed_rank,
                      "levels": [{k: lv.get(k) for k in ("level", "channels", "removed_rank", "identity_uniform_bits",
                                                          "identity_bits_before", "identity_bits_after",
                                                          "medical_bits_before", "medical_bits_after")}
                                 for lv in decoupler.report["levels"]]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
