"""`jsp-train CONFIG.yaml`: train one decomposition locally and print a one-screen summary."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from param_decomp_jax.cli.common import add_config_args, config_from_args, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jsp-train",
        description="Train a parameter decomposition (VPD) of a frozen model described by one YAML config. "
        "Writes <out_dir>/<run_id>/ with config.yaml, metrics.jsonl, ckpts/ and summary.json; "
        "resumes from the latest checkpoint if the run directory exists.",
    )
    add_config_args(parser)
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    dist = parser.add_argument_group(
        "multi-host (jax.distributed)",
        "One process per host or per accelerator. Without these flags the settings come from "
        "JSP_COORDINATOR / JSP_NUM_PROCESSES / JSP_PROCESS_ID, else from SLURM's variables "
        "(coordinator = first node of the job), else a single process.",
    )
    dist.add_argument("--coordinator", metavar="HOST:PORT", help="Address of process 0's coordinator.")
    dist.add_argument("--num-processes", type=int, metavar="N", help="Processes in the job.")
    dist.add_argument("--process-id", type=int, metavar="I", help="This process's index (0 = primary).")
    return parser


def format_summary(summary: dict, run_dir: str) -> str:
    lines = [
        f"run {summary.get('run_id')}  ->  {run_dir}",
        f"steps {summary.get('steps')}"
        f"   compile {summary.get('compile_s', 0):.1f}s   build {summary.get('build_s', 0):.1f}s",
    ]
    losses = {k: v for k, v in summary.items() if k.startswith("loss/")}
    if losses:
        lines.append("final losses: " + "  ".join(f"{k[5:]}={v:.4g}" for k, v in sorted(losses.items())))
    recon = {k: v for k, v in summary.items() if k.startswith("eval/recon/")}
    if recon:
        lines.append("eval recon:   " + "  ".join(f"{k[11:]}={v:.4g}" for k, v in sorted(recon.items())))
    sites = sorted({k.split("/", 2)[-1] for k in summary if k.startswith("eval/alive/")})
    if sites:
        # id_err: identity-CI error; act/probe: components with CI > threshold per one-feature probe;
        # block_err: dense-CI error for the sites of `eval.dense_ci_blocks` (see toy_metrics).
        lines.append(
            f"{'site':28s} {'alive':>6s} {'ci_l0':>7s} {'id_err':>7s} {'act/probe':>9s} {'block_err':>9s}"
        )
        for s in sites:

            def get(key: str) -> str:
                v = summary.get(key)
                return "-" if v is None else f"{v:.3g}"

            lines.append(
                f"{s:28s} {get('eval/alive/' + s):>6s} {get('eval/ci_l0/' + s):>7s} "
                f"{get('eval/identity_ci_error/' + s):>7s} {get('eval/probe_mean_active_per_input/' + s):>9s} "
                f"{get('eval/dense_ci_error/' + s):>9s}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        # The config is pure pydantic: a bad one fails here, before joining (and hanging) a job.
        cfg = config_from_args(args, mint=False)
        from param_decomp_config import ConfigError, mint_run_id
        from param_decomp_jax.runtime import distributed

        try:
            settings = distributed.resolve_settings(args.coordinator, args.num_processes, args.process_id)
        except ValueError as e:  # inconsistent flags/env: a usage error, not a crash
            raise ConfigError(f"multi-host settings: {e}") from None
        distributed.maybe_initialize(settings)  # before any jax computation fixes the device list
        cfg = cfg.model_copy(update={"run_id": distributed.agree_run_id(cfg.run_id, mint_run_id)})
        from param_decomp_jax.runtime.compile_cache import enable_compile_cache
        from param_decomp_jax.runtime.trainer import Trainer

        enable_compile_cache(cfg.runtime.compile_cache_dir or Path(cfg.out_dir) / ".jax_cache")
        trainer = Trainer(cfg, progress=not args.no_progress)
        result = trainer.run_training()
        if result.exit_code:
            print(
                f"interrupted at step {result.final_step}; checkpoint saved in {result.run_dir.ckpts}",
                file=sys.stderr,
            )
            return result.exit_code
        if trainer.primary:  # one summary per job, not one per process
            print(format_summary(result.summary, str(result.run_dir.root)))
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
