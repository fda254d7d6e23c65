"""Target registry: config -> (DecomposedModel, frozen weights, residual_fn), plus a disk cache of
pretrained toy targets so repeated runs and tests do not pretrain again.

Cached toy weights live in `<cache_dir>/<type>-<hash>.npz` (+ a `.json` with the config), where the
hash covers the target config JSON and `PRETRAIN_CODE_VERSION`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from param_decomp_config.targets import ResidMLPTargetConfig, TargetConfig, TMSTargetConfig
from param_decomp_jax.core.model import DecomposedModel
from param_decomp_jax.targets.resid_mlp import build_resid_mlp, make_resid_mlp_model, pretrain_resid_mlp
from param_decomp_jax.targets.tms import (
    ResidualFn,
    build_tms,
    make_tms_model,
    pretrain_tms,
    tms_features_represented,
)

Frozen = dict[str, Any]

# Bump whenever pretraining math changes (init, optimizer, data): it invalidates every cached target.
PRETRAIN_CODE_VERSION = 1
# How many times each toy type was actually pretrained in this process (tests check cache hits).
PRETRAIN_CALLS: Counter[str] = Counter()
_PRETRAINERS: dict[str, Callable[[Any], Frozen]] = {"tms": pretrain_tms, "resid_mlp": pretrain_resid_mlp}


def target_cache_key(target_cfg: TMSTargetConfig | ResidMLPTargetConfig) -> str:
    """`<type>-<16 hex>`: a hash of the full target config (pretraining settings included)."""
    payload = f"v{PRETRAIN_CODE_VERSION}:{target_cfg.model_dump_json()}"
    return f"{target_cfg.type}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def _save_npz_atomic(path: Path, frozen: Frozen) -> None:
    # Write-then-rename: concurrent runs/tests never read a half-written file.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in frozen.items()})  # type: ignore[arg-type]
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_or_pretrain(
    target_cfg: TMSTargetConfig | ResidMLPTargetConfig, cache_dir: Path | str | None = None
) -> tuple[Frozen, bool]:
    """(frozen weights, cache_hit). Without `cache_dir` it always pretrains and stores nothing."""
    path = None if cache_dir is None else Path(cache_dir) / f"{target_cache_key(target_cfg)}.npz"
    if path is not None and path.is_file():
        with np.load(path) as z:
            return {k: jnp.asarray(z[k]) for k in z.files}, True
    frozen = _PRETRAINERS[target_cfg.type](target_cfg)
    PRETRAIN_CALLS[target_cfg.type] += 1
    if path is not None:
        _save_npz_atomic(path, frozen)
        path.with_suffix(".json").write_text(target_cfg.model_dump_json(indent=2))
    return frozen, False


def target_summary(target_cfg: TargetConfig, frozen: Frozen) -> dict[str, float]:
    """Facts about the pretrained target worth a line in the run summary (SPEC: TMS seed check)."""
    if isinstance(target_cfg, TMSTargetConfig):
        rep = tms_features_represented(frozen, target_cfg.n_features)
        return {"target/features_represented": float(sum(rep)), "target/n_features": float(len(rep))}
    return {}


def build_target(
    target_cfg: TargetConfig, site_Cs: Mapping[str, int], cache_dir: Path | str | None = None
) -> tuple[DecomposedModel, Frozen, ResidualFn]:
    """Dispatch on `target_cfg.type`. Toy targets are pretrained (or loaded from `cache_dir`)."""
    if isinstance(target_cfg, TMSTargetConfig | ResidMLPTargetConfig):
        # Check the site list first (by building the model): a bad one fails before any pretraining.
        if isinstance(target_cfg, TMSTargetConfig):
            make_tms_model(target_cfg, site_Cs)
        else:
            make_resid_mlp_model(target_cfg, site_Cs)
        frozen, _ = load_or_pretrain(target_cfg, cache_dir)
        summary = target_summary(target_cfg, frozen)
        if summary.get("target/features_represented", np.inf) < target_cfg.n_features:
            # A dropped TMS feature makes the identity-CI result unreachable: say so loudly.
            warnings.warn(
                f"TMS target (seed {target_cfg.pretrain.seed}) represents only "
                f"{int(summary['target/features_represented'])}/{target_cfg.n_features} features",
                stacklevel=2,
            )
        # The target module owns its residual fn (TMS: identity; ResidMLP: the fixed embedding).
        build = build_tms if isinstance(target_cfg, TMSTargetConfig) else build_resid_mlp
        return build(target_cfg, site_Cs, frozen)  # type: ignore[arg-type]
    if target_cfg.type == "llama":
        # ---- llama: registered by the Llama target (lazy import keeps toys free of its deps) ----
        from param_decomp_jax.targets.llama import build_llama

        return build_llama(target_cfg.checkpoint_dir, site_Cs, target_cfg.dtype)
    raise ValueError(f"unknown target type {target_cfg.type!r}")
