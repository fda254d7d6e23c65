"""Data schemas: synthetic sparse features for toys, pre-tokenized shards for language models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from param_decomp_config.base import StrictModel


class SparseFeatureDataConfig(StrictModel):
    """Each feature is active with `feature_probability`, with a value ~ U[0, 1]."""

    type: Literal["sparse_features"] = Field("sparse_features", description="Data kind.")
    feature_probability: float = Field(0.05, gt=0, le=1, description="Probability a feature is active.")
    generation: Literal["at_least_zero_active", "exactly_one_active"] = Field(
        "at_least_zero_active",
        description="`at_least_zero_active`: independent Bernoulli per feature; "
        "`exactly_one_active`: one uniformly chosen feature per example.",
    )
    value_range: tuple[float, float] | None = Field(
        None,
        description="Active features take values ~ U[lo, hi). None: the target's own range, [0, 1] for "
        "TMS and [-1, 1] for ResidMLP (whose label act(x) + x would be linear on [0, 1]).",
    )

    @model_validator(mode="after")
    def _range_order(self) -> SparseFeatureDataConfig:
        if self.value_range is not None and not self.value_range[0] < self.value_range[1]:
            raise ValueError(f"value_range must be [lo, hi] with lo < hi, got {list(self.value_range)}")
        return self


class TokenDataConfig(StrictModel):
    """Pre-tokenized parquet shards with a fixed-length token column."""

    type: Literal["tokens"] = Field("tokens", description="Data kind.")
    train_path: Path = Field(description="A parquet file, a folder of *.parquet shards, or a glob.")
    eval_path: Path | None = Field(None, description="Eval shards (defaults to the train shards).")
    seq_len: int = Field(256, gt=0, description="Tokens per sequence; rows are cut to this length.")
    column: str = Field("input_ids", description="Name of the token column.")


DataConfig = Annotated[SparseFeatureDataConfig | TokenDataConfig, Field(discriminator="type")]
