"""SPEC T1 (one compile), T2 (warmup discards its optimizer), M3 (frozen non-live sites), L1."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tiny_model import linear_ci_fn, tiny_config, tiny_model

from param_decomp_jax.core.losses import faithfulness_loss
from param_decomp_jax.core.model import init_components
from param_decomp_jax.core.step import (
    LossSpec,
    Optimizers,
    init_train_state,
    make_faithfulness_warmup,
    make_train_step,
)

X = jax.random.uniform(jax.random.PRNGKey(3), (16, 6))


def _setup(losses=None, **kw):
    cfg = tiny_config(losses, **kw)
    model, frozen = tiny_model()
    ci_fn, ci_params = linear_ci_fn()
    spec, opt = LossSpec.from_config(cfg), Optimizers.from_config(cfg)
    state = init_train_state(
        jax.random.PRNGKey(0),
        model,
        init_components(model, jax.random.PRNGKey(1)),
        ci_params,
        opt,
        spec,
        (16,),
    )
    return model, frozen, ci_fn, spec, opt, state


def test_step_compiles_once_across_steps():
    model, frozen, ci_fn, spec, opt, state = _setup()
    traces = []
    inner = make_train_step(model, ci_fn, spec, opt)

    def counted(state, frozen, residual):
        traces.append(1)
        return inner(state, frozen, residual)

    step = jax.jit(counted, donate_argnums=(0,))
    for i in range(4):
        state, metrics = step(state, frozen, X + i)
    jax.block_until_ready(metrics)
    assert len(traces) == 1
    assert int(state["step"]) == 4


def test_non_live_sites_get_zero_component_grads():
    model, frozen = tiny_model()
    comps = init_components(model, jax.random.PRNGKey(1))
    clean = model.clean_output(frozen, X)

    def loss(c):
        masks = {"a": jnp.full((16, 5), 0.7)}
        out = model.masked_output(frozen, c, X, masks, {"a": jnp.ones(16)}, None, ["a"])
        return model.recon_loss(out, clean)

    grads = jax.grad(loss)(comps)
    assert float(jnp.abs(grads["b"]["V"]).max()) == 0.0 and float(jnp.abs(grads["b"]["U"]).max()) == 0.0
    assert float(jnp.abs(grads["a"]["V"]).max()) > 0.0


def test_total_is_the_weighted_sum_of_terms():
    losses = [
        {"type": "faithfulness", "coeff": 2.0},
        {"type": "importance_minimality", "coeff": 0.1, "p_start": 1.0},
        {"type": "stochastic_recon", "coeff": 0.5},
        {"type": "ci_masked_recon", "coeff": 3.0},
        {"type": "unmasked_recon", "coeff": 0.25},
    ]
    model, frozen, ci_fn, spec, opt, state = _setup(losses)
    _, m = jax.jit(make_train_step(model, ci_fn, spec, opt))(state, frozen, X)
    expected = (
        2.0 * m["loss/faithfulness"]
        + 0.1 * m["loss/importance_minimality"]
        + 0.5 * m["loss/stochastic_recon"]
        + 3.0 * m["loss/ci_masked_recon"]
        + 0.25 * m["loss/unmasked_recon"]
    )
    np.testing.assert_allclose(m["loss/total"], expected, rtol=1e-6)


def test_faithfulness_warmup_reduces_faithfulness_and_leaves_optimizers_fresh():
    model, frozen, ci_fn, spec, opt, state = _setup()
    before = float(faithfulness_loss(model.weight_deltas(frozen, state["components"])))
    comps, after = jax.jit(make_faithfulness_warmup(model, 50, 0.01))(state["components"], frozen)
    assert float(after) < 0.5 * before
    # The warmup returns components only: its AdamW state cannot leak into training; the training
    # optimizer built for those components starts at count 0 with zero moments.
    fresh = opt.components.init(comps)
    counts = [x for x in jax.tree.leaves(fresh) if x.dtype == jnp.int32]
    assert all(int(c) == 0 for c in counts)
    mu = [
        s.mu
        for s in jax.tree.leaves(fresh, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)
    ][0]
    assert all(float(jnp.abs(v).max()) == 0.0 for v in jax.tree.leaves(mu))


def test_faithfulness_warmup_weight_decay_shrinks_the_factors():
    """`faithfulness_warmup.weight_decay` is decoupled AdamW decay on V/U during the warmup: same
    faithfulness regime, smaller factors (0 reproduces the plain warmup exactly)."""
    model, frozen, ci_fn, spec, opt, state = _setup()
    plain, f_plain = jax.jit(make_faithfulness_warmup(model, 200, 0.01))(state["components"], frozen)
    same, _ = jax.jit(make_faithfulness_warmup(model, 200, 0.01, 0.0))(state["components"], frozen)
    decayed, f_decayed = jax.jit(make_faithfulness_warmup(model, 200, 0.01, 0.1))(state["components"], frozen)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(same), strict=True):
        np.testing.assert_array_equal(a, b)

    def sq_norm(c):
        return sum(float(jnp.sum(x**2)) for x in jax.tree.leaves(c))

    assert sq_norm(decayed) < 0.97 * sq_norm(plain)  # measured 0.94 (lr 0.01 x wd 0.1 x 200 steps)
    before = float(faithfulness_loss(model.weight_deltas(frozen, state["components"])))
    assert float(f_decayed) < 0.5 * before and float(f_plain) < 0.5 * before
