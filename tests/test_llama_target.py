"""Llama target: checkpoint reading, site names, greedy decoding, the waist, and HF parity.

Tolerances (fp32 on CPU, see conftest): a forward through several layers compares at
TRAJECTORY_RTOL relative to the output's scale (reassociated reductions compound per layer).
"""

from __future__ import annotations

import json
import math
import shutil
from functools import cache
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import TRAJECTORY_RTOL
from safetensors.numpy import load_file, save_file

from param_decomp_jax.core.model import Components, DecomposedModel, init_components
from param_decomp_jax.targets.hf_checkpoint import HFCheckpoint
from param_decomp_jax.targets.llama import (
    Frozen,
    LlamaArch,
    ResidualFn,
    all_llama_site_names,
    build_llama,
    expand_site_patterns,
    greedy_generate,
    llama_logits,
    load_llama_frozen,
    make_residual_fn,
    rms_norm,
)

STORIES_IDS = [
    1,
    403,
    407,
    261,
    378,
    432,
    383,
    286,
    261,
    376,
    298,
    315,
    421,
    395,
    317,
    426,
    338,
    401,
    396,
    267,
]
STORIES_TEXT = (
    " Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big, red ball. She wanted to play with it, but it was too high"
)
ALL_SITES = all_llama_site_names(5)


@cache
def _val_ids(data_dir: Path, batch: int = 2, seq: int = 32) -> np.ndarray:
    rows = pq.read_table(data_dir / "val-00000.parquet")["input_ids"].to_pylist()
    return np.asarray(rows, dtype=np.int32)[:batch, :seq]


@cache
def _built(
    data_dir: Path, sites: tuple[str, ...], dtype: str = "float32"
) -> tuple[DecomposedModel, Frozen, ResidualFn]:
    return build_llama(data_dir, {n: 8 for n in sites}, dtype=dtype)


def _assert_close_to_scale(got: jax.Array, ref: np.ndarray, rtol: float = TRAJECTORY_RTOL) -> float:
    """max |got − ref| ≤ rtol · max |ref|; returns the observed max abs diff."""
    diff = float(np.max(np.abs(np.asarray(got, dtype=np.float64) - ref)))
    assert diff <= rtol * float(np.max(np.abs(ref))), (diff, float(np.max(np.abs(ref))))
    return diff


# ---- names and config ------------------------------------------------------------------------------
def test_site_names_canonical_order_and_patterns() -> None:
    names = all_llama_site_names(2)
    assert names[:7] == [
        "layers.0.self_attn.q_proj",
        "layers.0.self_attn.k_proj",
        "layers.0.self_attn.v_proj",
        "layers.0.self_attn.o_proj",
        "layers.0.mlp.gate_proj",
        "layers.0.mlp.up_proj",
        "layers.0.mlp.down_proj",
    ]
    assert len(names) == 14 and names[7] == "layers.1.self_attn.q_proj"
    got = expand_site_patterns(["layers.1.mlp.down_proj", "layers.*.mlp.gate_proj"], 12)
    assert got[0] == "layers.0.mlp.gate_proj" and got[-1] == "layers.11.mlp.gate_proj"
    assert got.index("layers.1.mlp.gate_proj") + 1 == got.index("layers.1.mlp.down_proj")
    assert len(got) == 13
    with pytest.raises(ValueError, match="layers.12.mlp.up_proj"):
        expand_site_patterns(["layers.12.mlp.up_proj"], 12)


