"""SPEC D1/D2 end to end: the metric trajectory does not depend on how the batch is split.

A 20-step TMS run with every kind of loss term (faithfulness, imp-min, stochastic recon, PPGD with
shared scope `c` and batch-sharded scope `bsc`; toys have no sequence axis, so `sc` is `c`) must
log the same metrics on 1 device, on 4 devices, and on 2 processes x 2 devices.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TRAJECTORY_RTOL
from e2e import (
    TIMEOUT_S,
    check,
    ckpt_steps,
    compare_trajectories,
    env,
    free_port,
    train_cmd,
    trajectory,
    write_config,
)

from param_decomp_jax.runtime.trainer import REQUEUE_EXIT_CODE

LOSSES = [
    {"type": "faithfulness", "coeff": 1.0},
    {"type": "importance_minimality", "coeff": 3e-3, "p_start": 1.0},
    {"type": "stochastic_recon", "coeff": 1.0, "name": "stoch"},
    {"type": "stochastic_recon", "coeff": 1.0, "name": "stoch_layerwise", "plan": {"type": "per_site"}},
    {"type": "persistent_pgd_recon", "coeff": 0.5, "name": "ppgd_c", "scope": {"type": "c"}},
    {"type": "persistent_pgd_recon", "coeff": 0.5, "name": "ppgd_bsc", "scope": {"type": "bsc"}},
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("invariance_runs")


@pytest.fixture(scope="module")
def config(runs: Path) -> Path:
    return write_config(
        runs / "invariance.yaml",
        losses=LOSSES,
        steps=20,
        logging__log_every=1,
        runtime__compile_cache_dir=os.environ["JSP_TEST_COMPILE_CACHE"],
    )


@pytest.fixture(scope="module")
def device_runs(runs: Path, config: Path) -> dict[int, dict]:
    """The 1-device and 4-device trajectories, run side by side (two cores)."""
    procs = {
        n: subprocess.Popen(
            train_cmd(config, runs, f"p-000000d{n}"),
            env=env(n),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in (1, 4)
    }
    for proc in _wait_all(list(procs.values())):
        check(proc, proc.stderr)
    return {n: trajectory(runs / f"p-000000d{n}" / "metrics.jsonl") for n in procs}


def _assert_invariant(a: dict, b: dict, label: str) -> None:
    worst, where = compare_trajectories(a, b)
    print(f"{label}: max relative metric difference {worst:.2e} ({where})")
    assert worst <= TRAJECTORY_RTOL, where
    # Counts are integers: a tiny float difference must not flip one.
    for step in a:
        counts = {k: v for k, v in a[step].items() if k.startswith(("alive/", "eval/alive/"))}
        assert counts == {k: b[step][k] for k in counts}, step
    names = set().union(*(rec.keys() for rec in a.values()))
    assert {"loss/ppgd_c", "loss/ppgd_bsc", "loss/stoch", "loss/importance_minimality"} <= names


def test_one_and_four_devices_give_the_same_trajectory(device_runs: dict[int, dict]) -> None:
    assert sorted(device_runs[1]) == list(range(1, 21)), sorted(device_runs[1])  # log_every 1
    _assert_invariant(device_runs[1], device_runs[4], "1 vs 4 devices")


def _start_two_processes(cmd: list[str], **extra: str) -> list[subprocess.Popen]:
    port = free_port()
    return [
        subprocess.Popen(
            cmd,
            env=env(
                2, JSP_COORDINATOR=f"127.0.0.1:{port}", JSP_NUM_PROCESSES="2", JSP_PROCESS_ID=str(i), **extra
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]


def _launch_two_processes(cmd: list[str], **extra: str) -> list[subprocess.CompletedProcess]:
    return _wait_all(_start_two_processes(cmd, **extra))


def _wait_all(procs: list[subprocess.Popen]) -> list[subprocess.CompletedProcess]:
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT_S)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return done


@pytest.mark.slow
def test_two_processes_reproduce_four_devices(runs: Path, config: Path, device_runs: dict[int, dict]) -> None:
    # No --run-id: process 0 mints it and broadcasts it, so both write to one run directory.
    cmd = train_cmd(config, runs / "mp", "p-00000000")
    cmd = cmd[: cmd.index("--run-id")] + cmd[cmd.index("--run-id") + 2 :]
    results = _launch_two_processes(cmd)
    for r in results:
        check(r, r.stderr)
    run_dirs = [p for p in (runs / "mp").iterdir() if p.name.startswith("p-")]
    assert len(run_dirs) == 1, run_dirs
    # Only process 0 writes the run summary to stdout and files; both saved the checkpoints.
    assert "run p-" in results[0].stdout and "run p-" not in results[1].stdout
    multi = trajectory(run_dirs[0] / "metrics.jsonl")
    _assert_invariant(multi, device_runs[4], "2 processes x 2 devices vs 1 x 4")
    assert (run_dirs[0] / "summary.json").exists()


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(runs: Path, config: Path) -> None:
    # Processes share collectives, so a signal seen by one must stop all at one step (agreed at
    # the log cadence, here every 5 steps); then both exit 75 and a restart of both finishes.
    cmd = train_cmd(config, runs, "p-000000f2", "steps=40", "checkpoint.save_every=5", "logging.log_every=5")
    run_dir = runs / "p-000000f2"
    procs = _start_two_processes(cmd, E2E_STEP_SLEEP_S="0.1")
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not any(s >= 5 for s in ckpt_steps(run_dir)):
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.05)
        os.kill(procs[1].pid, signal.SIGTERM)  # the non-primary process only
    finally:
        results = _wait_all(procs)
    for r in results:
        check(r, r.stderr, expect=REQUEUE_EXIT_CODE)
    stopped = {re.search(r"interrupted at step (\d+)", r.stderr).group(1) for r in results}
    assert len(stopped) == 1 and int(stopped.pop()) % 5 == 0
    for r in _launch_two_processes(cmd):
        check(r, r.stderr)
    assert max(ckpt_steps(run_dir)) == 40
    assert sorted(trajectory(run_dir / "metrics.jsonl")) == list(range(5, 41, 5))


# Each process loads its rows of the global token batch; the global array must be the one a
# single process would load (token batches go through make_array_from_process_local_data).
_TOKEN_WORKER = textwrap.dedent(
    """
    import json, sys
    from param_decomp_jax.runtime.distributed import maybe_initialize, resolve_settings
    maybe_initialize(resolve_settings())
    import jax, numpy as np
    from jax.experimental import multihost_utils
    from param_decomp_config.data import TokenDataConfig
    from param_decomp_jax.runtime.data import TokenBatchProvider
    from param_decomp_jax.runtime.mesh import batch_sharding, make_mesh
    cfg = TokenDataConfig(train_path=sys.argv[1], seq_len=4)
    provider = TokenBatchProvider(cfg, 8, seed=3, sharding=batch_sharding(make_mesh(), 2))
    out = {"process": jax.process_index(), "devices": jax.device_count(), "batches": []}
    for step in range(3):
        arr = provider.batch(step)
        assert arr.shape == (8, 4) and len(arr.addressable_shards) == 2
        out["batches"].append(np.asarray(multihost_utils.process_allgather(arr, tiled=True)).tolist())
    print("RESULT " + json.dumps(out), flush=True)
    """
)


def test_token_batches_are_global_under_two_processes(tmp_path: Path) -> None:
    from param_decomp_jax.runtime.token_data import BatchSchedule, TokenBatches, TokenDataset

    rows = [list(range(100 * i, 100 * i + 4)) for i in range(20)]
    shard = tmp_path / "train.parquet"
    pq.write_table(pa.table({"input_ids": pa.array(rows, type=pa.list_(pa.int32()))}), shard)
    results = _launch_two_processes([sys.executable, "-c", _TOKEN_WORKER, str(shard)])
    outs = []
    for r in results:
        check(r, r.stderr)
        outs.append(json.loads(next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))[7:]))
    dataset = TokenDataset(shard, "input_ids", 4)
    expected = TokenBatches(dataset, BatchSchedule(dataset.n_rows, 8, 3))
    for o in outs:
        assert o["devices"] == 4
        for step, got in enumerate(o["batches"]):
            np.testing.assert_array_equal(np.array(got), expected.global_batch(step))
