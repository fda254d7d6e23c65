"""Reconstruction terms as static plans × routing samplers × mask sources (SPEC §4).

A plan is a tuple of live-site tuples fixed at trace time; each entry draws a statically sized
family of routings per step, and every draw is one masked forward. A term is the mean over all
forwards of all its entries.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from param_decomp_config.losses import (
    AllRouting,
    AllSitesPlan,
    ChunksPlan,
    PerSitePlan,
    RoutingConfig,
    StaticProbRouting,
    SubsetsPlan,
    UniformKRouting,
)
from param_decomp_jax.core.model import Components, DecomposedModel, PyTree

Plan = tuple[tuple[str, ...], ...]


def resolve_plan(
    plan: AllSitesPlan | PerSitePlan | ChunksPlan | SubsetsPlan, site_names: Sequence[str]
) -> Plan:
    names = tuple(site_names)
    if isinstance(plan, AllSitesPlan):
        return (names,)
    if isinstance(plan, PerSitePlan):
        return tuple((n,) for n in names)
    if isinstance(plan, ChunksPlan):
        if len(names) % plan.k:
            raise ValueError(f"plan.k={plan.k} does not divide {len(names)} sites")
        return tuple(names[i : i + plan.k] for i in range(0, len(names), plan.k))
    # Custom subsets keep canonical order inside each subset.
    return tuple(tuple(n for n in names if n in set(subset)) for subset in plan.subsets)


def sample_routes(
    key: Array, routing: RoutingConfig, live: Sequence[str], leading_shape: tuple[int, ...]
) -> dict[str, Bool[Array, "*leading"]] | None:
    """Per position, which live sites take the decomposed path; None means everywhere."""
    if isinstance(routing, AllRouting):
        return None
    n_live = len(live)
    if isinstance(routing, StaticProbRouting):
        draws = jax.random.bernoulli(key, routing.p, (*leading_shape, n_live))
    else:
        assert isinstance(routing, UniformKRouting)
        k_key, perm_key = jax.random.split(key)
        k = jax.random.randint(k_key, (*leading_shape, 1), 1, n_live + 1)
        # The ranks of i.i.d. uniforms are a uniform permutation; the first k form a uniform k-subset.
        noise = jax.random.uniform(perm_key, (*leading_shape, n_live))
        ranks = jnp.argsort(jnp.argsort(noise, axis=-1), axis=-1)
        draws = ranks < k
    return {name: draws[..., i] for i, name in enumerate(live)}


def stochastic_sources(
    key: Array,
    sampling: str,
    live: Sequence[str],
    channels: Mapping[str, int],
    leading_shape: tuple[int, ...],
) -> dict[str, Float[Array, "*leading Cp"]]:
    """Fresh sources per live site, independent across sites, positions and draws."""
    keys = jax.random.split(key, len(live))
    out = {}
    for name, k in zip(live, keys, strict=True):
        shape = (*leading_shape, channels[name])
        if sampling == "binomial":
            out[name] = jax.random.bernoulli(k, 0.5, shape).astype(jnp.float32)
        else:
            out[name] = jax.random.uniform(k, shape, jnp.float32)
    return out


def masks_from_sources(
    ci_lower: Mapping[str, Array], sources: Mapping[str, Array], live: Sequence[str], use_delta: bool
) -> tuple[dict[str, Array], dict[str, Array] | None]:
    """mask = ci + (1 − ci)·source on component channels; the delta channel takes the raw source."""
    masks, deltas = {}, {}
    for name in live:
        ci = ci_lower[name]
        C = ci.shape[-1]
        src = sources[name]
        masks[name] = ci + (1.0 - ci) * src[..., :C]
        if use_delta:
            deltas[name] = src[..., C]
    return masks, (deltas if use_delta else None)


def masked_recon(
    model: DecomposedModel,
    frozen: PyTree,
    components: Components,
    residual: Array,
    clean: Array,
    masks: Mapping[str, Array],
    deltas: Mapping[str, Array] | None,
    routes: Mapping[str, Array] | None,
    live: Sequence[str],
) -> Array:
    out = model.masked_output(frozen, components, residual, masks, deltas, routes, live)
    return model.recon_loss(out, clean)


SourceFn = Callable[[Array, tuple[str, ...]], dict[str, Array]]


def plan_recon_loss(
    key: Array,
    model: DecomposedModel,
    frozen: PyTree,
    components: Components,
    residual: Array,
    clean: Array,
    ci_lower: Mapping[str, Array],
    plan: Plan,
    routing: RoutingConfig,
    n_draws: int,
    source_fn: SourceFn,
    use_delta: bool,
    fixed_routes: Sequence[Mapping[str, Array] | None] | None = None,
) -> Array:
    """Mean recon loss over every (plan entry, draw) forward; `source_fn(key, live)` gives sources.

    `fixed_routes` (one per plan entry, n_draws = 1) replaces the routing draw: fresh PGD shares
    the routing of its ascents with its loss forward.
    """
    leading_shape = next(iter(ci_lower.values())).shape[:-1]
    losses = []
    entry_keys = jax.random.split(key, len(plan))
    for i, (live, entry_key) in enumerate(zip(plan, entry_keys, strict=True)):
        for draw_key in jax.random.split(entry_key, n_draws):
            route_key, src_key = jax.random.split(draw_key)
            if fixed_routes is not None:
                routes = fixed_routes[i]
            else:
                routes = sample_routes(route_key, routing, live, leading_shape)
            sources = source_fn(src_key, live)
            masks, deltas = masks_from_sources(ci_lower, sources, live, use_delta)
            losses.append(
                masked_recon(model, frozen, components, residual, clean, masks, deltas, routes, live)
            )
    return jnp.mean(jnp.stack(losses))


def constant_source_fn(value: float, ci_lower: Mapping[str, Array]) -> SourceFn:
    """Sources fixed at 0 (CI-masked) or 1 (unmasked), no delta channel."""

    def fn(_key: Array, live: tuple[str, ...]) -> dict[str, Array]:
        return {n: jnp.full_like(ci_lower[n], value) for n in live}

    return fn


def channel_counts(model: DecomposedModel, use_delta: bool) -> dict[str, int]:
    return {s.name: s.C + int(use_delta) for s in model.sites}
