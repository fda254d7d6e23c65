"""SPEC F1 (faithfulness), I1-I3 (importance minimality: global sums before log2, per-site, p schedule)."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SINGLE_OP_RTOL

from param_decomp_jax.core.losses import (
    annealed_p,
    faithfulness_loss,
    importance_minimality_loss,
    importance_minimality_per_site,
)

RNG = np.random.default_rng(0)


def test_faithfulness_is_sum_of_squares_over_total_numel():
    d1, d2 = RNG.normal(size=(3, 4)), RNG.normal(size=(5, 2))
    expected = (np.sum(d1**2) + np.sum(d2**2)) / (12 + 10)
    got = faithfulness_loss({"a": jnp.asarray(d1, jnp.float32), "b": jnp.asarray(d2, jnp.float32)})
    np.testing.assert_allclose(got, expected, rtol=SINGLE_OP_RTOL * 10)


def _reference_imp(ci: np.ndarray, p: float, eps: float, beta: float) -> float:
    flat = ci.reshape(-1, ci.shape[-1]).astype(np.float64)
    s = np.sum((flat + eps) ** p, axis=0)
    return float(np.sum((s / flat.shape[0]) * (1 + beta * np.log2(1 + s))))


@pytest.mark.parametrize("p,beta", [(2.0, 0.0), (1.0, 0.2), (0.4, 0.5)])
def test_imp_min_matches_reference_over_all_leading_axes(p, beta):
    ci = RNG.uniform(size=(4, 6, 5)).astype(np.float32)
    got = importance_minimality_per_site(jnp.asarray(ci), p, 1e-12, beta)
    np.testing.assert_allclose(got, _reference_imp(ci, p, 1e-12, beta), rtol=1e-5)  # fp32 power + log


def test_imp_min_sums_globally_before_the_log():
    # With beta > 0 the loss of the whole batch is NOT the mean of the halves' losses: the log acts on
    # the global sum S_c. A per-shard implementation that averaged shard losses would fail here.
    ci = RNG.uniform(size=(8, 5)).astype(np.float32)
    whole = float(importance_minimality_per_site(jnp.asarray(ci), 1.0, 0.0, 0.5))
    halves = [float(importance_minimality_per_site(jnp.asarray(h), 1.0, 0.0, 0.5)) for h in (ci[:4], ci[4:])]
    np.testing.assert_allclose(whole, _reference_imp(ci, 1.0, 0.0, 0.5), rtol=1e-5)
    assert abs(whole - np.mean(halves)) > 1e-2


def test_imp_min_is_per_site_not_pooled():
    a = RNG.uniform(size=(6, 3)).astype(np.float32)
    b = RNG.uniform(size=(6, 4)).astype(np.float32)
    total, per_site = importance_minimality_loss({"a": jnp.asarray(a), "b": jnp.asarray(b)}, 1.0, 0.0, 0.3)
    np.testing.assert_allclose(per_site["a"], _reference_imp(a, 1.0, 0.0, 0.3), rtol=1e-5)
    np.testing.assert_allclose(
        total, _reference_imp(a, 1.0, 0.0, 0.3) + _reference_imp(b, 1.0, 0.0, 0.3), rtol=1e-5
    )


def test_eps_sits_inside_the_power():
    ci = jnp.zeros((4, 2))
    # (0 + eps)^p summed over 4 positions / 4 positions, for 2 components.
    np.testing.assert_allclose(importance_minimality_per_site(ci, 0.5, 0.01, 0.0), 2 * 0.1, rtol=1e-6)


def test_p_anneals_linearly_inside_its_window():
    def p_at(step):
        return float(annealed_p(jnp.asarray(step), 100, 2.0, 0.4, 0.2, 0.6))

    assert p_at(0) == pytest.approx(2.0)
    assert p_at(20) == pytest.approx(2.0)
    assert p_at(40) == pytest.approx(1.2, rel=1e-6)
    assert p_at(60) == pytest.approx(0.4, rel=1e-6)
    assert p_at(99) == pytest.approx(0.4, rel=1e-6)
    assert float(annealed_p(jnp.asarray(50), 100, 1.0, None, 0.0, 1.0)) == 1.0
