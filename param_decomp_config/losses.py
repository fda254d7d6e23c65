"""Loss-term schemas: a discriminated list; recon terms keep their config order in the step."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from param_decomp_config.base import StrictModel
from param_decomp_config.optim import ScheduleConfig

# ---- plans (which sites are live in each forward) --------------------------------------------


class AllSitesPlan(StrictModel):
    """One live set: every site."""

    type: Literal["all_sites"] = Field("all_sites", description="Plan kind.")


class PerSitePlan(StrictModel):
    """One live set per site ("layerwise")."""

    type: Literal["per_site"] = Field("per_site", description="Plan kind.")


class ChunksPlan(StrictModel):
    """Sequential groups of `k` sites in canonical order ("chunkwise"); k must divide the site count."""

    type: Literal["chunks"] = Field("chunks", description="Plan kind.")
    k: int = Field(gt=0, description="Sites per chunk.")


class SubsetsPlan(StrictModel):
    """Custom live sets, each a list of site names."""

    type: Literal["subsets"] = Field("subsets", description="Plan kind.")
    subsets: list[list[str]] = Field(min_length=1, description="Live site sets (resolved names).")


PlanConfig = Annotated[AllSitesPlan | PerSitePlan | ChunksPlan | SubsetsPlan, Field(discriminator="type")]

# ---- routing samplers (where live sites use the decomposed path) -----------------------------


class AllRouting(StrictModel):
    """Every live site is routed at every position."""

    type: Literal["all"] = Field("all", description="Routing kind.")


class UniformKRouting(StrictModel):
    """Per position: k ~ U{1..|live|}, then a uniform k-subset of live sites routes."""

    type: Literal["uniform_k"] = Field("uniform_k", description="Routing kind.")


class StaticProbRouting(StrictModel):
    """Per position and live site: routed with probability `p`."""

    type: Literal["static_prob"] = Field("static_prob", description="Routing kind.")
    p: float = Field(gt=0, le=1, description="Routing probability.")


RoutingConfig = Annotated[AllRouting | UniformKRouting | StaticProbRouting, Field(discriminator="type")]

# ---- loss terms -------------------------------------------------------------------------------


class _Term(StrictModel):
    coeff: float = Field(ge=0, description="Coefficient of this term in the total loss.")
    name: str | None = Field(None, description="Metric name `loss/<name>` (defaults to the type).")


class FaithfulnessLoss(_Term):
    """Σ_s ||W_s − V_s U_s||² / Σ_s numel(W_s)."""

    type: Literal["faithfulness"] = Field("faithfulness", description="Term kind.")


class ImportanceMinimalityLoss(_Term):
    """Per site: Σ_c (S_c/N)(1 + beta log2(1 + S_c)), S_c = Σ_positions (ci_upper + eps)^p."""

    type: Literal["importance_minimality"] = Field("importance_minimality", description="Term kind.")
    p_start: float = Field(2.0, gt=0, description="Exponent p at the start of annealing.")
    p_end: float | None = Field(None, gt=0, description="Exponent p at the end (default: p_start).")
    anneal_start_frac: float = Field(0.0, ge=0, le=1, description="Training fraction where annealing starts.")
    anneal_end_frac: float = Field(1.0, ge=0, le=1, description="Training fraction where annealing ends.")
    eps: float = Field(1e-12, ge=0, description="Added to CI inside the power.")
    beta: float = Field(0.0, ge=0, description="Weight of the log2(1 + S_c) factor.")

    @model_validator(mode="after")
    def _window(self) -> ImportanceMinimalityLoss:
        if self.anneal_end_frac < self.anneal_start_frac:
            raise ValueError("anneal_end_frac must be >= anneal_start_frac")
        return self


class _ReconTerm(_Term):
    plan: PlanConfig = Field(default_factory=AllSitesPlan, description="Live-site sets, one family each.")
    routing: RoutingConfig = Field(default_factory=AllRouting, description="Routing sampler per forward.")


class StochasticReconLoss(_ReconTerm):
    """Masks ci + (1 − ci)·source with fresh sources per forward; mean over all forwards."""

    type: Literal["stochastic_recon"] = Field("stochastic_recon", description="Term kind.")
    n_draws: int = Field(1, gt=0, description="Forwards (routing + source draws) per plan entry per step.")
    sampling: Literal["continuous", "binomial"] = Field(
        "continuous", description="Sources ~ U[0,1] (continuous) or Bernoulli{0,1} (binomial)."
    )


class CIMaskedReconLoss(_ReconTerm):
    """Masks = ci (source 0), no delta path."""

    type: Literal["ci_masked_recon"] = Field("ci_masked_recon", description="Term kind.")


class UnmaskedReconLoss(_ReconTerm):
    """Masks = 1 (source 1), no delta path."""

    type: Literal["unmasked_recon"] = Field("unmasked_recon", description="Term kind.")


class SourceOptimizerConfig(StrictModel):
    """How adversarial sources ascend."""

    type: Literal["adam", "sign"] = Field("adam", description="Adam (bias-corrected) or sign ascent.")
    lr: float = Field(0.01, gt=0, description="Peak source learning rate (step size for sign).")
    beta1: float = Field(0.5, ge=0, lt=1, description="Adam beta1.")
    beta2: float = Field(0.99, ge=0, lt=1, description="Adam beta2.")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    schedule: ScheduleConfig = Field(
        default_factory=lambda: ScheduleConfig(kind="constant"),
        description="Source LR schedule, stepped once per training step.",
    )


class ScopeConfig(StrictModel):
    """Shape of a source bundle: c=(1,1), sc=(1,T), nsc=(n,T), bsc=(B,T) (toys drop the T axis)."""

    type: Literal["c", "sc", "nsc", "bsc"] = Field("c", description="Scope kind.")
    n: int | None = Field(None, gt=0, description="Number of groups for `nsc` (must divide the batch).")

    @model_validator(mode="after")
    def _n(self) -> ScopeConfig:
        if (self.type == "nsc") != (self.n is not None):
            raise ValueError("`n` is required for scope 'nsc' and only allowed there")
        return self


class PersistentPGDReconLoss(_ReconTerm):
    """Adversarial recon with sources persisting in the train state across steps."""

    type: Literal["persistent_pgd_recon"] = Field("persistent_pgd_recon", description="Term kind.")
    scope: ScopeConfig = Field(default_factory=ScopeConfig, description="Source shape.")
    optimizer: SourceOptimizerConfig = Field(
        default_factory=SourceOptimizerConfig, description="Source ascent optimizer."
    )
    parameterisation: Literal["clamp", "sigmoid"] = Field(
        "clamp", description="clamp: project to [0,1], init U[0,1]; sigmoid: sigmoid(raw), raw init N(0,1)."
    )
    n_warmup: int = Field(2, ge=0, description="Detached ascents before the main loss each step.")
    start_frac: float = Field(0.0, ge=0, lt=1, description="Term inactive before this training fraction.")


class PGDReconLoss(_ReconTerm):
    """Fresh PGD: sources re-initialised each step, `n_steps` sign ascents of `step_size`."""

    type: Literal["pgd_recon"] = Field("pgd_recon", description="Term kind.")
    init: Literal["random", "ones", "zeros"] = Field("random", description="Source initialisation.")
    scope: Literal["c", "bc", "bsc"] = Field(
        "bsc", description="Source shape: shared, per batch, per position."
    )
    n_steps: int = Field(5, ge=0, description="Sign ascents per step.")
    step_size: float = Field(0.1, gt=0, description="Sign ascent step size.")


LossTermConfig = Annotated[
    FaithfulnessLoss
    | ImportanceMinimalityLoss
    | StochasticReconLoss
    | CIMaskedReconLoss
    | UnmaskedReconLoss
    | PersistentPGDReconLoss
    | PGDReconLoss,
    Field(discriminator="type"),
]

RECON_TYPES = (
    "stochastic_recon",
    "ci_masked_recon",
    "unmasked_recon",
    "persistent_pgd_recon",
    "pgd_recon",
)


def term_name(term: _Term) -> str:
    """The metric name `loss/<name>` of a term: its `name`, else its `type`."""
    return term.name or str(term.type)  # type: ignore[attr-defined]  # every concrete term has `type`
