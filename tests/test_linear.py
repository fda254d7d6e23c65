"""SPEC §2: decomposed site output, mask formula, raw delta channel, routing."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import SINGLE_OP_ATOL, SINGLE_OP_RTOL

from param_decomp_jax.core.linear import decomposed_site_output
from param_decomp_jax.core.recon import masks_from_sources

K = jax.random.split(jax.random.PRNGKey(0), 6)
X = jax.random.normal(K[0], (3, 5, 4))
W = jax.random.normal(K[1], (4, 6))
V = jax.random.normal(K[2], (4, 7))
U = jax.random.normal(K[3], (7, 6))


def test_full_mask_with_delta_equals_frozen():
    ones = jnp.ones((3, 5, 7))
    y = decomposed_site_output(X, W, V, U, ones, jnp.ones((3, 5)))
    np.testing.assert_allclose(y, X @ W, rtol=1e-5, atol=1e-5)  # two matmul paths re-associate


def test_mask_scales_components_and_delta_is_separate():
    mask = jax.random.uniform(K[4], (3, 5, 7))
    dm = jax.random.uniform(K[5], (3, 5))
    y = decomposed_site_output(X, W, V, U, mask, dm)
    expected = ((X @ V) * mask) @ U + (X @ (W - V @ U)) * dm[..., None]
    np.testing.assert_allclose(y, expected, rtol=SINGLE_OP_RTOL * 10, atol=SINGLE_OP_ATOL * 100)


def test_routing_selects_frozen_where_false():
    mask = jnp.zeros((3, 5, 7))
    route = jnp.arange(15).reshape(3, 5) % 2 == 0
    y = decomposed_site_output(X, W, V, U, mask, None, route)
    np.testing.assert_allclose(y[~route], (X @ W)[~route], rtol=SINGLE_OP_RTOL, atol=SINGLE_OP_ATOL)
    np.testing.assert_allclose(y[route], 0.0, atol=0)


def test_mask_formula_and_raw_delta_channel():
    ci = {"s": jnp.array([[0.0, 0.5, 1.0]])}
    src = {"s": jnp.array([[0.2, 0.2, 0.2, 0.7]])}  # last channel = delta
    masks, deltas = masks_from_sources(ci, src, ["s"], use_delta=True)
    np.testing.assert_allclose(masks["s"], [[0.2, 0.6, 1.0]], rtol=SINGLE_OP_RTOL)
    np.testing.assert_allclose(deltas["s"], [0.7], rtol=SINGLE_OP_RTOL)  # float32(0.7) != 0.7
    masks, deltas = masks_from_sources(ci, {"s": src["s"][:, :3]}, ["s"], use_delta=False)
    assert deltas is None
