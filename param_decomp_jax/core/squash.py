"""The leaky-hard squashing pair applied to the SAME CI logits (SPEC §3).

`lower_leaky_hard` feeds every mask: forward clamp(x, 0, 1); its custom backward keeps components
from dying (a small pull up from below, none from above). `upper_leaky_hard` feeds only
importance-minimality: it keeps a gradient above 1 so the penalty still acts there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array

LEAK_ALPHA = 0.01


@jax.custom_vjp
def lower_leaky_hard(x: Array) -> Array:
    return jnp.clip(x, 0.0, 1.0)


def _lower_fwd(x: Array) -> tuple[Array, Array]:
    return jnp.clip(x, 0.0, 1.0), x


def _lower_bwd(x: Array, g: Array) -> tuple[Array]:
    inside = (x > 0.0) & (x <= 1.0)
    # Below 0 only a descent direction that would raise x (g < 0) leaks through, scaled by alpha.
    below = (x <= 0.0) & (g < 0.0)
    grad = jnp.where(inside, g, jnp.where(below, LEAK_ALPHA * g, jnp.zeros_like(g)))
    return (grad,)


lower_leaky_hard.defvjp(_lower_fwd, _lower_bwd)


def upper_leaky_hard(x: Array) -> Array:
    """x > 1: 1 + alpha (x − 1); otherwise clamp(x, 0, 1). Ordinary autodiff."""
    return jnp.where(x > 1.0, 1.0 + LEAK_ALPHA * (x - 1.0), jnp.clip(x, 0.0, 1.0))


def squash_pair(logits: dict[str, Array]) -> tuple[dict[str, Array], dict[str, Array]]:
    """(ci_lower, ci_upper) per site from one set of CI logits."""
    lower = {k: lower_leaky_hard(v) for k, v in logits.items()}
    upper = {k: upper_leaky_hard(v) for k, v in logits.items()}
    return lower, upper
