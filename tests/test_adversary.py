"""SPEC P1, P4, P5, P7: adversary building blocks (scopes, init, ascents) and the fresh-PGD term.

The step-level PPGD invariants (P2, P3, P6, checkpointing) are in `test_ppgd_step.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SINGLE_OP_ATOL, SINGLE_OP_RTOL
from ppgd_harness import B, HandAdam, all_sites_loss, hand_ci_lower, hand_loss, trajectory
from tiny_model import tiny_config

from param_decomp_config.loading import ConfigError
from param_decomp_config.losses import PersistentPGDReconLoss, PGDReconLoss, ScopeConfig
from param_decomp_jax.core import adversary as adv

CHANNELS = {"a": 6, "b": 6}  # C = 5 plus the delta channel


def _ppgd(**kw) -> PersistentPGDReconLoss:
    return PersistentPGDReconLoss(coeff=1.0, **kw)


# ---- P1: scopes ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("scope", "toy", "lm"),
    [
        (ScopeConfig(type="c"), (1,), (1, 1)),
        (ScopeConfig(type="sc"), (1,), (1, 7)),  # toys have no T: sc is c
        (ScopeConfig(type="nsc", n=4), (4,), (4, 7)),
        (ScopeConfig(type="bsc"), (8,), (8, 7)),  # toys: bsc is per example
    ],
)
def test_ppgd_scope_shapes_toy_and_lm(scope, toy, lm):
    """P1: c (1,1), sc (1,T), nsc (n,T), bsc (B,T); positionless toy leading (B,) drops T."""
    assert adv.ppgd_scope_shape(scope, (8,)) == toy
    assert adv.ppgd_scope_shape(scope, (8, 7)) == lm
    state = adv.init_ppgd_state(jax.random.PRNGKey(0), _ppgd(scope=scope), CHANNELS, (8, 7))
    assert {k: v.shape for k, v in state["sources"].items()} == {k: (*lm, c) for k, c in CHANNELS.items()}


def test_nsc_groups_must_divide_the_batch():
    """P1: n | B, rejected both at config validation and at state construction."""
    with pytest.raises(ValueError, match="does not divide"):
        adv.ppgd_scope_shape(ScopeConfig(type="nsc", n=3), (8, 7))
    bad = {"type": "persistent_pgd_recon", "coeff": 1.0, "scope": {"type": "nsc", "n": 3}}
    with pytest.raises(ConfigError, match="scope.n"):
        tiny_config([bad], batch_size=16)


def test_broadcast_sources_nsc_covers_contiguous_batch_blocks():
    """P1: group g of an nsc bundle covers batch rows [g·B/n, (g+1)·B/n); c/sc broadcast; bsc is as is."""
    n, b, t, cp = 4, 8, 3, 6
    src = jnp.arange(n * t * cp, dtype=jnp.float32).reshape(n, t, cp)
    out = np.asarray(adv.broadcast_sources(src, (b, t)))
    for row in range(b):
        np.testing.assert_array_equal(out[row], src[row // (b // n)])
    toy = np.asarray(adv.broadcast_sources(src[:, 0], (b,)))
    np.testing.assert_array_equal(toy, np.repeat(np.asarray(src[:, 0]), b // n, axis=0))
    shared = adv.broadcast_sources(src[:1, :1], (b, t))
    np.testing.assert_array_equal(shared, np.broadcast_to(src[0, 0], (b, t, cp)))
    per_pos = adv.broadcast_sources(src[:1], (b, t))
    np.testing.assert_array_equal(per_pos, np.broadcast_to(src[0], (b, t, cp)))
    full = jnp.ones((b, t, cp))
    np.testing.assert_array_equal(adv.broadcast_sources(full, (b, t)), full)


# ---- P4/P5: parameterisations and ascents --------------------------------------------------------
N_INIT = 8192  # positions; 5 standard errors of a mean over 2·N_INIT·6 draws is ~0.01 (U) / ~0.02 (N)


def test_clamp_init_is_uniform_and_sigmoid_init_is_standard_normal():
    """P5: clamp raw ~ U[0,1] (mean 1/2, var 1/12); sigmoid raw ~ N(0,1), unbounded, read as sigmoid.

    Statistical tolerances: 5 standard errors over 98k draws (mean: 0.005 for U, 0.016 for N)."""
    key = jax.random.PRNGKey(5)
    for parameterisation, (mean, var) in (("clamp", (0.5, 1 / 12)), ("sigmoid", (0.0, 1.0))):
        term = _ppgd(scope=ScopeConfig(type="bsc"), parameterisation=parameterisation)
        state = adv.init_ppgd_state(key, term, CHANNELS, (N_INIT,))
        raw = np.concatenate([np.ravel(v) for v in state["sources"].values()])
        se = np.sqrt(var / raw.size)
        assert abs(raw.mean() - mean) < 5 * se
        assert abs(raw.var() - var) < 0.02 * var
        assert int(state["opt_state"].count) == 0
        eff = adv.effective_sources(state["sources"], parameterisation)
        if parameterisation == "clamp":
            assert raw.min() >= 0.0 and raw.max() <= 1.0
            assert eff is state["sources"]
        else:
            assert raw.min() < -3.0 and raw.max() > 3.0
            for k, v in eff.items():
                np.testing.assert_array_equal(v, jax.nn.sigmoid(state["sources"][k]))


def _grads(key, sources):
    g = {
        k: jax.random.normal(jax.random.fold_in(key, i), v.shape) for i, (k, v) in enumerate(sources.items())
    }
    g["a"] = g["a"].at[0, 0].set(0.0)  # sign(0) = 0: no move
    return g


def test_sign_step_is_exactly_lr_times_sign():
    """P4: sign ascent adds lr·sign(g), bitwise (same float32 ops), 0 where g == 0; no clamp under sigmoid."""
    term = _ppgd(scope=ScopeConfig(type="bsc"), parameterisation="sigmoid", optimizer={"type": "sign"})
    state = adv.init_ppgd_state(jax.random.PRNGKey(1), term, CHANNELS, (32,))
    grads = _grads(jax.random.PRNGKey(2), state["sources"])
    lr = jnp.float32(0.3)
    new = adv.ppgd_ascend(term, state, grads, lr, jnp.bool_(True))
    for k, v in new["sources"].items():
        old = np.asarray(state["sources"][k])
        np.testing.assert_array_equal(v, old + np.float32(0.3) * np.sign(np.asarray(grads[k])))
    assert float(new["sources"]["a"][0, 0]) == float(state["sources"]["a"][0, 0])


def test_adam_ascent_is_bias_corrected_and_clamp_projects():
    """P4: Adam (β1 .5, β2 .99, ε 1e-8 defaults) ASCENT, bias-corrected on the update count, matches a
    float64 hand Adam over 3 updates (SINGLE_OP: a few elementwise ops per update). P5: with lr 100
    every clamped source lands exactly on 0 or 1 (where g != 0), never outside; inactive is a no-op."""
    key = jax.random.PRNGKey(3)
    free = _ppgd(scope=ScopeConfig(type="bsc"), parameterisation="sigmoid")
    state = adv.init_ppgd_state(key, free, CHANNELS, (32,))
    hand = HandAdam(state["sources"], clamp=False)
    for i in range(3):
        g = _grads(jax.random.fold_in(key, i), state["sources"])
        state = adv.ppgd_ascend(free, state, g, jnp.float32(0.01), jnp.bool_(True))
        hand.ascend(g, 0.01)
    assert int(state["opt_state"].count) == 3
    for k, v in state["sources"].items():
        np.testing.assert_allclose(v, hand.s[k], rtol=SINGLE_OP_RTOL, atol=SINGLE_OP_ATOL)
        np.testing.assert_allclose(state["opt_state"].nu[k], hand.v[k], rtol=SINGLE_OP_RTOL, atol=1e-9)

    boxed = _ppgd(scope=ScopeConfig(type="bsc"))
    state = adv.init_ppgd_state(key, boxed, CHANNELS, (32,))
    g = _grads(key, state["sources"])
    new = adv.ppgd_ascend(boxed, state, g, jnp.float32(100.0), jnp.bool_(True))
    for k, v in new["sources"].items():
        v, moved = np.asarray(v), np.asarray(g[k]) != 0
        assert v.min() >= 0.0 and v.max() <= 1.0
        np.testing.assert_array_equal(v[moved], (np.asarray(g[k])[moved] > 0).astype(np.float32))
    off = adv.ppgd_ascend(boxed, state, g, jnp.float32(100.0), jnp.bool_(False))
    for x, y in zip(jax.tree.leaves(off), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(x, y)


# ---- P7: fresh PGD -------------------------------------------------------------------------------
@pytest.mark.parametrize(("scope", "shape"), [("c", (1, 1)), ("bc", (8, 1)), ("bsc", (8, 7))])
def test_fresh_pgd_init_and_scope(scope, shape):
    """P7: init random (U[0,1], not constant) / ones / zeros with scope c (1,1), bc (B,1), bsc (B,T)."""
    for init in ("random", "ones", "zeros"):
        term = PGDReconLoss(coeff=1.0, init=init, scope=scope)
        src = adv.init_pgd_sources(jax.random.PRNGKey(0), term, CHANNELS, (8, 7))
        for k, v in src.items():
            assert v.shape == (*shape, CHANNELS[k])
            v = np.asarray(v)
            if init == "random":
                assert v.min() >= 0.0 and v.max() <= 1.0 and v.std() > 0.1
            else:
                np.testing.assert_array_equal(v, 1.0 if init == "ones" else 0.0)


def test_pgd_attack_is_n_sign_steps_projected():
    """P7: n_steps sign ascents of step_size, projected to [0,1] after each (exact on a linear loss)."""
    w = jnp.array([[2.0, -1.0, 0.0, 3.0]])
    src = {"a": jnp.full((1, 4), 0.5)}

    def loss(s):
        return jnp.sum(w * s["a"])

    two = adv.pgd_attack(src, loss, 2, 0.125)["a"]
    np.testing.assert_array_equal(two, [[0.75, 0.25, 0.5, 0.75]])
    many = adv.pgd_attack(src, loss, 5, 0.125)["a"]
    np.testing.assert_array_equal(many, [[1.0, 0.0, 0.5, 1.0]])  # 0.5 + 5/8 clamps to 1
    np.testing.assert_array_equal(adv.pgd_attack(src, loss, 0, 0.125)["a"], src["a"])


PGD = [
    {"type": "pgd_recon", "name": "pgd_zeros", "coeff": 1.0, "init": "zeros", "scope": "bsc",
     "n_steps": 2, "step_size": 0.25},
    {"type": "pgd_recon", "name": "pgd_ones", "coeff": 1.0, "init": "ones", "scope": "c", "n_steps": 0},
    {"type": "pgd_recon", "name": "pgd_routed", "coeff": 1.0, "init": "zeros", "scope": "bc",
     "n_steps": 3, "step_size": 0.1, "plan": {"type": "per_site"}, "routing": {"type": "uniform_k"}},
]  # fmt: skip


def _sign_attack(objective, src, n_steps, step_size):
    for _ in range(n_steps):
        g = jax.grad(objective)(src)
        src = {k: jnp.clip(v + step_size * jnp.sign(g[k]), 0.0, 1.0) for k, v in src.items()}
    return src


def test_fresh_pgd_is_reinitialised_every_step():
    """P7: at EVERY step the sources restart from their init (zeros / ones), take n_steps sign ascents
    at the step's detached components and CI, and the term is the loss at the result.

    Checked at steps 0 and 1 (step 1 would differ if sources carried over). Tolerance SINGLE_OP: the
    reference repeats the same forward on the same inputs; sign ascents only see gradient signs.
    Fresh PGD keeps nothing in the train state."""
    run = trajectory(PGD, 2, patch_routes=True)
    assert run.states[0]["adversaries"] == {} and run.states[2]["adversaries"] == {}
    for k in range(2):
        state, x, m = run.states[k], run.batches[k], run.metrics[k]
        comps, ci = state["components"], hand_ci_lower(run, state["ci_params"], x)
        objective = all_sites_loss(run, comps, ci, x)
        zeros = {n: jnp.zeros((B, c)) for n, c in CHANNELS.items()}
        attacked = _sign_attack(objective, zeros, 2, 0.25)
        np.testing.assert_allclose(m["loss/pgd_zeros"], objective(attacked), rtol=SINGLE_OP_RTOL)
        ones = {n: jnp.ones((1, c)) for n, c in CHANNELS.items()}
        np.testing.assert_allclose(m["loss/pgd_ones"], objective(ones), rtol=SINGLE_OP_RTOL)


def test_fresh_pgd_routing_is_drawn_once_and_shared_by_ascents_and_loss():
    """P7: per step the routing is sampled once per plan entry, and the ascents and the loss forward
    all use that draw. The patched sampler hands out a DIFFERENT pattern on every call, so a loss
    forward that re-drew its routing would disagree with the reference. Tolerance SINGLE_OP."""
    run = trajectory(PGD, 2, patch_routes=True)
    routed = run.book.routed()  # the step is traced once: these are the draws of every step
    assert [live for live, _ in routed] == [("a",), ("b",)]
    routes = dict(routed)
    for k in range(2):
        state, x = run.states[k], run.batches[k]
        comps, ci = state["components"], hand_ci_lower(run, state["ci_params"], x)

        def term(src, routes=routes, comps=comps, ci=ci, x=x):
            return jnp.mean(jnp.stack([hand_loss(run, comps, ci, src, x, lv, r) for lv, r in routes.items()]))

        zeros = {n: jnp.zeros((B, c)) for n, c in CHANNELS.items()}  # bc on toys: per example
        attacked = _sign_attack(term, zeros, 3, 0.1)
        got = run.metrics[k]["loss/pgd_routed"]
        np.testing.assert_allclose(got, term(attacked), rtol=SINGLE_OP_RTOL)
        flipped = {lv: {n: ~r for n, r in rs.items()} for lv, rs in routes.items()}
        assert abs(float(term(attacked, routes=flipped)) - float(got)) > 1e-4
