"""Metrics for toy targets over CI matrices on the host (numpy/scipy), pure functions of arrays.

CI matrices are `[N inputs, C components]`; for probes, `N = F` and row i is the CI of every
component when only feature i is on (value 1).
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Float
from scipy.optimize import linear_sum_assignment


def probe_inputs(n_features: int) -> Float[np.ndarray, "F F"]:
    """One feature at a time with value 1.0 (row i = e_i)."""
    return np.eye(n_features, dtype=np.float32)


def alive_components(ci_NxC: Float[np.ndarray, "N C"], threshold: float = 0.1) -> int:
    """Components whose CI exceeds `threshold` on at least one input."""
    return int((np.asarray(ci_NxC) > threshold).any(axis=0).sum())


def identity_ci_error(ci_FxC: Float[np.ndarray, "F C"], threshold: float = 0.1) -> float:
    """Distance of the probe CI pattern from "one distinct component per feature, nothing else".

    Binarize at `threshold`; match features to components one-to-one by Hungarian assignment
    maximising the (raw) CI; the ideal pattern has exactly the matched entry of each row on. The
    error is the number of binarized entries that differ from the ideal, divided by F. A missing
    feature costs 1, a component shared by two features 2 (its extra on-entry plus the second
    feature's empty match), each extra firing component 1. With C < F the unmatched features'
    ideal rows are all off.
    """
    ci = np.asarray(ci_FxC, dtype=np.float64)
    F = ci.shape[0]
    rows, cols = linear_sum_assignment(ci, maximize=True)
    ideal = np.zeros(ci.shape, dtype=bool)
    ideal[rows, cols] = True
    return float(np.count_nonzero((ci > threshold) != ideal)) / F


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
