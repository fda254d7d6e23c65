"""Faithfulness and importance-minimality (SPEC §4). Pure functions over per-site dicts."""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
from jaxtyping import Array, Float


def faithfulness_loss(weight_deltas: Mapping[str, Float[Array, "d_in d_out"]]) -> Float[Array, ""]:
    """Σ_s ||W_s − V_s U_s||_F² / Σ_s numel(W_s), in fp32 (SPEC F1)."""
    total = sum(jnp.sum(jnp.square(d.astype(jnp.float32))) for d in weight_deltas.values())
    numel = sum(d.size for d in weight_deltas.values())
    return jnp.asarray(total, jnp.float32) / numel


def annealed_p(
    step: Array, total_steps: int, p_start: float, p_end: float | None, start_frac: float, end_frac: float
) -> Array:
    """p moves linearly from p_start to p_end inside [start_frac, end_frac] of training (SPEC I3)."""
    if p_end is None or p_end == p_start:
        return jnp.asarray(p_start, jnp.float32)
    frac = step.astype(jnp.float32) / max(total_steps, 1)
    width = max(end_frac - start_frac, 1e-12)
    t = jnp.clip((frac - start_frac) / width, 0.0, 1.0)
    return jnp.asarray(p_start, jnp.float32) + t * (p_end - p_start)


def importance_minimality_per_site(
    ci_upper: Float[Array, "*leading C"], p: Array | float, eps: float, beta: float
) -> Float[Array, ""]:
    """L_s = Σ_c (S_c / N)(1 + beta log2(1 + S_c)), S_c = Σ_leading (ci_upper + eps)^p (SPEC I1, I2).

    `ci_upper` is the GLOBAL batch (under jit over a mesh the sum is global before the log).
    """
    ci = ci_upper.astype(jnp.float32)
    n_positions = ci.size // ci.shape[-1]
    s_c = jnp.sum((ci + eps) ** p, axis=tuple(range(ci.ndim - 1)))
    return jnp.sum((s_c / n_positions) * (1.0 + beta * jnp.log2(1.0 + s_c)))


def importance_minimality_loss(
    ci_upper: Mapping[str, Array], p: Array | float, eps: float, beta: float
) -> tuple[Array, dict[str, Array]]:
    """Σ_s L_s — never pooled across sites — and the per-site values."""
    per_site = {s: importance_minimality_per_site(v, p, eps, beta) for s, v in ci_upper.items()}
    return sum(per_site.values(), jnp.zeros((), jnp.float32)), per_site


def mse_recon_loss(masked: Array, clean: Array) -> Array:
    """Mean squared error over every element, fp32 (toy regression targets)."""
    return jnp.mean(jnp.square(masked.astype(jnp.float32) - clean.astype(jnp.float32)))
