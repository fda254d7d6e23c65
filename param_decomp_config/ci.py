"""Causal-importance (CI) network schemas: which network maps site inputs to per-component logits.

Pure pydantic + stdlib (no jax): configs are loaded and validated before any backend starts.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator


class _CIConfigBase(BaseModel):
    """Unknown keys are errors; instances are immutable (configs are data, not state)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class LayerwiseMLPCIConfig(_CIConfigBase):
    """One MLP per site on that site's own input; GELU hidden layers; outputs C_site logits.

    Per-position, so it runs under any leading axes (toys `(batch,)`, LMs `(batch, sequence)`).
    """

    type: Literal["layerwise_mlp"] = Field("layerwise_mlp", description="CI network kind.")
    hidden_dims: list[PositiveInt] = Field(
        default_factory=lambda: [16],
        description="Widths of the GELU hidden layers of every per-site MLP ([] = a linear map).",
    )


class ComponentMLPCIConfig(_CIConfigBase):
    """One tiny MLP per COMPONENT on its scalar inner activation `x @ V[:, c]` (SPD's "mlp" gates).

    CI of component c sees only how strongly the input projects on V[:, c]; gradients flow back
    into V through that activation. This is the published toy-model regime (TMS, ResidMLP).
    """

    type: Literal["component_mlp"] = Field("component_mlp", description="CI network kind.")
    hidden_dims: list[PositiveInt] = Field(
        default_factory=lambda: [16],
        description="Widths of the GELU hidden layers of every per-component MLP (scalar in, scalar out).",
    )


class SharedMLPCIConfig(_CIConfigBase):
    """One MLP over the concatenation (last axis) of all site inputs, in site order.

    Outputs Σ_s C_s logits, split back per site in site order. Per-position like the layerwise MLP.
    """

    type: Literal["shared_mlp"] = Field("shared_mlp", description="CI network kind.")
    hidden_dims: list[PositiveInt] = Field(
        description="Widths of the GELU hidden layers of the shared MLP ([] = a linear map)."
    )


class SharedTransformerCIConfig(_CIConfigBase):
    """A bidirectional transformer over the sequence, fed the concatenated RMS-normed site inputs.

    Needs leading axes `(batch, sequence)`: it attends over positions, so it only fits LM targets.
    """

    type: Literal["shared_transformer"] = Field("shared_transformer", description="CI network kind.")
    d_model: PositiveInt = Field(description="Residual width of the transformer.")
    n_blocks: PositiveInt = Field(description="Number of pre-norm attention + MLP blocks.")
    n_heads: PositiveInt = Field(description="Attention heads per block; must divide d_model.")
    mlp_hidden: PositiveInt = Field(description="Hidden width of each block's GELU MLP.")
    rope_base: float = Field(10000.0, gt=0, description="Base of the rotate-half rotary embedding.")
    final_norm: bool = Field(True, description="Apply a weightless RMS-norm before the output projection.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> SharedTransformerCIConfig:
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        # Rotate-half RoPE pairs dimension i with i + head_dim/2, so head_dim must be even.
        head_dim = self.d_model // self.n_heads
        if head_dim % 2 != 0:
            raise ValueError(
                f"d_model / n_heads (head dim {head_dim}) must be even for rotary embeddings; "
                f"change d_model ({self.d_model}) or n_heads ({self.n_heads})"
            )
        return self


CIFnConfig = Annotated[
    LayerwiseMLPCIConfig | ComponentMLPCIConfig | SharedMLPCIConfig | SharedTransformerCIConfig,
    Field(discriminator="type"),
]

__all__ = [
    "CIFnConfig",
    "LayerwiseMLPCIConfig",
    "SharedMLPCIConfig",
    "SharedTransformerCIConfig",
]
