"""Tiny trained runs shared by the eval tests (test_open_run, test_slow_eval, test_wandb_sink).

Training is the expensive part, so each run is made ONCE per pytest process (module-level memo)
and every test reads it. The toy run has wandb enabled in offline mode, so the same run also
serves the wandb-sink tests; `wandb_offline_env` keeps every wandb call off the network.
"""

from __future__ import annotations

import contextlib
import io
import os
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO_ROOT, STORIES260K

TOY_CONFIG = REPO_ROOT / "configs" / "tms_5-2_smoke.yaml"
TOY_RUN_ID = "p-e0a1e001"
LM_RUN_ID = "p-e0a1e002"
# Pretrained toy targets persist across sessions (same key scheme as the trainer's cache).
TARGET_CACHE = REPO_ROOT / ".jax_cache" / "targets"
TOY_OVERRIDES = (
    "steps=10",
    "eval.eval_every=5",
    "eval.pgd_steps=2",
    "eval.ci_l0_groups={both: ['linear*']}",
    "logging.log_every=5",
    "checkpoint.save_every=5",
    "wandb.enabled=true",
    "wandb.tags=[eval-test]",
)


class FakeTTY(io.StringIO):
    """A stderr that claims to be a terminal: the progress bar would draw on it."""

    def isatty(self) -> bool:
        return True


@contextlib.contextmanager
def wandb_offline_env(wandb_dir: Path) -> Iterator[None]:
    """Offline wandb under `wandb_dir`; the API URL is a closed local port, so an accidental
    network call would fail at once instead of reaching the internet."""
    values = {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(wandb_dir),
        "WANDB_BASE_URL": "http://127.0.0.1:9",
        "WANDB_SILENT": "true",
        "WANDB_DISABLE_GIT": "true",
    }
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    wandb_dir.mkdir(parents=True, exist_ok=True)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _compile_cache_override() -> str:
    # The CLIs point jax at the config's compile cache; keep them on the suite's warm one.
    return f"runtime.compile_cache_dir={os.environ['JSP_TEST_COMPILE_CACHE']}"


def _out_dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    link = root / ".target_cache"
    if not link.exists():
        TARGET_CACHE.mkdir(parents=True, exist_ok=True)
        link.symlink_to(TARGET_CACHE, target_is_directory=True)
    return root


@dataclass(frozen=True)
class ToyRun:
    run_dir: Path
    wandb_dir: Path
    train_stderr: str  # what `jsp-train --no-progress` wrote to a terminal-like stderr
    slow_eval_rc: int
    slow_eval_stdout: str


_MEMO: dict[str, object] = {}


def toy_run(factory: pytest.TempPathFactory) -> ToyRun:
    """TMS 5-2 smoke, 10 steps, checkpoints 0/5/10, wandb offline; then `jsp-slow-eval` on it."""
    if "toy" not in _MEMO:
        from param_decomp_jax.cli import slow_eval, train

        root = _out_dir(factory.mktemp("eval_runs"))
        wandb_dir = root / "wandb_dir"
        args = [str(TOY_CONFIG), "--out-dir", str(root), "--run-id", TOY_RUN_ID, "--no-progress"]
        for o in (*TOY_OVERRIDES, _compile_cache_override()):
            args += ["--set", o]
        err, out = FakeTTY(), io.StringIO()
        with wandb_offline_env(wandb_dir), contextlib.redirect_stderr(err):
            assert train.main(args) == 0, err.getvalue()[-3000:]
        with wandb_offline_env(wandb_dir), contextlib.redirect_stdout(out):
            rc = slow_eval.main([str(root / TOY_RUN_ID), "--n-batches", "1", "--no-progress"])
        _MEMO["toy"] = ToyRun(root / TOY_RUN_ID, wandb_dir, err.getvalue(), rc, out.getvalue())
    return _MEMO["toy"]  # type: ignore[return-value]


def lm_config_yaml() -> str:
    """A tiny stories260K decomposition: layer 4's q/k (for attention KL) and MLP."""
    d = STORIES260K
    return textwrap.dedent(
        f"""
        run_name: stories_tiny
        steps: 2
        batch_size: 2
        target: {{type: llama, checkpoint_dir: {d}}}
        data: {{type: tokens, train_path: {d}/train-00000.parquet, eval_path: {d}/val-00000.parquet, seq_len: 32}}
        sites:
          - {{name: "layers.4.self_attn.[qk]_proj", C: 8}}
          - {{name: "layers.4.mlp.*", C: 16}}
        ci_fn: {{type: layerwise_mlp, hidden_dims: [8]}}
        losses:
          - {{type: faithfulness, coeff: 1.0}}
          - {{type: importance_minimality, coeff: 1.0e-3, p_start: 1.0}}
          - {{type: stochastic_recon, coeff: 1.0, plan: {{type: all_sites}}, routing: {{type: all}}}}
        components_optimizer: {{lr: 1.0e-3}}
        ci_optimizer: {{lr: 1.0e-3}}
        faithfulness_warmup: {{steps: 20, lr: 0.01}}
        eval: {{eval_every: 0, pgd_steps: 1, ci_l0_groups: {{attn: ["layers.*.self_attn.*"], mlp: ["layers.*.mlp.*"]}}}}
        logging: {{log_every: 1}}
        checkpoint: {{save_every: 0}}
        """
    )


def lm_run(factory: pytest.TempPathFactory) -> Path:
    if "lm" not in _MEMO:
        from param_decomp_jax.cli import train

        root = _out_dir(factory.mktemp("lm_runs"))
        cfg = root / "stories_tiny.yaml"
        cfg.write_text(lm_config_yaml())
        args = [str(cfg), "--out-dir", str(root), "--run-id", LM_RUN_ID, "--no-progress"]
        assert train.main([*args, "--set", _compile_cache_override()]) == 0
        _MEMO["lm"] = root / LM_RUN_ID
    return _MEMO["lm"]  # type: ignore[return-value]
