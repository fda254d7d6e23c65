"""Language-model losses on logits: the KL reconstruction target (§4) and next-token CE for eval.

Both compute in fp32 whatever the logits dtype (§7: KL/softmax are fp32).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, jaxtyped

from param_decomp_jax.core.typecheck import typechecker

# Auto chunk size: at most this many logits per batch row in one chunk (16 MiB of fp32 per row),
# e.g. all of a 512-vocab sequence at once, ~32 positions of a 128k vocab.
_AUTO_CHUNK_LOGITS_PER_ROW = 1 << 22


def _kl_sum(masked_xV: Array, clean_xV: Array) -> Array:
    """Σ over all positions and the vocab of KL(softmax(clean) ‖ softmax(masked)), fp32."""
    logp = jax.nn.log_softmax(clean_xV.astype(jnp.float32), axis=-1)
    logq = jax.nn.log_softmax(masked_xV.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(logp) * (logp - logq))


@jaxtyped(typechecker=typechecker)
def kl_recon_loss(
    masked_logits: Float[Array, "*leading V"],
    clean_logits: Float[Array, "*leading V"],
    chunk_positions: int | None = None,
) -> Float[Array, ""]:
    """KL(softmax(clean) ‖ softmax(masked)) summed over the vocab, mean over all positions, fp32.

    The caller passes `clean_logits` under stop_gradient (it is the target). To bound the fp32
    softmax temporaries, positions are processed in chunks along the sequence axis (every
    leading axis after the first, flattened); the batch axis is never split, so a batch-sharded
    input stays sharded inside each chunk. Each chunk is rematerialised in the backward pass, so
    the saved residuals are only the logits themselves. `chunk_positions` = sequence positions
    per chunk; None picks it from the vocab size; padded positions carry zero logits on both
    sides and contribute exactly zero.
    """
    if masked_logits.shape != clean_logits.shape:
        raise ValueError(f"logit shapes differ: {masked_logits.shape} vs {clean_logits.shape}")
    V = masked_logits.shape[-1]
    n_positions = math.prod(masked_logits.shape[:-1])
    # [*leading, V] -> [rows, seq, V]; a 1-D leading (no sequence axis) is one row of positions.
    rows = masked_logits.shape[0] if masked_logits.ndim >= 3 else 1
    seq = n_positions // rows
    masked_RxSxV = masked_logits.reshape(rows, seq, V)
    clean_RxSxV = clean_logits.reshape(rows, seq, V)
    chunk = chunk_positions or max(1, _AUTO_CHUNK_LOGITS_PER_ROW // V)
    if chunk >= seq:
        return _kl_sum(masked_RxSxV, clean_RxSxV) / n_positions
    n_chunks = -(-seq // chunk)
    pad = ((0, 0), (0, n_chunks * chunk - seq), (0, 0))

    def to_chunks(x_RxSxV: Array) -> Array:
        x_RxNxCxV = jnp.pad(x_RxSxV, pad).reshape(rows, n_chunks, chunk, V)
        return jnp.moveaxis(x_RxNxCxV, 1, 0)

    chunk_fn = jax.checkpoint(lambda mc: _kl_sum(mc[0], mc[1]))
    sums_N = jax.lax.map(chunk_fn, (to_chunks(masked_RxSxV), to_chunks(clean_RxSxV)))
    return jnp.sum(sums_N) / n_positions


@jaxtyped(typechecker=typechecker)
def next_token_ce(logits: Float[Array, "B T V"], input_ids: Int[Array, "B T"]) -> Float[Array, ""]:
    """Mean next-token cross-entropy (nats) of `logits[:, t]` predicting `input_ids[:, t + 1]`, fp32."""
    logp_BxTm1xV = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    target_BxTm1 = input_ids[:, 1:]
    picked_BxTm1 = jnp.take_along_axis(logp_BxTm1xV, target_BxTm1[..., None], axis=-1)[..., 0]
    return -jnp.mean(picked_BxTm1)
