"""Decomposed site output: masked components, optional delta channel, and routing."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, jaxtyped

from param_decomp_jax.core.typecheck import typechecker


@jaxtyped(typechecker=typechecker)
def decomposed_site_output(
    x: Float[Array, "*leading d_in"],
    w: Float[Array, "d_in d_out"],
    v: Float[Array, "d_in C"],
    u: Float[Array, "C d_out"],
    mask: Float[Array, "*leading C"],
    delta_mask: Float[Array, "*leading"] | None = None,
    route: Bool[Array, "*leading"] | None = None,
) -> Float[Array, "*leading d_out"]:
    """`((x V) * mask) U + (x (W − V U)) * delta_mask`, where `route`; `x W` elsewhere.

    The delta term is present only when `delta_mask` is given. Compute runs in `x.dtype`.
    """
    dt = x.dtype
    inner = (x @ v.astype(dt)) * mask.astype(dt)
    y_dec = inner @ u.astype(dt)
    if delta_mask is not None:
        w_delta = (w.astype(jnp.float32) - v @ u).astype(dt)
        y_dec = y_dec + (x @ w_delta) * delta_mask.astype(dt)[..., None]
    if route is None:
        return y_dec
    y_frozen = x @ w.astype(dt)
    return jnp.where(route[..., None], y_dec, y_frozen)
