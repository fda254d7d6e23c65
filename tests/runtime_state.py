"""A realistic TrainState for the runtime tests (placement, checkpoints), built without a target.

Importable from test subprocesses too (they put tests/ on PYTHONPATH), so the writer and the
reader of a cross-topology checkpoint rebuild bit-identical expected values from the same seed.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

SITES = {"layers.0.mlp.up": (6, 5), "layers.0.mlp.down": (5, 6)}  # site -> (d_in, d_out)
B, T = 4, 3  # batch, sequence (bsc sources are [B, T, C+1])
BSC_TERM = "ppgd_bsc"
SHARED_TERM = "ppgd_sc"


def components_tx() -> optax.GradientTransformation:
    # The production shape: clip then AdamW, hyperparameters injected so schedules live in state.
    return optax.chain(
        optax.clip_by_global_norm(0.01), optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3)
    )


def make_state(C: int = 8, seed: int = 0) -> dict[str, Any]:
    """Concrete host-side state with non-trivial values everywhere (numpy -> jax on 1 device)."""
    rng = np.random.default_rng(seed)

    def arr(*shape: int) -> jax.Array:
        return jnp.asarray(rng.standard_normal(shape).astype(np.float32))

    components = {s: {"V": arr(d_in, C), "U": arr(C, d_out)} for s, (d_in, d_out) in SITES.items()}
    ci_params = {
        "mlp": {s: {"w1": arr(d_in, 4), "b1": arr(4), "w2": arr(4, C)} for s, (d_in, _) in SITES.items()}
    }
    ctx = components_tx()
    components_opt = ctx.init(components)
    # One fake update so the moments and counts are non-zero (a bitwise round trip must see them).
    _, components_opt = ctx.update(jax.tree.map(jnp.ones_like, components), components_opt, components)
    citx = optax.inject_hyperparams(optax.adamw)(learning_rate=5e-5)
    ci_opt = citx.init(ci_params)
    adversaries = {}
    for term, lead in ((BSC_TERM, (B, T)), (SHARED_TERM, (1, T))):
        sources = {s: jnp.asarray(rng.uniform(size=(*lead, C + 1)).astype(np.float32)) for s in SITES}
        atx = optax.adam(0.01, b1=0.5, b2=0.99)
        opt_state = atx.init(sources)
        _, opt_state = atx.update(jax.tree.map(jnp.ones_like, sources), opt_state, sources)
        adversaries[term] = {"sources": sources, "opt_state": opt_state}
    return {
        "step": jnp.int32(17),
        "components": components,
        "ci_params": ci_params,
        "components_opt": components_opt,
        "ci_opt": ci_opt,
        "adversaries": adversaries,
        "rng": jax.random.PRNGKey(seed),
    }


def abstract_state(C: int = 8) -> Any:
    return jax.eval_shape(lambda: make_state(C))


def assert_bitwise_equal(a: Any, b: Any) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype, jax.tree_util.keystr(path)
        assert x.shape == y.shape, jax.tree_util.keystr(path)
        assert np.array_equal(np.atleast_1d(x).view(np.uint8), np.atleast_1d(y).view(np.uint8)), (
            jax.tree_util.keystr(path)
        )
