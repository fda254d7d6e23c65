"""Open a run directory from Python: the API downstream analysis (harvest, clustering, autointerp)
builds on.

```python
run = open_run("runs/p-1234abcd")           # latest checkpoint, on this process's first device
batch = run.eval_batch(0)                    # the eval stream the trainer evaluates on
ci = run.ci(batch)                           # {site: CI [*leading, C]} in [0, 1]
acts = run.component_acts(batch)             # {site: x @ V [*leading, C]}
```
Batches go through the frozen prefix: integer arrays (token batches) and float arrays as wide as a
toy batch (`[..., n_features]`; ResidMLP embeds them, TMS's prefix is the identity); any other float
array is taken to be a residual already. Placement never depends on how the run was trained:
only the components and CI params are read back, onto one local device.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array

from param_decomp_config import ConfigError, ExperimentConfig, load_config
from param_decomp_jax.core.ci_fn import ci_logits
from param_decomp_jax.core.model import Components, DecomposedModel, PyTree
from param_decomp_jax.core.squash import lower_leaky_hard
from param_decomp_jax.runtime import mesh as mesh_lib
from param_decomp_jax.runtime.build import Experiment, build_experiment
from param_decomp_jax.runtime.checkpoint import CheckpointStore
from param_decomp_jax.runtime.data import BatchProvider, make_batches
from param_decomp_jax.runtime.run_dir import RunDir


class RunOpenError(Exception):
    """A run directory that cannot be opened (missing, no checkpoint, unknown step); the message
    says what to do, so commands print it without a traceback."""


@contextmanager
def _quiet_absl() -> Iterator[None]:
    # A read-only CheckpointManager warns (via absl) that it ignores save options: noise for a reader.
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def checkpoint_step(store: CheckpointStore, run: RunDir, step: int | None) -> int:
    steps = store.all_steps()
    if not steps:
        raise RunOpenError(f"{run.root}: no checkpoint under {run.ckpts} (has the run saved one yet?)")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise RunOpenError(f"{run.root}: no checkpoint for step {step}; available steps: {steps}")
    return step


def load_run_config(run: RunDir, eval_overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The pinned config; `eval_overrides` (`eval.key=value`, as `--set`) may change how the run is
    evaluated, never what was trained."""
    if not run.root.is_dir():
        raise RunOpenError(f"run directory not found: {run.root}")
    if not run.config.is_file():
        raise RunOpenError(f"{run.root} is not a run directory: it has no config.yaml")
    for text in eval_overrides:
        if not text.startswith("eval."):
            raise RunOpenError(f"--set {text}: only eval.* keys can be overridden when evaluating a run")
    try:
        return load_config(run.config, overrides=eval_overrides)
    except ConfigError as e:
        raise RunOpenError(f"pinned config cannot be loaded: {e}") from None


