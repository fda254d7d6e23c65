"""Optimizer and learning-rate schedule schemas."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from param_decomp_config.base import StrictModel


class ScheduleConfig(StrictModel):
    """LR multiplier over training: optional linear warmup, then constant / linear / cosine decay."""

    kind: Literal["constant", "linear", "cosine"] = Field("cosine", description="Decay shape after warmup.")
    warmup_frac: float = Field(0.0, ge=0, lt=1, description="Fraction of steps of linear warmup from 0.")
    final_frac: float = Field(0.1, ge=0, le=1, description="Final LR as a fraction of the peak.")


class OptimizerConfig(StrictModel):
    """AdamW with an LR schedule and optional global-norm gradient clipping (applied first)."""

    lr: float = Field(gt=0, description="Peak learning rate.")
    beta1: float = Field(0.9, ge=0, lt=1, description="Adam beta1.")
    beta2: float = Field(0.999, ge=0, lt=1, description="Adam beta2.")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")
    grad_clip_norm: float | None = Field(None, gt=0, description="Clip the global grad norm to this first.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="LR schedule.")


class FaithfulnessWarmupConfig(StrictModel):
    """Steps of faithfulness-only AdamW on V/U before training; its optimizer is then discarded."""

    steps: int = Field(400, ge=0, description="Warmup steps (0 disables).")
    lr: float = Field(1e-3, gt=0, description="Constant warmup learning rate.")
    weight_decay: float = Field(
        0.0,
        ge=0,
        description="Decoupled AdamW weight decay of the warmup (the SPD reference's toy configs use 0.1: "
        "of the many V/U that sum to W it prefers small ones, so the spare components start near zero).",
    )
