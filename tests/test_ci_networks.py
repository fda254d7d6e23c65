"""CI networks and their schemas: shapes, per-site split, purity, init, dependence structure."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError
from scipy.special import erf

from param_decomp_config.ci import (
    CIFnConfig,
    LayerwiseMLPCIConfig,
    SharedMLPCIConfig,
    SharedTransformerCIConfig,
)
from param_decomp_jax.ci import build_ci_fn
from param_decomp_jax.core.model import SiteSpec

# Dotted names like a real LM's, different d_in and C per site to catch split/order mistakes.
SITES = (
    SiteSpec("layers.0.mlp.up_proj", d_in=6, d_out=3, C=5),
    SiteSpec("layers.0.mlp.down_proj", d_in=4, d_out=6, C=3),
    SiteSpec("layers.1.mlp.up_proj", d_in=6, d_out=2, C=4),
)
LM_AXES = ("batch", "sequence")
B, T = 2, 5
TRANSFORMER = SharedTransformerCIConfig(d_model=8, n_blocks=2, n_heads=2, mlp_hidden=12)
ALL_CONFIGS = {
    "layerwise_mlp": LayerwiseMLPCIConfig(hidden_dims=[7]),
    "shared_mlp": SharedMLPCIConfig(hidden_dims=[9, 7]),
    "shared_transformer": TRANSFORMER,
}


def make_inputs(key: jax.Array, leading: tuple[int, ...] = (B, T)) -> dict[str, jax.Array]:
    keys = jax.random.split(key, len(SITES))
    return {s.name: jax.random.normal(k, (*leading, s.d_in)) for s, k in zip(SITES, keys, strict=True)}


@pytest.fixture(scope="module")
def built():
    """Each network built once per module: compiles dominate this file's runtime."""
    return {
        name: build_ci_fn(cfg, SITES, LM_AXES, jax.random.key(i))
        for i, (name, cfg) in enumerate(ALL_CONFIGS.items())
    }


@pytest.fixture(scope="module")
def applied(built):
    """One jitted apply per network, reused by the tests that only need outputs."""
    return {name: jax.jit(fn.apply) for name, (fn, _) in built.items()}


# ---- schemas ------------------------------------------------------------------------------------
def test_discriminator_picks_the_config_class():
    adapter = TypeAdapter(CIFnConfig)
    assert adapter.validate_python({"type": "layerwise_mlp"}) == LayerwiseMLPCIConfig(hidden_dims=[16])
    assert isinstance(adapter.validate_python({"type": "shared_mlp", "hidden_dims": []}), SharedMLPCIConfig)
    tf = adapter.validate_python(
        {"type": "shared_transformer", "d_model": 16, "n_blocks": 1, "n_heads": 4, "mlp_hidden": 32}
    )
    assert isinstance(tf, SharedTransformerCIConfig) and tf.rope_base == 10000.0
    with pytest.raises(ValidationError):
        adapter.validate_python({"type": "conv"})


@pytest.mark.parametrize(
    "data",
    [
        {"type": "layerwise_mlp", "hidden": [4]},
        {"type": "shared_mlp", "hidden_dims": [4], "dropout": 0.1},
        {"type": "shared_transformer", "d_model": 8, "n_blocks": 1, "n_heads": 2, "mlp_hidden": 8, "x": 1},
    ],
)
def test_unknown_key_rejected(data):
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        TypeAdapter(CIFnConfig).validate_python(data)


def test_d_model_must_divide_by_heads():
    with pytest.raises(ValidationError, match="d_model"):
        SharedTransformerCIConfig(d_model=10, n_blocks=1, n_heads=4, mlp_hidden=8)
    with pytest.raises(ValidationError, match="even"):  # head dim 3: rotate-half RoPE needs pairs
        SharedTransformerCIConfig(d_model=6, n_blocks=1, n_heads=2, mlp_hidden=8)


@pytest.mark.parametrize(
    "data",
    [
        {"type": "layerwise_mlp", "hidden_dims": [0]},
        {"type": "shared_mlp", "hidden_dims": [8, -1]},
        {"type": "shared_transformer", "d_model": 0, "n_blocks": 1, "n_heads": 1, "mlp_hidden": 8},
        {"type": "shared_transformer", "d_model": 8, "n_blocks": 0, "n_heads": 2, "mlp_hidden": 8},
        {
            "type": "shared_transformer",
            "d_model": 8,
            "n_blocks": 1,
            "n_heads": 2,
            "mlp_hidden": 8,
            "rope_base": 0,
        },
    ],
)
def test_sizes_must_be_positive(data):
    with pytest.raises(ValidationError):
        TypeAdapter(CIFnConfig).validate_python(data)