@dataclass
class OpenedRun:
    """One checkpoint of a run plus everything needed to evaluate it (see the module docstring)."""

    run: RunDir
    cfg: ExperimentConfig
    step: int
    exp: Experiment
    components: Components
    ci_params: PyTree
    _jitted: dict[str, Any] = field(default_factory=dict, repr=False)

    # ---- the pieces --------------------------------------------------------------------------
    @property
    def model(self) -> DecomposedModel:
        return self.exp.model

    @property
    def frozen(self) -> PyTree:
        return self.exp.frozen

    @property
    def ci_fn(self) -> Any:
        return self.exp.ci_fn

    @property
    def site_names(self) -> tuple[str, ...]:
        return self.model.site_names

    @cached_property
    def is_lm(self) -> bool:
        return len(self.model.leading_axes) == 2

    # ---- data --------------------------------------------------------------------------------
    def eval_batches(self, batch_size: int | None = None) -> BatchProvider:
        """The run's eval stream (`batch(i)`); batch 0 is what the in-loop eval measured."""
        bs = batch_size or self.cfg.eval.batch_size or self.cfg.batch_size
        return make_batches(self.cfg, None, stream=1, batch_size=bs)

    def eval_batch(self, i: int = 0, batch_size: int | None = None) -> Array:
        return self.eval_batches(batch_size).batch(i)

    # ---- jitted views ------------------------------------------------------------------------
    def _fn(self, name: str, make: Any) -> Any:
        # One jit per view, built lazily and kept: repeated calls on same-shape batches never retrace.
        if name not in self._jitted:
            self._jitted[name] = jax.jit(make())
        return self._jitted[name]

    def residual(self, batch_or_residual: Array) -> Array:
        x = jnp.asarray(batch_or_residual)
        toy_batch_width = getattr(self.cfg.target, "n_features", None)
        if not (jnp.issubdtype(x.dtype, jnp.integer) or x.shape[-1] == toy_batch_width):
            return x
        fn = self._fn("residual", lambda: lambda f, b: self.exp.residual_fn(f, b))
        return fn(self.frozen, x)

    def site_inputs(self, batch_or_residual: Array) -> dict[str, Array]:
        fn = self._fn("site_inputs", lambda: self.model.site_inputs)
        return fn(self.frozen, self.residual(batch_or_residual))

    def ci(self, batch_or_residual: Array) -> dict[str, Array]:
        """{site: CI [*leading, C]}: the lower leaky-hard CI (clamped to [0, 1]) that masks use."""

        def make() -> Any:
            def ci(
                params: PyTree, components: Components, frozen: PyTree, residual: Array
            ) -> dict[str, Array]:
                inputs = self.model.site_inputs(frozen, residual)
                # Components matter only for CI networks that read component activations.
                logits = ci_logits(self.ci_fn, params, inputs, components)
                return {k: lower_leaky_hard(v) for k, v in logits.items()}

            return ci

        fn = self._fn("ci", make)
        return fn(self.ci_params, self.components, self.frozen, self.residual(batch_or_residual))

    def component_acts(self, batch_or_residual: Array) -> dict[str, Array]:
        """{site: x @ V [*leading, C]}: each rank-one component's input activation."""

        def make() -> Any:
            def acts(components: Components, frozen: PyTree, residual: Array) -> dict[str, Array]:
                inputs = self.model.site_inputs(frozen, residual)
                return {n: inputs[n].astype(jnp.float32) @ components[n]["V"] for n in self.site_names}

            return acts

        return self._fn("acts", make)(self.components, self.frozen, self.residual(batch_or_residual))


def open_run(
    run_dir: Path | str,
    step: int | None = None,
    *,
    target_cache: Path | None = None,
    eval_overrides: Sequence[str] = (),
) -> OpenedRun:
    """Load the pinned config and restore `step` (latest by default) of a run directory.

    Only `components` and `ci_params` are read (a partial orbax restore), replicated on a
    one-device mesh of THIS process, whatever mesh the run was trained on. Toy targets are read
    from the run's sibling `.target_cache` (where training put them) or pretrained again.
    """
    run = RunDir(Path(run_dir))
    cfg = load_run_config(run, eval_overrides)
    if not run.ckpts.is_dir():
        raise RunOpenError(f"{run.root}: no checkpoint directory {run.ckpts}")
    with _quiet_absl():
        store = CheckpointStore(run.root, keep_last=None, read_only=True, async_save=False)
    try:
        step = checkpoint_step(store, run, step)
        exp = build_experiment(cfg, target_cache=target_cache or run.root.parent / ".target_cache")
        abstract = jax.eval_shape(exp.fresh_state)
        wanted = {"components": abstract["components"], "ci_params": abstract["ci_params"]}
        mesh = mesh_lib.make_mesh(jax.local_devices()[:1])
        target = mesh_lib.with_shardings(wanted, mesh_lib.replicated_shardings(wanted, mesh))
        try:
            restored = store.restore_subtree(step, target)
        except ValueError as e:
            raise RunOpenError(
                f"checkpoint {step} of {run.root} does not match its config.yaml: {e}"
            ) from None
    finally:
        store.close()
    return OpenedRun(run, cfg, step, exp, restored["components"], restored["ci_params"])
