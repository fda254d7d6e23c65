"""`pd-jax-lm CONFIG.yaml`: validate, mint a run id, pin the config, then train here or submit to SLURM.

The run directory is created (and the config pinned) before anything runs, so a SLURM job, its
requeued restarts and a local run all execute the same `jsp-train <run_dir>/config.yaml`.
No jax is imported here unless the run is local.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from param_decomp_config import ConfigError, ExperimentConfig, dump_config
from param_decomp_jax.cli.common import add_config_args, config_from_args, run_cli

TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "pd_jax_lm.sbatch.tmpl"
SCRIPT_NAME = "pd_jax_lm.sbatch"
# Same ephemeral-port convention as runtime.distributed (jax's own SLURM support uses it too).
PORT_BASE = 65535 - 2**12 + 1
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")  # the forms sbatch --time accepts
# runtime.trainer.REQUEUE_EXIT_CODE, repeated so that launching imports no jax (test_launch checks).
REQUEUE_EXIT_CODE = 75
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pd-jax-lm",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Launch one decomposition run: validate CONFIG, mint a run id (p- + 8 hex), stamp out_dir\n"
            "(made absolute) and wandb.group (default: run_name), pin the config as\n"
            "<out_dir>/<run_id>/config.yaml, then either train here (--local; the default when `sbatch`\n"
            f"is not on PATH) or write <run_dir>/{SCRIPT_NAME} from slurm/pd_jax_lm.sbatch.tmpl and\n"
            "submit it with sbatch."
        ),
        epilog=(
            "The SLURM job runs one jsp-train task per GPU under srun (jax.distributed; process 0\n"
            "coordinates from the first node). It is marked --requeue and gets SIGTERM --signal-grace\n"
            "seconds before its time limit: jsp-train checkpoints, exits 75, the script requeues the job,\n"
            "and the restarted job resumes from the checkpoint. Re-running pd-jax-lm with the same\n"
            "--run-id resubmits (a different config for an existing run is refused).\n\n"
            "examples:\n"
            "  pd-jax-lm configs/tms_5-2.yaml --local\n"
            "  pd-jax-lm configs/stories260k_mlp.yaml --nodes 2 --gpus-per-node 8 --partition gpu \\\n"
            "      --time 12:00:00 --dry-run\n\n"
            "exit codes: 0 submitted / trained, 1 sbatch failed, 2 bad config or arguments,\n"
            "  75 local run stopped by SIGTERM (checkpoint saved; run the same command to resume)."
        ),
    )
    add_config_args(parser)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="Train in this process (as jsp-train would).")
    where.add_argument(
        "--dry-run",
        action="store_true",
        help="Print the sbatch script and write nothing (no run directory, no submission).",
    )
    slurm = parser.add_argument_group("SLURM")
    slurm.add_argument("--nodes", type=int, default=1, help="Nodes (default 1).")
    slurm.add_argument(
        "--gpus-per-node",
        type=int,
        default=1,
        help="GPUs per node = jax processes per node; 0 for CPU nodes (one process per node). Default 1.",
    )
    slurm.add_argument("--partition", help="SLURM partition (default: the cluster's).")
    slurm.add_argument("--account", help="SLURM account.")
    slurm.add_argument("--time", default="24:00:00", help="Time limit per job, e.g. 12:00:00 or 2-00:00:00.")
    slurm.add_argument(
        "--signal-grace",
        type=int,
        default=300,
        metavar="SECONDS",
        help="SIGTERM this long before the time limit to checkpoint (default 300; SLURM may send it up "
        "to 60 s earlier).",
    )
    slurm.add_argument("--job-name", help="Job name (default: pd-<run_id>).")
    slurm.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="Extra #SBATCH option, e.g. --sbatch-arg=--qos=high; repeatable.",
    )
    slurm.add_argument(
        "--template", type=Path, default=TEMPLATE, help="sbatch template (default: %(default)s)."
    )
    parser.add_argument("--no-progress", action="store_true", help="Local runs: hide the progress bar.")
    return parser


def stamp(cfg: ExperimentConfig) -> ExperimentConfig:
    """Absolute out_dir (jobs start elsewhere) and a wandb group (the experiment's runs together)."""
    out_dir = str(Path(cfg.out_dir).expanduser().absolute())
    wandb = cfg.wandb.model_copy(update={"group": cfg.wandb.group or cfg.run_name})
    return cfg.model_copy(update={"out_dir": out_dir, "wandb": wandb})


def check_slurm_args(args: argparse.Namespace, cfg: ExperimentConfig) -> None:
    if args.nodes < 1 or args.gpus_per_node < 0:
        raise ConfigError(
            f"--nodes must be >= 1 and --gpus-per-node >= 0 (got {args.nodes}, {args.gpus_per_node})"
        )
    if not _TIME.match(args.time):
        raise ConfigError(f"--time {args.time!r}: expected minutes, HH:MM:SS or D-HH:MM:SS")
    if not 0 < args.signal_grace <= 65535:
        raise ConfigError(f"--signal-grace {args.signal_grace}: expected 1..65535 seconds")
    devices = args.nodes * max(args.gpus_per_node, 1)
    if args.gpus_per_node and cfg.batch_size % devices:
        raise ConfigError(
            f"batch_size {cfg.batch_size} does not divide over {devices} GPUs "
            f"({args.nodes} nodes x {args.gpus_per_node})"
        )


def train_command() -> str:
    """jsp-train of this environment, so the job runs the code that validated the config."""
    beside = Path(sys.executable).with_name("jsp-train")
    if beside.exists():
        return shlex.quote(str(beside))
    found = shutil.which("jsp-train")
    return shlex.quote(found) if found else f"{shlex.quote(sys.executable)} -m param_decomp_jax.cli.train"


def render_sbatch(cfg: ExperimentConfig, args: argparse.Namespace, template: str) -> str:
    run_dir = Path(cfg.out_dir) / str(cfg.run_id)
    resources = [f"#SBATCH --gpus-per-node={args.gpus_per_node}"] if args.gpus_per_node else []
    resources += [f"#SBATCH --partition={args.partition}"] if args.partition else []
    resources += [f"#SBATCH --account={args.account}"] if args.account else []
    values = {
        "run_id": str(cfg.run_id),
        "run_name": cfg.run_name,
        "job_name": args.job_name or f"pd-{cfg.run_id}",
        "nodes": str(args.nodes),
        "tasks_per_node": str(max(args.gpus_per_node, 1)),
        "resource_lines": "\n".join(resources),
        "time": args.time,
        "grace": str(args.signal_grace),
        "requeue_code": str(REQUEUE_EXIT_CODE),
        "run_dir": str(run_dir),
        "extra_lines": "\n".join(f"#SBATCH {a}" for a in args.sbatch_arg),
        "workdir": shlex.quote(str(Path.cwd())),
        "port_base": str(PORT_BASE),
        "train_command": train_command(),
        "config": shlex.quote(str(run_dir / "config.yaml")),
    }
    missing = sorted({m for m in _PLACEHOLDER.findall(template) if m not in values})
    if missing:
        raise ConfigError(f"{args.template}: unknown placeholder(s) {missing}")
    lines = []
    for line in template.splitlines():
        whole = _PLACEHOLDER.fullmatch(line.strip())
        if whole and not values[whole.group(1)]:
            continue  # an optional block (e.g. no extra #SBATCH lines) leaves no blank line
        lines.append(_PLACEHOLDER.sub(lambda m: values[m.group(1)], line))
    return "\n".join(lines) + "\n"


def submit(script: Path) -> int:
    proc = subprocess.run(["sbatch", str(script)], capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode:
        print(f"error: sbatch {script} failed (exit {proc.returncode}):\n{proc.stderr}", file=sys.stderr)
        return 1
    job = re.search(r"Submitted batch job (\d+)", proc.stdout)
    if job:
        with (script.parent / "slurm_jobs.txt").open("a") as f:  # history of this run's submissions
            f.write(job.group(1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        cfg = stamp(config_from_args(args))
        run_dir = Path(cfg.out_dir) / str(cfg.run_id)
        local = args.local or (not args.dry_run and shutil.which("sbatch") is None)
        if not local:
            check_slurm_args(args, cfg)
            if not args.template.is_file():
                raise ConfigError(f"{args.template}: sbatch template not found (use --template)")
            script_text = render_sbatch(cfg, args, args.template.read_text())
            if args.dry_run:
                print(script_text, end="")
                print(f"(dry run: nothing written; {run_dir}/config.yaml would hold:)\n", file=sys.stderr)
                print(dump_config(cfg), file=sys.stderr)
                return 0
        from param_decomp_jax.runtime.run_dir import pin_config, run_dir_for

        pin_config(run_dir_for(cfg), cfg)  # refuses an existing run dir pinned with another config
        if local:
            from param_decomp_jax.cli import train

            print(f"run {cfg.run_id}: training locally in {run_dir}", file=sys.stderr)
            argv_train = [str(run_dir / "config.yaml"), "--run-id", str(cfg.run_id)]
            return train.main(argv_train + (["--no-progress"] if args.no_progress else []))
        script = run_dir / SCRIPT_NAME
        script.write_text(script_text)
        script.chmod(0o755)
        print(f"run {cfg.run_id}: {script}", file=sys.stderr)
        return submit(script)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
