"""Pure statistics of the negative-transfer study: transfer ratios, paired bootstrap, gradient cosines.

Shape legend (the project's, shodh/__init__.py): R seeds (runs), I test samples (frame pairs of one
domain, the same across arms), Q bootstrap replicates, V parameters of a flat gradient vector.
"""

from __future__ import annotations

import math

import numpy as np


def negative_transfer(err_arm_RI: np.ndarray, err_ref_RI: np.ndarray) -> float:
    """NT = mean error of the arm / mean error of the reference − 1 over seeds and samples:
    [R, I] x2 -> scalar. Positive: the arm is worse than its single-domain reference."""
    _check_paired(err_arm_RI, err_ref_RI)
    return float(err_arm_RI.mean() / err_ref_RI.mean() - 1.0)


def paired_bootstrap_ci(err_arm_RI: np.ndarray, err_ref_RI: np.ndarray, replicates: int, level: float,
                        seed: int = 0, cluster_I: np.ndarray | None = None) -> tuple[float, float]:
    """Percentile interval of NT under a paired bootstrap: [R, I] x2 -> (lo, hi).

    Each replicate resamples seeds, then test samples, with replacement, and takes the SAME indices
    for both arms: the arms share seeds and test samples, so the pairing removes the between-sample
    spread both see. An arm against itself gives NT = 0 in every replicate.
    cluster_I (the trajectory of each sample) makes it a clustered bootstrap: whole trajectories are
    resampled, then frames within each drawn trajectory. Frames of one trajectory are strongly
    correlated, so resampling them as if independent (cluster_I=None) understates the spread and
    says nothing about other trajectories (other geometries, other flows)."""
    _check_paired(err_arm_RI, err_ref_RI)
    R, I = err_arm_RI.shape
    rng = np.random.default_rng(seed)
    seed_QR = rng.integers(0, R, size=(replicates, R))
    if cluster_I is None:
        sample_QI = rng.integers(0, I, size=(replicates, I))
        arm_Q = err_arm_RI[seed_QR[:, :, None], sample_QI[:, None, :]].mean(axis=(1, 2))
        ref_Q = err_ref_RI[seed_QR[:, :, None], sample_QI[:, None, :]].mean(axis=(1, 2))
    else:
        if len(cluster_I) != I:
            raise ValueError(f"cluster_I has {len(cluster_I)} entries for {I} samples")
        members = [np.flatnonzero(cluster_I == c) for c in np.unique(cluster_I)]
        arm_Q, ref_Q = np.empty(replicates), np.empty(replicates)
        for q in range(replicates):
            drawn = rng.integers(0, len(members), size=len(members))
            idx = np.concatenate([members[c][rng.integers(0, len(members[c]), size=len(members[c]))] for c in drawn])
            arm_Q[q] = err_arm_RI[seed_QR[q][:, None], idx[None, :]].mean()
            ref_Q[q] = err_ref_RI[seed_QR[q][:, None], idx[None, :]].mean()
    nt_Q = arm_Q / ref_Q - 1.0
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(nt_Q, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def trajectory_of(sample_id: str) -> str:
    """The cluster of an evaluation sample id `<domain>_<traj:05d>_<frame:05d>`: `<domain>_<traj>`."""
    return sample_id.rsplit("_", 1)[0]


def _check_paired(a_RI: np.ndarray, b_RI: np.ndarray) -> None:
    if a_RI.shape != b_RI.shape or a_RI.ndim != 2 or a_RI.size == 0:
        raise ValueError(f"paired errors need equal non-empty [R, I] shapes, got {a_RI.shape} and {b_RI.shape}")


def cosine(a_V: np.ndarray, b_V: np.ndarray) -> float:
    """cos(a, b) of two flat gradients [V] x2 -> scalar; NaN when either is zero (no gradient)."""
    na, nb = float(np.linalg.norm(a_V)), float(np.linalg.norm(b_V))
    if na == 0.0 or nb == 0.0:
        return math.nan
    return float(np.dot(a_V, b_V) / (na * nb))


def conflict_stats(grads: dict[str, list[np.ndarray]]) -> dict[str, float]:
    """Gradient conflict between domains from per-domain lists of held-out batch gradients [V].

    cross: mean cosine over every pair of batches from two different domains; same_<d>: mean
    cosine over pairs of distinct batches of domain d (the agreement batch noise allows);
    normalized: cross / sqrt(same_a * same_b), averaged over domain pairs, so 1 means "as
    aligned as two batches of one domain" and <= 0 means opposing (NaN if a same-domain cosine is
    not positive); conflict_rate: the fraction of cross-domain pairs with cosine < 0."""
    domains = sorted(grads)
    same = {d: _mean([cosine(grads[d][i], grads[d][j]) for i in range(len(grads[d]))
                      for j in range(i + 1, len(grads[d]))]) for d in domains}
    cross_all: list[float] = []
    normalized: list[float] = []
    for i, a in enumerate(domains):
        for b in domains[i + 1:]:
            pair = [cosine(ga, gb) for ga in grads[a] for gb in grads[b]]
            cross_all += pair
            normalized.append(normalized_cosine(_mean(pair), same[a], same[b]))
    finite = [c for c in cross_all if not math.isnan(c)]
    return {"cross": _mean(cross_all), "normalized": _mean(normalized),
            "conflict_rate": sum(c < 0 for c in finite) / len(finite) if finite else math.nan,
            **{f"same_{d}": same[d] for d in domains}}


def normalized_cosine(cross: float, same_a: float, same_b: float) -> float:
    """Cross-domain cosine over the geometric mean of the two same-domain cosines (NaN unless both > 0)."""
    if not (same_a > 0 and same_b > 0):
        return math.nan
    return cross / math.sqrt(same_a * same_b)


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan
