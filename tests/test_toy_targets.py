"""Toy targets: sparse-feature sampler, TMS / ResidMLP pretraining and waist views, target cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO_ROOT

from param_decomp_config.loading import load_config
from param_decomp_config.targets import ResidMLPTargetConfig, TMSTargetConfig, ToyPretrainConfig
from param_decomp_jax import targets as registry
from param_decomp_jax.core.model import init_components
from param_decomp_jax.targets.resid_mlp import (
    RESID_MLP_VALUE_RANGE,
    factored_output,
    pretrain_resid_mlp_with_losses,
    resid_mlp_output,
)
from param_decomp_jax.targets.tms import pretrain_tms_with_losses, tms_features_represented
from param_decomp_jax.targets.toy_data import resolve_value_range, sample_sparse_features

# Masked-with-masks=1-and-delta vs clean: (x V) U + x (W − V U) against x W reassociates a few
# matmuls and cancels V U inside the delta, so allow the multi-op fp32 budget (absolute, outputs O(1)).
MULTI_OP_ATOL = 1e-5

SMALL_PRETRAIN = ToyPretrainConfig(steps=300, batch_size=256, lr=5e-3, seed=3, feature_probability=0.05)
TMS_SMALL = TMSTargetConfig(n_features=5, n_hidden=2, identity_hidden=True, pretrain=SMALL_PRETRAIN)
RESID_SMALL = ResidMLPTargetConfig(
    n_features=12,
    d_embed=32,
    d_mlp=6,
    n_layers=2,
    act="gelu",
    in_bias=True,
    pretrain=ToyPretrainConfig(steps=300, batch_size=256, lr=5e-3, seed=1, feature_probability=0.1),
)


# ---- sampler ------------------------------------------------------------------------------------
def test_at_least_zero_active_statistics() -> None:
    B, F, p = 20_000, 10, 0.05
    x = np.asarray(sample_sparse_features(jax.random.key(0), B, F, p, "at_least_zero_active"))
    on = x != 0
    # Per-feature frequency ~ Binomial(B, p)/B: 5 standard deviations (sd = 0.0015) per feature.
    sd = np.sqrt(p * (1 - p) / B)
    assert np.all(np.abs(on.mean(0) - p) < 5 * sd), on.mean(0)
    vals = x[on]
    assert vals.min() >= 0.0 and vals.max() <= 1.0
    # Active values ~ U[0, 1]: mean 1/2 within 5 sd (sd = 0.289 / sqrt(#active)).
    assert abs(vals.mean() - 0.5) < 5 * 0.289 / np.sqrt(vals.size)
    # Independent across features: the fraction of all-zero rows is (1 - p)^F.
    assert abs((~on.any(1)).mean() - (1 - p) ** F) < 5 * np.sqrt(0.6 * 0.4 / B)


def test_value_range_and_traced_probability() -> None:
    sample = jax.jit(
        lambda k, p: sample_sparse_features(k, 20_000, 5, p, "at_least_zero_active", RESID_MLP_VALUE_RANGE)
    )
    x = np.asarray(sample(jax.random.key(1), jnp.float32(0.2)))
    vals = x[x != 0]
    assert abs((x != 0).mean() - 0.2) < 5 * np.sqrt(0.2 * 0.8 / x.size)
    assert vals.min() >= -1.0 and vals.max() <= 1.0 and (vals < 0).any()
    assert abs(vals.mean()) < 5 * 0.577 / np.sqrt(vals.size)


def test_resolve_value_range() -> None:
    assert resolve_value_range("tms", None) == (0.0, 1.0)
    assert resolve_value_range("resid_mlp", None) == (-1.0, 1.0)
    assert resolve_value_range("resid_mlp", (0.0, 2.0)) == (0.0, 2.0)
    with pytest.raises(ValueError, match="llama"):
        resolve_value_range("llama", None)


def test_exactly_one_active() -> None:
    B, F = 8192, 8
    x = np.asarray(sample_sparse_features(jax.random.key(2), B, F, 0.05, "exactly_one_active"))
    assert np.all((x != 0).sum(1) == 1)
    counts = (x != 0).sum(0)
    # Uniform choice of feature: each count ~ Binomial(B, 1/F), 5 sd.
    assert np.all(np.abs(counts - B / F) < 5 * np.sqrt(B * (1 / F) * (1 - 1 / F))), counts
    assert x.min() >= 0.0 and x.max() <= 1.0


# ---- TMS ----------------------------------------------------------------------------------------
def test_tms_pretraining_reduces_loss_and_is_deterministic() -> None:
    frozen_a, losses = pretrain_tms_with_losses(TMS_SMALL)
    losses = np.asarray(losses)
    assert losses.shape == (300,)
    assert losses[-30:].mean() < 0.5 * losses[:30].mean()
    frozen_b, _ = pretrain_tms_with_losses(TMS_SMALL)
    assert set(frozen_a) == {"W1", "b", "I_hidden"}
    for k in frozen_a:
        np.testing.assert_array_equal(np.asarray(frozen_a[k]), np.asarray(frozen_b[k]))


def test_tms_5_2_config_seed_represents_all_features() -> None:
    """The seed pinned in configs/tms_5-2.yaml, with its real pretraining settings (~3 s)."""
    cfg = load_config(REPO_ROOT / "configs" / "tms_5-2.yaml")
    assert isinstance(cfg.target, TMSTargetConfig) and cfg.target.pretrain.steps == 10_000
    frozen, _ = pretrain_tms_with_losses(cfg.target)
    assert tms_features_represented(frozen, cfg.target.n_features) == [True] * 5


def test_tms_features_represented_flags_a_dropped_feature() -> None:
    # A hand-made pentagon, then feature 3 dropped (zero row) and feature 1 doubled onto feature 0.
    angles = 2 * np.pi * np.arange(5) / 5
    w = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    frozen = {"W1": jnp.asarray(w), "b": jnp.full((5,), -0.2, jnp.float32)}
    assert tms_features_represented(frozen, 5) == [True] * 5
    w[3] = 0.0
    w[1] = w[0]
    frozen["W1"] = jnp.asarray(w)
    assert tms_features_represented(frozen, 5) == [False, False, True, False, True]


def _check_masked_equals_clean(model, frozen, x) -> None:
    comps = init_components(model, jax.random.key(7))
    clean = model.clean_output(frozen, x)
    masks = {s.name: jnp.ones(x.shape[:1] + (s.C,), jnp.float32) for s in model.sites}
    deltas = {s.name: jnp.ones(x.shape[:1], jnp.float32) for s in model.sites}
    masked = model.masked_output(frozen, comps, x, masks, deltas)
    np.testing.assert_allclose(np.asarray(masked), np.asarray(clean), rtol=0, atol=MULTI_OP_ATOL)
    # Without the delta the output really changes (components start far from W): the test has teeth.
    assert not np.allclose(np.asarray(model.masked_output(frozen, comps, x, masks)), np.asarray(clean))


def test_tms_waist_views() -> None:
    site_Cs = {"linear1": 7, "hidden_layers.0": 3, "linear2": 7}
    # 300 pretraining steps are too few for a pentagon: the build must say so.
    with pytest.warns(UserWarning, match=r"represents only \d/5 features"):
        model, frozen, residual_fn = registry.build_target(TMS_SMALL, site_Cs)
    assert model.site_names == ("linear1", "hidden_layers.0", "linear2")
    assert model.leading_axes == ("batch",)
    x = sample_sparse_features(jax.random.key(3), 64, 5, 0.3, "at_least_zero_active")
    assert residual_fn(frozen, x) is x
    inputs = model.site_inputs(frozen, x)
    assert {k: v.shape for k, v in inputs.items()} == {
        "linear1": (64, 5),
        "hidden_layers.0": (64, 2),
        "linear2": (64, 2),
    }
    _check_masked_equals_clean(model, frozen, x)
    # recon loss is the MSE over batch and outputs
    clean = model.clean_output(frozen, x)
    assert float(model.recon_loss(clean + 0.5, clean)) == pytest.approx(0.25, rel=1e-6)


@pytest.mark.filterwarnings("ignore:TMS target")
def test_tms_site_subset_and_unknown_site() -> None:
    model, _, _ = registry.build_target(TMSTargetConfig(pretrain=SMALL_PRETRAIN), {"linear2": 4})
    assert [(s.name, s.d_in, s.d_out, s.C) for s in model.sites] == [("linear2", 2, 5, 4)]
    with pytest.raises(ValueError, match="TMS sites"):
        registry.build_target(TMSTargetConfig(pretrain=SMALL_PRETRAIN), {"hidden_layers.0": 2})


# ---- ResidMLP -----------------------------------------------------------------------------------
def test_resid_mlp_pretraining_reduces_loss_and_is_deterministic() -> None:
    frozen_a, losses = pretrain_resid_mlp_with_losses(RESID_SMALL)
    losses = np.asarray(losses)
    assert losses[-30:].mean() < 0.7 * losses[:30].mean()
    frozen_b, _ = pretrain_resid_mlp_with_losses(RESID_SMALL)
    assert set(frozen_a) == {"W_E"} | {f"layers.{i}.{k}" for i in (0, 1) for k in ("W_in", "W_out", "b_in")}
    for k in frozen_a:
        np.testing.assert_array_equal(np.asarray(frozen_a[k]), np.asarray(frozen_b[k]))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(frozen_a["W_E"]), axis=1), 1.0, rtol=1e-6)


def test_resid_mlp_factored_pretraining_forward_matches_target() -> None:
    frozen, _ = pretrain_resid_mlp_with_losses(RESID_SMALL)
    x = sample_sparse_features(jax.random.key(4), 128, 12, 0.2, "at_least_zero_active", (-1.0, 1.0))
    params = {k: v for k, v in frozen.items() if k != "W_E"}
    np.testing.assert_allclose(
        np.asarray(factored_output(RESID_SMALL, params, frozen["W_E"], x)),
        np.asarray(resid_mlp_output(RESID_SMALL, frozen, x)),
        rtol=0,
        atol=MULTI_OP_ATOL,
    )


def test_resid_mlp_waist_views() -> None:
    site_Cs = {n: 9 for n in RESID_SMALL.available_sites()}
    model, frozen, residual_fn = registry.build_target(RESID_SMALL, site_Cs)
    assert model.site_names == ("layers.0.mlp_in", "layers.0.mlp_out", "layers.1.mlp_in", "layers.1.mlp_out")
    x = sample_sparse_features(jax.random.key(5), 32, 12, 0.2, "at_least_zero_active", (-1.0, 1.0))
    # The fixed embedding is the frozen prefix: the decomposed model starts from the residual.
    r = residual_fn(frozen, x)
    assert r.shape == (32, 32)
    shapes = {k: v.shape for k, v in model.site_inputs(frozen, r).items()}
    assert shapes == {
        "layers.0.mlp_in": (32, 32),
        "layers.0.mlp_out": (32, 6),
        "layers.1.mlp_in": (32, 32),
        "layers.1.mlp_out": (32, 6),
    }
    assert model.clean_output(frozen, r).shape == (32, 12)
    np.testing.assert_allclose(
        np.asarray(model.clean_output(frozen, r)),
        np.asarray(resid_mlp_output(RESID_SMALL, frozen, x)),
        rtol=0,
        atol=MULTI_OP_ATOL,
    )
    _check_masked_equals_clean(model, frozen, r)


# ---- registry cache -----------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:TMS target")
def test_target_cache_hits(tmp_path) -> None:
    before = registry.PRETRAIN_CALLS["tms"]
    frozen_a, hit_a = registry.load_or_pretrain(TMS_SMALL, tmp_path)
    _, frozen_b, _ = registry.build_target(TMS_SMALL, {"linear1": 3}, cache_dir=tmp_path)
    frozen_c, hit_c = registry.load_or_pretrain(TMS_SMALL, tmp_path)
    assert (hit_a, hit_c) == (False, True)
    assert registry.PRETRAIN_CALLS["tms"] == before + 1  # the build and the reload did not pretrain
    for k in frozen_a:
        np.testing.assert_array_equal(np.asarray(frozen_a[k]), np.asarray(frozen_b[k]))
        np.testing.assert_array_equal(np.asarray(frozen_a[k]), np.asarray(frozen_c[k]))
    # Any change to the target config (here the pretraining seed) is a different cache entry.
    other = TMS_SMALL.model_copy(update={"pretrain": SMALL_PRETRAIN.model_copy(update={"seed": 4})})
    assert registry.target_cache_key(other) != registry.target_cache_key(TMS_SMALL)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".npz"]


@pytest.mark.data
def test_registry_dispatches_llama(stories260k_dir) -> None:
    from param_decomp_config.targets import LlamaTargetConfig

    cfg = LlamaTargetConfig(checkpoint_dir=stories260k_dir)
    model, frozen, _ = registry.build_target(cfg, {"layers.0.mlp.up_proj": 4})
    assert model.leading_axes == ("batch", "sequence") and model.site_names == ("layers.0.mlp.up_proj",)
    assert registry.target_summary(cfg, frozen) == {}