def test_configs_are_frozen_and_documented():
    with pytest.raises(ValidationError):
        TRANSFORMER.d_model = 16  # type: ignore[misc]
    cls: type[BaseModel]
    for cls in (LayerwiseMLPCIConfig, SharedMLPCIConfig, SharedTransformerCIConfig):
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no description"


def test_schema_module_imports_no_jax():
    code = "import sys, param_decomp_config.ci; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- networks -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ALL_CONFIGS))
def test_output_shapes_and_dtype(built, applied, name):
    fn, _ = built[name]
    x = make_inputs(jax.random.key(1))
    x = {k: v.astype(jnp.bfloat16) for k, v in x.items()}  # LM activations may be bf16
    out = applied[name](built[name][1], x)
    assert set(out) == {s.name for s in SITES}  # jit returns dicts key-sorted, not site-ordered
    for s in SITES:
        assert out[s.name].shape == (B, T, s.C) and out[s.name].dtype == jnp.float32
    assert fn.leading_axes == LM_AXES


@pytest.mark.parametrize("name", ["layerwise_mlp", "shared_mlp"])
def test_mlps_are_per_position_and_adopt_model_axes(name):
    fn, params = build_ci_fn(ALL_CONFIGS[name], SITES, ("batch",), jax.random.key(0))
    assert fn.leading_axes == ("batch",)
    out = jax.jit(fn.apply)(params, make_inputs(jax.random.key(1), leading=(3,)))
    assert {k: v.shape for k, v in out.items()} == {s.name: (3, s.C) for s in SITES}


def _numpy_gelu(v: np.ndarray) -> np.ndarray:
    return 0.5 * v * (1 + erf(v / np.sqrt(2)))  # exact GELU, as in the reference


def _numpy_mlp(layers: dict, v: np.ndarray) -> np.ndarray:
    for i in range(len(layers)):
        v = v @ layers[f"layer_{i}"]["kernel"] + layers[f"layer_{i}"]["bias"]
        v = _numpy_gelu(v) if i < len(layers) - 1 else v
    return v


def _split(logits: np.ndarray) -> dict[str, np.ndarray]:
    parts = np.split(logits, np.cumsum([s.C for s in SITES])[:-1], -1)
    return dict(zip([s.name for s in SITES], parts, strict=True))


def _with_nonzero_biases(params):
    """Exercise every bias (they are zero at init) so the references check them too."""
    return jax.tree_util.tree_map_with_path(
        lambda path, a: (
            a + 0.1 * jnp.arange(a.size).reshape(a.shape) / a.size if path[-1].key == "bias" else a
        ),
        params,
    )


@pytest.mark.parametrize("name", ["layerwise_mlp", "shared_mlp"])
def test_mlps_match_numpy_reference(built, applied, name):
    params = _with_nonzero_biases(built[name][1])
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = make_inputs(jax.random.key(5))
    xs = {k: np.asarray(v, np.float64) for k, v in x.items()}
    if name == "layerwise_mlp":
        ref = {s.name: _numpy_mlp(p["mlps"][s.name]["layers"], xs[s.name]) for s in SITES}
    else:  # concatenated in site order, logits split back in site order
        ref = _split(_numpy_mlp(p["mlp"]["layers"], np.concatenate([xs[s.name] for s in SITES], -1)))
    out = applied[name](params, x)
    for s in SITES:
        np.testing.assert_allclose(out[s.name], ref[s.name], rtol=1e-5, atol=1e-6)


def test_apply_rejects_mismatched_params(built):
    fn, params = built["shared_mlp"]
    broken = {"mlp": {"layers": dict(params["mlp"]["layers"])}}
    del broken["mlp"]["layers"]["layer_2"]
    with pytest.raises(ValueError, match="do not match"):
        fn.apply(broken, make_inputs(jax.random.key(0)))


def test_transformer_rejects_non_sequence_models():
    with pytest.raises(ValueError, match="leading axes"):
        build_ci_fn(TRANSFORMER, SITES, ("batch",), jax.random.key(0))


@pytest.mark.parametrize("name", list(ALL_CONFIGS))
def test_params_plain_dict_and_jit_grad(built, applied, name):
    fn, params = built[name]

    def check_plain(node, path=""):
        if isinstance(node, dict):
            assert type(node) is dict, f"{path}: {type(node)}"
            for k, v in node.items():
                assert isinstance(k, str), f"{path}: non-string key {k!r}"
                check_plain(v, f"{path}/{k}")
        else:
            assert isinstance(node, jax.Array) and node.dtype == jnp.float32, path

    check_plain(params)
    x = make_inputs(jax.random.key(2))

    @jax.jit
    def loss_and_grad(p, x):
        return jax.value_and_grad(lambda p: sum(jnp.mean(v**2) for v in fn.apply(p, x).values()))(p)

    loss, grads = loss_and_grad(params, x)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree.leaves(grads)) > 0
    # Restored checkpoints may hand back numpy arrays: apply takes any array-like leaves.
    out_np = applied[name](jax.tree.map(np.asarray, params), x)
    np.testing.assert_array_equal(out_np[SITES[0].name], applied[name](params, x)[SITES[0].name])


