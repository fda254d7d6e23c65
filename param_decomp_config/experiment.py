"""The one schema a run is described by."""

from __future__ import annotations

import fnmatch
import warnings

from pydantic import Field, model_validator

from param_decomp_config.base import StrictModel
from param_decomp_config.ci import CIFnConfig, LayerwiseMLPCIConfig
from param_decomp_config.data import DataConfig, SparseFeatureDataConfig, TokenDataConfig
from param_decomp_config.losses import (
    RECON_TYPES,
    ChunksPlan,
    FaithfulnessLoss,
    ImportanceMinimalityLoss,
    LossTermConfig,
    PersistentPGDReconLoss,
    SubsetsPlan,
    term_name,
)
from param_decomp_config.optim import FaithfulnessWarmupConfig, OptimizerConfig
from param_decomp_config.runtime import (
    CheckpointConfig,
    EvalConfig,
    LoggingConfig,
    ResumeProvenanceConfig,
    RuntimeConfig,
    WandbConfig,
)
from param_decomp_config.targets import TargetConfig


class SiteConfig(StrictModel):
    """Decompose the weights matching `name` (`*` wildcards allowed) into C components each."""

    name: str = Field(description="Site name or wildcard pattern, e.g. `layers.*.mlp.down_proj`.")
    C: int = Field(gt=0, description="Number of rank-one components.")


