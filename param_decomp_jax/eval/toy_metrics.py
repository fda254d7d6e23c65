"""Metrics for toy targets over CI matrices on the host (numpy/scipy), pure functions of arrays.

CI matrices are `[N inputs, C components]`; for probes, `N = F` and row i is the CI of every
component when only feature i is on (at the probe magnitude, `eval.probe_value`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

import numpy as np
from jaxtyping import Float
from scipy.optimize import linear_sum_assignment


def probe_inputs(n_features: int, value: float = 1.0) -> Float[np.ndarray, "F F"]:
    """One feature at a time with magnitude `value` (row i = value * e_i)."""
    return np.eye(n_features, dtype=np.float32) * np.float32(value)


def alive_components(ci_NxC: Float[np.ndarray, "N C"], threshold: float = 0.1) -> int:
    """Components whose CI exceeds `threshold` on at least one input."""
    return int((np.asarray(ci_NxC) > threshold).any(axis=0).sum())


def identity_ci_error(ci_FxC: Float[np.ndarray, "F C"], tolerance: float = 0.1) -> float:
    """Distance of the probe CI pattern from "one distinct, fully important component per feature".

    Features are matched one-to-one to components by Hungarian assignment maximising the CI. An
    entry is wrong when it deviates from the ideal pattern by more than `tolerance`: a matched
    entry below `1 - tolerance` (the feature's component is not fully important) or an unmatched
    entry above `tolerance` (a second component fires). The error is the count of wrong entries
    divided by F, so 0 is a perfect identity and a feature that fires nothing costs 1/F. With
    C < F the unmatched features' ideal rows are all zero.
    """
    ci = np.asarray(ci_FxC, dtype=np.float64)
    F = ci.shape[0]
    rows, cols = linear_sum_assignment(ci, maximize=True)
    matched = np.zeros(ci.shape, dtype=bool)
    matched[rows, cols] = True
    weak_matched = np.count_nonzero(ci[matched] < 1.0 - tolerance)
    stray = np.count_nonzero(ci[~matched] > tolerance)
    return float(weak_matched + stray) / F


def dense_ci_stats(
    ci_NxC: Float[np.ndarray, "N C"], threshold: float = 0.1, dense_frac: float = 0.9
) -> dict[str, float]:
    """Alive components, mean active components per input, and "dense" components.

    A component is dense when it is active (CI > threshold) on at least `dense_frac` of the inputs:
    the signature of ResidMLP's `mlp_out` collapsing into one always-on ~d_mlp-component block.
    """
    active_NxC = np.asarray(ci_NxC) > threshold
    frac_C = active_NxC.mean(axis=0)
    return {
        "alive": int(active_NxC.any(axis=0).sum()),
        "mean_active_per_input": float(active_NxC.sum(axis=1).mean()),
        "dense": int((frac_C >= dense_frac).sum()),
    }


def columns_by_ci_mass(ci_NxC: Float[np.ndarray, "N C"]) -> np.ndarray:
    """Component indices by total CI over the inputs, largest first (ties: lower index first)."""
    return np.argsort(-np.asarray(ci_NxC).sum(axis=0), kind="stable")


def dense_ci_error(ci_FxC: Float[np.ndarray, "F C"], k: int, tolerance: float = 0.1) -> float:
    """Distance of the probe CI pattern from "one block of k components, nothing outside it".

    For a matrix that the target uses as a whole (ResidMLP's `mlp_out`: any basis of its rank-d_mlp
    row space serves, e.g. one component per ReLU neuron) the expected decomposition is exactly k
    components, however they split the work. The k components with the most CI mass over the probes
    form the block: each must be fully important (CI >= 1 - tolerance) on at least one probe, and
    every entry outside the block must stay <= tolerance. The error is the number of block components
    that are never fully important plus the number of entries above tolerance outside the block,
    divided by k: 0 is exactly k working components and silence elsewhere.
    """
    ci = np.asarray(ci_FxC, dtype=np.float64)
    if not 0 < k <= ci.shape[1]:
        raise ValueError(f"block size k = {k} must be in 1..C = {ci.shape[1]}")
    by_mass = columns_by_ci_mass(ci)
    block, rest = ci[:, by_mass[:k]], ci[:, by_mass[k:]]
    never_full = np.count_nonzero(~(block >= 1.0 - tolerance).any(axis=0))
    stray = np.count_nonzero(rest > tolerance)
    return float(never_full + stray) / k


def dense_block_sizes(patterns: Mapping[str, int], site_names: Sequence[str]) -> dict[str, int]:
    """Site -> block size k from `eval.dense_ci_blocks` (pattern -> k; the first matching pattern wins)."""
    out: dict[str, int] = {}
    for site in site_names:
        k = next((k for pattern, k in patterns.items() if fnmatch.fnmatchcase(site, pattern)), None)
        if k is not None:
            out[site] = k
    return out
