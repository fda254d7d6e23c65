"""The device mesh and every placement decision, keyed on pytree paths.

Placement is data: an ordered list of `Rule(regex on jax.tree_util.keystr(path), spec maker)`,
resolved by ONE function (`resolve_shardings`) that fails loudly when a leaf matches no rule or
when matching rules disagree. Nothing else in the project should build a `NamedSharding` by hand.

Paths look like `['components']['layers.0.mlp.up']['V']` for parameters and, for an
`optax.chain(clip_by_global_norm, inject_hyperparams(adamw))` state,
`['components_opt'][1].inner_state[0].mu['layers.0.mlp.up']['V']`: optimizer moments end in the
same `[site][V|U]` keys as the parameter they track, which is what the component rules key on.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

PyTree = Any

# Axis names are constants so a second ("model") axis can be added without touching callers.
DATA_AXIS = "dp"
MESH_AXES: tuple[str, ...] = (DATA_AXIS,)
# The axis V/U shard over along C when `runtime.shard_components` is on. With a future "model"
# axis this becomes that axis and the data axis stays free for the batch.
COMPONENT_AXIS = DATA_AXIS

# (regex match on the keystr path, leaf with .shape/.dtype) -> PartitionSpec
SpecMaker = Callable[[re.Match[str], Any], PartitionSpec]


@dataclass(frozen=True)
class Rule:
    """Leaves whose keystr path matches `pattern` (re.search) are placed by `make`."""

    pattern: str
    make: SpecMaker
    name: str


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis `dp` over all global devices (or the given ones).

    Auto axis types keep classic GSPMD propagation (jax 0.10 defaults to Explicit).
    """
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.array(devices), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def axis_size(mesh: Mesh, axis: str = DATA_AXIS) -> int:
    return int(mesh.shape[axis])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) dim over `dp`, everything else replicated: `P('dp', None, ...)`."""
    if ndim < 1:
        raise ValueError(f"a batch-sharded array needs at least one dim, got ndim={ndim}")
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS, *([None] * (ndim - 1))))


def replicated_shardings(tree: PyTree, mesh: Mesh) -> PyTree:
    """Every leaf replicated (e.g. the frozen target)."""
    rep = replicated(mesh)
    return jax.tree.map(lambda _: rep, tree)


def assert_global_batch_divisible(batch_size: int, mesh: Mesh) -> None:
    n = axis_size(mesh, DATA_AXIS)
    if batch_size % n != 0:
        raise ValueError(
            f"batch_size={batch_size} (the global batch) must be divisible by the {n} devices of "
            f"mesh axis {DATA_AXIS!r}"
        )


# ---- rule resolution ---------------------------------------------------------------------------
def resolve_shardings(tree: PyTree, mesh: Mesh, rules: Sequence[Rule]) -> PyTree:
    """Map every leaf of `tree` (arrays or ShapeDtypeStructs) to a NamedSharding via `rules`.

    All rules are tried on every leaf; rules that match must agree on the spec. Errors for all
    offending leaves are collected so one run shows every missing or conflicting rule.
    """
    compiled = [(re.compile(r.pattern), r) for r in rules]
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    specs: list[PartitionSpec] = []
    errors: list[str] = []
    for path, leaf in paths_leaves:
        key = jax.tree_util.keystr(path)
        found: list[tuple[str, PartitionSpec]] = []
        for regex, rule in compiled:
            m = regex.search(key)
            if m is not None:
                found.append((rule.name, _canonical(rule.make(m, leaf))))
        distinct = {spec for _, spec in found}
        if not found:
            errors.append(f"{key}: matches no placement rule")
        elif len(distinct) > 1:
            errors.append(f"{key}: conflicting placement rules {found}")
        else:
            spec = found[0][1]
            problem = _spec_problem(spec, np.shape(leaf), mesh)
            if problem:
                errors.append(f"{key}: rule {found[0][0]!r} gives {spec}: {problem}")
            specs.append(spec)
    if errors:
        raise ValueError("cannot place the tree on the mesh:\n  " + "\n  ".join(errors))
    return jax.tree_util.tree_unflatten(treedef, [NamedSharding(mesh, s) for s in specs])


def _canonical(spec: PartitionSpec) -> PartitionSpec:
    # P() and P(None, None) place a leaf identically but compare unequal: strip trailing Nones
    # so agreeing rules are not reported as conflicting.
    entries = list(spec)
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


def _spec_problem(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> str | None:
    if len(spec) > len(shape):
        return f"spec has {len(spec)} entries but the leaf has shape {shape}"
    for dim, axes in enumerate(spec):
        if axes is None:
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        n = int(np.prod([mesh.shape[a] for a in names]))
        if shape[dim] % n:
            return f"dim {dim} of shape {shape} is not divisible by {n} devices"
    return None


# ---- the train-state rules ---------------------------------------------------------------------
_SITE_FACTOR = r"\['(?P<site>[^']+)'\]\['(?P<factor>[VU])'\]$"


def _replicate(_m: re.Match[str], _leaf: Any) -> PartitionSpec:
    return PartitionSpec()


def state_rules(
    state_abstract: PyTree,
    mesh: Mesh,
    *,
    shard_components: bool,
    batch_sharded_terms: Collection[str],
) -> list[Rule]:
    """The placement rules for the TrainState dict (see architecture.md, "State and placement")."""
    n_comp = axis_size(mesh, COMPONENT_AXIS)
    comp_shapes = {
        (site, f): tuple(np.shape(leaf))
        for site, vu in state_abstract.get("components", {}).items()
        for f, leaf in vu.items()
    }
    adversaries = state_abstract.get("adversaries", {})
    unknown = sorted(set(batch_sharded_terms) - set(adversaries))
    if unknown:
        raise ValueError(
            f"batch-sharded (bsc) terms {unknown} have no entry in state['adversaries'] "
            f"(present: {sorted(adversaries)})"
        )
    source_shapes = {
        term: {tuple(np.shape(x)) for x in jax.tree.leaves(adv.get("sources", {}))}
        for term, adv in adversaries.items()
    }

    def component_spec(m: re.Match[str], leaf: Any) -> PartitionSpec:
        site, factor = m["site"], m["factor"]
        if (site, factor) not in comp_shapes:
            raise ValueError(f"{m.string}: no component {site!r}/{factor} in state['components']")
        shape = tuple(np.shape(leaf))
        if shape != comp_shapes[(site, factor)]:
            if not shape:  # a per-parameter scalar (e.g. a count) is cheap to replicate
                return PartitionSpec()
            raise ValueError(
                f"{m.string}: shape {shape} differs from its parameter's "
                f"{comp_shapes[(site, factor)]}; add a placement rule for this optimizer"
            )
        if not shard_components:
            return PartitionSpec()
        c_dim = 1 if factor == "V" else 0
        C = shape[c_dim]
        if C % n_comp:
            raise ValueError(
                f"runtime.shard_components=True needs C divisible by the {n_comp} devices of mesh "
                f"axis {COMPONENT_AXIS!r}, but site {site!r} has C={C}"
            )
        return PartitionSpec(None, COMPONENT_AXIS) if factor == "V" else PartitionSpec(COMPONENT_AXIS, None)

    def batch_leading(leaf: Any, what: str) -> PartitionSpec:
        shape = tuple(np.shape(leaf))
        try:
            assert_global_batch_divisible(shape[0], mesh)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
        return PartitionSpec(DATA_AXIS, *([None] * (len(shape) - 1)))

    def source_spec(m: re.Match[str], leaf: Any) -> PartitionSpec:
        if m["term"] not in batch_sharded_terms:
            return PartitionSpec()  # shared scopes (c, sc, nsc) stay identical on every replica
        return batch_leading(leaf, m.string)

    def adversary_opt_spec(m: re.Match[str], leaf: Any) -> PartitionSpec:
        term = m["term"]
        shape = tuple(np.shape(leaf))
        if term not in batch_sharded_terms or not shape:
            return PartitionSpec()
        if shape not in source_shapes[term]:
            raise ValueError(
                f"{m.string}: shape {shape} matches none of term {term!r}'s source shapes "
                f"{sorted(source_shapes[term])}; cannot tell whether it shards with the batch"
            )
        return batch_leading(leaf, m.string)

    return [
        Rule(r"^\['step'\]$", _replicate, "step"),
        Rule(r"^\['rng'\]$", _replicate, "rng"),
        Rule(r"^\['ci_params'\]", _replicate, "ci_params"),
        Rule(r"^\['ci_opt'\]", _replicate, "ci_opt"),
        Rule(r"^\['components'\]" + _SITE_FACTOR, component_spec, "components"),
        # Moments keep the parameter's [site][V|U] suffix whatever optax nesting precedes it.
        Rule(r"^\['components_opt'\].*" + _SITE_FACTOR, component_spec, "components_opt/moments"),
        # Everything else in the component optimizer (counts, injected hyperparams) is scalar.
        Rule(r"^\['components_opt'\](?!.*\['[VU]'\]$)", _replicate, "components_opt/other"),
        Rule(r"^\['adversaries'\]\['(?P<term>[^']+)'\]\['sources'\]", source_spec, "adversary/sources"),
        Rule(r"^\['adversaries'\]\['(?P<term>[^']+)'\]\['opt_state'\]", adversary_opt_spec, "adversary/opt"),
    ]


def state_shardings(
    state_abstract: PyTree,
    mesh: Mesh,
    *,
    shard_components: bool,
    batch_sharded_terms: Collection[str],
    extra_rules: Sequence[Rule] = (),
) -> PyTree:
    """NamedShardings for a TrainState (arrays or ShapeDtypeStructs), same tree structure.

    `batch_sharded_terms` names the persistent terms with scope `bsc`, whose sources (and their
    optimizer moments) shard along dim 0 with the batch; the scope is not visible from the shape.
    `extra_rules` lets a caller place new state entries without editing this module.
    """
    rules = state_rules(
        state_abstract, mesh, shard_components=shard_components, batch_sharded_terms=batch_sharded_terms
    )
    return resolve_shardings(state_abstract, mesh, [*rules, *extra_rules])


def with_shardings(tree: PyTree, shardings: PyTree) -> PyTree:
    """Abstract copy of `tree` (ShapeDtypeStructs carrying `shardings`), e.g. a restore target."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


def place(tree: PyTree, shardings: PyTree) -> PyTree:
    """Put `tree` on the mesh. With several processes every process must pass the same values."""
    return jax.device_put(tree, shardings)
