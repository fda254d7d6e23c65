"""Preemption end to end: kill -9 and SIGTERM mid-run, restart, and land on the uninterrupted state.

SPEC C1: resuming continues the same trajectory, bitwise on the same device count on CPU; a
checkpoint written on 4 devices restores onto 1 (then only TRAJECTORY_RTOL-close, since the
steps before it ran on 4 devices).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import TRAJECTORY_RTOL
from e2e import (
    SIGKILL,
    SIGTERM,
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

from param_decomp_jax.runtime.trainer import REQUEUE_EXIT_CODE

STEPS = 40
SAVE_EVERY = 5


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("preempt_runs")  # one .target_cache for every run here


@pytest.fixture(scope="module")
def config(runs: Path) -> Path:
    return write_config(
        runs / "preempt.yaml",
        steps=STEPS,
        checkpoint__save_every=SAVE_EVERY,
        checkpoint__keep_last=3,
        logging__log_every=1,
        runtime__compile_cache_dir=os.environ["JSP_TEST_COMPILE_CACHE"],
    )


@pytest.fixture(scope="module")
def reference(runs: Path, config: Path) -> Path:
    """The uninterrupted 1-device run every interrupted one must reproduce."""
    proc = run(train_cmd(config, runs, "p-00000000"))
    check(proc, proc.stderr)
    return runs / "p-00000000"


def _assert_same_as_reference(run_dir: Path, reference: Path) -> None:
    ref_step, ref_state = final_state(reference)
    step, state = final_state(run_dir)
    assert step == ref_step == STEPS
    assert_states_bitwise_equal(state, ref_state)
    worst, where = compare_trajectories(
        trajectory(run_dir / "metrics.jsonl"), trajectory(reference / "metrics.jsonl")
    )
    assert worst == 0.0, where


def test_kill9_then_restart_is_bitwise_identical(runs: Path, config: Path, reference: Path) -> None:
    cmd = train_cmd(config, runs, "p-0000a001")
    proc = start_and_wait_for_ckpt(cmd, runs / "p-0000a001", min_step=SAVE_EVERY)
    code, _ = interrupt(proc, SIGKILL)
    assert code == -SIGKILL
    saved = ckpt_steps(runs / "p-0000a001")
    assert 0 < max(saved) < STEPS, saved  # really killed mid-run
    assert not (runs / "p-0000a001" / "summary.json").exists()

    again = run(cmd)
    check(again, again.stderr)
    _assert_same_as_reference(runs / "p-0000a001", reference)


def test_sigterm_checkpoints_exits_for_requeue_and_resumes(runs: Path, config: Path, reference: Path) -> None:
    cmd = train_cmd(config, runs, "p-0000a002")
    run_dir = runs / "p-0000a002"
    proc = start_and_wait_for_ckpt(cmd, run_dir, min_step=SAVE_EVERY)
    code, err = interrupt(proc, SIGTERM)
    assert code == REQUEUE_EXIT_CODE, err[-3000:]
    interrupted_at = max(ckpt_steps(run_dir))
    assert 0 < interrupted_at < STEPS
    assert f"interrupted at step {interrupted_at}" in err  # the checkpoint is of the step it stopped at
    last_logged = max(trajectory(run_dir / "metrics.jsonl"))
    assert last_logged == interrupted_at  # metrics flushed up to the interruption, none beyond

    again = run(cmd)
    check(again, again.stderr)
    _assert_same_as_reference(run_dir, reference)


@pytest.mark.slow
def test_checkpoint_from_4_devices_resumes_on_1(runs: Path, config: Path, reference: Path) -> None:
    cmd = train_cmd(config, runs, "p-0000a004")
    run_dir = runs / "p-0000a004"
    proc = start_and_wait_for_ckpt(cmd, run_dir, min_step=SAVE_EVERY, n_devices=4)
    code, err = interrupt(proc, SIGTERM)
    assert code == REQUEUE_EXIT_CODE, err[-3000:]
    interrupted_at = max(ckpt_steps(run_dir))
    assert 0 < interrupted_at < STEPS

    again = run(cmd, n_devices=1)  # same command, same pinned config, one device
    check(again, again.stderr)
    step, state = final_state(run_dir)
    ref_step, ref_state = final_state(reference)
    assert step == ref_step == STEPS
    worst, where = compare_trajectories(
        trajectory(run_dir / "metrics.jsonl"), trajectory(reference / "metrics.jsonl")
    )
    print(
        f"4->1 device resume at step {interrupted_at}: max relative metric difference {worst:.2e} ({where})"
    )
    assert worst <= TRAJECTORY_RTOL, where
    for name in ("components", "ci_params"):
        for x, y in zip(_leaves(state[name]), _leaves(ref_state[name]), strict=True):
            np.testing.assert_allclose(x, y, rtol=TRAJECTORY_RTOL, atol=1e-7)


def _leaves(tree) -> list[np.ndarray]:
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]
