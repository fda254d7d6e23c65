"""Several training steps per jitted call (`runtime.steps_per_call`, SPEC T3, with C1 for resume).

A multi-step call runs the same step function in a device-side loop: it must give the trajectory
of one step per call, log/eval/checkpoint on the same steps, and resume bitwise after SIGTERM.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import TRAJECTORY_RTOL
from e2e import (
    SIGTERM,
    SMOKE,
    assert_states_bitwise_equal,
    check,
    ckpt_steps,
    compare_trajectories,
    final_state,
    interrupt,
    run,
    start_and_wait_for_ckpt,
    train_cmd,
    trajectory,
    write_config,
)

from param_decomp_config.loading import ConfigError, load_config
from param_decomp_jax.runtime.trainer import REQUEUE_EXIT_CODE, Trainer, steps_per_call


def _smoke_cfg(tmp_path: Path, run_id: str, **overrides: object):
    sets = [f"{k}={v}" for k, v in overrides.items()]
    return load_config(SMOKE, sets, out_dir=str(tmp_path), run_id=run_id)


def test_automatic_steps_per_call_divides_every_cadence(tmp_path: Path) -> None:
    # Smoke: steps 20, log 5, eval 10, no periodic checkpoint -> gcd 5.
    cfg = _smoke_cfg(tmp_path, "p-00000001")
    batches = type("Toy", (), {"input_shardings": ()})()
    assert steps_per_call(cfg, batches) == 5
    # gcd 100 -> the largest divisor <= 10.
    cfg = _smoke_cfg(tmp_path, "p-00000002", steps=2000, **{"logging.log_every": 100, "eval.eval_every": 500})
    assert steps_per_call(cfg, batches) == 10
    # A coprime step count leaves one step per call.
    cfg = _smoke_cfg(tmp_path, "p-00000003", steps=21)
    assert steps_per_call(cfg, batches) == 1
    # A batch from the host (token data) is always one step per call.
    tokens = type("Tokens", (), {"input_shardings": (None,)})()
    assert steps_per_call(_smoke_cfg(tmp_path, "p-00000004"), tokens) == 1


def test_explicit_steps_per_call_must_divide_the_cadences(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"runtime\.steps_per_call: 3 does not divide logging\.log_every = 5"
    ):
        _smoke_cfg(tmp_path, "p-00000005", steps=30, **{"runtime.steps_per_call": 3})
    with pytest.raises(ConfigError, match=r"runtime\.steps_per_call: 4 does not divide steps = 30"):
        _smoke_cfg(tmp_path, "p-00000006", steps=30, **{"logging.log_every": 4, "runtime.steps_per_call": 4})


def test_multi_step_calls_follow_the_one_step_trajectory(tmp_path: Path) -> None:
    """Same metrics on the same steps and the same final state, K = 5 vs K = 1. Different
    compiled programs may fuse differently, so the bound is TRAJECTORY_RTOL (observed: equal)."""
    results = {}
    for k in (1, 5):
        # The K = 5 run also runs under runtime.transfer_guard: its calls move nothing implicitly.
        overrides = {"runtime.steps_per_call": k, "runtime.transfer_guard": k > 1}
        cfg = _smoke_cfg(tmp_path, f"p-0000000{k}", **overrides)
        res = Trainer(cfg, progress=False, target_cache=tmp_path / "cache").run_training()
        assert res.summary["steps_per_call"] == k
        records = [json.loads(x) for x in res.run_dir.metrics.read_text().splitlines() if x.strip()]
        step, state = final_state(res.run_dir.root)
        results[k] = (trajectory(res.run_dir.metrics), state, step, records)
    (traj1, state1, step1, rec1), (traj5, state5, step5, rec5) = results[1], results[5]
    assert step1 == step5 == 20
    assert sorted({r["step"] for r in rec1}) == sorted({r["step"] for r in rec5}) == [5, 10, 15, 20]
    assert set(traj1) == set(traj5)
    worst, where = compare_trajectories(traj5, traj1)
    assert worst <= TRAJECTORY_RTOL, where
    for name in ("components", "ci_params"):
        for x, y in zip(jax.tree.leaves(state5[name]), jax.tree.leaves(state1[name]), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=TRAJECTORY_RTOL, atol=1e-7)


def test_sigterm_between_multi_step_calls_resumes_bitwise(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "k5.yaml",
        steps=40,
        checkpoint__save_every=5,
        checkpoint__keep_last=3,
        logging__log_every=5,
        runtime__compile_cache_dir=os.environ["JSP_TEST_COMPILE_CACHE"],
    )
    ref = run(train_cmd(config, tmp_path, "p-0000b000"))
    check(ref, ref.stderr)
    reference = tmp_path / "p-0000b000"
    assert json.loads((reference / "summary.json").read_text())["steps_per_call"] == 5

    cmd = train_cmd(config, tmp_path, "p-0000b001")
    run_dir = tmp_path / "p-0000b001"
    proc = start_and_wait_for_ckpt(cmd, run_dir, min_step=5)
    code, err = interrupt(proc, SIGTERM)
    assert code == REQUEUE_EXIT_CODE, err[-3000:]
    interrupted_at = max(ckpt_steps(run_dir))
    assert 0 < interrupted_at < 40 and interrupted_at % 5 == 0, interrupted_at
    again = run(cmd)
    check(again, again.stderr)
    step, state = final_state(run_dir)
    ref_step, ref_state = final_state(reference)
    assert step == ref_step == 40
    assert_states_bitwise_equal(state, ref_state)
    worst, where = compare_trajectories(
        trajectory(run_dir / "metrics.jsonl"), trajectory(reference / "metrics.jsonl")
    )
    assert worst == 0.0, where
