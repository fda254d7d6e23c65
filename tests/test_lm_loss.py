"""KL reconstruction loss and next-token CE against float64 numpy references; chunking invariance."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SINGLE_OP_ATOL, SINGLE_OP_RTOL

from param_decomp_jax.targets.lm_loss import kl_recon_loss, next_token_ce


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _logits(seed: int, shape: tuple[int, ...], scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def test_kl_matches_numpy_reference() -> None:
    masked, clean = _logits(0, (3, 7, 11)), _logits(1, (3, 7, 11))
    logp, logq = _np_log_softmax(clean), _np_log_softmax(masked)
    expected = (np.exp(logp) * (logp - logq)).sum(-1).mean()
    got = float(kl_recon_loss(jnp.asarray(masked), jnp.asarray(clean)))
    np.testing.assert_allclose(got, expected, rtol=SINGLE_OP_RTOL * 10)


def test_kl_is_zero_on_identical_logits_and_fp32_for_bf16_inputs() -> None:
    x = jnp.asarray(_logits(2, (2, 5, 13)))
    assert float(kl_recon_loss(x, x)) == pytest.approx(0.0, abs=SINGLE_OP_ATOL)
    loss = kl_recon_loss(x.astype(jnp.bfloat16), (x + 1.0).astype(jnp.bfloat16))
    assert loss.dtype == jnp.float32


@pytest.mark.parametrize("chunk", [1, 3, 4, 16])
def test_kl_chunked_equals_unchunked_value_and_grad(chunk: int) -> None:
    # T = 10 is not a multiple of 3 or 4: exercises the zero padding of the last chunk.
    masked, clean = jnp.asarray(_logits(3, (4, 10, 37))), jnp.asarray(_logits(4, (4, 10, 37)))
    full, g_full = jax.value_and_grad(lambda m: kl_recon_loss(m, clean, chunk_positions=10_000))(masked)
    part, g_part = jax.jit(jax.value_and_grad(lambda m: kl_recon_loss(m, clean, chunk_positions=chunk)))(
        masked
    )
    np.testing.assert_allclose(float(part), float(full), rtol=SINGLE_OP_RTOL)
    np.testing.assert_allclose(np.asarray(g_part), np.asarray(g_full), rtol=SINGLE_OP_RTOL * 10, atol=1e-9)


def test_kl_flat_leading_axis_chunks_too() -> None:
    masked, clean = jnp.asarray(_logits(5, (9, 6))), jnp.asarray(_logits(6, (9, 6)))
    np.testing.assert_allclose(
        float(kl_recon_loss(masked, clean, chunk_positions=2)),
        float(kl_recon_loss(masked, clean)),
        rtol=SINGLE_OP_RTOL,
    )


def test_kl_shape_mismatch_is_an_error() -> None:
    # jaxtyping catches it at the boundary (TypeError); the explicit check backs it up (ValueError).
    with pytest.raises((TypeError, ValueError)):
        kl_recon_loss(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4, 5)))


def test_next_token_ce_matches_numpy_reference() -> None:
    logits = _logits(7, (2, 6, 9))
    ids = np.random.default_rng(8).integers(0, 9, size=(2, 6)).astype(np.int32)
    logp = _np_log_softmax(logits)[:, :-1]
    expected = -np.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()
    got = float(next_token_ce(jnp.asarray(logits), jnp.asarray(ids)))
    np.testing.assert_allclose(got, expected, rtol=SINGLE_OP_RTOL * 10)
