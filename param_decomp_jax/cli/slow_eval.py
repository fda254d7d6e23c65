"""`jsp-slow-eval RUN_DIR [--step N]`: evaluate one checkpoint of a run (on this machine's devices,
whatever the training topology) and write `slow_eval/<step>.json` plus PNGs in `figures/`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from param_decomp_jax.cli.common import EXIT_CONFIG_ERROR, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jsp-slow-eval",
        description="Evaluate a checkpoint of a parameter-decomposition run on its eval stream: in-loop "
        "metrics averaged over several batches, CI distributions, hidden-activation recon, "
        "attention-pattern KL (LMs) and probe-CI / UV plots (toys). Writes RUN_DIR/slow_eval/<step>.json "
        "and RUN_DIR/figures/*.png; logs to wandb when the run has wandb enabled.",
    )
    parser.add_argument("run_dir", type=Path, help="A run directory (holds config.yaml and ckpts/).")
    parser.add_argument("--step", type=int, help="Checkpoint step (default: the latest).")
    parser.add_argument("--n-batches", type=int, default=8, help="Eval batches to average over (default 8).")
    parser.add_argument("--no-figures", action="store_true", help="Only write the JSON.")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="eval.KEY=VALUE",
        help="Override an evaluation setting of the run's pinned config (eval.* keys only; "
        "repeatable), e.g. --set 'eval.dense_ci_blocks={layers.*.mlp_out: 50}' or "
        "--set eval.probe_value=1.0.",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from param_decomp_jax.eval.open_run import RunOpenError, load_run_config
        from param_decomp_jax.eval.slow_eval import run_slow_eval
        from param_decomp_jax.runtime.compile_cache import enable_compile_cache
        from param_decomp_jax.runtime.run_dir import RunDir

        try:
            # The same persistent compile cache as training (before anything compiles).
            cfg = load_run_config(RunDir(args.run_dir), args.overrides)
            enable_compile_cache(cfg.runtime.compile_cache_dir or args.run_dir.parent / ".jax_cache")
            result = run_slow_eval(
                args.run_dir,
                args.step,
                args.n_batches,
                figures=not args.no_figures,
                progress=not args.no_progress,
                eval_overrides=args.overrides,
            )
        except (RunOpenError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
        print(f"step {result.step}: {result.json_path}")
        for name, path in result.figures.items():
            print(f"  {name:24s} {path}")
        recon = {k[11:]: v for k, v in result.metrics.items() if k.startswith("eval/recon/")}
        print("eval recon: " + "  ".join(f"{k}={v:.4g}" for k, v in recon.items()))
        for prefix in ("eval/identity_ci_error/", "eval/dense_ci_error/"):
            errs = {k[len(prefix) :]: v for k, v in result.metrics.items() if k.startswith(prefix)}
            if errs:
                print(prefix[5:-1] + ": " + "  ".join(f"{k}={v:.3g}" for k, v in errs.items()))
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
