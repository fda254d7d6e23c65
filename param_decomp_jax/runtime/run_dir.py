"""The run directory contract: <out_dir>/<run_id>/{config.yaml, metrics.jsonl, ckpts/, figures/, slow_eval/}."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from param_decomp_config import ConfigError, ExperimentConfig, dump_config


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def ckpts(self) -> Path:
        return self.root / "ckpts"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def slow_eval(self) -> Path:
        return self.root / "slow_eval"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"


def run_dir_for(cfg: ExperimentConfig) -> RunDir:
    assert cfg.run_id is not None, "run_id must be minted before the run directory is known"
    return RunDir(Path(cfg.out_dir) / cfg.run_id)


def _comparable(cfg_text: str) -> str:
    """Pinned configs are compared without fields that may legitimately differ on resume."""
    raw = yaml.safe_load(cfg_text)
    raw.pop("out_dir", None)
    raw.get("wandb", {}).pop("group", None)
    return yaml.safe_dump(raw, sort_keys=True)


def pin_config(run: RunDir, cfg: ExperimentConfig, write: bool = True) -> None:
    """Write config.yaml, or refuse (with a readable diff) if a different one is pinned already.

    `write=False` only checks (non-primary processes: every process refuses a mismatch, rather
    than process 0 alone leaving the others waiting in a collective).
    """
    text = dump_config(cfg)
    if run.config.exists():
        old = run.config.read_text()
        if _comparable(old) != _comparable(text):
            diff = "\n".join(
                difflib.unified_diff(
                    _comparable(old).splitlines(),
                    _comparable(text).splitlines(),
                    "pinned",
                    "requested",
                    lineterm="",
                )
            )
            raise ConfigError(
                f"{run.config}: this run directory was started with a different config; "
                f"refusing to resume. Use a new --run-id, or restore the pinned config.\n{diff}"
            )
        return
    if not write:
        return
    run.root.mkdir(parents=True, exist_ok=True)
    # Atomic, so another process checking at the same moment never reads half a file.
    tmp = run.config.with_suffix(f".yaml.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(run.config)
