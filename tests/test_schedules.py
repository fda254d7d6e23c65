"""SPEC §6 step 5: LR schedules (warmup, constant/linear/cosine to a final fraction), clip then AdamW."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from param_decomp_config.optim import OptimizerConfig, ScheduleConfig
from param_decomp_jax.core.schedules import make_adamw, make_schedule


def _lrs(cfg, steps=100, peak=1.0):
    sched = make_schedule(cfg, peak, steps)
    return np.array([float(sched(jnp.asarray(i))) for i in range(steps)])


def test_constant():
    np.testing.assert_allclose(_lrs(ScheduleConfig(kind="constant")), 1.0)


def test_cosine_to_final_fraction():
    lrs = _lrs(ScheduleConfig(kind="cosine", final_frac=0.1))
    assert lrs[0] == pytest.approx(1.0)
    assert lrs[50] == pytest.approx(0.1 + 0.45 * (1 + np.cos(np.pi * 0.5)), rel=1e-6)
    assert np.all(np.diff(lrs) <= 1e-7)
    assert float(
        make_schedule(ScheduleConfig(kind="cosine", final_frac=0.1), 1.0, 100)(100)
    ) == pytest.approx(0.1)


def test_linear_decay_and_warmup():
    lrs = _lrs(ScheduleConfig(kind="linear", warmup_frac=0.1, final_frac=0.0))
    # Warmup: step i uses (i + 1) / 10 of the peak, so the first step already learns.
    np.testing.assert_allclose(lrs[:10], (np.arange(10) + 1) / 10, rtol=1e-6)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5, rel=1e-6)


def test_clip_happens_before_adamw():
    # A huge gradient clipped to norm c makes AdamW's first update the same as for the clipped grad;
    # with clip AFTER Adam the update would be ~lr per coordinate regardless. We check the moments.
    cfg = OptimizerConfig(lr=0.1, grad_clip_norm=0.01, schedule=ScheduleConfig(kind="constant"))
    tx = make_adamw(cfg, 10)
    params = {"w": jnp.zeros(4)}
    grads = {"w": jnp.array([300.0, 400.0, 0.0, 0.0])}
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    adam_state = [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)
    ][0]
    clipped = np.array([0.006, 0.008, 0.0, 0.0])
    np.testing.assert_allclose(adam_state.mu["w"], (1 - 0.9) * clipped, rtol=1e-5)
