"""Adversarial mask sources: the persistent PGD adversary (PPGD) and the fresh PGD probe (SPEC §5).

PPGD sources live in the train state as `{site: raw[*scope, C(+1)]}` plus optimizer moments. Each
step: `n_warmup` detached ascents (all sites live, routed everywhere), then the main loss reads
`sg[effective(raw)]`; the last ascent's gradient comes from the main backward (coefficient divided
out) and is applied after it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array

from param_decomp_config.losses import PersistentPGDReconLoss, PGDReconLoss, ScopeConfig
from param_decomp_jax.core.schedules import make_schedule

SourceDict = dict[str, Array]


# ---- shapes ------------------------------------------------------------------------------------
def ppgd_scope_shape(scope: ScopeConfig, leading_shape: tuple[int, ...]) -> tuple[int, ...]:
    """c=(1,1), sc=(1,T), nsc=(n,T), bsc=(B,T); positionless toys drop T (sc == c)."""
    batch, rest = leading_shape[0], leading_shape[1:]
    ones = (1,) * len(rest)
    if scope.type == "c":
        return (1, *ones)
    if scope.type == "sc":
        return (1, *rest)
    if scope.type == "nsc":
        assert scope.n is not None
        if batch % scope.n:
            raise ValueError(f"scope.n={scope.n} does not divide the batch size {batch}")
        return (scope.n, *rest)
    return (batch, *rest)


def pgd_scope_shape(scope: str, leading_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Fresh PGD: c = one vector, bc = per batch element, bsc = per batch element and position."""
    if scope == "c":
        return (1,) * len(leading_shape)
    if scope == "bc":
        return (leading_shape[0],) + (1,) * (len(leading_shape) - 1)
    return tuple(leading_shape)


def broadcast_sources(src: Array, leading_shape: tuple[int, ...]) -> Array:
    """Expand `[*scope, Cp]` to `[*leading, Cp]`; n groups cover contiguous blocks of the batch."""
    n = src.shape[0]
    if n not in (1, leading_shape[0]):
        src = jnp.repeat(src, leading_shape[0] // n, axis=0)
    return jnp.broadcast_to(src, (*leading_shape, src.shape[-1]))


# ---- persistent adversary ----------------------------------------------------------------------
def effective_sources(raw: SourceDict, parameterisation: str) -> SourceDict:
    if parameterisation == "sigmoid":
        return {k: jax.nn.sigmoid(v) for k, v in raw.items()}
    return raw


def source_transform(term: PersistentPGDReconLoss) -> optax.GradientTransformation:
    """The ascent DIRECTION (lr applied separately so the schedule steps once per training step)."""
    if term.optimizer.type == "sign":
        return optax.scale_by_sign()
    o = term.optimizer
    return optax.scale_by_adam(b1=o.beta1, b2=o.beta2, eps=o.eps)


def init_ppgd_state(
    key: Array, term: PersistentPGDReconLoss, channels: Mapping[str, int], leading_shape: tuple[int, ...]
) -> dict:
    shape = ppgd_scope_shape(term.scope, leading_shape)
    sources = {}
    for (name, cp), k in zip(channels.items(), jax.random.split(key, len(channels)), strict=True):
        if term.parameterisation == "sigmoid":
            sources[name] = jax.random.normal(k, (*shape, cp), jnp.float32)
        else:
            sources[name] = jax.random.uniform(k, (*shape, cp), jnp.float32)
    return {"sources": sources, "opt_state": source_transform(term).init(sources)}


def ppgd_lr(term: PersistentPGDReconLoss, step: Array, total_steps: int) -> Array:
    return make_schedule(term.optimizer.schedule, term.optimizer.lr, total_steps)(step)


def ppgd_ascend(term: PersistentPGDReconLoss, adv: dict, grads: SourceDict, lr: Array, active: Array) -> dict:
    """One ascent on the term's loss; projected to [0,1] under clamp. No-op where `active` is False."""
    tx = source_transform(term)
    direction, new_opt = tx.update(grads, adv["opt_state"], adv["sources"])
    new_sources = {}
    for name, raw in adv["sources"].items():
        stepped = raw + lr * direction[name]
        if term.parameterisation == "clamp":
            stepped = jnp.clip(stepped, 0.0, 1.0)
        new_sources[name] = jnp.where(active, stepped, raw)
    new_opt = jax.tree.map(lambda new, old: jnp.where(active, new, old), new_opt, adv["opt_state"])
    return {"sources": new_sources, "opt_state": new_opt}


def ppgd_warmup(
    term: PersistentPGDReconLoss,
    adv: dict,
    warmup_loss: Callable[[SourceDict], Array],
    lr: Array,
    active: Array,
) -> tuple[dict, Array]:
    """`n_warmup` detached ascents; `warmup_loss(effective_sources)` routes all sites everywhere."""

    def loss_of_raw(raw: SourceDict) -> Array:
        return warmup_loss(effective_sources(raw, term.parameterisation))

    def ascent(_i: Array, carry: tuple[dict, Array]) -> tuple[dict, Array]:
        adv, _ = carry
        loss, grads = jax.value_and_grad(loss_of_raw)(adv["sources"])
        return ppgd_ascend(term, adv, grads, lr, active), loss

    # A loop, not an unrolled Python for: one traced forward/backward whatever n_warmup is,
    # which keeps compile time flat for large models.
    return jax.lax.fori_loop(0, term.n_warmup, ascent, (adv, jnp.zeros((), jnp.float32)))


# ---- fresh PGD ---------------------------------------------------------------------------------
def init_pgd_sources(
    key: Array, term: PGDReconLoss, channels: Mapping[str, int], leading_shape: tuple[int, ...]
) -> SourceDict:
    shape = pgd_scope_shape(term.scope, leading_shape)
    out = {}
    for (name, cp), k in zip(channels.items(), jax.random.split(key, len(channels)), strict=True):
        if term.init == "random":
            out[name] = jax.random.uniform(k, (*shape, cp), jnp.float32)
        else:
            out[name] = jnp.full((*shape, cp), 1.0 if term.init == "ones" else 0.0, jnp.float32)
    return out


def pgd_attack(
    sources: SourceDict, loss_of_sources: Callable[[SourceDict], Array], n_steps: int, step_size: float
) -> SourceDict:
    """`n_steps` sign ascents of `step_size`, projected to [0, 1]."""

    def ascent(_i: Array, sources: SourceDict) -> SourceDict:
        grads = jax.grad(loss_of_sources)(sources)
        return {k: jnp.clip(v + step_size * jnp.sign(grads[k]), 0.0, 1.0) for k, v in sources.items()}

    return jax.lax.fori_loop(0, n_steps, ascent, dict(sources))
