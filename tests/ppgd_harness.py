"""Shared harness for the adversary tests: cached tiny-model trajectories and hand-written references.

Every distinct loss config costs one XLA compile (~3-4 s on the shared 2-core box), so each config
is compiled once per session (`trajectory` is cached) and several tests read the same trajectory.

The references below deliberately avoid the code under test: they call `model.masked_output`
directly, broadcast scopes with numpy-style `repeat`, and implement Adam by hand in float64.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_model import linear_ci_fn, tiny_config, tiny_model

from param_decomp_config.losses import AllRouting
from param_decomp_jax.core import recon as recon_lib
from param_decomp_jax.core import step as step_lib
from param_decomp_jax.core.model import DecomposedModel, init_components
from param_decomp_jax.core.step import LossSpec, Optimizers, init_train_state, make_train_step

B = 16  # toy batch (leading shape (B,))
LM_B, LM_T = 4, 3  # "LM" leading shape (B, T): the tiny forward is position-wise, so it runs on [B, T, d]
TOTAL_STEPS = 10


def toy_batch(i: int) -> jax.Array:
    return jax.random.uniform(jax.random.fold_in(jax.random.PRNGKey(3), i), (B, 6))


def lm_batch(i: int) -> jax.Array:
    return jax.random.uniform(jax.random.fold_in(jax.random.PRNGKey(4), i), (LM_B, LM_T, 6))


class RouteBook:
    """Replaces `sample_routes` (in recon AND step) while a step is traced.

    Non-`all` routings get a distinct Bernoulli(0.5) pattern per CALL (seeded by the call index),
    so a loss forward that drew its own routing instead of reusing the ascents' would see a
    different pattern than the one recorded here. Calls are recorded as (live, routing, routes).
    """

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[str, ...], Any, dict[str, np.ndarray] | None]] = []

    def __call__(self, key, routing, live, leading_shape):
        if isinstance(routing, AllRouting):
            self.calls.append((tuple(live), routing, None))
            return None
        rng = np.random.default_rng(1000 + len(self.calls))
        draws = rng.random((*leading_shape, len(live))) < 0.5
        routes = {n: np.ascontiguousarray(draws[..., i]) for i, n in enumerate(live)}
        self.calls.append((tuple(live), routing, routes))  # numpy: no tracer leaks out of the trace
        return {n: jnp.asarray(r) for n, r in routes.items()}

    def routed(self) -> list[tuple[tuple[str, ...], dict[str, jax.Array]]]:
        return [
            (live, {n: jnp.asarray(v) for n, v in r.items()}) for live, _, r in self.calls if r is not None
        ]


@dataclass
class Run:
    model: DecomposedModel
    frozen: dict
    ci_fn: Any
    spec: LossSpec
    opt: Optimizers
    step: Any  # the jitted step (compiled once)
    batches: list[jax.Array]
    states: list[dict] = field(default_factory=list)  # states[k] is the state BEFORE step k
    metrics: list[dict] = field(default_factory=list)  # metrics[k] come from step k
    book: RouteBook | None = None


def build(losses: list[dict], *, lm: bool = False, **overrides) -> Run:
    cfg = tiny_config(losses, steps=TOTAL_STEPS, batch_size=LM_B if lm else B, **overrides)
    model, frozen = tiny_model()
    if lm:
        model = replace(model, leading_axes=("batch", "sequence"))
    ci_fn, ci_params = linear_ci_fn()
    spec, opt = LossSpec.from_config(cfg), Optimizers.from_config(cfg)
    leading = (LM_B, LM_T) if lm else (B,)
    comps = init_components(model, jax.random.PRNGKey(1))
    state = init_train_state(jax.random.PRNGKey(0), model, comps, ci_params, opt, spec, leading)
    run = Run(model, frozen, ci_fn, spec, opt, jax.jit(make_train_step(model, ci_fn, spec, opt)), [])
    run.states.append(state)
    return run


def advance(run: Run, n: int, *, lm: bool = False) -> Run:
    """Run the jitted step until `n` steps exist (batch k is `toy_batch(k)` / `lm_batch(k)`)."""
    while len(run.metrics) < n:
        k = len(run.metrics)
        x = lm_batch(k) if lm else toy_batch(k)
        state, metrics = run.step(run.states[-1], run.frozen, x)
        run.batches.append(x)
        run.states.append(state)
        run.metrics.append(metrics)
    return run


_RUNS: dict[tuple, Run] = {}


def trajectory(
    losses: list[dict], n: int, *, lm: bool = False, patch_routes: bool = False, **overrides
) -> Run:
    """At least `n` steps of one config, cached per config (one compile) and extended on demand.

    With `patch_routes` a `RouteBook` replaces the routing sampler while the step is traced.
    """
    key = (json.dumps(losses, sort_keys=True), lm, patch_routes, json.dumps(overrides, sort_keys=True))
    if key not in _RUNS:
        _RUNS[key] = build(losses, lm=lm, **overrides)
    run = _RUNS[key]
    if not patch_routes:
        return advance(run, n, lm=lm)
    run.book = run.book or RouteBook()
    with pytest.MonkeyPatch.context() as mp:  # active while the step is traced (first call)
        mp.setattr(recon_lib, "sample_routes", run.book)
        mp.setattr(step_lib, "sample_routes", run.book)
        return advance(run, n, lm=lm)


# ---- hand-written references -------------------------------------------------------------------
def expand(src: jax.Array, leading: tuple[int, ...]) -> jax.Array:
    """`[*scope, Cp] -> [*leading, Cp]`; n groups own CONTIGUOUS batch blocks (SPEC P1)."""
    n = src.shape[0]
    if n not in (1, leading[0]):
        per = leading[0] // n
        src = jnp.stack([src[i // per] for i in range(leading[0])])
    return jnp.broadcast_to(src, (*leading, src.shape[-1]))


def hand_ci_lower(run: Run, ci_params: dict, x: jax.Array) -> dict[str, jax.Array]:
    logits = run.ci_fn.apply(ci_params, run.model.site_inputs(run.frozen, x))
    return {k: jnp.clip(v, 0.0, 1.0) for k, v in logits.items()}


def hand_loss(
    run: Run,
    components: dict,
    ci_lower: dict[str, jax.Array],
    sources: dict[str, jax.Array],
    x: jax.Array,
    live: tuple[str, ...],
    routes: dict[str, jax.Array] | None = None,
) -> jax.Array:
    """MSE of one masked forward: mask = ci + (1-ci)·src[..., :C], delta mask = src[..., C]."""
    leading = x.shape[:-1]
    masks, deltas = {}, {}
    for n in live:
        s = expand(sources[n], leading)
        ci = ci_lower[n]
        masks[n] = ci + (1.0 - ci) * s[..., : ci.shape[-1]]
        deltas[n] = s[..., ci.shape[-1]]
    out = run.model.masked_output(run.frozen, components, x, masks, deltas, routes, live)
    clean = run.model.clean_output(run.frozen, x)
    return jnp.mean(jnp.square(out - clean))


def all_sites_loss(run: Run, components, ci_lower, x):
    names = run.model.site_names
    return lambda src: hand_loss(run, components, ci_lower, src, x, names)


class HandAdam:
    """Bias-corrected Adam ascent in float64 (independent of optax), optional [0,1] projection."""

    def __init__(self, sources: dict, b1=0.5, b2=0.99, eps=1e-8, clamp=True):
        self.s = {k: np.asarray(v, np.float64) for k, v in sources.items()}
        self.m = {k: np.zeros_like(v) for k, v in self.s.items()}
        self.v = {k: np.zeros_like(v) for k, v in self.s.items()}
        self.t, self.b1, self.b2, self.eps, self.clamp = 0, b1, b2, eps, clamp

    def ascend(self, grads: dict, lr: float) -> None:
        self.t += 1
        for k in self.s:
            g = np.asarray(grads[k], np.float64)
            self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * g
            self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * g * g
            mh, vh = self.m[k] / (1 - self.b1**self.t), self.v[k] / (1 - self.b2**self.t)
            self.s[k] = self.s[k] + lr * mh / (np.sqrt(vh) + self.eps)
            if self.clamp:
                self.s[k] = np.clip(self.s[k], 0.0, 1.0)

    def sources32(self) -> dict[str, jax.Array]:
        return {k: jnp.asarray(v, jnp.float32) for k, v in self.s.items()}


def max_abs_diff(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)))) for k in a)
