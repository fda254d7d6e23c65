"""SPEC P1-P6: the persistent adversary (PPGD) inside the fused training step, against hand references.

Trajectories are compiled once per config and shared (see `ppgd_harness`). Hand references never call
the adversary code: they run `model.masked_output` directly and a float64 Adam.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SINGLE_OP_ATOL, SINGLE_OP_RTOL, TRAJECTORY_RTOL
from ppgd_harness import (
    LM_B,
    LM_T,
    HandAdam,
    all_sites_loss,
    build,
    expand,
    hand_ci_lower,
    hand_loss,
    max_abs_diff,
    trajectory,
)
from runtime_state import assert_bitwise_equal

from param_decomp_config import ConfigError
from param_decomp_jax.runtime.checkpoint import CheckpointStore
from param_decomp_jax.runtime.mesh import make_mesh, state_shardings, with_shardings

# Two PPGD terms in one run. `ppgd_site` uses a per-site plan with uniform-k routing (so its main
# loss differs from the all-sites warmup objective); `ppgd_nsc` has another scope and coefficient.
PER_SITE = {
    "type": "persistent_pgd_recon", "name": "ppgd_site", "coeff": 0.5, "n_warmup": 2,
    "scope": {"type": "c"}, "plan": {"type": "per_site"}, "routing": {"type": "uniform_k"},
    "optimizer": {"type": "adam", "lr": 0.05},
}  # fmt: skip
NSC = {
    "type": "persistent_pgd_recon", "name": "ppgd_nsc", "coeff": 1.0, "n_warmup": 1,
    "scope": {"type": "nsc", "n": 4}, "optimizer": {"type": "adam", "lr": 0.05},
}  # fmt: skip
PAIR = [{"type": "faithfulness", "coeff": 1.0}, PER_SITE, NSC]
PAIR_COEFF5 = [{"type": "faithfulness", "coeff": 1.0}, {**PER_SITE, "coeff": 5.0}, {**NSC, "coeff": 0.5}]
# A large component/CI lr makes "pre-update vs post-update parameters" a large difference.
FAST = {"components_optimizer": {"lr": 0.05}, "ci_optimizer": {"lr": 0.05}}


def pair_run(n: int = 2):
    return trajectory(PAIR, n, patch_routes=True, **FAST)


def _opt(run, k: int, term: str):
    return run.states[k]["adversaries"][term]["opt_state"]


def _sources(run, k: int, term: str):
    return run.states[k]["adversaries"][term]["sources"]


def test_source_update_count_is_n_warmup_plus_one():
    """P3: each training step applies n_warmup + 1 source updates (Adam's bias-correction count)."""
    run = pair_run(3)
    for k in range(4):
        assert int(_opt(run, k, "ppgd_site").count) == k * (2 + 1)
        assert int(_opt(run, k, "ppgd_nsc").count) == k * (1 + 1)


def test_warmup_ascents_route_all_sites():
    """P2: warmup ascents use every site, routed everywhere, even for a per-site/uniform-k term.

    (1) The step reports the loss at its last (2nd) warmup ascent. By hand: one Adam ascent on the
    all-sites objective (`masked_output` over both sites, routes None), then that objective.
    Tolerance SINGLE_OP: one short composition (an Adam step feeding one forward) on the same inputs.
    The term's own objective (per-site, its routes) at that point is far off (> 1e-3).
    (2) The sources after step 0 match the two-pass reference whose warmup routes all sites
    (tolerance as in the final-ascent test) and miss, by > 100x that, the reference whose warmup uses
    the term's plan and routing (Adam's 2nd update depends on gradient magnitudes, so it tells them apart).
    """
    run = pair_run()
    state, x = run.states[0], run.batches[0]
    comps, ci = state["components"], hand_ci_lower(run, state["ci_params"], x)
    objective = all_sites_loss(run, comps, ci, x)
    adam = HandAdam(_sources(run, 0, "ppgd_site"))
    adam.ascend(jax.grad(objective)(adam.sources32()), 0.05)
    got = run.metrics[0]["ppgd/ppgd_site/warmup_loss"]
    np.testing.assert_allclose(got, objective(adam.sources32()), rtol=SINGLE_OP_RTOL, atol=SINGLE_OP_ATOL)
    assert abs(float(_term_loss(run, comps, ci, x)(adam.sources32())) - float(got)) > 1e-3

    got_src = _sources(run, 1, "ppgd_site")
    for k, v in _two_pass(run, 1).s.items():
        np.testing.assert_allclose(got_src[k], v, rtol=TRAJECTORY_RTOL, atol=1e-6)
    assert max_abs_diff(got_src, _two_pass(run, 1, warmup_on_term=True).s) > 100 * 1e-6


def _term_loss(run, comps, ci, x):
    """`ppgd_site`'s own objective: mean over its per-site plan entries, each with its recorded routes."""
    routes = dict(run.book.routed())
    assert sorted(routes) == [("a",), ("b",)]
    return lambda src: jnp.mean(
        jnp.stack([hand_loss(run, comps, ci, src, x, live, r) for live, r in routes.items()])
    )


def _two_pass(
    run, steps: int, *, post_update: bool = False, scale: float = 1.0, warmup_on_term: bool = False
) -> HandAdam:
    """The un-fused reference for `ppgd_site`: 2 warmup ascents by hand (all sites, no routes), then
    jax.grad of the term's own loss at the step's PRE-update components and CI, then Adam.
    The keyword arguments build the wrong variants used as controls."""
    adam = HandAdam(_sources(run, 0, "ppgd_site"))
    for k in range(steps):
        x = run.batches[k]
        comps, ci = run.states[k]["components"], hand_ci_lower(run, run.states[k]["ci_params"], x)
        warm = _term_loss if warmup_on_term else all_sites_loss
        for _ in range(2):
            adam.ascend(jax.grad(warm(run, comps, ci, x))(adam.sources32()), 0.05)
        params = run.states[k + 1] if post_update else run.states[k]
        comps, ci = params["components"], hand_ci_lower(run, params["ci_params"], x)
        grads = jax.grad(_term_loss(run, comps, ci, x))(adam.sources32())
        adam.ascend(jax.tree.map(lambda g: scale * g, grads), 0.05)
    return adam


def test_final_ascent_uses_pre_update_parameters_and_live_ci():
    """P3: the fused final ascent equals a two-pass reference at PRE-update components and CI.

    Two training steps (6 source updates) of `ppgd_site` (coeff 0.5, so the coefficient must be
    divided out), compared on sources and both Adam moments. Tolerance: TRAJECTORY_RTOL relative
    plus 1e-6 absolute: the fused backward reassociates reductions (gradients agree to ~1e-6
    relative) and Adam divides by sqrt(v), so gradient rounding shows up at ~lr·1e-6 in the sources
    over several updates; the reference's moments are float64 vs float32 in the step.
    Controls (each must miss by > 100x the tolerance): the reference at POST-update parameters, and
    the reference without the coefficient divided out.
    """
    run = pair_run()
    ref = _two_pass(run, 2)
    got_src, got_opt = _sources(run, 2, "ppgd_site"), _opt(run, 2, "ppgd_site")
    atol = 1e-6
    for k in got_src:
        np.testing.assert_allclose(got_src[k], ref.s[k], rtol=TRAJECTORY_RTOL, atol=atol)
        np.testing.assert_allclose(got_opt.mu[k], ref.m[k], rtol=TRAJECTORY_RTOL, atol=atol)
        np.testing.assert_allclose(got_opt.nu[k], ref.v[k], rtol=TRAJECTORY_RTOL, atol=atol * 1e-2)
    assert max_abs_diff(got_src, _two_pass(run, 2, post_update=True).s) > 100 * atol
    assert max_abs_diff(got_opt.nu, _two_pass(run, 2, scale=0.5).v) > 100 * atol * 1e-2


def test_source_step_is_independent_of_the_coefficient():
    """P3: one step with coeff 0.5 and with coeff 5.0 moves the sources identically.

    Only step 0 is comparable (components then diverge). Tolerance SINGLE_OP: the only difference
    is (g·c)/c rounding (<= 1 ulp per gradient), which Adam passes through at the same scale.
    """
    a, b = pair_run(), trajectory(PAIR_COEFF5, 1, patch_routes=True, **FAST)
    for term in ("ppgd_site", "ppgd_nsc"):
        for part in ("sources", "opt_state"):
            x, y = a.states[1]["adversaries"][term][part], b.states[1]["adversaries"][term][part]
            for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
                np.testing.assert_allclose(u, v, rtol=SINGLE_OP_RTOL, atol=SINGLE_OP_ATOL)


def test_ppgd_term_needs_a_positive_coefficient():
    """P3: with coeff 0 there is no gradient to divide out of the main backward (Adam would coast on
    stale momentum), so such a term is refused: by the config schema (naming the key) and, for a
    hand-built spec, by the step builder."""
    with pytest.raises((ValueError, ConfigError), match="coeff > 0"):
        build([{**PER_SITE, "coeff": 0.0}])


def test_one_bundle_feeds_exactly_one_term():
    """P1: two PPGD terms own separate state (their own shapes), and each reads only its own bundle.

    Overwriting `ppgd_nsc`'s sources must leave `ppgd_site`'s loss and update bitwise unchanged (same
    compiled program, same inputs for that term). Coefficient independence across terms is checked
    by `test_source_step_is_independent_of_the_coefficient` (`ppgd_nsc`'s coefficient changes too).
    """
    run = pair_run()
    state = run.states[0]
    assert set(state["adversaries"]) == {"ppgd_site", "ppgd_nsc"}
    assert {k: v.shape for k, v in _sources(run, 0, "ppgd_site").items()} == {"a": (1, 6), "b": (1, 6)}
    assert {k: v.shape for k, v in _sources(run, 0, "ppgd_nsc").items()} == {"a": (4, 6), "b": (4, 6)}
    advs = dict(state["adversaries"])
    advs["ppgd_nsc"] = {
        **advs["ppgd_nsc"],
        "sources": jax.tree.map(jnp.ones_like, advs["ppgd_nsc"]["sources"]),
    }
    new, m = run.step({**state, "adversaries": advs}, run.frozen, run.batches[0])
    assert float(m["loss/ppgd_site"]) == float(run.metrics[0]["loss/ppgd_site"])
    assert float(m["loss/ppgd_nsc"]) != float(run.metrics[0]["loss/ppgd_nsc"])
    assert_bitwise_equal(new["adversaries"]["ppgd_site"], run.states[1]["adversaries"]["ppgd_site"])


# ---- parameterisations and steps -----------------------------------------------------------------
SIGN = {
    "type": "persistent_pgd_recon", "name": "ppgd_sign", "coeff": 1.0, "n_warmup": 0,
    "scope": {"type": "bsc"},
    "optimizer": {"type": "sign", "lr": 0.25, "schedule": {"kind": "linear", "final_frac": 0.5}},
}  # fmt: skip
SIGMOID = {
    "type": "persistent_pgd_recon", "name": "ppgd_sigmoid", "coeff": 1.0, "n_warmup": 0,
    "parameterisation": "sigmoid", "optimizer": {"type": "adam", "lr": 1.0},
}  # fmt: skip
# P6: off at steps 0-2 of 10 (fractions 0, .1, .2 < .25), on from step 3. Sharing this run with
# the two terms above is safe: bundles are independent (test_one_bundle_feeds_exactly_one_term).
LATE = {"type": "persistent_pgd_recon", "name": "ppgd_late", "coeff": 2.0, "n_warmup": 1, "start_frac": 0.25}
STEPS = [SIGN, SIGMOID, LATE]


def test_sign_step_moves_each_source_by_exactly_lr_then_clamps():
    """P4/P5: a sign ascent moves every source by exactly ±lr(step) (0 where the gradient is exactly
    0), in the direction of the term's gradient, then projects to [0, 1].

    n_warmup 0, so step 0 applies one update. Directions come from a hand gradient; only gradients
    above 1e-6·max are compared (their sign cannot flip by rounding). Step sizes: exact up to the
    float32 rounding of `s + lr` (1 ulp of 1.0 = 1.2e-7).
    """
    run = trajectory(STEPS, 4)
    x, s0 = run.batches[0], _sources(run, 0, "ppgd_sign")
    ci = hand_ci_lower(run, run.states[0]["ci_params"], x)
    grads = jax.grad(all_sites_loss(run, run.states[0]["components"], ci, x))(s0)
    for k, s1 in _sources(run, 1, "ppgd_sign").items():
        old, new, g = np.asarray(s0[k]), np.asarray(s1), np.asarray(grads[k])
        step = new - old
        unclipped = (new > 0.0) & (new < 1.0)
        assert unclipped.mean() > 0.3
        moved = unclipped & (g != 0.0)  # g == 0 exactly where ci_lower == 1 (the mask ignores the source)
        np.testing.assert_allclose(np.abs(step[moved]), 0.25, atol=2e-7)
        np.testing.assert_array_equal(step[unclipped & (g == 0.0)], 0.0)
        clear = np.abs(g) > 1e-6 * np.abs(g).max()
        assert clear.mean() > 0.9
        np.testing.assert_array_equal(new[clear], np.clip(old[clear] + 0.25 * np.sign(g[clear]), 0, 1))
    # P4: the source lr follows its schedule at the TRAINING step (linear 0.25 -> 0.125 over 10 steps;
    # one update per step here): every unclipped source with a gradient moves by exactly lr(k).
    for k in range(1, 4):
        lr_k = 0.25 + (k / 10) * (0.125 - 0.25)
        for name, new in _sources(run, k + 1, "ppgd_sign").items():
            old, new = np.asarray(_sources(run, k, "ppgd_sign")[name]), np.asarray(new)
            step = np.abs(new - old)[(new > 0.0) & (new < 1.0) & (new != old)]
            assert step.size > 0
            np.testing.assert_allclose(step, lr_k, atol=2e-7)
    # P5 clamp: four steps of ~0.25 push many sources against the box, none leaves it.
    final = np.concatenate([np.ravel(v) for v in _sources(run, 4, "ppgd_sign").values()])
    assert final.min() >= 0.0 and final.max() <= 1.0
    assert np.mean((final == 0.0) | (final == 1.0)) > 0.2


def test_sigmoid_parameterisation():
    """P5: sigmoid sources are unbounded raw values read through sigmoid and never clamped.

    Step 0 (n_warmup 0): the term's loss equals the hand loss at sigmoid(raw) (SINGLE_OP: one forward),
    and the first Adam update is lr·g/(|g|+eps) with g the hand gradient THROUGH the sigmoid. 1e-6
    absolute: float32 rounding of raw + lr·(~1) (raw ~ N(0,1)); a ~1e-6 relative gradient mismatch
    moves g/(|g|+eps) by at most 2.5e-7.
    """
    run = trajectory(STEPS, 4)
    x, raw0 = run.batches[0], _sources(run, 0, "ppgd_sigmoid")
    comps, ci = run.states[0]["components"], hand_ci_lower(run, run.states[0]["ci_params"], x)
    objective = all_sites_loss(run, comps, ci, x)
    eff = {k: jax.nn.sigmoid(v) for k, v in raw0.items()}
    np.testing.assert_allclose(run.metrics[0]["loss/ppgd_sigmoid"], objective(eff), rtol=SINGLE_OP_RTOL)
    g = jax.grad(lambda r: objective({k: jax.nn.sigmoid(v) for k, v in r.items()}))(raw0)
    for k, r1 in _sources(run, 1, "ppgd_sigmoid").items():
        gk = np.asarray(g[k], np.float64)
        np.testing.assert_allclose(np.asarray(r1) - raw0[k], 1.0 * gk / (np.abs(gk) + 1e-8), atol=1e-6)
    raw = np.concatenate([np.ravel(v) for v in _sources(run, 4, "ppgd_sigmoid").values()])
    assert raw.min() < 0.0 and raw.max() > 1.0  # unbounded: no projection


# ---- scopes on (B, T) leading shapes -------------------------------------------------------------
SCOPES = [
    {"type": "persistent_pgd_recon", "name": f"ppgd_{s}", "coeff": 1.0, "n_warmup": 0, "scope": scope}
    for s, scope in (("c", {"type": "c"}), ("sc", {"type": "sc"}), ("nsc", {"type": "nsc", "n": 2}),
                     ("bsc", {"type": "bsc"}))
]  # fmt: skip


def test_lm_scopes_shapes_and_broadcast_in_the_step():
    """P1 for (B, T) leading: c (1,1), sc (1,T), nsc (n,T) over contiguous batch blocks, bsc (B,T).

    Each term's loss at step 0 equals the hand loss with the sources expanded independently
    (row b of an nsc bundle is group b // (B/n)). Tolerance SINGLE_OP: one forward each.
    """
    run = trajectory(SCOPES, 1, lm=True)
    state, x = run.states[0], run.batches[0]
    shapes = {"c": (1, 1), "sc": (1, LM_T), "nsc": (2, LM_T), "bsc": (LM_B, LM_T)}
    comps, ci = state["components"], hand_ci_lower(run, state["ci_params"], x)
    for s, lead in shapes.items():
        src = _sources(run, 0, f"ppgd_{s}")
        assert {k: v.shape for k, v in src.items()} == {"a": (*lead, 6), "b": (*lead, 6)}
        expected = all_sites_loss(run, comps, ci, x)(src)
        np.testing.assert_allclose(run.metrics[0][f"loss/ppgd_{s}"], expected, rtol=SINGLE_OP_RTOL)
    nsc = _sources(run, 0, "ppgd_nsc")["a"]
    np.testing.assert_array_equal(expand(nsc, (LM_B, LM_T))[1], nsc[0])
    np.testing.assert_array_equal(expand(nsc, (LM_B, LM_T))[2], nsc[1])


# ---- start_frac ----------------------------------------------------------------------------------
def test_start_frac_term_is_inactive_before_its_fraction():
    """P6: with 10 steps and start_frac 0.25 the term is off at steps 0-2 (fractions 0, .1, .2 < .25)
    and on from step 3: before, it adds 0 to the total and its sources/moments do not move.
    Tolerance SINGLE_OP for the total (a weighted sum of three scalars); the term's own contribution
    2·loss ~ 1.4 is far outside it."""
    run = trajectory(STEPS, 4)

    def others(m):
        return float(m["loss/ppgd_sign"]) + float(m["loss/ppgd_sigmoid"])

    for k in range(3):
        m = run.metrics[k]
        np.testing.assert_allclose(m["loss/total"], others(m), rtol=SINGLE_OP_RTOL)
        assert 2.0 * float(m["loss/ppgd_late"]) > 1e3 * SINGLE_OP_RTOL * float(m["loss/total"])
        assert_bitwise_equal(
            run.states[k + 1]["adversaries"]["ppgd_late"], run.states[0]["adversaries"]["ppgd_late"]
        )
    m = run.metrics[3]
    np.testing.assert_allclose(
        m["loss/total"], others(m) + 2.0 * float(m["loss/ppgd_late"]), rtol=SINGLE_OP_RTOL
    )
    assert int(_opt(run, 4, "ppgd_late").count) == 2
    assert max_abs_diff(_sources(run, 4, "ppgd_late"), _sources(run, 3, "ppgd_late")) > 0


# ---- the adversary finds worse masks; checkpoints ------------------------------------------------
ADV = [
    {"type": "faithfulness", "coeff": 1.0},
    {"type": "importance_minimality", "coeff": 1e-3, "p_start": 1.0},
    {"type": "stochastic_recon", "coeff": 1.0},
    {"type": "persistent_pgd_recon", "name": "ppgd", "coeff": 1.0, "n_warmup": 2,
     "optimizer": {"type": "adam", "lr": 0.05}},
]  # fmt: skip
ADV_STEPS = 40


def test_adversarial_loss_is_at_least_the_stochastic_loss():
    """The adversary finds worse masks than random sources: on the SAME batch and components, the
    PPGD recon loss (after its warmup ascents) is >= the stochastic recon loss, averaged over the
    last 20 of 40 training steps (20 different batches), and on most individual steps."""
    run = trajectory(ADV, ADV_STEPS)
    ppgd = np.array([float(m["loss/ppgd"]) for m in run.metrics[20:ADV_STEPS]])
    stoch = np.array([float(m["loss/stochastic_recon"]) for m in run.metrics[20:ADV_STEPS]])
    assert ppgd.mean() >= stoch.mean()
    assert np.mean(ppgd >= stoch) >= 0.8


@pytest.mark.filterwarnings("ignore:Exception ignored in. None:pytest.PytestUnraisableExceptionWarning")
def test_ppgd_state_survives_a_checkpoint_round_trip(tmp_path):
    """The PPGD sources and moments are TrainState: a save/restore (with the production placement rules,
    `ppgd_sign` batch-sharded as bsc) is bitwise, and one more step from the restored state equals one
    more step from the original (bitwise: same program, same device count)."""
    run = trajectory(STEPS, 4)
    state = run.states[3]
    expected = jax.tree.map(np.array, state)
    abstract = jax.eval_shape(lambda: state)
    shardings = state_shardings(
        abstract, make_mesh(), shard_components=False, batch_sharded_terms={"ppgd_sign"}
    )
    with CheckpointStore(tmp_path) as store:
        store.save(3, state)
        store.wait()
        restored = store.restore(3, with_shardings(abstract, shardings))
    assert set(restored["adversaries"]) == {"ppgd_sign", "ppgd_sigmoid", "ppgd_late"}
    assert int(restored["adversaries"]["ppgd_sigmoid"]["opt_state"].count) == 3
    assert_bitwise_equal(restored, expected)
    new, metrics = run.step(restored, run.frozen, run.batches[3])
    assert_bitwise_equal(new, run.states[4])
    assert_bitwise_equal(metrics, run.metrics[3])
