"""Orbax checkpoints of the whole TrainState under `<run_dir>/ckpts/<step>/`.

Restores always take an abstract target whose leaves carry the CURRENT mesh's shardings, so a
checkpoint written on 4 devices restores onto 1 and vice versa (a bare restore would try to
rebuild the saved topology and fail). Orbax facts this module relies on (orbax 0.12.8):
- `save` is async: it returns once arrays are copied off device (donating the state afterwards
  is safe) and a background thread writes; `wait()` blocks until the write is committed.
- A step directory appears under its final name only after a complete write (tmp dir + rename),
  but files can still go missing or rot later: restore then raises (ValueError from tensorstore),
  which `restore_latest_valid` turns into a fallback to the previous step.
- `StandardRestore` cannot restore a subset of keys; a `PyTreeCheckpointHandler` restore with
  `partial_restore=True` can, but returns unknown keys untouched, so we check keys first.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

PyTree = Any
log = logging.getLogger(__name__)

_ITEM = "default"  # orbax's directory name for the single item a manager saves


class CheckpointStore:
    """All checkpoints of one run; every process must call every method (they synchronise)."""

    def __init__(
        self,
        run_dir: Path | str,
        *,
        keep_last: int | None = 3,
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.run_dir = Path(run_dir).absolute()
        self.directory = self.run_dir / "ckpts"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            # Leftovers of a save killed mid-write are removed when the run restarts.
            cleanup_tmp_directories=not read_only,
        )
        # Naming the handler lets a fresh process read item metadata of existing checkpoints.
        self._mgr = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=ocp.StandardCheckpointHandler()
        )

    # ---- save -------------------------------------------------------------------------------
    def save(self, step: int, state: PyTree, *, force: bool = False) -> bool:
        """Start an async save; False when skipped (step already saved, or orbax's policy).

        Saving an existing step is a no-op rather than orbax's StepAlreadyExistsError, so a loop
        may save on `save_every` and again unconditionally at the end.
        """
        if step in self._mgr.all_steps():
            return False
        saved = bool(self._mgr.save(step, args=ocp.args.StandardSave(state), force=force))
        if not saved and force:
            log.warning("checkpoint of step %d skipped by orbax (latest is %s)", step, self.latest_step())
        return saved

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.close()

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- inspect ------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def item_metadata(self, step: int) -> PyTree:
        """Saved tree of ArrayMetadata (shape, dtype, saved sharding); containers are dicts/lists."""
        md = self._mgr.item_metadata(step)
        if md is None:
            raise FileNotFoundError(f"no readable checkpoint metadata for step {step} in {self.directory}")
        return md.tree

    def abstract_from_metadata(self, step: int, sharding: jax.sharding.Sharding, keys=None) -> PyTree:
        """Abstract target from the checkpoint's own metadata, every leaf on `sharding`.

        For reading a tree whose structure the caller cannot rebuild (e.g. a parent run's
        state); optax NamedTuples come back as plain lists/dicts.
        """
        tree = self.item_metadata(step)
        if keys is not None:
            tree = {k: tree[k] for k in keys}
        return jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
            tree,
            is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"),
        )

    # ---- restore ------------------------------------------------------------------------------
    def restore(self, step: int, target: PyTree) -> PyTree:
        """Restore `step` onto the shardings in `target` (ShapeDtypeStructs with shardings, or arrays)."""
        return self._mgr.restore(step, args=ocp.args.StandardRestore(_abstract_target(target)))

    def restore_latest_valid(self, target: PyTree) -> tuple[int, PyTree] | None:
        """Newest checkpoint that restores; None when there is none at all.

        A step that fails to restore is logged, moved out of `ckpts/` (to `ckpts_invalid/`) so
        orbax neither keeps it as "latest" (it would refuse to save older steps) nor garbage
        collects good ones in its favour, and the previous step is tried. If every step fails
        the errors are raised: silently restarting from scratch would overwrite a run.
        """
        errors: list[str] = []
        abstract = _abstract_target(target)
        for step in reversed(self.all_steps()):
            try:
                state = self.restore(step, abstract)
            except Exception as e:  # tensorstore/orbax raise several types for damaged files
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                log.warning(
                    "checkpoint step %d in %s cannot be restored (%s); trying an older one",
                    step,
                    self.directory,
                    msg,
                )
                errors.append(f"step {step}: {msg}")
                continue
            if errors:
                self._quarantine_newer_than(step)
            return step, state
        if errors:
            raise RuntimeError(f"no checkpoint in {self.directory} restores:\n  " + "\n  ".join(errors))
        return None

    def restore_subtree(self, step: int, target: Mapping[str, PyTree]) -> dict[str, PyTree]:
        """Restore only some top-level keys (e.g. components and ci_params of a parent run).

        Shapes and dtypes are checked against the checkpoint first, so a parent whose sites, C or
        CI-fn architecture differ fails with a readable list of mismatches.
        """
        saved = self.item_metadata(step)
        problems = [f"{k!r}: not in the checkpoint (has {sorted(saved)})" for k in target if k not in saved]
        abstract = {k: _abstract_target(v) for k, v in target.items()}
        for k in abstract:
            if k in saved:
                problems += _tree_mismatches(k, abstract[k], saved[k])
        if problems:
            raise ValueError(
                f"checkpoint {self.directory}/{step} does not match the requested state:\n  "
                + "\n  ".join(problems)
            )
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
            restored = ckptr.restore(
                self.directory / str(step) / _ITEM,
                args=ocp.args.PyTreeRestore(
                    item=abstract,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                    partial_restore=True,
                ),
            )
        return dict(restored)

    def _quarantine_newer_than(self, step: int) -> None:
        bad = [s for s in self.all_steps() if s > step]
        if jax.process_index() == 0:
            dest_root = self.run_dir / "ckpts_invalid"
            dest_root.mkdir(exist_ok=True)
            for s in bad:
                dest = dest_root / f"{s}-{int(time.time())}"
                log.warning("moving unrestorable checkpoint %s to %s", self.directory / str(s), dest)
                shutil.move(str(self.directory / str(s)), dest)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("param_decomp_jax.checkpoint.quarantine")
        self._mgr.reload()


def _abstract_target(target: PyTree) -> PyTree:
    """ShapeDtypeStructs with shardings; refuse leaves without one (orbax would then try the
    saved topology, or hand back host numpy arrays)."""

    def one(x: Any) -> jax.ShapeDtypeStruct:
        sharding = getattr(x, "sharding", None)
        if sharding is None:
            raise ValueError(
                f"restore target leaf {type(x).__name__}{np.shape(x)} has no sharding; build the "
                "target with runtime.mesh.with_shardings(abstract, shardings)"
            )
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    return jax.tree.map(one, target)


def _plain_key(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _tree_mismatches(prefix: str, abstract: PyTree, saved: PyTree) -> list[str]:
    def flat(tree: PyTree) -> dict[tuple[str, ...], Any]:
        leaves = jax.tree_util.tree_flatten_with_path(
            tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
        )[0]
        return {tuple(_plain_key(k) for k in path): leaf for path, leaf in leaves}

    want, have = flat(abstract), flat(saved)
    out = []
    for path in sorted(set(want) | set(have)):
        name = "/".join((prefix, *path))
        if path not in have:
            out.append(f"{name}: expected {want[path].shape} but the checkpoint has no such entry")
        elif path not in want:
            out.append(f"{name}: in the checkpoint {tuple(have[path].shape)} but not expected here")
        elif tuple(want[path].shape) != tuple(have[path].shape) or np.dtype(want[path].dtype) != np.dtype(
            have[path].dtype
        ):
            out.append(
                f"{name}: expected {want[path].dtype}{tuple(want[path].shape)}, "
                f"checkpoint has {have[path].dtype}{tuple(have[path].shape)}"
            )
    return out
