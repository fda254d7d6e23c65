"""Learning-rate schedules and the AdamW chains (clip first, then AdamW)."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from param_decomp_config.optim import OptimizerConfig, ScheduleConfig


def make_schedule(cfg: ScheduleConfig, peak_lr: float, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over `warmup_frac`, then constant / linear / cosine to `final_frac`·peak."""
    warmup = int(round(cfg.warmup_frac * total_steps))
    decay_steps = max(total_steps - warmup, 1)
    final = cfg.final_frac * peak_lr

    def schedule(count: jnp.ndarray) -> jnp.ndarray:
        count = jnp.asarray(count, jnp.float32)
        warm = peak_lr * jnp.minimum((count + 1.0) / max(warmup, 1), 1.0) if warmup else peak_lr
        t = jnp.clip((count - warmup) / decay_steps, 0.0, 1.0)
        if cfg.kind == "constant":
            after = jnp.asarray(peak_lr, jnp.float32)
        elif cfg.kind == "linear":
            after = peak_lr + t * (final - peak_lr)
        else:
            after = final + 0.5 * (peak_lr - final) * (1.0 + jnp.cos(jnp.pi * t))
        return jnp.where(count < warmup, warm, after)

    return schedule


def make_adamw(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clip (if configured) THEN AdamW; the schedule steps once per update."""
    adamw = optax.adamw(
        learning_rate=make_schedule(cfg.schedule, cfg.lr, total_steps),
        b1=cfg.beta1,
        b2=cfg.beta2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )
    if cfg.grad_clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw)
