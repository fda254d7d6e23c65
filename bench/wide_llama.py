"""A random-init Llama-family checkpoint wider than stories260K, for compute-bound bench cases.

stories260K has d_model 64: every component matmul has an inner dimension of 64 (or C), so the
per-element mask arithmetic around it costs as much memory traffic as the matmul does FLOPs and
the step is bandwidth-bound (BENCHMARKS.md, "where the time goes"). The same architecture at
d_model 512 raises FLOPs per mask element 8x. Its weights are random (scaled by 1/sqrt(fan_in)):
speed does not depend on what the weights mean. It reads stories260K's token shards (vocab 512).

    python -m bench.wide_llama [DIR]   # writes config.json + model.safetensors
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from bench.common import REPO_ROOT

DEFAULT_DIR = REPO_ROOT / "runs" / ".bench_wide_llama"
SHAPE = {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 2, "num_attention_heads": 8}


def write_random_llama(out: Path = DEFAULT_DIR, seed: int = 0) -> Path:
    """Write (once) a tied-embedding Llama checkpoint of SHAPE with vocab 512; returns its folder."""
    from safetensors.numpy import save_file

    d, f, n_layers, heads = (SHAPE[k] for k in SHAPE)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **SHAPE,
        "num_key_value_heads": heads,
        "head_dim": d // heads,
        "vocab_size": 512,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    config_path = out / "config.json"
    if config_path.exists() and json.loads(config_path.read_text()) == config:
        return out
    rng = np.random.default_rng(seed)

    def linear(d_out: int, d_in: int) -> np.ndarray:  # HF layout [out, in]
        return (rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)).astype(np.float32)

    tensors = {"model.embed_tokens.weight": linear(512, d), "model.norm.weight": np.ones(d, np.float32)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": np.ones(d, np.float32),
            p + "post_attention_layernorm.weight": np.ones(d, np.float32),
            p + "self_attn.q_proj.weight": linear(d, d),
            p + "self_attn.k_proj.weight": linear(d, d),
            p + "self_attn.v_proj.weight": linear(d, d),
            p + "self_attn.o_proj.weight": linear(d, d),
            p + "mlp.gate_proj.weight": linear(f, d),
            p + "mlp.up_proj.weight": linear(f, d),
            p + "mlp.down_proj.weight": linear(d, f),
        }
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    config_path.write_text(json.dumps(config, indent=2))  # last: marks a complete folder
    return out


if __name__ == "__main__":
    print(write_random_llama(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR))
