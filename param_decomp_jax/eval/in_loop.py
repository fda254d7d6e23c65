"""In-loop evaluation: recon (and next-token CE for LMs) under fixed mask families, CI sparsity per
site and per configured group, alive components. `make_eval_step` returns one pure function that
the trainer jits once; slow eval reuses it batch by batch.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from param_decomp_config.runtime import EvalConfig
from param_decomp_jax.core import adversary as adv_lib
from param_decomp_jax.core.ci_fn import CIFn, ci_logits
from param_decomp_jax.core.model import Components, DecomposedModel, PyTree
from param_decomp_jax.core.recon import channel_counts, masks_from_sources, stochastic_sources
from param_decomp_jax.core.squash import lower_leaky_hard
from param_decomp_jax.targets.lm_loss import next_token_ce

# The mask families every eval reports, in the order they are computed.
MASK_KINDS = ("unmasked", "ci_masked", "rounded_ci", "zero_masked", "stochastic", "pgd")


def make_ci_of_residual(
    model: DecomposedModel, ci_fn: CIFn
) -> Callable[[PyTree, PyTree, Array], dict[str, Array]]:
    """`ci(ci_params, frozen, residual) -> {site: ci_lower [*leading, C]}`."""

    def ci(ci_params: PyTree, frozen: PyTree, residual: Array, components: PyTree = None) -> dict[str, Array]:
        # `components` is needed only by CI networks that read component activations (x @ V).
        logits = ci_logits(ci_fn, ci_params, model.site_inputs(frozen, residual), components)
        return {k: lower_leaky_hard(v) for k, v in logits.items()}

    return ci


def resolve_ci_l0_groups(
    groups: Mapping[str, Sequence[str]], site_names: Sequence[str]
) -> dict[str, tuple[str, ...]]:
    """Group name -> its sites (canonical order); a pattern that matches no site is an error."""
    out: dict[str, tuple[str, ...]] = {}
    for group, patterns in groups.items():
        chosen: set[str] = set()
        for pattern in patterns:
            hits = fnmatch.filter(site_names, pattern)
            if not hits:
                raise ValueError(
                    f"eval.ci_l0_groups.{group}: pattern {pattern!r} matches no site of {list(site_names)}"
                )
            chosen.update(hits)
        out[group] = tuple(n for n in site_names if n in chosen)
    return out


def eval_masks(
    ci: Mapping[str, Array],
    key: Array,
    names: Sequence[str],
    channels: Mapping[str, int],
    use_delta: bool,
    rounding_threshold: float,
) -> dict[str, tuple[dict[str, Array], dict[str, Array] | None]]:
    """(masks, delta masks) per deterministic/stochastic family; fresh PGD needs the forward, so it
    is built by the caller."""
    leading = next(iter(ci.values())).shape[:-1]
    src = stochastic_sources(key, "continuous", names, channels, leading)
    return {
        "unmasked": ({n: jnp.ones_like(ci[n]) for n in names}, None),
        "ci_masked": ({n: ci[n] for n in names}, None),
        "rounded_ci": ({n: (ci[n] > rounding_threshold).astype(ci[n].dtype) for n in names}, None),
        "zero_masked": ({n: jnp.zeros_like(ci[n]) for n in names}, None),
        "stochastic": masks_from_sources(ci, src, names, use_delta),
    }


def make_eval_step(model: DecomposedModel, ci_fn: CIFn, use_delta: bool, cfg: EvalConfig):
    """`eval_step(components, ci_params, frozen, residual, key, tokens=None) -> metrics` (`eval/...`).

    `tokens` ([B, T] ids of the batch the residual came from) adds the next-token CE of the clean
    and of every masked output (`eval/ce/<mask>`); toys pass nothing. The function is pure: the
    caller jits it once (passing tokens or not is fixed per run, so it never retraces).
    """
    names = model.site_names
    channels = channel_counts(model, use_delta)
    groups = resolve_ci_l0_groups(cfg.ci_l0_groups, names)
    # For LMs the recon loss IS the KL to the clean next-token distribution; also log it under
    # the name the architecture doc promises (`eval/kl/<mask>`).
    kl_alias = "sequence" in model.leading_axes

    def eval_step(
        components: Components,
        ci_params: PyTree,
        frozen: PyTree,
        residual: Array,
        key: Array,
        tokens: Int[Array, "B T"] | None = None,
    ) -> dict[str, Array]:
        clean, inputs = model.clean_output_and_site_inputs(frozen, residual)
        ci = {k: lower_leaky_hard(v) for k, v in ci_logits(ci_fn, ci_params, inputs, components).items()}
        leading = next(iter(ci.values())).shape[:-1]
        m: dict[str, Array] = {}

        def forward(masks: dict[str, Array], deltas: dict[str, Array] | None) -> Array:
            return model.masked_output(frozen, components, residual, masks, deltas, None, names)

        def record(kind: str, out: Array) -> None:
            m[f"eval/recon/{kind}"] = model.recon_loss(out, clean)
            if kl_alias:
                m[f"eval/kl/{kind}"] = m[f"eval/recon/{kind}"]
            if tokens is not None:
                m[f"eval/ce/{kind}"] = next_token_ce(out, tokens)

        stoch_key, pgd_key = jax.random.split(key)
        for kind, (masks, deltas) in eval_masks(
            ci, stoch_key, names, channels, use_delta, cfg.rounding_threshold
        ).items():
            record(kind, forward(masks, deltas))
        if cfg.pgd_steps > 0:
            shape = adv_lib.pgd_scope_shape("bsc", leading)
            init = {
                n: jax.random.uniform(k, (*shape, channels[n]))
                for n, k in zip(names, jax.random.split(pgd_key, len(names)), strict=True)
            }

            def objective(s: dict[str, Array]) -> Array:
                return model.recon_loss(forward(*masks_from_sources(ci, s, names, use_delta)), clean)

            adv = adv_lib.pgd_attack(init, objective, cfg.pgd_steps, cfg.pgd_step_size)
            record("pgd", forward(*masks_from_sources(ci, adv, names, use_delta)))
        if tokens is not None:
            m["eval/ce/clean"] = next_token_ce(clean, tokens)
        l0: dict[str, Array] = {}
        for n in names:
            flat = ci[n].reshape(-1, ci[n].shape[-1])
            l0[n] = jnp.mean(jnp.sum(flat > 0.0, axis=-1).astype(jnp.float32))
            m[f"eval/ci_l0/{n}"] = l0[n]
            # Alive: CI above threshold at ANY position of the eval batch.
            m[f"eval/alive/{n}"] = jnp.sum(jnp.max(flat, axis=0) > cfg.ci_alive_threshold)
        m["eval/ci_l0/total"] = jnp.sum(jnp.stack(list(l0.values())))
        m["eval/alive/total"] = jnp.sum(jnp.stack([m[f"eval/alive/{n}"] for n in names]))
        for group, members in groups.items():
            m[f"eval/ci_l0_group/{group}"] = jnp.sum(jnp.stack([l0[n] for n in members]))
        return m

    return eval_step
