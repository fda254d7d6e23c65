"""Runtime, evaluation, logging, checkpoint, wandb and provenance schemas."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveInt, field_validator

from param_decomp_config.base import StrictModel


class RuntimeConfig(StrictModel):
    """How the step is placed and compiled."""

    shard_components: bool = Field(False, description="Shard V/U along C over the `dp` axis.")
    compute_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Dtype of forward activations (master params stay fp32)."
    )
    compile_cache_dir: Path | None = Field(
        None, description="XLA persistent compile cache (default: <out_dir>/../.jax_cache)."
    )
    transfer_guard: bool = Field(False, description="Disallow implicit host<->device transfers in the loop.")
    steps_per_call: int = Field(
        0,
        ge=0,
        description="Training steps run inside ONE jitted call (a device-side loop) when the batch is "
        "made on device (toy targets), to cut the per-step dispatch cost of fast steps. 0 = automatic: "
        "the largest divisor of gcd(steps, logging.log_every, eval.eval_every, checkpoint.save_every) "
        "that is <= 10, so every log, eval and checkpoint still falls on a call boundary. Token data "
        "always runs 1 (its batch comes from the host). A value > 0 must divide those cadences.",
    )


class EvalConfig(StrictModel):
    """In-loop evaluation on a separate stream."""

    eval_every: int = Field(500, ge=0, description="Steps between eval passes (0: only at the end).")
    batch_size: int | None = Field(
        None, gt=0, description="Eval batch size (default: the training batch size)."
    )
    ci_alive_threshold: float = Field(
        0.1,
        gt=0,
        lt=0.5,
        description="A component is alive if CI exceeds this; also the tolerance of the toy identity-CI "
        "error (a feature's own component must reach 1 - tolerance, any other must stay below tolerance).",
    )
    probe_value: float = Field(
        0.75,
        gt=0,
        description="Magnitude of the single active feature in the toy one-feature probes (identity-CI "
        "error, probe alive/dense counts, permuted-CI figure). 0.75, as in the SPD reference evaluation: "
        "the typical magnitude of an active feature (values are U[0, 1]), where a pretrained target's "
        "bias still cuts the interference a value-1 probe leaks to neighbouring features.",
    )
    dense_ci_blocks: dict[str, PositiveInt] = Field(
        default_factory=dict,
        description="Toy targets only: sites expected to decompose into ONE block of k co-working "
        "components rather than one component per feature (ResidMLP's `mlp_out`: k = d_mlp). Site "
        "pattern (`*` wildcards) -> k. Each matched site logs `eval/dense_ci_error/<site>` at the end "
        "of training: on the one-feature probes, the k components with the most CI mass must each be "
        "fully important (CI >= 1 - ci_alive_threshold) on at least one probe and every other "
        "component must stay <= ci_alive_threshold; the error counts the violations divided by k.",
    )
    rounding_threshold: float = Field(0.0, ge=0, lt=1, description="Rounded-CI mask: CI > threshold -> 1.")
    pgd_steps: int = Field(5, ge=0, description="Fresh-PGD probe ascents in eval (0 disables).")
    pgd_step_size: float = Field(0.1, gt=0, description="Fresh-PGD probe step size.")
    ci_l0_groups: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Extra CI-L0 metrics over groups of sites: group name -> site-name patterns "
        "(`*` wildcards, e.g. `{mlp: ['layers.*.mlp.*'], attn: ['layers.*.self_attn.*']}`). Logged "
        "as `eval/ci_l0_group/<group>` = mean over positions of the active components summed over "
        "the group's sites. A pattern matching no site is an error when the run is built.",
    )

    @field_validator("ci_l0_groups")
    @classmethod
    def _groups_well_formed(cls, groups: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, patterns in groups.items():
            if not name or "/" in name:
                raise ValueError(f"CI-L0 group name {name!r} must be non-empty and contain no '/'")
            if not patterns:
                raise ValueError(f"CI-L0 group {name!r} has no site patterns")
        return groups


class LoggingConfig(StrictModel):
    """Metric cadence."""

    log_every: int = Field(100, gt=0, description="Steps between metrics.jsonl records.")
    progress: bool = Field(True, description="Show a progress bar when stdout is a terminal.")


class CheckpointConfig(StrictModel):
    """Orbax checkpoints of the whole train state under <run_dir>/ckpts."""

    save_every: int = Field(1000, ge=0, description="Steps between checkpoints (0: only step 0 and end).")
    keep_last: int = Field(3, gt=0, description="How many checkpoints to keep.")


class WandbConfig(StrictModel):
    """Weights & Biases logging (offline by default: nothing touches the network)."""

    enabled: bool = Field(False, description="Log to wandb.")
    mode: Literal["offline", "online", "disabled"] = Field("offline", description="wandb mode.")
    project: str = Field("param-decomp-jax", description="wandb project.")
    group: str | None = Field(None, description="wandb group (pd-jax-lm stamps it).")
    tags: list[str] = Field(default_factory=list, description="wandb tags.")


class ResumeProvenanceConfig(StrictModel):
    """Start from a parent run's components and CI fn (fresh optimizers, step 0, no warmup)."""

    run_dir: Path = Field(description="The parent run directory (holds config.yaml and ckpts/).")
    step: int | Literal["latest"] = Field("latest", description="Parent checkpoint step.")
