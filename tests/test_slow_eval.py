"""`jsp-slow-eval` (issue 6, item 2): JSON + figures for a toy run and a tiny stories260K run,
consistency with the in-loop eval, clear errors, and the attention-pattern helper it relies on."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TRAJECTORY_RTOL
from eval_runs import lm_run, toy_run

from param_decomp_jax.cli import slow_eval as cli
from param_decomp_jax.runtime.sinks import read_metrics

TOY_FIGURES = {
    "ci_histograms",
    "mean_ci_per_component",
    "component_density",
    "hidden_recon",
    "permuted_ci",
    "uv_matrices",
}
# Mask families with no randomness: slow eval on eval batch 0 must reproduce the in-loop numbers.
DETERMINISTIC = ("unmasked", "ci_masked", "rounded_ci", "zero_masked")


def _final_eval(run_dir, step: int) -> dict:
    rows = [
        r
        for r in read_metrics(run_dir / "metrics.jsonl")
        if r["step"] == step and "eval/recon/ci_masked" in r
    ]
    assert rows, f"no in-loop eval at step {step}"
    return rows[-1]


def _check_figures(run_dir, record: dict, expected: set[str]) -> None:
    assert set(record["figures"]) == expected
    for rel in record["figures"].values():
        png = run_dir / rel
        assert png.parent == run_dir / "figures"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_toy_slow_eval_writes_json_and_figures(tmp_path_factory) -> None:
    run = toy_run(tmp_path_factory)
    assert run.slow_eval_rc == 0, run.slow_eval_stdout
    record = json.loads((run.run_dir / "slow_eval" / "10.json").read_text())
    assert record["step"] == 10 and record["n_batches"] == 1
    m = record["metrics"]
    logged = _final_eval(run.run_dir, 10)
    for kind in DETERMINISTIC:
        np.testing.assert_allclose(
            m[f"eval/recon/{kind}"], logged[f"eval/recon/{kind}"], rtol=TRAJECTORY_RTOL
        )
    for site in ("linear1", "linear2"):
        assert m[f"slow_eval/alive/{site}"] == logged[f"eval/alive/{site}"]
        assert m[f"slow_eval/hidden_mse/ci_masked/{site}"] >= 0
        assert f"eval/identity_ci_error/{site}" in m
        assert len(record["per_component"][site]["mean_ci"]) == 20
    assert m["eval/ci_l0_group/both"] == pytest.approx(m["eval/ci_l0/total"])
    _check_figures(run.run_dir, record, TOY_FIGURES)


def test_slow_eval_older_step_without_figures(tmp_path_factory, capsys) -> None:
    run = toy_run(tmp_path_factory)
    assert (
        cli.main([str(run.run_dir), "--step", "5", "--n-batches", "2", "--no-figures", "--no-progress"]) == 0
    )
    record = json.loads((run.run_dir / "slow_eval" / "5.json").read_text())
    assert record["step"] == 5 and record["n_batches"] == 2 and record["figures"] == {}
    assert "5.json" in capsys.readouterr().out


def test_slow_eval_eval_overrides(tmp_path_factory, capsys) -> None:
    """`--set eval.*` changes how a finished run is scored (here: a dense-CI block on linear2)."""
    run = toy_run(tmp_path_factory)
    args = [str(run.run_dir), "--step", "5", "--no-figures", "--no-progress"]
    assert cli.main([*args, "--set", "eval.dense_ci_blocks={linear2: 5}"]) == 0
    m = json.loads((run.run_dir / "slow_eval" / "5.json").read_text())["metrics"]
    assert m["eval/dense_ci_error/linear2"] >= 0 and "eval/dense_ci_error/linear1" not in m
    assert "dense_ci_error: linear2=" in capsys.readouterr().out
    # Only evaluation settings: what was trained cannot be re-declared.
    assert cli.main([*args, "--set", "steps=3"]) == 2
    assert "only eval.* keys" in capsys.readouterr().err
    assert cli.main([*args, "--set", "eval.dense_ci_blocks={linear7: 5}"]) == 2
    assert "eval.dense_ci_blocks.linear7" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing", "no_ckpt", "bad_step", "bad_n"])
def test_slow_eval_errors_exit_2_without_traceback(case, tmp_path, tmp_path_factory, capsys) -> None:
    run_dir = tmp_path / "p-00000000"
    args: list[str] = []
    if case == "no_ckpt":
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text(
            toy_run(tmp_path_factory).run_dir.joinpath("config.yaml").read_text()
        )
    elif case in ("bad_step", "bad_n"):
        run_dir = toy_run(tmp_path_factory).run_dir
        args = ["--step", "3"] if case == "bad_step" else ["--n-batches", "0"]
    assert cli.main([str(run_dir), *args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    expected = {
        "missing": "run directory not found",
        "no_ckpt": "no checkpoint",
        "bad_step": "available steps",
        "bad_n": "--n-batches",
    }[case]
    assert expected in err, err


@pytest.mark.data
def test_attention_probs_reproduce_the_forward(stories260k_dir) -> None:
    """probs @ v from `attention_probs` on pre-RoPE q/k equals the forward's attention output."""
    import jax
    import jax.numpy as jnp

    from param_decomp_jax.targets import llama

    arch = llama.load_llama_arch(stories260k_dir)
    B, T, H, G, K = 2, 7, arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (
        jax.random.normal(kq, (B, T, H * K)),
        jax.random.normal(kk, (B, T, G * K)),
        jax.random.normal(kv, (B, T, G, K)),
    )
    probs = llama.attention_probs(arch, q, k)
    np.testing.assert_allclose(np.asarray(probs.sum(-1)), 1.0, rtol=1e-6)
    assert float(jnp.abs(jnp.triu(probs, 1)).max()) == 0.0  # causal
    rope = llama._rope_tables(arch, T)
    expected = llama._causal_attention(
        arch,
        llama._apply_rope(q.reshape(B, T, H, K), *rope),
        llama._apply_rope(k.reshape(B, T, G, K), *rope),
        v,
    )
    v_heads = jnp.repeat(v, H // G, axis=2)  # query head h reads KV head h // (H/G)
    got = jnp.einsum("bhts,bshk->bthk", probs, v_heads).reshape(B, T, H * K)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.data
def test_lm_slow_eval(tmp_path_factory, capsys) -> None:
    run_dir = lm_run(tmp_path_factory)
    assert cli.main([str(run_dir), "--n-batches", "1", "--no-progress"]) == 0, capsys.readouterr().err
    record = json.loads((run_dir / "slow_eval" / "2.json").read_text())
    m = record["metrics"]
    logged = _final_eval(run_dir, 2)
    for kind in DETERMINISTIC:  # batch 0 of the eval stream, same state: the in-loop numbers
        for metric in ("recon", "ce"):
            key = f"eval/{metric}/{kind}"
            np.testing.assert_allclose(m[key], logged[key], rtol=TRAJECTORY_RTOL, err_msg=key)
    assert m["eval/kl/ci_masked"] == m["eval/recon/ci_masked"]
    # Consistency with training: the clean model predicts its own samples better than any masked
    # forward; with every component off the output is far from the target.
    assert all(m["eval/ce/clean"] < m[f"eval/ce/{k}"] for k in ("ci_masked", "zero_masked", "stochastic"))
    assert m["eval/recon/zero_masked"] >= m["eval/recon/unmasked"]
    assert m["eval/ci_l0_group/attn"] + m["eval/ci_l0_group/mlp"] == pytest.approx(m["eval/ci_l0/total"])
    for kind in ("ci_masked", "stochastic"):
        assert m[f"slow_eval/attn_kl/{kind}/layers.4"] > 0
        assert m[f"slow_eval/hidden_mse/{kind}/layers.4.mlp.down_proj"] > 0
    _check_figures(
        run_dir,
        record,
        {"ci_histograms", "mean_ci_per_component", "component_density", "hidden_recon", "attention_kl"},
    )
