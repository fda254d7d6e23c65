"""A two-site toy model and config used by core tests (no pretraining, instant to build)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import yaml
from conftest import REPO_ROOT

from param_decomp_config import ExperimentConfig, build_config
from param_decomp_jax.core.ci_fn import CIFn
from param_decomp_jax.core.losses import mse_recon_loss
from param_decomp_jax.core.model import DecomposedModel, SiteSpec

D_IN, D_HID, C = 6, 4, 5


def tiny_forward(frozen, x, site_fn):
    return site_fn("b", jax.nn.relu(site_fn("a", x)))


def tiny_model() -> tuple[DecomposedModel, dict]:
    model = DecomposedModel(
        sites=(SiteSpec("a", D_IN, D_HID, C), SiteSpec("b", D_HID, D_IN, C)),
        leading_axes=("batch",),
        forward=tiny_forward,
        site_weights=lambda f: {"a": f["a"], "b": f["b"]},
        recon_loss=mse_recon_loss,
    )
    k1, k2 = jax.random.split(jax.random.PRNGKey(42))
    frozen = {"a": jax.random.normal(k1, (D_IN, D_HID)), "b": jax.random.normal(k2, (D_HID, D_IN))}
    return model, frozen


def linear_ci_fn() -> tuple[CIFn, dict]:
    def apply(params, inputs):
        return {n: inputs[n] @ params[n]["w"] + params[n]["b"] for n in ("a", "b")}

    k1, k2 = jax.random.split(jax.random.PRNGKey(7))
    params = {
        "a": {"w": 0.3 * jax.random.normal(k1, (D_IN, C)), "b": jnp.full((C,), 0.2)},
        "b": {"w": 0.3 * jax.random.normal(k2, (D_HID, C)), "b": jnp.full((C,), 0.2)},
    }
    return CIFn(("batch",), apply, "linear"), params


def tiny_config(losses: list[dict] | None = None, **overrides) -> ExperimentConfig:
    """The TMS 5-2 config re-pointed at sites a/b is not possible (site names are validated against the
    target), so the tiny model reuses the TMS schema only for its loss/optimizer sections."""
    raw = yaml.safe_load((REPO_ROOT / "configs" / "tms_5-2.yaml").read_text())
    if losses is not None:
        raw["losses"] = losses
    raw.update(overrides)
    return build_config(raw, "tiny")
