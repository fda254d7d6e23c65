"""Fine-tuning from a parent run (`resume_provenance`, SPEC FT1, semantics §9).

A child run whose own `ckpts/` is empty starts from the parent's V/U and CI-fn parameters at a
chosen step; everything else in the train state (optimizer moments, adversary sources, step
counter, RNG) stays as the fresh state built for the child, and no faithfulness warmup runs (the
trainer skips it). Only structure that the restored arrays depend on must match the parent: the
frozen target, the sites (names, order, C), the CI-fn architecture and the delta choice. Loss
coefficients, schedules, batch size, steps and data may all differ.

The resolved parent step is recorded in `<run_dir>/provenance.json`, so the run summary can name
it even after the child restarts from its own checkpoints (when the parent is no longer read, and
`step: latest` could by then resolve to a different step).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax

from param_decomp_config import ConfigError, ExperimentConfig, load_config
from param_decomp_jax.runtime import mesh as mesh_lib
from param_decomp_jax.runtime.checkpoint import CheckpointStore
from param_decomp_jax.runtime.run_dir import RunDir, run_dir_for

PyTree = Any

# The only parts of the parent's TrainState a child keeps.
INHERITED_KEYS = ("components", "ci_params")
RECORD_NAME = "provenance.json"


# ---- structural compatibility ----------------------------------------------------------------
def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    """Nested dicts -> {dotted.path: leaf}; lists stay leaves so `hidden_dims: [16]` reads whole."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(f"{prefix}.{k}", v))
        return out
    return {prefix: value}


def _section_diff(name: str, parent: Any, child: Any) -> list[str]:
    """Per-field differences of one config section (a pydantic model), dotted paths."""
    p = _flatten(name, parent.model_dump(mode="json") if hasattr(parent, "model_dump") else parent)
    c = _flatten(name, child.model_dump(mode="json") if hasattr(child, "model_dump") else child)
    missing = "<absent>"
    return [
        f"{key}: parent {p.get(key, missing)!r}, this run {c.get(key, missing)!r}"
        for key in sorted(set(p) | set(c))
        if p.get(key, missing) != c.get(key, missing)
    ]


def structural_differences(parent: ExperimentConfig, child: ExperimentConfig) -> list[str]:
    """Every structural field where the child differs from the parent (empty: compatible)."""
    problems = _section_diff("target", parent.target, child.target)
    p_sites, c_sites = parent.resolved_sites(), child.resolved_sites()
    p_names, c_names = [n for n, _ in p_sites], [n for n, _ in c_sites]
    if p_names != c_names:
        detail = []
        if only_p := [n for n in p_names if n not in c_names]:
            detail.append(f"only in parent: {only_p}")
        if only_c := [n for n in c_names if n not in p_names]:
            detail.append(f"only in this run: {only_c}")
        if not detail:
            detail.append("same sites in a different order")
        problems.append(f"sites: parent {p_names}, this run {c_names} ({'; '.join(detail)})")
    p_C = dict(p_sites)
    for name, C in c_sites:
        if name in p_C and p_C[name] != C:
            problems.append(f"sites.{name}.C: parent {p_C[name]}, this run {C}")
    problems += _section_diff("ci_fn", parent.ci_fn, child.ci_fn)
    if parent.use_delta_component != child.use_delta_component:
        problems.append(
            f"use_delta_component: parent {parent.use_delta_component}, this run {child.use_delta_component}"
        )
    return problems


def check_compatible(parent: ExperimentConfig, child: ExperimentConfig, parent_dir: Path) -> None:
    problems = structural_differences(parent, child)
    if problems:
        raise ConfigError(
            f"resume_provenance: parent {parent.run_id or parent_dir.name} ({parent_dir}) differs in "
            f"structure from this run ({len(problems)} field{'s' * (len(problems) > 1)}); only "
            "losses, schedules, optimizers, batch size, steps and data may change:\n  "
            + "\n  ".join(problems)
        )


# ---- the parent on disk ----------------------------------------------------------------------
def _parent_dir(cfg: ExperimentConfig) -> Path:
    assert cfg.resume_provenance is not None
    return cfg.resume_provenance.run_dir.expanduser().absolute()


