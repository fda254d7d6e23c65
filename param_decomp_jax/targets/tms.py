"""Toy model of superposition (TMS): x -> ReLU(x W1 (I) W1^T + b), with tied weights W1: [F, H].

The frozen target is a flat dict `{"W1": [F, H], "b": [F]}` plus `"I_hidden": [H, H]` when the
fixed identity hidden layer is on. The target ties `linear2 = W1^T`, but the decomposition treats
every site as an independent matrix (`linear1` = W1, `hidden_layers.0` = I, `linear2` = W1^T);
the bias is frozen and never a site. The batch is the residual (`residual_fn` is the identity).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from param_decomp_config.targets import TMSTargetConfig
from param_decomp_jax.core.losses import mse_recon_loss
from param_decomp_jax.core.model import DecomposedModel, SiteFn, SiteSpec, frozen_matmul
from param_decomp_jax.targets.toy_data import sample_sparse_features
from param_decomp_jax.targets.toy_pretrain import pretrain

Frozen = dict[str, Array]
ResidualFn = Callable[[Frozen, Array], Array]
LEADING_AXES = ("batch",)
HIDDEN_SITE = "hidden_layers.0"


def tms_forward(frozen: Frozen, x_BxF: Float[Array, "B F"], site_fn: SiteFn) -> Float[Array, "B F"]:
    """The one forward the core derives every view from; each weight goes through `site_fn`."""
    h_BxH = site_fn("linear1", x_BxF)
    if "I_hidden" in frozen:
        h_BxH = site_fn(HIDDEN_SITE, h_BxH)
    return jax.nn.relu(site_fn("linear2", h_BxH) + frozen["b"].astype(h_BxH.dtype))


def tms_site_weights(frozen: Frozen) -> dict[str, Array]:
    """Every weight `tms_forward` applies through `site_fn` (decomposed or not), as [d_in, d_out]."""
    weights = {"linear1": frozen["W1"], "linear2": frozen["W1"].T}
    if "I_hidden" in frozen:
        weights[HIDDEN_SITE] = frozen["I_hidden"]
    return weights


def tms_output(frozen: Frozen, x_BxF: Float[Array, "B F"]) -> Float[Array, "B F"]:
    """The plain target (every weight on its frozen path)."""
    weights = tms_site_weights(frozen)
    return tms_forward(frozen, x_BxF, lambda n, x: frozen_matmul(x, weights[n]))


def _pretrain_loss(params: Frozen, x_BxF: Array) -> Array:
    # The identity hidden layer is exactly a no-op, so pretraining never needs it.
    out_BxF = jax.nn.relu(x_BxF @ params["W1"] @ params["W1"].T + params["b"])
    return jnp.mean(jnp.square(out_BxF - x_BxF))


def pretrain_tms_with_losses(cfg: TMSTargetConfig) -> tuple[Frozen, Float[Array, " steps"]]:
    """`pretrain_tms` that also returns the per-step training loss."""
    p = cfg.pretrain
    init_key, data_key = jax.random.split(jax.random.key(p.seed))
    F, H = cfg.n_features, cfg.n_hidden
    # Xavier-normal W1 and zero bias: the classic TMS initialisation.
    std = float(np.sqrt(2.0 / (F + H)))
    params = {"W1": std * jax.random.normal(init_key, (F, H), jnp.float32), "b": jnp.zeros((F,), jnp.float32)}

    def sample(key: Array) -> Array:
        return sample_sparse_features(key, p.batch_size, F, p.feature_probability, "at_least_zero_active")

    params, losses = pretrain(_pretrain_loss, params, sample, p, data_key)
    frozen = dict(params)
    if cfg.identity_hidden:
        frozen["I_hidden"] = jnp.eye(H, dtype=jnp.float32)
    return frozen, losses


def pretrain_tms(cfg: TMSTargetConfig) -> Frozen:
    """Train the TMS target on MSE(out, x) with sparse inputs; deterministic from `cfg.pretrain.seed`."""
    return pretrain_tms_with_losses(cfg)[0]


def tms_features_represented(
    frozen: Frozen, n_features: int, on_threshold: float = 0.5, off_threshold: float = 0.25
) -> list[bool]:
    """Whether each single-feature input e_i (value 1) is reconstructed by the target.

    Feature i counts as represented when out_i > `on_threshold` and every other output stays below
    `off_threshold`. A degenerate 5-2 polygon fails this: the dropped feature's output is ~0, or
    two features share a direction and light each other up.
    """
    out_FxF = np.asarray(tms_output(frozen, jnp.eye(n_features, dtype=jnp.float32)))
    diag = np.diag(out_FxF)
    off = out_FxF - np.diag(diag)
    return [bool(diag[i] > on_threshold and off[i].max() < off_threshold) for i in range(n_features)]


def make_tms_model(cfg: TMSTargetConfig, site_Cs: Mapping[str, int]) -> DecomposedModel:
    """The decomposed model over the chosen sites (canonical order); needs no weights."""
    available = cfg.available_sites()
    unknown = sorted(set(site_Cs) - set(available))
    if unknown or not site_Cs:
        raise ValueError(f"TMS sites must be a non-empty subset of {available}, got {sorted(site_Cs)}")
    F, H = cfg.n_features, cfg.n_hidden
    dims = {"linear1": (F, H), HIDDEN_SITE: (H, H), "linear2": (H, F)}
    sites = tuple(SiteSpec(n, *dims[n], C=int(site_Cs[n])) for n in available if n in site_Cs)
    return DecomposedModel(
        sites=sites,
        leading_axes=LEADING_AXES,
        forward=tms_forward,
        site_weights=tms_site_weights,
        recon_loss=mse_recon_loss,
    )


def identity_residual_fn(frozen: Frozen, batch_BxF: Float[Array, "B F"]) -> Float[Array, "B F"]:
    """Toy targets have no frozen prefix: the input batch is the residual."""
    del frozen
    return batch_BxF


def build_tms(
    cfg: TMSTargetConfig, site_Cs: Mapping[str, int], frozen: Frozen | None = None
) -> tuple[DecomposedModel, Frozen, ResidualFn]:
    """(model, frozen weights, residual_fn). Pretrains unless `frozen` is given (e.g. from a cache)."""
    model = make_tms_model(cfg, site_Cs)
    if frozen is None:
        frozen = pretrain_tms(cfg)
    return model, frozen, identity_residual_fn