@pytest.mark.parametrize("name", list(ALL_CONFIGS))
def test_biases_zero_at_init(built, name):
    biases = [
        leaf for path, leaf in jax.tree_util.tree_leaves_with_path(built[name][1]) if path[-1].key == "bias"
    ]
    assert biases and all(bool(jnp.all(b == 0)) for b in biases)


def test_kernels_fan_in_scaled():
    sites = (SiteSpec("wide", d_in=400, d_out=1, C=300),)
    _, params = build_ci_fn(LayerwiseMLPCIConfig(hidden_dims=[]), sites, ("batch",), jax.random.key(0))
    kernel = params["mlps"]["wide"]["layers"]["layer_0"]["kernel"]
    assert float(jnp.mean(kernel)) == pytest.approx(0.0, abs=0.005)
    assert float(jnp.std(kernel)) == pytest.approx(400**-0.5, rel=0.03)


def test_layerwise_site_ignores_other_sites(built, applied):
    _, params = built["layerwise_mlp"]
    x = make_inputs(jax.random.key(6))
    a, b = SITES[0].name, SITES[1].name
    x2 = dict(x, **{b: x[b] + 3.0})
    out, out2 = applied["layerwise_mlp"](params, x), applied["layerwise_mlp"](params, x2)
    np.testing.assert_array_equal(out[a], out2[a])
    assert not np.allclose(out[b], out2[b])


def test_transformer_is_bidirectional_and_batch_independent(built, applied):
    _, params = built["shared_transformer"]
    x = make_inputs(jax.random.key(7))
    x2 = {k: v.at[0, T - 1].add(2.0) for k, v in x.items()}  # change the LAST position of row 0
    out, out2 = applied["shared_transformer"](params, x), applied["shared_transformer"](params, x2)
    for s in SITES:
        assert not np.allclose(out[s.name][0, 0], out2[s.name][0, 0])  # earlier position sees it
        np.testing.assert_array_equal(out[s.name][1], out2[s.name][1])  # other rows do not


def test_transformer_is_position_aware(built, applied):
    # Without RoPE unmasked attention is permutation-equivariant; with it, swapping two positions'
    # inputs must not merely swap their outputs.
    _, params = built["shared_transformer"]
    x = make_inputs(jax.random.key(8))
    perm = np.array([2, 1, 0, 3, 4])
    out = applied["shared_transformer"](params, x)
    out_perm = applied["shared_transformer"](params, {k: v[:, perm] for k, v in x.items()})
    assert not np.allclose(out_perm[SITES[0].name], out[SITES[0].name][:, perm], atol=1e-4)


