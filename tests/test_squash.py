"""SPEC S1/S2: the leaky-hard squashing pair, forward and custom backward on every branch."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import SINGLE_OP_ATOL, SINGLE_OP_RTOL

from param_decomp_jax.core.squash import LEAK_ALPHA, lower_leaky_hard, upper_leaky_hard

X = jnp.array([-2.0, -0.5, 0.0, 0.3, 1.0, 1.5, 3.0])


def _vjp(fn, x, g):
    _, pullback = jax.vjp(fn, x)
    return pullback(g)[0]


def test_lower_forward_is_clamp():
    np.testing.assert_allclose(lower_leaky_hard(X), jnp.clip(X, 0, 1), rtol=0, atol=0)


def test_lower_backward_positive_cotangent():
    # g > 0: passes on (0, 1]; zero at and below 0 (x = 0 is the lower branch); zero above 1.
    g = jnp.ones_like(X)
    expected = jnp.array([0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    np.testing.assert_array_equal(_vjp(lower_leaky_hard, X, g), expected)


def test_lower_backward_negative_cotangent_leaks_below_zero():
    # g < 0: alpha * g for x <= 0 (the push that would raise a dead CI), g inside, 0 above 1.
    g = -2.0 * jnp.ones_like(X)
    a = LEAK_ALPHA
    expected = jnp.array([-2 * a, -2 * a, -2 * a, -2.0, -2.0, 0.0, 0.0])
    np.testing.assert_allclose(_vjp(lower_leaky_hard, X, g), expected, rtol=SINGLE_OP_RTOL)


def test_lower_edge_x_equals_one_passes_gradient():
    assert float(_vjp(lower_leaky_hard, jnp.array(1.0), jnp.array(3.0))) == 3.0


def test_upper_forward_and_grad():
    y = upper_leaky_hard(X)
    expected = jnp.array([0.0, 0.0, 0.0, 0.3, 1.0, 1 + LEAK_ALPHA * 0.5, 1 + LEAK_ALPHA * 2.0])
    np.testing.assert_allclose(y, expected, rtol=SINGLE_OP_RTOL, atol=SINGLE_OP_ATOL)
    grads = jax.vmap(jax.grad(upper_leaky_hard))(X)
    # Ordinary autodiff: 0 below 0, 1 inside, alpha above 1.
    np.testing.assert_allclose(
        np.asarray(grads)[[0, 1, 3, 5, 6]], [0, 0, 1, LEAK_ALPHA, LEAK_ALPHA], rtol=SINGLE_OP_RTOL
    )
