"""Helpers for end-to-end tests that run `jsp-train` / `pd-jax-lm` in subprocesses.

Subprocesses because the device count is fixed when jax starts its backend, and because kill -9
and SIGTERM must hit a real process. Every subprocess is bounded by a timeout.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml
from conftest import REPO_ROOT

SMOKE = REPO_ROOT / "configs" / "tms_5-2_smoke.yaml"
TIMEOUT_S = 240  # one training subprocess; generous for 2 shared, busy cores

# `jsp-train`, optionally slowed down on the host side by E2E_STEP_SLEEP_S per training call so a
# test can interrupt it mid-run deterministically. The sleep happens when the loop asks for the
# call's inputs (toys have none: the batch is made on device): the numbers computed are unchanged.
TRAIN_DRIVER = textwrap.dedent(
    """
    import os, sys, time
    delay = float(os.environ.get("E2E_STEP_SLEEP_S", "0"))
    if delay:
        from param_decomp_jax.runtime import data
        original = data.ToyBatches.step_inputs
        def slow_step_inputs(self, step):
            time.sleep(delay)
            return original(self, step)
        data.ToyBatches.step_inputs = slow_step_inputs
    from param_decomp_jax.cli.train import main
    sys.exit(main(sys.argv[1:]))
    """
)


def env(n_devices: int = 1, **extra: str) -> dict[str, str]:
    """Child environment: N simulated CPU devices, no inherited SLURM/JSP job variables."""
    out = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "JSP_NUM", "JSP_PROC", "JSP_COORD"))
    }
    out["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
    out["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), out.get("PYTHONPATH", "")])
    out["WANDB_MODE"] = "disabled"
    out["PYTHONUNBUFFERED"] = "1"
    out.update(extra)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def train_cmd(config: Path, out_dir: Path, run_id: str, *overrides: str) -> list[str]:
    cmd = [sys.executable, "-c", TRAIN_DRIVER, str(config), "--out-dir", str(out_dir), "--run-id", run_id]
    cmd += ["--no-progress"]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def run(
    cmd: list[str], n_devices: int = 1, timeout: float = TIMEOUT_S, **extra: str
) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env(n_devices, **extra), capture_output=True, text=True, timeout=timeout)


def check(proc: subprocess.CompletedProcess | subprocess.Popen, stderr: str, expect: int = 0) -> None:
    assert proc.returncode == expect, f"exit {proc.returncode} (want {expect}):\n{stderr[-4000:]}"


def write_config(path: Path, base: Path = SMOKE, losses: list[dict] | None = None, **top: Any) -> Path:
    """A copy of `base` with top-level keys replaced (dotted keys go one level deep)."""
    raw = yaml.safe_load(base.read_text())
    if losses is not None:
        raw["losses"] = losses
    for key, value in top.items():
        head, _, tail = key.partition("__")
        if tail:
            raw.setdefault(head, {})[tail] = value
        else:
            raw[head] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def ckpt_steps(run_dir: Path) -> list[int]:
    d = run_dir / "ckpts"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def start_and_wait_for_ckpt(
    cmd: list[str], run_dir: Path, min_step: int, n_devices: int = 1, step_sleep_s: float = 0.1
) -> subprocess.Popen:
    """Start a slowed-down run; return once a checkpoint at step >= `min_step` is committed."""
    proc = subprocess.Popen(
        cmd,
        env=env(n_devices, E2E_STEP_SLEEP_S=str(step_sleep_s)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"run ended (exit {proc.returncode}) before a checkpoint:\n{err[-4000:]}")
        if any(s >= min_step for s in ckpt_steps(run_dir)):
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no checkpoint >= {min_step} in {run_dir} after {TIMEOUT_S}s")


def interrupt(proc: subprocess.Popen, sig: int) -> tuple[int, str]:
    os.kill(proc.pid, sig)
    try:
        _, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def trajectory(metrics_path: Path) -> dict[int, dict[str, Any]]:
    """step -> every metric logged at that step (train, eval and final records merged)."""
    out: dict[int, dict[str, Any]] = {}
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        step = rec.pop("step")
        dup = set(rec) & set(out.get(step, {}))
        assert not dup, f"step {step} logged twice: {sorted(dup)[:5]}"
        out.setdefault(step, {}).update(rec)
    return out


def compare_trajectories(a: dict, b: dict) -> tuple[float, str]:
    """(max relative difference, where) over every non-timing metric; structure must match."""
    assert sorted(a) == sorted(b), f"logged steps differ: {sorted(a)} vs {sorted(b)}"
    worst, where = 0.0, ""
    for step in a:
        keys = {k for k in a[step] if not k.startswith("time/")}
        assert keys == {k for k in b[step] if not k.startswith("time/")}, f"metric names differ at {step}"
        for k in keys:
            x, y = a[step][k], b[step][k]
            if x == y:
                continue
            if isinstance(x, str) or isinstance(y, str):
                return math.inf, f"{k}@{step}: {x} vs {y}"
            d = abs(x - y) / max(abs(x), abs(y))
            if d > worst:
                worst, where = d, f"{k}@{step}: {x!r} vs {y!r}"
    return worst, where


def final_state(run_dir: Path) -> tuple[int, Any]:
    """(step, state) of the newest checkpoint, restored onto this (1-device) process."""
    from param_decomp_jax.runtime.checkpoint import CheckpointStore
    from param_decomp_jax.runtime.mesh import make_mesh, replicated

    with CheckpointStore(run_dir, read_only=True) as store:
        step = store.latest_step()
        assert step is not None, f"no checkpoint in {run_dir}"
        state = store.restore(step, store.abstract_from_metadata(step, replicated(make_mesh())))
    return step, jax.device_get(state)


def assert_states_bitwise_equal(a: Any, b: Any) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        where = jax.tree_util.keystr(path)
        assert (x.dtype, x.shape) == (y.dtype, y.shape), where
        assert np.array_equal(np.atleast_1d(x).view(np.uint8), np.atleast_1d(y).view(np.uint8)), where


SIGTERM, SIGKILL = signal.SIGTERM, signal.SIGKILL