def _numpy_transformer(params, x, cfg: SharedTransformerCIConfig) -> dict[str, np.ndarray]:
    """Independent float64 reference of the shared transformer, written from the semantics."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    rms = lambda v: v / np.sqrt(np.mean(v**2, -1, keepdims=True) + 1e-6)  # noqa: E731
    lin = lambda v, q: v @ q["kernel"] + q.get("bias", 0.0)  # noqa: E731
    h = lin(np.concatenate([rms(np.asarray(x[s.name], np.float64)) for s in SITES], -1), p["in_proj"])
    n, dh = cfg.n_heads, cfg.d_model // cfg.n_heads
    ang = np.arange(T)[:, None] * cfg.rope_base ** (-np.arange(0, dh, 2) / dh)[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(v):  # [B, T, N, dh]; pairs i with i + dh/2
        rot = np.concatenate([-v[..., dh // 2 :], v[..., : dh // 2]], -1)
        return v * cos[:, None] + rot * sin[:, None]

    for i in range(cfg.n_blocks):
        blk = p["blocks"][f"block_{i}"]
        a = rms(h)
        q, k, v = (lin(a, blk["attn"][w]).reshape(B, T, n, dh) for w in "qkv")
        s = np.einsum("btnd,bsnd->bnts", rope(q), rope(k)) / np.sqrt(dh)
        w = np.exp(s - s.max(-1, keepdims=True))
        att = np.einsum("bnts,bsnd->btnd", w / w.sum(-1, keepdims=True), v).reshape(B, T, -1)
        h = h + lin(att, blk["attn"]["o"])
        m = lin(rms(h), blk["mlp_in"])
        h = h + lin(_numpy_gelu(m), blk["mlp_out"])
    return _split(lin(rms(h), p["out_proj"]))


def test_transformer_matches_numpy_reference(built, applied):
    params = _with_nonzero_biases(built["shared_transformer"][1])
    x = make_inputs(jax.random.key(9))
    out = applied["shared_transformer"](params, x)
    ref = _numpy_transformer(params, x, TRANSFORMER)
    for s in SITES:
        np.testing.assert_allclose(out[s.name], ref[s.name], rtol=1e-4, atol=1e-5)


def test_params_round_trip_through_orbax(built, applied, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    _, params = built["layerwise_mlp"]  # dotted site names as dict keys
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "ci", params)
    ckpt.wait_until_finished()
    restored = ckpt.restore(
        tmp_path / "ci", jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    )
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    x = make_inputs(jax.random.key(10))
    apply = applied["layerwise_mlp"]
    np.testing.assert_array_equal(apply(restored, x)[SITES[0].name], apply(params, x)[SITES[0].name])


def test_project_per_site_equals_splitting_the_full_projection():
    """The transformer's output head slices the kernel per site instead of the logits: same values
    (fp32, one matmul each: 1e-6 relative) and same gradients w.r.t. kernel, bias and input."""
    from types import SimpleNamespace

    from flax import nnx

    from param_decomp_jax.ci.mlp import fan_in_linear, project_per_site, split_per_site

    sites = [SiteSpec("a", 4, 4, 3), SiteSpec("b", 4, 4, 5), SiteSpec("c", 4, 4, 2)]
    lin = fan_in_linear(6, 10, use_bias=True, rngs=nnx.Rngs(0))
    kernel, bias = lin.kernel[...], jax.random.normal(jax.random.PRNGKey(1), (10,))
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 3, 6))
    weights = {s.name: jax.random.normal(jax.random.PRNGKey(3 + i), (s.C,)) for i, s in enumerate(sites)}

    def loss(kernel: jax.Array, bias: jax.Array, x: jax.Array, per_site: bool) -> jax.Array:
        if per_site:
            out = project_per_site(SimpleNamespace(kernel=kernel, bias=bias), x, sites)  # type: ignore[arg-type]
        else:
            out = split_per_site(x @ kernel + bias, sites)
        return sum(jnp.sum(jnp.sin(out[s.name]) * weights[s.name]) for s in sites)  # type: ignore[return-value]

    lin.bias.value = bias
    full, per = split_per_site(lin(x), sites), project_per_site(lin, x, sites)
    for s in sites:
        np.testing.assert_allclose(per[s.name], full[s.name], rtol=1e-6, atol=1e-6)
    g_full = jax.grad(loss, argnums=(0, 1, 2))(kernel, bias, x, False)
    g_per = jax.grad(loss, argnums=(0, 1, 2))(kernel, bias, x, True)
    for a, b in zip(g_per, g_full, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="sites need"):
        project_per_site(lin, x, sites[:2])


@pytest.mark.parametrize("hidden", [[16], [5, 7]])
def test_component_mlp_matches_numpy_reference(hidden):
    """SPEC S4 component_mlp: CI logit of component c = MLP_c(x @ V[:, c]), one MLP per component.
    [5, 7] runs the scalar-in, matrix and scalar-out layer paths. fp32 vs float64: rtol 1e-5."""
    from param_decomp_config.ci import ComponentMLPCIConfig

    fn, params = build_ci_fn(ComponentMLPCIConfig(hidden_dims=hidden), SITES, LM_AXES, jax.random.key(3))
    params = jax.tree.map(lambda a: a + 0.01 * jnp.arange(a.size).reshape(a.shape) / a.size, params)
    keys = jax.random.split(jax.random.key(9), len(SITES))
    acts = {s.name: jax.random.normal(k, (B, T, s.C)) for s, k in zip(SITES, keys, strict=True)}
    out = jax.jit(fn.apply)(params, acts)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    (site_params,) = [v for v in _dicts_with(p, "w0")]
    for s in SITES:
        w = site_params[s.name]
        for c in range(s.C):
            h = np.asarray(acts[s.name], np.float64)[..., c : c + 1]  # [B, T, 1]
            for i in range(len(hidden) + 1):
                h = h @ w[f"w{i}"][c] + w[f"b{i}"][c]
                h = _numpy_gelu(h) if i < len(hidden) else h
            np.testing.assert_allclose(out[s.name][..., c], h[..., 0], rtol=1e-5, atol=1e-6)


def _dicts_with(tree, key: str):
    """The dicts of site name -> layer params inside a params pytree (found by a layer key)."""
    if isinstance(tree, dict):
        if tree and all(isinstance(v, dict) and key in v for v in tree.values()):
            yield tree
        else:
            for v in tree.values():
                yield from _dicts_with(v, key)