def load_parent_config(cfg: ExperimentConfig) -> tuple[Path, ExperimentConfig]:
    """(parent dir, the parent's pinned config); ConfigError naming the key when unusable."""
    parent_dir = _parent_dir(cfg)
    if not parent_dir.is_dir():
        raise ConfigError(f"resume_provenance.run_dir: parent run directory {parent_dir} does not exist")
    pinned = parent_dir / "config.yaml"
    if not pinned.is_file():
        raise ConfigError(
            f"resume_provenance.run_dir: {parent_dir} has no config.yaml; is it a run directory?"
        )
    try:
        return parent_dir, load_config(pinned)
    except ConfigError as e:
        raise ConfigError(
            f"resume_provenance.run_dir: the parent's pinned config does not load: {e}"
        ) from None


def resolve_step(store: CheckpointStore, requested: int | str, parent_dir: Path) -> int:
    steps = store.all_steps()
    if not steps:
        raise ConfigError(f"resume_provenance.run_dir: parent {parent_dir} has no checkpoints in ckpts/")
    if requested == "latest":
        return steps[-1]
    if requested not in steps:
        raise ConfigError(
            f"resume_provenance.step: parent {parent_dir} has no checkpoint at step {requested} "
            f"(available: {', '.join(map(str, steps))})"
        )
    return int(requested)


# ---- the entry point the trainer calls ------------------------------------------------------
def init_from_parent(cfg: ExperimentConfig, fresh_state: PyTree, shardings: PyTree) -> PyTree:
    """`fresh_state` with V/U and CI params replaced by the parent's at `resume_provenance.step`.

    The restore target carries THIS run's shardings, so a parent saved on another device count
    (or with different component sharding) lands directly in this run's layout.
    """
    assert cfg.resume_provenance is not None
    parent_dir, parent_cfg = load_parent_config(cfg)
    check_compatible(parent_cfg, cfg, parent_dir)
    if not (parent_dir / "ckpts").is_dir():
        raise ConfigError(f"resume_provenance.run_dir: parent {parent_dir} has no ckpts/ directory")
    with CheckpointStore(parent_dir, read_only=True) as store:
        step = resolve_step(store, cfg.resume_provenance.step, parent_dir)
        target = {k: mesh_lib.with_shardings(fresh_state[k], shardings[k]) for k in INHERITED_KEYS}
        try:
            restored = store.restore_subtree(step, target)
        except ValueError as e:
            # The configs matched but the arrays do not (e.g. the code's parameter layout changed).
            raise ConfigError(
                f"resume_provenance: cannot take components/CI fn from the parent: {e}"
            ) from None
    # Orbax hands containers back as plain dicts; rebuild the child's own tree types.
    inherited = {
        k: jax.tree.unflatten(jax.tree.structure(fresh_state[k]), _leaves_like(fresh_state[k], restored[k]))
        for k in INHERITED_KEYS
    }
    record = {
        "parent_run_id": parent_cfg.run_id,
        "parent_run_dir": str(parent_dir),
        "parent_step": step,
        "requested_step": cfg.resume_provenance.step,
        "inherited": list(INHERITED_KEYS),
    }
    if jax.process_index() == 0:
        run = run_dir_for(cfg)
        run.root.mkdir(parents=True, exist_ok=True)
        (run.root / RECORD_NAME).write_text(json.dumps(record, indent=2))
        print(
            f"resume_provenance: V/U and CI fn from parent {parent_cfg.run_id} step {step} ({parent_dir}); "
            "fresh optimizers, sources and RNG; step 0; no faithfulness warmup"
        )
    return {**fresh_state, **inherited}


def _leaves_like(fresh: PyTree, restored: PyTree) -> list[Any]:
    """Restored leaves in the order of `fresh`'s leaves, matched by key path (not by position)."""

    def plain(path: tuple[Any, ...]) -> tuple[str, ...]:
        return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)

    by_path = {plain(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]}
    return [by_path[plain(p)] for p, _ in jax.tree_util.tree_flatten_with_path(fresh)[0]]


def provenance_record(cfg: ExperimentConfig, run: RunDir) -> dict[str, Any] | None:
    """What the run summary says about the parent (None for runs without one)."""
    if cfg.resume_provenance is None:
        return None
    path = run.root / RECORD_NAME
    if path.is_file():
        return json.loads(path.read_text())
    # No record on disk (e.g. a non-primary process without a shared filesystem): report the request.
    return {"parent_run_dir": str(_parent_dir(cfg)), "requested_step": cfg.resume_provenance.step}
