"""In-loop evaluation: recon under fixed mask families, CI sparsity, alive components (jit once)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array

from param_decomp_config.runtime import EvalConfig
from param_decomp_jax.core import adversary as adv_lib
from param_decomp_jax.core.ci_fn import CIFn
from param_decomp_jax.core.model import Components, DecomposedModel, PyTree
from param_decomp_jax.core.recon import channel_counts, masks_from_sources, stochastic_sources
from param_decomp_jax.core.squash import lower_leaky_hard


def make_ci_of_residual(model: DecomposedModel, ci_fn: CIFn) -> Callable[[PyTree, PyTree, Array], dict[str, Array]]:
    """`ci(ci_params, frozen, residual) -> {site: ci_lower [*leading, C]}`."""

    def ci(ci_params: PyTree, frozen: PyTree, residual: Array) -> dict[str, Array]:
        logits = ci_fn.apply(ci_params, model.site_inputs(frozen, residual))
        return {k: lower_leaky_hard(v) for k, v in logits.items()}

    return ci


def make_eval_step(model: DecomposedModel, ci_fn: CIFn, use_delta: bool, cfg: EvalConfig):
    """`eval_step(components, ci_params, frozen, residual, key) -> metrics` (all `eval/...`)."""
    names = model.site_names
    channels = channel_counts(model, use_delta)

    def eval_step(components: Components, ci_params: PyTree, frozen: PyTree, residual: Array, key: Array):
        clean, inputs = model.clean_output_and_site_inputs(frozen, residual)
        ci = {k: lower_leaky_hard(v) for k, v in ci_fn.apply(ci_params, inputs).items()}
        leading = next(iter(ci.values())).shape[:-1]

        def recon(masks: dict[str, Array], deltas: dict[str, Array] | None = None) -> Array:
            out = model.masked_output(frozen, components, residual, masks, deltas, None, names)
            return model.recon_loss(out, clean)

        m: dict[str, Array] = {}
        m["eval/recon/unmasked"] = recon({n: jnp.ones_like(ci[n]) for n in names})
        m["eval/recon/ci_masked"] = recon(ci)
        m["eval/recon/rounded_ci"] = recon({n: (ci[n] > cfg.rounding_threshold).astype(ci[n].dtype) for n in names})
        m["eval/recon/zero_masked"] = recon({n: jnp.zeros_like(ci[n]) for n in names})
        stoch_key, pgd_key = jax.random.split(key)
        src = stochastic_sources(stoch_key, "continuous", names, channels, leading)
        m["eval/recon/stochastic"] = recon(*masks_from_sources(ci, src, names, use_delta))
        if cfg.pgd_steps > 0:
            shape = adv_lib.pgd_scope_shape("bsc", leading)
            init = {n: jax.random.uniform(k, (*shape, channels[n]))
                    for n, k in zip(names, jax.random.split(pgd_key, len(names)), strict=True)}

            def objective(s: dict[str, Array]) -> Array:
                return recon(*masks_from_sources(ci, s, names, use_delta))

            adv = adv_lib.pgd_attack(init, objective, cfg.pgd_steps, cfg.pgd_step_size)
            m["eval/recon/pgd"] = objective(adv)
        for n in names:
            flat = ci[n].reshape(-1, ci[n].shape[-1])
            m[f"eval/ci_l0/{n}"] = jnp.mean(jnp.sum(flat > 0.0, axis=-1).astype(jnp.float32))
            m[f"eval/alive/{n}"] = jnp.sum(jnp.max(flat, axis=0) > cfg.ci_alive_threshold)
        m["eval/ci_l0/total"] = sum(m[f"eval/ci_l0/{n}"] for n in names)
        return m

    return eval_step
