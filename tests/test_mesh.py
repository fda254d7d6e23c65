"""Placement rules over a realistic TrainState.

Rules are resolved against a 4-way `AbstractMesh`, so the specs and divisibility checks of a
multi-device run are tested in-process (the main pytest process has only 1 real device).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P
from runtime_state import BSC_TERM, SHARED_TERM, SITES, abstract_state, make_state

from param_decomp_jax.runtime.mesh import (
    DATA_AXIS,
    Rule,
    assert_global_batch_divisible,
    batch_sharding,
    make_mesh,
    place,
    replicated,
    resolve_shardings,
    state_shardings,
    with_shardings,
)

MESH4 = AbstractMesh((4,), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def _specs(shardings) -> dict[str, P]:
    return {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(shardings)}


def test_state_rules_shard_components_and_bsc():
    specs = _specs(
        state_shardings(abstract_state(C=8), MESH4, shard_components=True, batch_sharded_terms={BSC_TERM})
    )
    site = "layers.0.mlp.up"
    assert specs[f"['components']['{site}']['V']"] == P(None, "dp")
    assert specs[f"['components']['{site}']['U']"] == P("dp")
    # AdamW moments inside chain(clip, inject_hyperparams(adamw)) shard like their parameter.
    for moment in ("mu", "nu"):
        assert specs[f"['components_opt'][1].inner_state[0].{moment}['{site}']['V']"] == P(None, "dp")
        assert specs[f"['components_opt'][1].inner_state[0].{moment}['{site}']['U']"] == P("dp")
    assert specs["['components_opt'][1].hyperparams['learning_rate']"] == P()
    assert specs["['components_opt'][1].inner_state[0].count"] == P()
    # bsc sources and their Adam moments go with the batch; shared-scope ones stay replicated.
    assert specs[f"['adversaries']['{BSC_TERM}']['sources']['{site}']"] == P("dp")
    assert specs[f"['adversaries']['{BSC_TERM}']['opt_state'][0].mu['{site}']"] == P("dp")
    assert specs[f"['adversaries']['{BSC_TERM}']['opt_state'][0].count"] == P()
    assert specs[f"['adversaries']['{SHARED_TERM}']['sources']['{site}']"] == P()
    assert specs[f"['adversaries']['{SHARED_TERM}']['opt_state'][0].nu['{site}']"] == P()
    for key in ("['step']", "['rng']"):
        assert specs[key] == P()
    assert all(v == P() for k, v in specs.items() if k.startswith(("['ci_params']", "['ci_opt']")))
    sharded = {k for k, v in specs.items() if v != P()}
    # 2 sites x (V, U) x (param, mu, nu) + 2 sites x (sources, mu, nu) of the bsc term.
    assert len(sharded) == 2 * 2 * 3 + 2 * 3


def test_state_rules_replicated_components():
    specs = _specs(
        state_shardings(abstract_state(C=6), MESH4, shard_components=False, batch_sharded_terms=())
    )
    assert all(v == P() for v in specs.values())


def test_c_not_divisible_names_flag_and_site():
    with pytest.raises(ValueError, match=r"runtime\.shard_components.*'layers\.0\.mlp\.(up|down)'.*C=6"):
        state_shardings(abstract_state(C=6), MESH4, shard_components=True, batch_sharded_terms=())


def test_unmatched_leaf_is_an_error():
    state = dict(abstract_state(), faith_opt={"x": jax.ShapeDtypeStruct((3,), jnp.float32)})
    with pytest.raises(ValueError, match=r"\['faith_opt'\]\['x'\]: matches no placement rule"):
        state_shardings(state, MESH4, shard_components=False, batch_sharded_terms=())


def test_conflicting_rules_are_an_error_agreeing_ones_are_not():
    state = abstract_state()
    agree = Rule(r"^\['ci_params'\]\['mlp'\]", lambda m, leaf: P(*([None] * leaf.ndim)), "agrees")
    state_shardings(state, MESH4, shard_components=False, batch_sharded_terms=(), extra_rules=[agree])
    clash = Rule(r"^\['ci_params'\].*\['w1'\]$", lambda m, leaf: P(DATA_AXIS), "clash")
    with pytest.raises(ValueError, match=r"\['w1'\]: conflicting placement rules.*'ci_params'.*'clash'"):
        state_shardings(state, MESH4, shard_components=False, batch_sharded_terms=(), extra_rules=[clash])


def test_bsc_term_checks():
    state = abstract_state()
    with pytest.raises(ValueError, match="no_such_term"):
        state_shardings(state, MESH4, shard_components=False, batch_sharded_terms={"no_such_term"})
    mesh3 = AbstractMesh((3,), (DATA_AXIS,), axis_types=(AxisType.Auto,))
    with pytest.raises(ValueError, match=r"batch_size=4 .*3 devices"):
        state_shardings(state, mesh3, shard_components=False, batch_sharded_terms={BSC_TERM})


def test_optimizer_leaf_with_foreign_shape_is_an_error():
    # e.g. a factored second moment [d_in] under [site]['V']: refuse to guess its placement.
    site = next(iter(SITES))
    state = abstract_state()
    state["components_opt"] = {"v_row": {site: {"V": jax.ShapeDtypeStruct((6,), jnp.float32)}}}
    with pytest.raises(ValueError, match=r"v_row.*shape \(6,\) differs"):
        state_shardings(state, MESH4, shard_components=True, batch_sharded_terms=())


def test_resolve_reports_indivisible_generic_spec():
    tree = {"a": jax.ShapeDtypeStruct((6, 2), jnp.float32)}
    with pytest.raises(ValueError, match=r"dim 0 of shape \(6, 2\) is not divisible by 4"):
        resolve_shardings(tree, MESH4, [Rule(r"\['a'\]", lambda m, leaf: P(DATA_AXIS), "a")])


def test_mesh_helpers_on_one_device():
    mesh = make_mesh()
    assert mesh.axis_names == (DATA_AXIS,)
    assert mesh.axis_types == (AxisType.Auto,)
    assert batch_sharding(mesh, 3).spec == P("dp", None, None)
    assert replicated(mesh).spec == P()
    assert_global_batch_divisible(5, mesh)
    with pytest.raises(ValueError, match=r"batch_size=6 .*divisible by the 4 devices"):
        assert_global_batch_divisible(6, MESH4)


def test_place_and_with_shardings_round_trip():
    mesh = make_mesh()
    state = make_state()
    shardings = state_shardings(state, mesh, shard_components=True, batch_sharded_terms={BSC_TERM})
    placed = place(state, shardings)
    abstract = with_shardings(state, shardings)
    for x, a, s in zip(
        jax.tree.leaves(placed), jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True
    ):
        assert x.sharding == s and a.sharding == s and a.shape == x.shape
    np.testing.assert_array_equal(placed["rng"], state["rng"])
