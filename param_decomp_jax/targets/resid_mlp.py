"""Residual MLP toy target ("compressed computation"): embed sparse features into a wide residual
stream, add n MLP layers, read off with the transposed embedding; label act(x) + x.

The frozen target is a flat dict: `"W_E": [F, D]` (fixed, rows unit-norm random or identity) and
per layer `"layers.{i}.W_in": [D, M]`, `"layers.{i}.W_out": [M, D]` (+ `"layers.{i}.b_in": [M]`
when `cfg.in_bias`). Sites are `layers.{i}.mlp_in` and `layers.{i}.mlp_out`; the embedding and
bias are frozen, never sites. Features take values in [-1, 1] (`RESID_MLP_VALUE_RANGE`) so the
label's nonlinearity matters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from param_decomp_config.targets import ResidMLPTargetConfig
from param_decomp_jax.core.losses import mse_recon_loss
from param_decomp_jax.core.model import DecomposedModel, SiteFn, SiteSpec, frozen_matmul
from param_decomp_jax.targets.tms import ResidualFn
from param_decomp_jax.targets.toy_data import TARGET_VALUE_RANGES, sample_sparse_features
from param_decomp_jax.targets.toy_pretrain import pretrain

Frozen = dict[str, Array]
LEADING_AXES = ("batch",)
# The published ResidMLP data: active features ~ U[-1, 1] (pretraining AND decomposition data).
RESID_MLP_VALUE_RANGE = TARGET_VALUE_RANGES["resid_mlp"]


def activation(name: str) -> Callable[[Array], Array]:
    # Exact (erf) GELU: the label and the MLP must use the same function.
    return jax.nn.relu if name == "relu" else (lambda x: jax.nn.gelu(x, approximate=False))


def resid_mlp_label(x_BxF: Float[Array, "B F"], act: str) -> Float[Array, "B F"]:
    """The regression target: act(x) + x, each feature its own function."""
    return activation(act)(x_BxF) + x_BxF


def _unembed(r_BxD: Array, w_e_FxD: Array) -> Array:
    # Contract against the stored [F, D] embedding: no transposed copy.
    return jnp.einsum("bd,fd->bf", r_BxD, w_e_FxD.astype(r_BxD.dtype))


def make_resid_mlp_forward(cfg: ResidMLPTargetConfig) -> Callable[[Frozen, Array, SiteFn], Array]:
    """The whole target from features: embedding, then the decomposed suffix."""
    suffix = make_resid_mlp_suffix(cfg)

    def forward(frozen: Frozen, x_BxF: Float[Array, "B F"], site_fn: SiteFn) -> Float[Array, "B F"]:
        return suffix(frozen, embed_residual_fn(frozen, x_BxF), site_fn)

    return forward


def embed_residual_fn(frozen: Frozen, x_BxF: Float[Array, "B F"]) -> Float[Array, "B D"]:
    """The frozen prefix: the fixed embedding runs once per batch, outside every gradient graph."""
    return frozen_matmul(x_BxF, frozen["W_E"])


def make_resid_mlp_suffix(cfg: ResidMLPTargetConfig) -> Callable[[Frozen, Array, SiteFn], Array]:
    """The decomposed part: MLP layers on the embedded residual, then the fixed unembedding."""
    act = activation(cfg.act)

    def suffix(frozen: Frozen, r_BxD: Float[Array, "B D"], site_fn: SiteFn) -> Float[Array, "B F"]:
        for i in range(cfg.n_layers):
            pre_BxM = site_fn(f"layers.{i}.mlp_in", r_BxD)
            if cfg.in_bias:
                pre_BxM = pre_BxM + frozen[f"layers.{i}.b_in"].astype(pre_BxM.dtype)
            r_BxD = r_BxD + site_fn(f"layers.{i}.mlp_out", act(pre_BxM))
        return _unembed(r_BxD, frozen["W_E"])

    return suffix


def make_resid_mlp_site_weights(cfg: ResidMLPTargetConfig) -> Callable[[Frozen], dict[str, Array]]:
    """Every matrix the forward applies through `site_fn`, as [d_in, d_out]."""

    def site_weights(frozen: Frozen) -> dict[str, Array]:
        out: dict[str, Array] = {}
        for i in range(cfg.n_layers):
            out[f"layers.{i}.mlp_in"] = frozen[f"layers.{i}.W_in"]
            out[f"layers.{i}.mlp_out"] = frozen[f"layers.{i}.W_out"]
        return out

    return site_weights


def resid_mlp_output(cfg: ResidMLPTargetConfig, frozen: Frozen, x_BxF: Float[Array, "B F"]) -> Array:
    """The plain target (every matrix on its frozen path)."""
    weights = make_resid_mlp_site_weights(cfg)(frozen)
    return make_resid_mlp_forward(cfg)(frozen, x_BxF, lambda n, x: frozen_matmul(x, weights[n]))


def _through_residual(coefs: list[Array], bases: list[Array], w: Array) -> Array:
    """`residual @ w` for residual = Σ_k coefs[k] @ bases[k], via the small products bases[k] @ w."""
    out = coefs[0] @ (bases[0] @ w)
    for c, b in zip(coefs[1:], bases[1:], strict=True):
        out = out + c @ (b @ w)
    return out


def factored_output(
    cfg: ResidMLPTargetConfig, params: Frozen, w_e_FxD: Array, x_BxF: Float[Array, "B F"]
) -> Float[Array, "B F"]:
    """The same function as `resid_mlp_output`, computed without materialising the residual.

    The residual is always `x W_E + Σ_j a_j W_out_j`, so every product with it can be taken against
    the (small, batch-independent) matrices `W_E W_in`, `W_out_j W_in`, `W_out_j W_E^T`. The
    per-example cost drops from O(F·D) to O(F·M) — what makes pretraining with D = 1000 cheap.
    """
    act = activation(cfg.act)
    coefs: list[Array] = [x_BxF]  # residual = Σ_k coefs[k] @ bases[k]
    bases: list[Array] = [w_e_FxD]
    for i in range(cfg.n_layers):
        w_in = params[f"layers.{i}.W_in"]
        pre_BxM = _through_residual(coefs, bases, w_in)
        if cfg.in_bias:
            pre_BxM = pre_BxM + params[f"layers.{i}.b_in"]
        coefs.append(act(pre_BxM))
        bases.append(params[f"layers.{i}.W_out"])
    return _through_residual(coefs, bases, w_e_FxD.T)


def _init(cfg: ResidMLPTargetConfig, key: Array) -> tuple[Array, Frozen]:
    """Fixed embedding and fan-in scaled normal MLP weights (zero bias)."""
    k_emb, *k_layers = jax.random.split(key, 1 + cfg.n_layers)
    if cfg.embedding == "identity":
        w_e = jnp.eye(cfg.n_features, dtype=jnp.float32)
    else:
        w_e = jax.random.normal(k_emb, (cfg.n_features, cfg.d_embed), jnp.float32)
        w_e = w_e / jnp.linalg.norm(w_e, axis=-1, keepdims=True)
    D, M = cfg.d_embed, cfg.d_mlp
    params: Frozen = {}
    for i, k in enumerate(k_layers):
        k_in, k_out = jax.random.split(k)
        params[f"layers.{i}.W_in"] = jax.random.normal(k_in, (D, M), jnp.float32) / jnp.sqrt(D)
        params[f"layers.{i}.W_out"] = jax.random.normal(k_out, (M, D), jnp.float32) / jnp.sqrt(M)
        if cfg.in_bias:
            params[f"layers.{i}.b_in"] = jnp.zeros((M,), jnp.float32)
    return w_e, params


def pretrain_resid_mlp_with_losses(cfg: ResidMLPTargetConfig) -> tuple[Frozen, Float[Array, " steps"]]:
    """`pretrain_resid_mlp` that also returns the per-step training loss."""
    p = cfg.pretrain
    init_key, data_key = jax.random.split(jax.random.key(p.seed))
    w_e, params = _init(cfg, init_key)

    def loss_fn(params: Frozen, x_BxF: Array) -> Array:
        # Read-off MSE in feature space, every feature weighted equally.
        out_BxF = factored_output(cfg, params, w_e, x_BxF)
        return jnp.mean(jnp.square(out_BxF - resid_mlp_label(x_BxF, cfg.act)))

    def sample(key: Array) -> Array:
        return sample_sparse_features(
            key, p.batch_size, cfg.n_features, p.feature_probability, "at_least_zero_active",
            RESID_MLP_VALUE_RANGE,
        )  # fmt: skip

    params, losses = pretrain(loss_fn, params, sample, p, data_key)
    return {"W_E": w_e, **params}, losses


def pretrain_resid_mlp(cfg: ResidMLPTargetConfig) -> Frozen:
    """Train the MLPs (embedding fixed) on MSE(out, act(x) + x); deterministic from the seed."""
    return pretrain_resid_mlp_with_losses(cfg)[0]


def make_resid_mlp_model(cfg: ResidMLPTargetConfig, site_Cs: Mapping[str, int]) -> DecomposedModel:
    """The decomposed model over the chosen sites (canonical order); needs no weights."""
    available = cfg.available_sites()
    unknown = sorted(set(site_Cs) - set(available))
    if unknown or not site_Cs:
        raise ValueError(f"ResidMLP sites must be a non-empty subset of {available}, got {sorted(site_Cs)}")
    D, M = cfg.d_embed, cfg.d_mlp
    sites = tuple(
        SiteSpec(n, *((D, M) if n.endswith("mlp_in") else (M, D)), C=int(site_Cs[n]))
        for n in available
        if n in site_Cs
    )
    return DecomposedModel(
        sites=sites,
        leading_axes=LEADING_AXES,
        forward=make_resid_mlp_suffix(cfg),
        site_weights=make_resid_mlp_site_weights(cfg),
        recon_loss=mse_recon_loss,
    )


def build_resid_mlp(
    cfg: ResidMLPTargetConfig, site_Cs: Mapping[str, int], frozen: Frozen | None = None
) -> tuple[DecomposedModel, Frozen, ResidualFn]:
    """(model, frozen weights, residual_fn). Pretrains unless `frozen` is given (e.g. from a cache)."""
    model = make_resid_mlp_model(cfg, site_Cs)
    if frozen is None:
        frozen = pretrain_resid_mlp(cfg)
    return model, frozen, embed_residual_fn
