"""Pulse tests: `jsp-train` on each target's smoke config writes the run-directory contract.

The long acceptance runs (full TMS 5-2 recovery) are marked `slow`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO_ROOT, STORIES260K

from param_decomp_jax.cli.slow_eval import main as slow_eval_main
from param_decomp_jax.cli.train import main as train_main
from param_decomp_jax.runtime.sinks import read_metrics

REQUIRED = ("loss/total", "loss/importance_minimality", "time/step_s")


def _train(config: str, tmp_path: Path, run_id: str, *extra: str) -> Path:
    code = train_main(
        [str(REPO_ROOT / config), "--out-dir", str(tmp_path), "--run-id", run_id, "--no-progress", *extra]
    )
    assert code == 0
    return tmp_path / run_id


def _check_run_dir(run: Path, sites: list[str], steps: int) -> dict:
    assert (run / "config.yaml").is_file()
    assert any((run / "ckpts").iterdir())
    records = read_metrics(run / "metrics.jsonl")
    train = [r for r in records if "loss/total" in r]
    assert train and train[-1]["step"] == steps
    for key in REQUIRED:
        assert key in train[-1], key
    for site in sites:
        assert f"ci_l0/{site}" in train[-1] and f"alive/{site}" in train[-1]
        assert any(f"eval/alive/{site}" in r for r in records)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == steps
    return summary


@pytest.mark.filterwarnings("ignore:TMS target")
def test_tms_smoke_pulse(tmp_path: Path):
    summary = _check_run_dir(
        _train("configs/tms_5-2_smoke.yaml", tmp_path, "p-0000b001"), ["linear1", "linear2"], 20
    )
    assert "eval/identity_ci_error/linear1" in summary


def test_resid_mlp_smoke_pulse(tmp_path: Path):
    run = _train("configs/resid_mlp_1l_smoke.yaml", tmp_path, "p-0000b002")
    summary = _check_run_dir(run, ["layers.0.mlp_in", "layers.0.mlp_out"], 20)
    # The config declares mlp_out a dense block (eval.dense_ci_blocks): only that site is scored.
    block_err = summary["eval/dense_ci_error/layers.0.mlp_out"]
    assert block_err >= 0 and "eval/dense_ci_error/layers.0.mlp_in" not in summary
    # jsp-slow-eval on the same checkpoint (ResidMLP batches go through the embedding prefix)
    # reproduces the end-of-run probe metrics exactly (same CI fn on the same probes).
    assert slow_eval_main([str(run), "--no-figures", "--no-progress"]) == 0
    record = json.loads((run / "slow_eval" / "20.json").read_text())
    assert record["metrics"]["eval/dense_ci_error/layers.0.mlp_out"] == block_err
    assert (
        record["metrics"]["eval/identity_ci_error/layers.0.mlp_in"]
        == summary["eval/identity_ci_error/layers.0.mlp_in"]
    )


@pytest.mark.slow
@pytest.mark.data
def test_stories260k_smoke_pulse(tmp_path: Path):
    if not STORIES260K.exists():
        pytest.skip("needs ../shared/data")
    run = _train("configs/stories260k_mlp_smoke.yaml", tmp_path, "p-0000b003")
    sites = [f"layers.{i}.mlp.{k}_proj" for i in range(5) for k in ("gate", "up", "down")]
    summary = _check_run_dir(run, sites, 6)
    assert "loss/persistent_pgd_recon" in summary and "eval/kl/ci_masked" in summary


@pytest.mark.slow
def test_tms_5_2_recovers_the_features(tmp_path: Path):
    """Issue acceptance on the real config (10k steps, ~2 min on 2 free cores): 5 alive components per
    site and at most one wrong probe entry per site (SPEC §9 metric; error 0.2 = 1 of 5 rows). The
    runs seen so far end at 0.0 / 0.0, but the trajectory is chaotic: last-bit differences between
    processes (compile cache, thread scheduling) diverge by step 200, and a run can end with one
    stray CI of ~0.2 on a neighbouring probe (seen with the PPGD variant), so CI asserts the margin."""
    summary = _check_run_dir(
        _train("configs/tms_5-2.yaml", tmp_path, "p-0000b004"), ["linear1", "linear2"], 10000
    )
    assert summary["eval/probe_alive/linear1"] == 5 and summary["eval/probe_alive/linear2"] == 5
    assert summary["eval/identity_ci_error/linear1"] <= 0.2
    assert summary["eval/identity_ci_error/linear2"] <= 0.2


@pytest.mark.slow
def test_tms_5_2_ppgd_recovers_the_features(tmp_path: Path):
    """Issue 3 on the real PPGD config (10k steps, ~2 min on 2 free cores): 5 alive per site, at most
    one wrong probe entry per site (the runs seen with PPGD coefficient 0.5 end at 0.0 / 0.0 with every
    stray CI exactly 0; at 1.0 one process gave 0.0 / 0.0 and another 0.0 / 0.2, so CI asserts the
    margin, as above), and the adversarial recon loss ends well below where it started (it is
    computed from step 0 against the still-frozen sources, then trained)."""
    run = _train("configs/tms_5-2_ppgd.yaml", tmp_path, "p-0000b005")
    summary = _check_run_dir(run, ["linear1", "linear2"], 10000)
    assert summary["eval/probe_alive/linear1"] == 5 and summary["eval/probe_alive/linear2"] == 5
    assert summary["eval/identity_ci_error/linear1"] <= 0.2
    assert summary["eval/identity_ci_error/linear2"] <= 0.2
    ppgd = [
        r["loss/persistent_pgd_recon"]
        for r in read_metrics(run / "metrics.jsonl")
        if "loss/persistent_pgd_recon" in r
    ]
    assert ppgd[-1] < 0.2 * ppgd[0], ppgd