def test_arch_parsing_formats_and_rejections() -> None:
    base = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    base |= {"vocab_size": 10}
    arch = LlamaArch.from_config(base)
    assert (arch.head_dim, arch.num_key_value_heads, arch.rope_scaling) == (16, 4, None)
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    scaling |= {"original_max_position_embeddings": 8192}
    legacy = LlamaArch.from_config(
        base | {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", **scaling}}
    )
    old_key = LlamaArch.from_config(base | {"rope_theta": 5e5, "rope_scaling": {"type": "llama3", **scaling}})
    v5 = LlamaArch.from_config(
        base | {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **scaling}}
    )
    assert legacy == old_key == v5 and legacy.rope_scaling is not None and legacy.rope_theta == 5e5
    with pytest.raises(ValueError, match="silu"):
        LlamaArch.from_config(base | {"hidden_act": "gelu"})
    with pytest.raises(ValueError, match="yarn"):
        LlamaArch.from_config(base | {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


# ---- checkpoint reading ----------------------------------------------------------------------------
@pytest.mark.data
def test_checkpoint_errors_name_the_missing_piece(stories260k_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        HFCheckpoint(tmp_path)
    shutil.copy(stories260k_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        HFCheckpoint(tmp_path)
    tensors = load_file(stories260k_dir / "model.safetensors")
    del tensors["model.layers.3.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.3\.mlp\.up_proj\.weight"):
        load_llama_frozen(tmp_path)
    with pytest.raises(ValueError, match="unknown Llama site"):
        build_llama(stories260k_dir, {"layers.5.mlp.up_proj": 4})


@pytest.mark.data
def test_sharded_checkpoint_and_bf16_cast(stories260k_dir: Path, tmp_path: Path) -> None:
    tensors = load_file(stories260k_dir / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / fname)
    weight_map = {k: fname for fname, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(stories260k_dir / "config.json", tmp_path / "config.json")
    _, sharded = load_llama_frozen(tmp_path)
    _, single = load_llama_frozen(stories260k_dir)
    # tree.map also checks that both trees have the same structure.
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), sharded, single)))
    # HF [out, in] is stored transposed: y = x @ W.
    np.testing.assert_array_equal(
        np.asarray(single["layers"]["1"]["mlp"]["down_proj"]),
        tensors["model.layers.1.mlp.down_proj.weight"].T,
    )
    _, bf16 = load_llama_frozen(tmp_path, dtype="bf16")
    assert {leaf.dtype for leaf in jax.tree.leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        HFCheckpoint(tmp_path)


# ---- behaviour on the real model --------------------------------------------------------------------
@pytest.mark.data
def test_greedy_generation_reproduces_published_sample(stories260k_dir: Path) -> None:
    arch, frozen = load_llama_frozen(stories260k_dir)
    ids = greedy_generate(frozen, arch, jnp.array([[1]], jnp.int32), 60)
    ids_list = np.asarray(ids)[0].tolist()
    assert len(ids_list) == 61 and ids_list[:20] == STORIES_IDS
    pieces = [
        p["piece"] for p in json.loads((stories260k_dir / "tokenizer_pieces.json").read_text())["pieces"]
    ]
    text = "".join(pieces[i] for i in ids_list[1:]).replace("\u2581", " ")
    assert text.startswith(" Once upon a time, there was a little girl named Lily.")
    assert text == STORIES_TEXT


@pytest.mark.data
def test_masked_all_live_with_delta_equals_clean_and_nonlive_grads_are_zero(stories260k_dir: Path) -> None:
    model, frozen, residual_fn = _built(stories260k_dir, tuple(ALL_SITES))
    assert model.site_names == tuple(ALL_SITES) and model.leading_axes == ("batch", "sequence")
    comps = init_components(model, jax.random.key(0))
    ids = jnp.asarray(_val_ids(stories260k_dir))
    B, T = ids.shape
    residual = jax.lax.stop_gradient(residual_fn(frozen, ids))
    clean = jax.jit(model.clean_output)(frozen, residual)
    ones = {n: jnp.ones((B, T, 8)) for n in ALL_SITES}
    delta_ones = {n: jnp.ones((B, T)) for n in ALL_SITES}
    masked = jax.jit(model.masked_output)(frozen, comps, residual, ones, delta_ones)
    # V U + (W − V U) = W up to rounding: fp32 over 5 layers (measured ≈ 2e-6 of the logit scale).
    _assert_close_to_scale(masked, np.asarray(clean))

    live = ["layers.2.self_attn.v_proj", "layers.3.mlp.up_proj"]
    masks = {n: jax.random.uniform(jax.random.key(i), (B, T, 8)) for i, n in enumerate(ALL_SITES)}

    def loss(c: Components) -> jax.Array:
        out = model.masked_output(frozen, c, residual, masks, None, None, live)
        return model.recon_loss(out, clean)

    value, grads = jax.jit(jax.value_and_grad(loss))(comps)
    assert float(value) > 0
    for name in ALL_SITES:
        for part in ("V", "U"):
            g = np.asarray(grads[name][part])
            if name in live:
                assert np.any(g != 0), name
            else:
                assert np.all(g == 0), name


@pytest.mark.data
def test_residual_prefix_plus_suffix_equals_full_forward(stories260k_dir: Path) -> None:
    late = ("layers.2.self_attn.k_proj", "layers.2.mlp.down_proj", "layers.4.mlp.gate_proj")
    model2, frozen, residual_fn2 = _built(stories260k_dir, late)
    model0, _, residual_fn0 = _built(stories260k_dir, ("layers.0.mlp.up_proj", *late))
    ids = jnp.asarray(_val_ids(stories260k_dir))

    @jax.jit
    def both(frozen: Frozen) -> tuple[jax.Array, dict[str, jax.Array], jax.Array, dict[str, jax.Array]]:
        out2, in2 = model2.clean_output_and_site_inputs(frozen, residual_fn2(frozen, ids))
        out0, in0 = model0.clean_output_and_site_inputs(frozen, residual_fn0(frozen, ids))
        return out2, in2, out0, in0

    out2, in2, out0, in0 = both(frozen)
    _assert_close_to_scale(out2, np.asarray(out0))
    assert set(in2) == set(late) and set(in0) == {"layers.0.mlp.up_proj", *late}
    for name in late:
        _assert_close_to_scale(in2[name], np.asarray(in0[name]))
    # Suffix site weights cover every linear the suffix applies (decomposed or not).
    assert len(model2.site_weights(frozen)) == 7 * 3


# ---- parity with transformers -----------------------------------------------------------------------
def _hf_parity(ckpt_dir: Path, ids: np.ndarray) -> dict[str, float]:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(
        ckpt_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        out = hf(torch.tensor(ids, dtype=torch.long), output_hidden_states=True)
    arch, frozen = load_llama_frozen(ckpt_dir)
    assert LlamaArch.from_config(hf.config.to_dict()) == arch  # the transformers-5 config format too
    n = arch.num_hidden_layers
    diffs: dict[str, float] = {}

    @jax.jit
    def ours(frozen: Frozen, ids: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        # HF's hidden_states[k] is the residual entering layer k; the last one is after the final norm.
        hidden = [make_residual_fn(arch, k)(frozen, ids) for k in range(n + 1)]
        hidden[n] = rms_norm(hidden[n], frozen["norm"], arch.rms_norm_eps)
        return llama_logits(frozen, arch, ids), hidden

    logits, hidden = ours(frozen, jnp.asarray(ids))
    ref = out.logits.numpy()
    diffs["logits_abs"] = _assert_close_to_scale(logits, ref, rtol=1e-5)
    diffs["logits_rel"] = diffs["logits_abs"] / float(np.abs(ref).max())
    for k in range(n + 1):
        diffs[f"hidden{k}_abs"] = _assert_close_to_scale(hidden[k], out.hidden_states[k].numpy(), rtol=1e-5)
    return diffs


@pytest.mark.data
def test_parity_with_transformers_stories260k(stories260k_dir: Path) -> None:
    diffs = _hf_parity(stories260k_dir, _val_ids(stories260k_dir))
    print("stories260K parity:", diffs)


def test_parity_with_transformers_random_gqa_untied_llama3(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 48,
        "intermediate_size": 80,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,  # != hidden / heads on purpose
        "vocab_size": 97,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        # wavelengths 2π·(1, 3.2, 10, …): the short ones sit between 16/4 and 16/1 (smoothed), the
        # long ones above 16 (divided by factor), so both llama3 branches are exercised.
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        "tie_word_embeddings": False,
        "hidden_act": "silu",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_pretrained(tmp_path))
    # HF's default init (std 0.02) gives near-uniform attention; unit-scale weights make it sharp.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 1.5 / math.sqrt(p.shape[1]))
    state = {k: v.detach().contiguous() for k, v in hf.state_dict().items()}
    assert "lm_head.weight" in state
    transformers_safetensors = pytest.importorskip("safetensors.torch")
    transformers_safetensors.save_file(state, tmp_path / "model.safetensors")
    ids = np.random.default_rng(0).integers(0, 97, size=(2, 40)).astype(np.int32)
    diffs = _hf_parity(tmp_path, ids)
    print("random llama3/GQA/untied parity:", diffs)
