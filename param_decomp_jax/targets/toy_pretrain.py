"""The shared pretraining loop of the toy targets: Adam + cosine LR, the whole run in one jitted scan.

Deterministic from the key: the batch of step t is drawn from `fold_in(data_key, t)`, so the run is
one compiled program with no host round-trips (10k tiny steps take seconds, not minutes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float

from param_decomp_config.targets import ToyPretrainConfig

Params = Any
LossFn = Callable[[Params, Array], Array]  # (params, x_BxF) -> scalar loss
SampleFn = Callable[[Array], Array]  # key -> x_BxF

# Torch's AdamW default; the toy targets' published pretraining used it and it keeps the unused
# directions of W from drifting. Kept here (not in the schema) because no config varies it.
PRETRAIN_WEIGHT_DECAY = 1e-2


def pretrain(
    loss_fn: LossFn, params: Params, sample_fn: SampleFn, cfg: ToyPretrainConfig, data_key: Array
) -> tuple[Params, Float[Array, " steps"]]:
    """Run `cfg.steps` AdamW steps (cosine LR from `cfg.lr` to 0); return params and per-step losses."""
    opt = optax.adamw(optax.cosine_decay_schedule(cfg.lr, cfg.steps), weight_decay=PRETRAIN_WEIGHT_DECAY)

    @jax.jit
    def run(params: Params, data_key: Array) -> tuple[Params, Array]:
        def step(carry: tuple[Params, Any], t: Array) -> tuple[tuple[Params, Any], Array]:
            params, opt_state = carry
            x_BxF = sample_fn(jax.random.fold_in(data_key, t))
            loss, grads = jax.value_and_grad(loss_fn)(params, x_BxF)
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), jnp.arange(cfg.steps))
        return params, losses

    return run(params, data_key)
