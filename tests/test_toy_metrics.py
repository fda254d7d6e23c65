"""Toy metrics on hand-made CI matrices with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from param_decomp_jax.eval.toy_metrics import (
    alive_components,
    dense_block_sizes,
    dense_ci_error,
    dense_ci_stats,
    identity_ci_error,
    probe_inputs,
)

F, C = 5, 8
PERM = np.array([6, 2, 0, 7, 3])  # feature i -> component PERM[i]


def _perfect() -> np.ndarray:
    ci = np.zeros((F, C))
    ci[np.arange(F), PERM] = 0.95
    return ci


def test_probe_inputs() -> None:
    x = probe_inputs(4)
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, np.eye(4))
    np.testing.assert_array_equal(probe_inputs(3, 0.75), 0.75 * np.eye(3, dtype=np.float32))


def test_identity_perfect_permuted_is_zero() -> None:
    ci = _perfect()
    assert identity_ci_error(ci) == 0.0
    # Sub-threshold noise everywhere does not count.
    assert identity_ci_error(ci + 0.05) == 0.0


def test_identity_missing_feature() -> None:
    ci = _perfect()
    ci[2] = 0.0  # feature 2 fires nothing
    assert identity_ci_error(ci) == pytest.approx(1 / F)


def test_identity_weak_own_component() -> None:
    """The matched entry must reach 1 - tolerance: a half-important own component is an error."""
    ci = _perfect()
    ci[2, PERM[2]] = 0.5
    assert identity_ci_error(ci) == pytest.approx(1 / F)
    assert identity_ci_error(ci, tolerance=0.6) == 0.0


def test_identity_duplicate_component() -> None:
    ci = _perfect()
    ci[1] = 0.0
    ci[1, PERM[0]] = 0.8  # features 0 and 1 share one component
    # One extra on-entry plus feature 1's matched (empty) component: 2 entries.
    assert identity_ci_error(ci) == pytest.approx(2 / F)


def test_identity_extra_firing_component() -> None:
    ci = _perfect()
    ci[3, 1] = 0.5  # an unmatched component also fires on feature 3
    assert identity_ci_error(ci) == pytest.approx(1 / F)
    ci[4, 1] = 0.5  # ... and on feature 4
    assert identity_ci_error(ci) == pytest.approx(2 / F)


def test_identity_fewer_components_than_features() -> None:
    ci = np.eye(4, 3)  # features 0..2 matched; feature 3 cannot be matched and fires nothing
    assert identity_ci_error(ci) == 0.0
    ci[3, 0] = 1.0  # now it fires on feature 0's component
    assert identity_ci_error(ci) == pytest.approx(1 / 4)


def test_dense_ci_stats_and_alive() -> None:
    N = 10
    ci = np.full((N, 6), 0.05)  # components 3..5 stay below threshold: dead
    ci[:, 0] = 1.0  # active on 10/10 inputs: dense
    ci[:9, 1] = 0.5  # active on 9/10 = dense_frac exactly: dense
    ci[4, 2] = 0.2  # active on 1 input
    stats = dense_ci_stats(ci, threshold=0.1, dense_frac=0.9)
    assert stats == {"alive": 3, "mean_active_per_input": pytest.approx((10 + 9 + 1) / N), "dense": 2}
    assert dense_ci_stats(ci, dense_frac=0.95)["dense"] == 1
    assert alive_components(ci, 0.1) == 3
    assert alive_components(ci, 0.01) == 6


def _block(n_probes: int = 10, C: int = 12, k: int = 4) -> np.ndarray:
    """k components sharing the probes (each fully on for some, off for others), the rest silent."""
    ci = np.zeros((n_probes, C))
    for j, col in enumerate([9, 2, 5, 0][:k]):
        ci[j::k, col] = 1.0  # component `col` fires on every k-th probe, offset j
    ci[:, 2] = np.maximum(ci[:, 2], 0.4)  # partial CI inside the block is allowed
    ci[:, 0] = np.maximum(ci[:, 0], 0.05)  # sub-tolerance background: ranks component 0 above 5
    return ci


def test_dense_error_zero_for_a_block_in_any_basis() -> None:
    ci = _block()
    assert dense_ci_error(ci, k=4) == 0.0
    # Independent of which component ids form the block, and of probe order.
    assert dense_ci_error(ci[::-1][:, np.random.default_rng(0).permutation(12)], k=4) == 0.0


def test_dense_error_counts_a_block_member_never_fully_on() -> None:
    ci = _block()
    ci[:, 5] = np.minimum(ci[:, 5], 0.85)  # < 1 - tolerance everywhere
    assert dense_ci_error(ci, k=4) == pytest.approx(1 / 4)


def test_dense_error_counts_entries_outside_the_block() -> None:
    ci = _block()
    ci[3, 7] = 0.2  # a fifth component fires (above tolerance) on one probe
    assert dense_ci_error(ci, k=4) == pytest.approx(1 / 4)
    ci[4, 7] = 0.05  # below tolerance: not counted
    assert dense_ci_error(ci, k=4) == pytest.approx(1 / 4)


def test_dense_error_k_mismatch() -> None:
    ci = _block()
    # A block of 3 expected: the lightest working component (5, on probes 2 and 6) falls outside
    # it, and each of its firing probes is a stray entry.
    assert dense_ci_error(ci, k=3) == pytest.approx(2 / 3)
    # A block of 5 expected: the 5th-heaviest component (silent) never reaches 1 - tolerance.
    assert dense_ci_error(ci, k=5) == pytest.approx(1 / 5)
    with pytest.raises(ValueError, match="block size"):
        dense_ci_error(ci, k=13)


def test_dense_block_sizes_first_matching_pattern_wins() -> None:
    sites = ["layers.0.mlp_in", "layers.0.mlp_out", "layers.1.mlp_out"]
    blocks = dense_block_sizes({"layers.0.*": 7, "layers.*.mlp_out": 25}, sites)
    assert blocks == {"layers.0.mlp_in": 7, "layers.0.mlp_out": 7, "layers.1.mlp_out": 25}
    assert dense_block_sizes({}, sites) == {}


def test_dense_block_figure_order_puts_the_block_first() -> None:
    from param_decomp_jax.eval.figures import dense_block_order

    ci = _block()
    ci[3, 7] = 0.2  # a stray component alive outside the block
    order, split = dense_block_order(ci, threshold=0.1, k=4)
    assert split == 4 and set(order[:4]) == {9, 2, 5, 0} and list(order[4:]) == [7]
