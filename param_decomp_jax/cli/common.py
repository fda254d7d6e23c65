"""Arguments and error handling shared by every command that takes a config."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from param_decomp_config import ConfigError, ExperimentConfig, load_config, mint_run_id

EXIT_CONFIG_ERROR = 2


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="Experiment YAML (see configs/).")
    parser.add_argument("--out-dir", help="Parent folder of run directories (overrides `out_dir`).")
    parser.add_argument(
        "--run-id", help="Run id `p-` + 8 hex digits (default: from the config, else minted)."
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="Override one config value, validated like the YAML; repeatable. List items by index, "
        "e.g. --set losses.2.coeff=0.5 --set target.pretrain.seed=3",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="Apply the config's `smoke:` overrides (a few seconds on CPU)."
    )


def config_from_args(args: argparse.Namespace, mint: bool = True) -> ExperimentConfig:
    """The validated config; `mint=False` leaves a missing run_id for a multi-process agreement."""
    cfg = load_config(args.config, args.overrides, args.smoke, args.out_dir, args.run_id)
    if mint and cfg.run_id is None:
        cfg = cfg.model_copy(update={"run_id": mint_run_id()})
    return cfg


def run_cli(body: Callable[[], int]) -> int:
    """Run a command body; config problems print one message and exit 2, without a traceback."""
    try:
        return body()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