class ExperimentConfig(StrictModel):
    """A whole run: target, sites, losses, optimizers, cadence. One self-contained YAML."""

    run_name: str = Field("run", description="Human-readable name.")
    run_id: str | None = Field(None, description="`p-` + 8 hex digits; minted when absent.")
    out_dir: str = Field("runs", description="Runs live in <out_dir>/<run_id>/.")
    seed: int = Field(0, description="Seed of components, CI fn, data order and stochastic draws.")
    steps: int = Field(gt=0, description="Training steps (after the faithfulness warmup).")
    batch_size: int = Field(gt=0, description="Global batch size (examples or sequences).")
    target: TargetConfig = Field(description="The frozen network.")
    data: DataConfig = Field(default_factory=SparseFeatureDataConfig, description="Training data.")
    sites: list[SiteConfig] = Field(min_length=1, description="Sites to decompose, with C per site.")
    use_delta_component: bool = Field(True, description="Add the maskable delta channel W − V U.")
    ci_fn: CIFnConfig = Field(default_factory=LayerwiseMLPCIConfig, description="Causal-importance network.")
    losses: list[LossTermConfig] = Field(min_length=1, description="Loss terms; recon terms keep this order.")
    components_optimizer: OptimizerConfig = Field(description="AdamW for V/U.")
    ci_optimizer: OptimizerConfig = Field(description="AdamW for the CI fn.")
    faithfulness_warmup: FaithfulnessWarmupConfig = Field(
        default_factory=FaithfulnessWarmupConfig, description="Faithfulness-only warmup before step 0."
    )
    eval: EvalConfig = Field(default_factory=EvalConfig, description="In-loop evaluation.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Metric cadence.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoint cadence.")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="Placement and compilation.")
    wandb: WandbConfig = Field(default_factory=WandbConfig, description="wandb logging.")
    resume_provenance: ResumeProvenanceConfig | None = Field(
        None, description="Fine-tune from a parent run's components and CI fn."
    )
    smoke: dict[str, object] = Field(
        default_factory=dict, description="Overrides (`key.path: value`) applied by `--smoke`."
    )

    # ---- derived ---------------------------------------------------------------------------
    def resolved_sites(self) -> list[tuple[str, int]]:
        """(site name, C) in the target's canonical order; patterns expanded."""
        available = self.target.available_sites()
        chosen: dict[str, int] = {}
        for site in self.sites:
            for name in fnmatch.filter(available, site.name):
                chosen[name] = site.C
        return [(n, chosen[n]) for n in available if n in chosen]

    def recon_terms(self) -> list:
        return [t for t in self.losses if t.type in RECON_TYPES]

    # ---- cross-field checks (messages name the key) ------------------------------------------
    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        available = self.target.available_sites()
        for i, site in enumerate(self.sites):
            if not fnmatch.filter(available, site.name):
                raise ValueError(
                    f"sites.{i}.name: {site.name!r} matches no site of target {self.target.type!r} "
                    f"(available: {', '.join(available[:12])}{' ...' if len(available) > 12 else ''})"
                )
        names = [n for n, _ in self.resolved_sites()]
        n_sites = len(names)
        seen: set[str] = set()
        for i, term in enumerate(self.losses):
            tname = term_name(term)
            if tname in seen:
                raise ValueError(f"losses.{i}.name: duplicate loss name {tname!r}; give each term a `name`")
            seen.add(tname)
            plan = getattr(term, "plan", None)
            if isinstance(plan, ChunksPlan) and n_sites % plan.k != 0:
                raise ValueError(
                    f"losses.{i}.plan.k: chunk size {plan.k} does not divide the {n_sites} sites"
                )
            if isinstance(plan, SubsetsPlan):
                for j, subset in enumerate(plan.subsets):
                    bad = [s for s in subset if s not in names]
                    if bad:
                        raise ValueError(f"losses.{i}.plan.subsets.{j}: unknown site(s) {bad}")
            if isinstance(term, PersistentPGDReconLoss) and term.coeff == 0:
                # The final ascent's gradient is taken from the main backward and divided by coeff.
                raise ValueError(f"losses.{i}.coeff: a persistent_pgd_recon term needs coeff > 0")
            if (
                isinstance(term, PersistentPGDReconLoss)
                and term.scope.type == "nsc"
                and term.scope.n is not None
                and self.batch_size % term.scope.n
            ):
                raise ValueError(
                    f"losses.{i}.scope.n: {term.scope.n} groups do not divide batch_size {self.batch_size}"
                )
        if sum(isinstance(t, FaithfulnessLoss) for t in self.losses) > 1:
            raise ValueError("losses: at most one faithfulness term")
        if sum(isinstance(t, ImportanceMinimalityLoss) for t in self.losses) > 1:
            raise ValueError("losses: at most one importance_minimality term")
        is_lm = self.target.type == "llama"
        if is_lm != isinstance(self.data, TokenDataConfig):
            want = "tokens" if is_lm else "sparse_features"
            raise ValueError(f"data.type: target {self.target.type!r} needs data of type {want!r}")
        if self.ci_fn.type == "shared_transformer" and not is_lm:
            raise ValueError("ci_fn.type: 'shared_transformer' attends over sequences; toy targets have none")
        if self.run_id is not None and not _is_run_id(self.run_id):
            raise ValueError(f"run_id: {self.run_id!r} is not `p-` followed by 8 hex digits")
        self._check_dense_ci_blocks(available, dict(self.resolved_sites()), is_lm)
        k = self.runtime.steps_per_call
        if k > 1:
            for key, every in self.call_boundaries().items():
                if every % k:
                    raise ValueError(f"runtime.steps_per_call: {k} does not divide {key} = {every}")
        self._warn_narrow_layerwise_ci()
        return self

    def _check_dense_ci_blocks(self, available: list[str], site_C: dict[str, int], is_lm: bool) -> None:
        for pattern, k in self.eval.dense_ci_blocks.items():
            key = f"eval.dense_ci_blocks.{pattern}"
            if is_lm:
                raise ValueError(f"{key}: dense-CI blocks are scored on one-feature probes; toy targets only")
            # A pattern must name sites of the target (typos fail); a run that decomposes only some
            # sites (`--set sites=...`) simply does not score the blocks it left out.
            if not fnmatch.filter(available, pattern):
                raise ValueError(f"{key}: pattern matches no site of target {self.target.type!r} {available}")
            for name in fnmatch.filter(list(site_C), pattern):
                if k > site_C[name]:
                    raise ValueError(f"{key}: block of {k} components exceeds C = {site_C[name]} of {name}")

    def call_boundaries(self) -> dict[str, int]:
        """The step counts a multi-step training call must not straddle (see runtime.steps_per_call)."""
        out = {"steps": self.steps, "logging.log_every": self.logging.log_every}
        if self.eval.eval_every:
            out["eval.eval_every"] = self.eval.eval_every
        if self.checkpoint.save_every:
            out["checkpoint.save_every"] = self.checkpoint.save_every
        return out

    def _warn_narrow_layerwise_ci(self) -> None:
        """A layerwise CI MLP computes every component's CI of a site from one hidden layer: narrower
        than the number of toy features, it cannot switch one component per feature on and the
        rest off. Measured: hidden [16] left ResidMLP 1L's mlp_in at ~8.6 components per feature
        after 20k steps and TMS 40-10's linear1 at 13-19 alive; [128] gave ~1.6 and 40 by 2k-4k."""
        n_features = getattr(self.target, "n_features", None)
        if not isinstance(self.ci_fn, LayerwiseMLPCIConfig) or n_features is None:
            return
        width = min(self.ci_fn.hidden_dims, default=0)
        if 0 < width < n_features:
            warnings.warn(
                f"ci_fn.hidden_dims: a layerwise CI MLP of width {width} is narrower than the "
                f"target's {n_features} features; it cannot give each feature its own component "
                f"(use a width >= n_features, or ci_fn.type: component_mlp)",
                UserWarning,
                stacklevel=2,
            )


def _is_run_id(s: str) -> bool:
    return len(s) == 10 and s.startswith("p-") and all(c in "0123456789abcdef" for c in s[2:])
