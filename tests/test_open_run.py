"""`open_run`: the Python API over a run directory (issue 6, item 4).

Round trip: CI computed through `open_run` on the eval batch equals (a) what the in-loop eval
logged to metrics.jsonl for that batch at the final step, and (b) CI recomputed from a state the
trainer itself restores (its mesh shardings, its restore path). Tolerances: alive counts exact;
CI-L0 within one position-component flip (1/N; a logit within float noise of 0 may flip between
two compiled programs); CI values SINGLE_OP (same params, same inputs, different jit).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import SINGLE_OP_ATOL, SINGLE_OP_RTOL
from eval_runs import toy_run

from param_decomp_config import load_config
from param_decomp_jax.eval.in_loop import make_ci_of_residual
from param_decomp_jax.eval.open_run import RunOpenError, open_run
from param_decomp_jax.runtime.checkpoint import CheckpointStore
from param_decomp_jax.runtime.sinks import read_metrics


@pytest.fixture(scope="module")
def opened(tmp_path_factory):
    return open_run(toy_run(tmp_path_factory).run_dir)


def test_open_run_loads_latest_checkpoint(opened) -> None:
    assert opened.step == 10
    assert opened.site_names == ("linear1", "linear2")
    assert not opened.is_lm
    for site in opened.site_names:
        s = opened.model.site(site)
        assert opened.components[site]["V"].shape == (s.d_in, s.C)
        assert opened.components[site]["U"].shape == (s.C, s.d_out)


def test_ci_matches_in_loop_eval_logged_in_training(opened) -> None:
    """The final in-loop eval (step 10, eval batch 0, the step-10 state) vs open_run on batch 0."""
    final_eval = [
        r for r in read_metrics(opened.run.metrics) if r["step"] == 10 and "eval/ci_l0/linear1" in r
    ]
    assert final_eval, "no eval record at the final step"
    logged = final_eval[-1]
    ci = opened.ci(opened.eval_batch(0))
    thr = opened.cfg.eval.ci_alive_threshold
    for site, ci_site in ci.items():
        ci_site = np.asarray(ci_site)
        n_positions = ci_site.shape[0]
        l0 = float((ci_site > 0).sum(-1).mean())
        assert abs(l0 - logged[f"eval/ci_l0/{site}"]) <= 1.0 / n_positions, site
        assert int((ci_site.max(0) > thr).sum()) == logged[f"eval/alive/{site}"], site
    both = sum(float((np.asarray(v) > 0).sum(-1).mean()) for v in ci.values())
    assert abs(both - logged["eval/ci_l0_group/both"]) <= 2.0 / n_positions


def test_ci_matches_trainer_restore(opened) -> None:
    """Restore with the trainer's own shardings and restore path; recompute CI its way."""
    from param_decomp_jax.runtime.trainer import Trainer

    cfg = load_config(opened.run.config)
    trainer = Trainer(cfg, progress=False, target_cache=opened.run.root.parent / ".target_cache")
    abstract = jax.eval_shape(trainer.exp.fresh_state)
    from param_decomp_jax.runtime import mesh as mesh_lib

    target = mesh_lib.with_shardings(abstract, trainer._shardings(abstract))
    with CheckpointStore(opened.run.root, keep_last=None) as store:
        step, state = store.restore_latest_valid(target)
    assert step == opened.step
    for site in opened.site_names:  # the same bits, whatever the placement
        for f in ("V", "U"):
            np.testing.assert_array_equal(
                np.asarray(state["components"][site][f]), np.asarray(opened.components[site][f])
            )
    batch = opened.eval_batch(0)
    residual = trainer.exp.residual_fn(trainer.exp.frozen, batch)
    expected = jax.jit(make_ci_of_residual(trainer.exp.model, trainer.exp.ci_fn))(
        state["ci_params"], trainer.exp.frozen, residual
    )
    got = opened.ci(batch)
    for site in opened.site_names:
        np.testing.assert_allclose(
            np.asarray(got[site]), np.asarray(expected[site]), rtol=SINGLE_OP_RTOL, atol=SINGLE_OP_ATOL
        )


def test_component_acts_are_site_inputs_times_V(opened) -> None:
    batch = opened.eval_batch(0)
    acts = opened.component_acts(batch)
    inputs = opened.site_inputs(batch)
    for site in opened.site_names:
        V = np.asarray(opened.components[site]["V"])
        np.testing.assert_allclose(np.asarray(acts[site]), np.asarray(inputs[site]) @ V, rtol=1e-5, atol=1e-6)
        assert acts[site].shape == (batch.shape[0], opened.model.site(site).C)


def test_open_run_older_step_and_errors(opened, tmp_path) -> None:
    assert open_run(opened.run.root, step=5).step == 5
    with pytest.raises(RunOpenError, match="available steps: \\[0, 5, 10\\]"):
        open_run(opened.run.root, step=7)
    with pytest.raises(RunOpenError, match="run directory not found"):
        open_run(tmp_path / "nope")
    (tmp_path / "bare").mkdir()
    with pytest.raises(RunOpenError, match="no config.yaml"):
        open_run(tmp_path / "bare")
