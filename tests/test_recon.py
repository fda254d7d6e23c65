"""SPEC R1-R3: plans, routing samplers (uniform-k: k uniform, then subset uniform), sources."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from param_decomp_config.losses import (
    AllRouting,
    AllSitesPlan,
    ChunksPlan,
    PerSitePlan,
    StaticProbRouting,
    SubsetsPlan,
    UniformKRouting,
)
from param_decomp_jax.core.recon import resolve_plan, sample_routes, stochastic_sources

SITES = ("a", "b", "c", "d")
N = 60_000  # positions; binomial std of a frequency 1/7 is ~0.0014, tolerances below are ~4 sigma


def test_plans_resolve_in_canonical_order():
    assert resolve_plan(AllSitesPlan(), SITES) == (SITES,)
    assert resolve_plan(PerSitePlan(), SITES) == tuple((s,) for s in SITES)
    assert resolve_plan(ChunksPlan(k=2), SITES) == (("a", "b"), ("c", "d"))
    assert resolve_plan(SubsetsPlan(subsets=[["c", "a"], ["d"]]), SITES) == (("a", "c"), ("d",))
    with pytest.raises(ValueError, match="does not divide"):
        resolve_plan(ChunksPlan(k=3), SITES)


def test_all_routing_is_none():
    assert sample_routes(jax.random.PRNGKey(0), AllRouting(), SITES, (4,)) is None


def test_uniform_k_routing_distribution():
    live = ("a", "b", "c")
    routes = sample_routes(jax.random.PRNGKey(1), UniformKRouting(), live, (N,))
    r = np.stack([np.asarray(routes[s]) for s in live], axis=-1)
    k = r.sum(-1)
    assert k.min() >= 1 and k.max() <= 3
    for j in (1, 2, 3):  # k ~ U{1..3}
        assert abs(np.mean(k == j) - 1 / 3) < 0.01
    for j in (1, 2):  # given k, every k-subset equally likely
        rows = r[k == j]
        for subset in itertools.combinations(range(3), j):
            pattern = np.zeros(3, bool)
            pattern[list(subset)] = True
            freq = np.mean(np.all(rows == pattern, axis=-1))
            assert abs(freq - 1 / 3) < 0.015, (j, subset, freq)


def test_static_prob_routing():
    routes = sample_routes(jax.random.PRNGKey(2), StaticProbRouting(p=0.3), ("a", "b"), (N,))
    assert abs(float(jnp.mean(routes["a"])) - 0.3) < 0.01
    # independent across sites
    both = float(jnp.mean(routes["a"] & routes["b"]))
    assert abs(both - 0.09) < 0.01


def test_stochastic_sources_shapes_ranges_and_independence():
    src = stochastic_sources(jax.random.PRNGKey(3), "continuous", ("a", "b"), {"a": 3, "b": 5}, (100, 7))
    assert src["a"].shape == (100, 7, 3) and src["b"].shape == (100, 7, 5)
    assert float(src["a"].min()) >= 0 and float(src["a"].max()) <= 1
    assert not np.allclose(np.asarray(src["a"]), np.asarray(src["b"][..., :3]))
    binom = stochastic_sources(jax.random.PRNGKey(3), "binomial", ("a",), {"a": 3}, (1000,))
    assert set(np.unique(np.asarray(binom["a"]))) == {0.0, 1.0}
