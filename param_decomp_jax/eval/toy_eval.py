"""End-of-run diagnostics for toy targets: CI on one-feature probes, identity and dense CI stats."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from param_decomp_jax.eval.in_loop import make_ci_of_residual
from param_decomp_jax.eval.toy_metrics import (
    dense_block_sizes,
    dense_ci_error,
    dense_ci_stats,
    identity_ci_error,
    probe_inputs,
)


def probe_ci(exp: Any, ci_params: Any, components: Any = None) -> dict[str, np.ndarray]:
    """CI (lower) of every site on the F one-feature probes at `eval.probe_value`: {site: [F, C]}."""
    n_features = exp.cfg.target.n_features
    ci_fn = jax.jit(make_ci_of_residual(exp.model, exp.ci_fn))
    probes = jnp.asarray(probe_inputs(n_features, exp.cfg.eval.probe_value))
    ci = ci_fn(ci_params, exp.frozen, exp.residual_fn(exp.frozen, probes), components)
    return {k: np.asarray(v) for k, v in ci.items()}


def toy_probe_metrics(exp: Any, ci_params: Any, threshold: float, components: Any = None) -> dict[str, float]:
    """`probe_metrics` of the probe CI of this state (see there)."""
    return probe_metrics(probe_ci(exp, ci_params, components), threshold, exp.cfg.eval.dense_ci_blocks)


def probe_metrics(
    cis: Mapping[str, np.ndarray], threshold: float, dense_ci_blocks: Mapping[str, int]
) -> dict[str, float]:
    """Per site: identity-CI error, probe alive/active/dense counts, and for the sites named in
    `eval.dense_ci_blocks` the dense-CI error against a block of that size (the first pattern that
    matches a site gives its k)."""
    out: dict[str, float] = {}
    blocks = dense_block_sizes(dense_ci_blocks, list(cis))
    for site, ci in cis.items():
        out[f"eval/identity_ci_error/{site}"] = float(identity_ci_error(ci, threshold))
        if site in blocks:
            out[f"eval/dense_ci_error/{site}"] = dense_ci_error(ci, blocks[site], threshold)
        stats = dense_ci_stats(ci, threshold)
        for k, v in stats.items():
            out[f"eval/probe_{k}/{site}"] = float(v)
    return out
