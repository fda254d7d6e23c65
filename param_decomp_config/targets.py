"""Target schemas: which frozen network is decomposed, and how toy targets are pretrained."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from param_decomp_config.base import StrictModel

LLAMA_SITE_KINDS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


class ToyPretrainConfig(StrictModel):
    """In-process pretraining of a toy target (deterministic from its seed)."""

    steps: int = Field(10_000, gt=0, description="Adam steps of target pretraining.")
    batch_size: int = Field(1024, gt=0, description="Batch size of target pretraining.")
    lr: float = Field(5e-3, gt=0, description="Peak learning rate (cosine decay) of target pretraining.")
    seed: int = Field(0, description="Seed of the target's initialisation and pretraining data.")
    feature_probability: float = Field(
        0.05, gt=0, le=1, description="Probability that a feature is active in pretraining data."
    )


class TMSTargetConfig(StrictModel):
    """Toy model of superposition: x -> ReLU(W^T W x + b), W: [n_hidden, n_features]."""

    type: Literal["tms"] = Field("tms", description="Target kind.")
    n_features: int = Field(5, gt=0, description="Number of sparse input features.")
    n_hidden: int = Field(2, gt=0, description="Width of the bottleneck.")
    identity_hidden: bool = Field(
        False, description="Insert a fixed identity hidden layer (site `hidden_layers.0`)."
    )
    pretrain: ToyPretrainConfig = Field(
        default_factory=ToyPretrainConfig, description="How the target is trained before decomposition."
    )

    @property
    def leading_axes(self) -> tuple[str, ...]:
        return ("batch",)

    def available_sites(self) -> list[str]:
        return ["linear1"] + (["hidden_layers.0"] if self.identity_hidden else []) + ["linear2"]


class ResidMLPTargetConfig(StrictModel):
    """Residual MLP toy: embed features, n MLP layers add to the residual, unembed. Label act(x) + x."""

    type: Literal["resid_mlp"] = Field("resid_mlp", description="Target kind.")
    n_features: int = Field(100, gt=0, description="Number of sparse input features.")
    d_embed: int = Field(1000, gt=0, description="Residual stream width.")
    d_mlp: int = Field(50, gt=0, description="Hidden width of each MLP.")
    n_layers: int = Field(1, ge=1, le=3, description="Number of MLP layers (1 to 3).")
    act: Literal["relu", "gelu"] = Field("relu", description="MLP nonlinearity (also used in the label).")
    in_bias: bool = Field(
        False, description="Give each MLP a (frozen, pretrained) input bias; the published target has none."
    )
    embedding: Literal["random", "identity"] = Field(
        "random",
        description="Fixed embedding: random unit-norm rows, or identity (needs d_embed = n_features).",
    )
    pretrain: ToyPretrainConfig = Field(
        default_factory=lambda: ToyPretrainConfig(feature_probability=0.01),
        description="How the target is trained before decomposition.",
    )

    @model_validator(mode="after")
    def _identity_shape(self) -> ResidMLPTargetConfig:
        if self.embedding == "identity" and self.d_embed != self.n_features:
            raise ValueError("embedding 'identity' needs d_embed == n_features")
        return self

    @property
    def leading_axes(self) -> tuple[str, ...]:
        return ("batch",)

    def available_sites(self) -> list[str]:
        return [f"layers.{i}.{k}" for i in range(self.n_layers) for k in ("mlp_in", "mlp_out")]


class LlamaTargetConfig(StrictModel):
    """A Llama-family Hugging Face checkpoint folder (config.json + safetensors), read locally."""

    type: Literal["llama"] = Field("llama", description="Target kind.")
    checkpoint_dir: Path = Field(
        description="Folder with config.json and model.safetensors (or a sharded index). No hub downloads."
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Storage dtype of the frozen target."
    )

    @model_validator(mode="after")
    def _checkpoint_exists(self) -> LlamaTargetConfig:
        if not (self.checkpoint_dir / "config.json").is_file():
            raise ValueError(f"no config.json in checkpoint_dir {str(self.checkpoint_dir)!r}")
        return self

    @property
    def leading_axes(self) -> tuple[str, ...]:
        return ("batch", "sequence")

    def n_layers(self) -> int:
        return int(json.loads((self.checkpoint_dir / "config.json").read_text())["num_hidden_layers"])

    def available_sites(self) -> list[str]:
        return [f"layers.{i}.{k}" for i in range(self.n_layers()) for k in LLAMA_SITE_KINDS]


TargetConfig = Annotated[
    TMSTargetConfig | ResidMLPTargetConfig | LlamaTargetConfig, Field(discriminator="type")
]
