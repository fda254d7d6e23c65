"""Synthetic sparse-feature batches for the toy targets (TMS, ResidMLP), pure and jit-able."""

from __future__ import annotations

from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

Generation = Literal["at_least_zero_active", "exactly_one_active"]
# The value range of active features each toy target is trained and decomposed on. ResidMLP needs
# negative values: on [0, 1] its label act(x) + x = 2x would be a linear task.
TARGET_VALUE_RANGES: dict[str, tuple[float, float]] = {"tms": (0.0, 1.0), "resid_mlp": (-1.0, 1.0)}


def resolve_value_range(target_type: str, value_range: tuple[float, float] | None) -> tuple[float, float]:
    """The data config's explicit `value_range`, else the target's own (`TARGET_VALUE_RANGES`)."""
    if value_range is not None:
        return (float(value_range[0]), float(value_range[1]))
    if target_type not in TARGET_VALUE_RANGES:
        raise ValueError(f"no default feature value range for target type {target_type!r}")
    return TARGET_VALUE_RANGES[target_type]


@partial(jax.jit, static_argnames=("batch_size", "n_features", "generation"))
def sample_sparse_features(
    key: Array,
    batch_size: int,
    n_features: int,
    feature_probability: float | Float[Array, ""],
    generation: Generation = "at_least_zero_active",
    value_range: tuple[float, float] = (0.0, 1.0),
) -> Float[Array, "B F"]:
    """A batch of sparse feature vectors; active features take values ~ U[lo, hi), the rest 0.

    `at_least_zero_active`: every feature is active independently with `feature_probability` (rows
    may be all zero). `exactly_one_active`: one uniformly chosen feature per row
    (`feature_probability` is ignored). `feature_probability` and `value_range` may be traced (no
    recompile). Pick the range with `resolve_value_range` (TMS [0, 1], ResidMLP [-1, 1]).
    """
    lo, hi = value_range
    if generation == "at_least_zero_active":
        # ONE uniform per entry: u < p decides activity and, given that, u / p ~ U[0, 1) is
        # independent of it, so it serves as the value. Half the RNG work of two draws; threefry
        # dominates the cost of a toy pretraining step on CPU. (Values sit on a grid of
        # 2^-23 / p, e.g. ~1e-5 at p = 0.01: irrelevant for these targets.)
        u_BxF = jax.random.uniform(key, (batch_size, n_features), jnp.float32)
        frac_BxF = jnp.minimum(u_BxF / feature_probability, 1.0)  # guard p rounding
        return jnp.where(u_BxF < feature_probability, lo + (hi - lo) * frac_BxF, 0.0)
    k_on, k_val = jax.random.split(key)
    if generation == "exactly_one_active":
        idx_B = jax.random.randint(k_on, (batch_size,), 0, n_features)
        vals_B = jax.random.uniform(k_val, (batch_size,), jnp.float32, lo, hi)
        return jax.nn.one_hot(idx_B, n_features, dtype=jnp.float32) * vals_B[:, None]
    raise ValueError(f"unknown generation {generation!r}")
