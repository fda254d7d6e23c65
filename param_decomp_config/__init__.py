"""Pure pydantic schemas for param-decomp-jax runs (no jax, no torch)."""

from param_decomp_config.experiment import ExperimentConfig, SiteConfig
from param_decomp_config.loading import ConfigError, build_config, dump_config, load_config, mint_run_id

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "SiteConfig",
    "build_config",
    "dump_config",
    "load_config",
    "mint_run_id",
]
