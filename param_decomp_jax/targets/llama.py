"""Llama-family frozen target in pure JAX (HF `LlamaForCausalLM` semantics), plugged into the core.

The frozen target is a plain nested dict of arrays mirroring HF names, with every linear stored
TRANSPOSED to `[d_in, d_out]` so that `y = x @ W` (HF stores `[out, in]`):
```
{"embed_tokens": [V, D], "norm": [D], "lm_head": [D, V] (absent when tied),
 "layers": {"0": {"input_layernorm": [D], "post_attention_layernorm": [D],
                  "self_attn": {"q_proj", "k_proj", "v_proj", "o_proj"},
                  "mlp": {"gate_proj", "up_proj", "down_proj"}}, "1": ...}}
```
Site names are the HF module paths below `model.`: `layers.{i}.self_attn.{q,k,v,o}_proj` and
`layers.{i}.mlp.{gate,up,down}_proj`.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from param_decomp_jax.core.model import DecomposedModel, SiteFn, SiteSpec, frozen_matmul
from param_decomp_jax.targets.hf_checkpoint import HFCheckpoint
from param_decomp_jax.targets.lm_loss import kl_recon_loss

Frozen = dict[str, Any]
ResidualFn = Callable[[Frozen, Int[Array, "B T"]], Float[Array, "B T D"]]
LEADING_AXES = ("batch", "sequence")
ATTN_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJS = ("gate_proj", "up_proj", "down_proj")
_SITE_RE = re.compile(r"^layers\.(\d+)\.(self_attn|mlp)\.(\w+)$")


# ---- architecture ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama-3.x RoPE frequency scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class LlamaArch:
    """The static shape of a Llama model, parsed from `config.json`. Hashable: usable as a jit static."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Llama3RopeScaling | None
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LlamaArch:
        """Parse an HF Llama config; accepts both the `rope_theta`/`rope_scaling` keys of older
        transformers releases and the `rope_parameters` dict that transformers 5 writes."""
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"Llama config: hidden_act must be 'silu', got {act!r}")
        for flag in ("attention_bias", "mlp_bias"):
            if config.get(flag, False):
                raise ValueError(f"Llama config: {flag}=true is not supported")
        if "rope_parameters" in config and config["rope_parameters"] is not None:
            rope = dict(config["rope_parameters"])
            theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
        else:
            rope = dict(config.get("rope_scaling") or {})
            theta = float(config.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling: Llama3RopeScaling | None
        if rope_type == "default":
            scaling = None
        elif rope_type == "llama3":
            scaling = Llama3RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            )
        else:
            raise ValueError(f"Llama config: unsupported RoPE type {rope_type!r} (default or llama3)")
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise ValueError(f"Llama config: {heads} attention heads not divisible by {kv_heads} KV heads")
        return cls(
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_hidden_layers=int(config["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=int(config.get("head_dim") or hidden // heads),
            vocab_size=int(config["vocab_size"]),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )


# ---- site names -----------------------------------------------------------------------------------
def layer_site_names(layer: int) -> list[str]:
    return [f"layers.{layer}.self_attn.{p}" for p in ATTN_PROJS] + [
        f"layers.{layer}.mlp.{p}" for p in MLP_PROJS
    ]


def all_llama_site_names(n_layers: int) -> list[str]:
    """Every linear of the decoder, canonical order: layer ascending, then q, k, v, o, gate, up, down."""
    return [name for i in range(n_layers) for name in layer_site_names(i)]


def expand_site_patterns(patterns: Sequence[str], n_layers: int) -> list[str]:
    """Expand fnmatch patterns (`layers.*.mlp.gate_proj`) to site names in canonical order."""
    names = all_llama_site_names(n_layers)
    chosen: set[str] = set()
    for pattern in patterns:
        hits = fnmatch.filter(names, pattern)
        if not hits:
            raise ValueError(f"site pattern {pattern!r} matches no site of a {n_layers}-layer Llama")
        chosen.update(hits)
    return [n for n in names if n in chosen]


def site_layer(name: str) -> int:
    """The decoder layer index a site belongs to (validates the name)."""
    m = _SITE_RE.match(name)
    if m is None or m.group(3) not in (ATTN_PROJS if m.group(2) == "self_attn" else MLP_PROJS):
        raise ValueError(f"not a Llama site name: {name!r} (expected e.g. 'layers.3.mlp.up_proj')")
    return int(m.group(1))


def _site_weight(frozen: Frozen, name: str) -> Array:
    _, i, block, proj = name.split(".")
    return frozen["layers"][i][block][proj]


# ---- loading --------------------------------------------------------------------------------------
def load_llama_frozen(checkpoint_dir: Path | str, dtype: str = "float32") -> tuple[LlamaArch, Frozen]:
    """Read an HF Llama checkpoint into the frozen pytree (linears transposed to `[d_in, d_out]`)."""
    ckpt = HFCheckpoint(checkpoint_dir, dtype)
    arch = LlamaArch.from_config(ckpt.config)

    def read(hf_name: str, shape: tuple[int, ...], transpose: bool = False) -> Array:
        w = ckpt.get(hf_name)
        if w.shape != shape:
            raise ValueError(f"tensor {hf_name!r} has shape {w.shape}, expected {shape}")
        return jnp.asarray(np.ascontiguousarray(w.T) if transpose else w)

    def linear(hf_name: str, d_in: int, d_out: int) -> Array:
        return read(hf_name, (d_out, d_in), transpose=True)  # HF [out, in] -> our [in, out]

    D, F, K = arch.hidden_size, arch.intermediate_size, arch.head_dim
    dq, dkv = arch.num_attention_heads * K, arch.num_key_value_heads * K
    shapes = {"q_proj": (D, dq), "k_proj": (D, dkv), "v_proj": (D, dkv), "o_proj": (dq, D)}
    shapes |= {"gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}
    layers: dict[str, Any] = {}
    for i in range(arch.num_hidden_layers):
        pre = f"model.layers.{i}"
        layers[str(i)] = {
            "input_layernorm": read(f"{pre}.input_layernorm.weight", (D,)),
            "post_attention_layernorm": read(f"{pre}.post_attention_layernorm.weight", (D,)),
            "self_attn": {p: linear(f"{pre}.self_attn.{p}.weight", *shapes[p]) for p in ATTN_PROJS},
            "mlp": {p: linear(f"{pre}.mlp.{p}.weight", *shapes[p]) for p in MLP_PROJS},
        }
    frozen: Frozen = {
        "embed_tokens": read("model.embed_tokens.weight", (arch.vocab_size, D)),
        "norm": read("model.norm.weight", (D,)),
        "layers": layers,
    }
    if not arch.tie_word_embeddings:
        frozen["lm_head"] = linear("lm_head.weight", D, arch.vocab_size)
    return arch, frozen


# ---- layers ---------------------------------------------------------------------------------------
def rms_norm(x_BxTxD: Array, g_D: Array, eps: float) -> Array:
    """HF LlamaRMSNorm: normalise in fp32 (bf16 squares lose too much), cast back, then scale."""
    x32 = x_BxTxD.astype(jnp.float32)
    var_BxTx1 = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(var_BxTx1 + eps)).astype(x_BxTxD.dtype)
    return g_D.astype(x_BxTxD.dtype) * normed


def rope_inv_freq(arch: LlamaArch) -> np.ndarray:
    """Per-pair inverse frequencies `[head_dim/2]` (fp32 like HF), with llama3 scaling if configured."""
    K = arch.head_dim
    inv_freq = (1.0 / (arch.rope_theta ** (np.arange(0, K, 2, dtype=np.float32) / K))).astype(np.float32)
    s = arch.rope_scaling
    if s is None:
        return inv_freq
    # Llama 3: keep high frequencies, divide low frequencies by `factor`, interpolate in between.
    old_len = s.original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = old_len / s.low_freq_factor, old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _rope_tables(arch: LlamaArch, T: int) -> tuple[Array, Array]:
    """cos/sin `[T, head_dim]` in fp32, each frequency repeated for both halves (rotate-half)."""
    freqs_TxK2 = np.arange(T, dtype=np.float32)[:, None] * rope_inv_freq(arch)[None, :]
    emb_TxK = np.concatenate([freqs_TxK2, freqs_TxK2], axis=-1)
    return jnp.asarray(np.cos(emb_TxK)), jnp.asarray(np.sin(emb_TxK))


def _apply_rope(x_BxTxHxK: Array, cos_TxK: Array, sin_TxK: Array) -> Array:
    x = x_BxTxHxK.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos_TxK[:, None, :] + rotated * sin_TxK[:, None, :]


def _causal_attention(arch: LlamaArch, q_BxTxHxK: Array, k_BxTxGxK: Array, v_BxTxGxK: Array) -> Array:
    """Causal softmax attention in fp32; GQA by grouping query heads per KV head (no repeat copy).

    HF's `repeat_kv` gives query head h the KV head h // (H/G); reshaping H -> (G, R) is the same.
    """
    B, T, H, K = q_BxTxHxK.shape
    G = arch.num_key_value_heads
    q_BxTxGxRxK = q_BxTxHxK.reshape(B, T, G, H // G, K)
    scores_BxGxRxTxS = jnp.einsum(
        "btgrk,bsgk->bgrts", q_BxTxGxRxK, k_BxTxGxK.astype(jnp.float32)
    ) / math.sqrt(K)
    causal_TxS = jnp.tril(jnp.ones((T, T), dtype=bool))
    scores_BxGxRxTxS = jnp.where(causal_TxS, scores_BxGxRxTxS, -jnp.inf)
    probs_BxGxRxTxS = jax.nn.softmax(scores_BxGxRxTxS, axis=-1)
    out_BxTxGxRxK = jnp.einsum("bgrts,bsgk->btgrk", probs_BxGxRxTxS, v_BxTxGxK.astype(jnp.float32))
    return out_BxTxGxRxK.reshape(B, T, H * K)


def attention_probs(arch: LlamaArch, q_BxTxHK: Array, k_BxTxGK: Array) -> Float[Array, "B H T S"]:
    """Causal attention probabilities (fp32) from q_proj / k_proj SITE OUTPUTS (before RoPE).

    Eval diagnostics (attention-pattern KL) compare clean and masked patterns without a hook in
    the forward: per-site outputs are already returned by the core. Same math as
    `_causal_attention`; query head h uses KV head h // (H/G).
    """
    B, T, _ = q_BxTxHK.shape
    H, G, K = arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim
    rope = _rope_tables(arch, T)
    q_BxTxGxRxK = _apply_rope(q_BxTxHK.reshape(B, T, H, K), *rope).reshape(B, T, G, H // G, K)
    k_BxTxGxK = _apply_rope(k_BxTxGK.reshape(B, T, G, K), *rope)
    scores_BxGxRxTxS = jnp.einsum("btgrk,bsgk->bgrts", q_BxTxGxRxK, k_BxTxGxK) / math.sqrt(K)
    scores_BxGxRxTxS = jnp.where(jnp.tril(jnp.ones((T, T), dtype=bool)), scores_BxGxRxTxS, -jnp.inf)
    return jax.nn.softmax(scores_BxGxRxTxS, axis=-1).reshape(B, H, T, T)


def load_llama_arch(checkpoint_dir: Path | str) -> LlamaArch:
    """The architecture of an HF Llama checkpoint folder (reads only `config.json`)."""
    return LlamaArch.from_config(HFCheckpoint(checkpoint_dir).config)


def _decoder_layer(
    arch: LlamaArch, i: int, p: Frozen, x_BxTxD: Array, rope: tuple[Array, Array], linear: SiteFn
) -> Array:
    """One pre-norm decoder block; every linear goes through `linear(site_name, x)`."""
    B, T, _ = x_BxTxD.shape
    H, G, K = arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim
    pre = f"layers.{i}"
    h_BxTxD = rms_norm(x_BxTxD, p["input_layernorm"], arch.rms_norm_eps)
    # q/k/v are sites, so they are applied before RoPE (the decomposed weight is the HF weight).
    q_BxTxHxK = _apply_rope(linear(f"{pre}.self_attn.q_proj", h_BxTxD).reshape(B, T, H, K), *rope)
    k_BxTxGxK = _apply_rope(linear(f"{pre}.self_attn.k_proj", h_BxTxD).reshape(B, T, G, K), *rope)
    v_BxTxGxK = linear(f"{pre}.self_attn.v_proj", h_BxTxD).reshape(B, T, G, K)
    attn_BxTxHK = _causal_attention(arch, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK).astype(x_BxTxD.dtype)
    x_BxTxD = x_BxTxD + linear(f"{pre}.self_attn.o_proj", attn_BxTxHK)
    h_BxTxD = rms_norm(x_BxTxD, p["post_attention_layernorm"], arch.rms_norm_eps)
    gate_BxTxF = linear(f"{pre}.mlp.gate_proj", h_BxTxD)
    up_BxTxF = linear(f"{pre}.mlp.up_proj", h_BxTxD)
    return x_BxTxD + linear(f"{pre}.mlp.down_proj", jax.nn.silu(gate_BxTxF) * up_BxTxF)


def _lm_head(arch: LlamaArch, frozen: Frozen, x_BxTxD: Array) -> Array:
    h_BxTxD = rms_norm(x_BxTxD, frozen["norm"], arch.rms_norm_eps)
    if arch.tie_word_embeddings:
        # Contract against the stored [V, D] embedding directly: no transposed copy of it.
        return jnp.einsum("btd,vd->btv", h_BxTxD, frozen["embed_tokens"].astype(h_BxTxD.dtype))
    return frozen_matmul(h_BxTxD, frozen["lm_head"])


def _plain_linear(frozen: Frozen) -> SiteFn:
    return lambda name, x: frozen_matmul(x, _site_weight(frozen, name))


# ---- the target's functions -----------------------------------------------------------------------
def make_residual_fn(arch: LlamaArch, start_layer: int) -> ResidualFn:
    """The frozen prefix: embeddings and layers `[0, start_layer)`. Callers wrap it in stop_gradient."""
    if not 0 <= start_layer <= arch.num_hidden_layers:
        raise ValueError(f"start_layer {start_layer} outside [0, {arch.num_hidden_layers}]")

    def residual_fn(frozen: Frozen, input_ids_BxT: Int[Array, "B T"]) -> Float[Array, "B T D"]:
        x_BxTxD = jnp.take(frozen["embed_tokens"], input_ids_BxT, axis=0)
        rope = _rope_tables(arch, input_ids_BxT.shape[1])
        for i in range(start_layer):
            x_BxTxD = _decoder_layer(arch, i, frozen["layers"][str(i)], x_BxTxD, rope, _plain_linear(frozen))
        return x_BxTxD

    return residual_fn


def make_forward(
    arch: LlamaArch, start_layer: int
) -> Callable[[Frozen, Float[Array, "B T D"], SiteFn], Float[Array, "B T V"]]:
    """The decomposed suffix: layers `[start_layer, n)`, final norm and LM head -> logits.

    Every linear of those layers is applied through `site_fn`, decomposed or not.
    """

    def forward(
        frozen: Frozen, residual_BxTxD: Float[Array, "B T D"], site_fn: SiteFn
    ) -> Float[Array, "B T V"]:
        rope = _rope_tables(arch, residual_BxTxD.shape[1])
        x_BxTxD = residual_BxTxD
        for i in range(start_layer, arch.num_hidden_layers):
            x_BxTxD = _decoder_layer(arch, i, frozen["layers"][str(i)], x_BxTxD, rope, site_fn)
        return _lm_head(arch, frozen, x_BxTxD)

    return forward


def make_site_weights(arch: LlamaArch, start_layer: int) -> Callable[[Frozen], dict[str, Array]]:
    """All linears of the suffix layers (the core's `site_fn` serves every name `forward` calls)."""
    names = [n for i in range(start_layer, arch.num_hidden_layers) for n in layer_site_names(i)]
    return lambda frozen: {n: _site_weight(frozen, n) for n in names}


def llama_logits(frozen: Frozen, arch: LlamaArch, input_ids_BxT: Int[Array, "B T"]) -> Float[Array, "B T V"]:
    """The plain (undecomposed) model: ids -> logits."""
    residual_BxTxD = make_residual_fn(arch, 0)(frozen, input_ids_BxT)
    return make_forward(arch, 0)(frozen, residual_BxTxD, _plain_linear(frozen))


@partial(jax.jit, static_argnames=("arch", "n_new"))
def greedy_generate(
    frozen: Frozen, arch: LlamaArch, prompt_ids: Int[Array, "B P"], n_new: int
) -> Int[Array, "B P+n_new"]:
    """Greedy decoding by re-running the full causal forward over a fixed-size buffer each token.

    The buffer keeps one shape (one compile); causality means the not-yet-written tail (zeros)
    never influences the logits read at position `P - 1 + i`. O(n_new · T²): tests and demos only.
    """
    B, P = prompt_ids.shape
    ids_BxL = jnp.zeros((B, P + n_new), jnp.int32).at[:, :P].set(prompt_ids.astype(jnp.int32))

    def step(i: Array, ids_BxL: Array) -> Array:
        logits_BxLxV = llama_logits(frozen, arch, ids_BxL)
        next_B = jnp.argmax(logits_BxLxV[:, P - 1 + i], axis=-1).astype(jnp.int32)
        return ids_BxL.at[:, P + i].set(next_B)

    return jax.lax.fori_loop(0, n_new, step, ids_BxL)


def build_llama(
    checkpoint_dir: Path | str, site_Cs: Mapping[str, int], dtype: str = "float32"
) -> tuple[DecomposedModel, Frozen, ResidualFn]:
    """Build the decomposed Llama target from an HF checkpoint folder.

    `site_Cs` maps already-expanded site names (see `expand_site_patterns`) to their C. The frozen
    prefix (embeddings and the layers before the first site layer) becomes `residual_fn`; the
    suffix runs from the first site layer all the way to the logits, because the reconstruction
    target is the KL between clean and masked next-token distributions on the logits — stopping
    at the last site's output would change the loss. Non-decomposed linears in the suffix run on
    the frozen path through the core's `site_fn`.
    """
    if not site_Cs:
        raise ValueError("build_llama needs at least one site")
    arch, frozen = load_llama_frozen(checkpoint_dir, dtype)
    canonical = all_llama_site_names(arch.num_hidden_layers)
    unknown = sorted(set(site_Cs) - set(canonical))
    if unknown:
        raise ValueError(
            f"unknown Llama site(s) {unknown} for a {arch.num_hidden_layers}-layer model "
            f"(expected names like 'layers.0.mlp.up_proj')"
        )
    names = [n for n in canonical if n in site_Cs]
    start_layer = min(site_layer(n) for n in names)
    shapes = {n: _site_weight(frozen, n).shape for n in names}
    sites = tuple(SiteSpec(n, shapes[n][0], shapes[n][1], int(site_Cs[n])) for n in names)
    model = DecomposedModel(
        sites=sites,
        leading_axes=LEADING_AXES,
        forward=make_forward(arch, start_layer),
        site_weights=make_site_weights(arch, start_layer),
        recon_loss=kl_recon_loss,
    )
    return model, frozen, make_residual_fn(arch, start_layer)
