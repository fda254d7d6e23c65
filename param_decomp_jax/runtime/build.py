"""Build everything a run needs from its config (no training): the composition root's first half."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax

from param_decomp_config import ExperimentConfig
from param_decomp_jax.ci import build_ci_fn
from param_decomp_jax.core.ci_fn import CIFn
from param_decomp_jax.core.model import DecomposedModel, init_components
from param_decomp_jax.core.step import LossSpec, Optimizers, TrainState, init_train_state
from param_decomp_jax.targets import build_target

# Fixed offsets into the run seed so each consumer has its own independent key stream.
KEY_COMPONENTS, KEY_CI, KEY_STATE = 0, 1, 2


@dataclass(frozen=True)
class Experiment:
    """The static pieces of a run: everything but the train state."""

    cfg: ExperimentConfig
    model: DecomposedModel
    frozen: Any
    residual_fn: Any
    ci_fn: CIFn
    spec: LossSpec
    optimizers: Optimizers
    initial_ci_params: Any

    def leading_shape(self, batch_size: int | None = None) -> tuple[int, ...]:
        bs = batch_size or self.cfg.batch_size
        if len(self.model.leading_axes) == 2:
            return (bs, self.cfg.data.seq_len)  # type: ignore[union-attr]
        return (bs,)

    def fresh_state(self) -> TrainState:
        """Step-0 state: fresh components, CI fn, optimizers, adversary sources and RNG."""
        base = jax.random.PRNGKey(self.cfg.seed)
        components = init_components(self.model, jax.random.fold_in(base, KEY_COMPONENTS))
        return init_train_state(
            jax.random.fold_in(base, KEY_STATE),
            self.model,
            components,
            self.initial_ci_params,
            self.optimizers,
            self.spec,
            self.leading_shape(),
        )


def build_experiment(cfg: ExperimentConfig, target_cache: Path | None = None) -> Experiment:
    site_Cs = dict(cfg.resolved_sites())
    model, frozen, residual_fn = build_target(cfg.target, site_Cs, cache_dir=target_cache)
    ci_key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), KEY_CI)
    ci_fn, ci_params = build_ci_fn(cfg.ci_fn, model.sites, model.leading_axes, ci_key)
    return Experiment(
        cfg=cfg,
        model=model,
        frozen=frozen,
        residual_fn=residual_fn,
        ci_fn=ci_fn,
        spec=LossSpec.from_config(cfg),
        optimizers=Optimizers.from_config(cfg),
        initial_ci_params=ci_params,
    )
