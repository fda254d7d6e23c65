"""Multi-process (multi-host) plumbing: who am I, how to join, which batch rows do I load.

Settings resolve from explicit arguments, else `JSP_*` env vars, else SLURM env vars, else a
single process. `maybe_initialize` must run before anything touches a jax backend (the device
list is fixed when the backend starts).

Data contract: every process loads only its rows of the GLOBAL batch (`process_slice`) and
`global_batch_from_local` stitches them into one global array sharded over `dp`, so the global
batch — and hence the trajectory — does not depend on the process or device count.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh

from param_decomp_jax.runtime.mesh import assert_global_batch_divisible, batch_sharding, make_mesh

log = logging.getLogger(__name__)

# jax's SLURM convention: a port in the ephemeral range derived from the job id, so concurrent
# jobs sharing a first node do not collide.
_SLURM_PORT_BASE = 65535 - 2**12 + 1


@dataclass(frozen=True)
class DistributedSettings:
    coordinator_address: str | None = None  # "host:port" of process 0
    num_processes: int = 1
    process_id: int = 0
    local_device_ids: tuple[int, ...] | None = None  # None = all local devices
    source: str = "single"  # "explicit" | "jsp_env" | "slurm" | "single" (for logs)
    initialization_timeout_s: int = 300

    def __post_init__(self) -> None:
        if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
            raise ValueError(
                f"need 0 <= process_id < num_processes, got process_id={self.process_id}, "
                f"num_processes={self.num_processes} (from {self.source})"
            )
        if self.num_processes > 1 and not self.coordinator_address:
            raise ValueError(f"{self.num_processes} processes need a coordinator_address ({self.source})")


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist, e.g. `node[01-03],gpu7` -> node01, node02, node03, gpu7."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        # Each bracket group is a comma list of `a` or `a-b` ranges; zero padding is kept.
        parts = re.split(r"(\[[^\]]*\])", item)
        choices: list[list[str]] = []
        for part in parts:
            if part.startswith("["):
                choices.append(_expand_range_list(part[1:-1]))
            elif part:
                choices.append([part])
        hosts.extend("".join(p) for p in itertools.product(*choices))
    return hosts


def _split_top_level(s: str) -> list[str]:
    items, depth, cur = [], 0, ""
    for ch in s.strip():
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        items.append(cur)
    return items


def _expand_range_list(spec: str) -> list[str]:
    out: list[str] = []
    for r in spec.split(","):
        lo, _, hi = r.partition("-")
        if not hi:
            out.append(lo)
            continue
        width = len(lo)
        out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return out


def resolve_settings(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    env: Mapping[str, str] | None = None,
) -> DistributedSettings:
    """Explicit args win; then JSP_COORDINATOR/JSP_NUM_PROCESSES/JSP_PROCESS_ID; then SLURM."""
    env = os.environ if env is None else env
    ids = tuple(local_device_ids) if local_device_ids is not None else None
    if num_processes is not None:
        return DistributedSettings(coordinator_address, num_processes, process_id or 0, ids, "explicit")
    if "JSP_NUM_PROCESSES" in env:
        env_ids = env.get("JSP_LOCAL_DEVICE_IDS")
        return DistributedSettings(
            coordinator_address=env.get("JSP_COORDINATOR"),
            num_processes=int(env["JSP_NUM_PROCESSES"]),
            process_id=int(env.get("JSP_PROCESS_ID", "0")),
            local_device_ids=tuple(int(i) for i in env_ids.split(",")) if env_ids else ids,
            source="jsp_env",
        )
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env and nodelist:
        return _slurm_settings(env, nodelist, ids)
    return DistributedSettings()


def _slurm_settings(
    env: Mapping[str, str], nodelist: str, ids: tuple[int, ...] | None
) -> DistributedSettings:
    hosts = expand_nodelist(nodelist)
    ntasks = int(env["SLURM_NTASKS"])
    port = env.get("JSP_COORDINATOR_PORT") or str(
        int(env.get("SLURM_JOB_ID", "0")) % 2**12 + _SLURM_PORT_BASE
    )
    nnodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES") or len(hosts))
    # Several tasks per node means one task per accelerator: pin each to its local id. With one
    # task per node the process owns every local device.
    if ids is None and ntasks > nnodes and "SLURM_LOCALID" in env:
        ids = (int(env["SLURM_LOCALID"]),)
    return DistributedSettings(
        coordinator_address=f"{hosts[0]}:{port}",
        num_processes=ntasks,
        process_id=int(env["SLURM_PROCID"]),
        local_device_ids=ids,
        source="slurm",
    )


def maybe_initialize(settings: DistributedSettings) -> bool:
    """Join the job when it has several processes; returns whether jax.distributed is active."""
    if settings.num_processes <= 1:
        return False
    if jax.distributed.is_initialized():
        return True
    # Cross-process collectives on CPU go through gloo (jax 0.10's default; set so it holds even
    # when a user config changed it). Ignored on GPU/TPU, which bring their own collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    log.info(
        "jax.distributed.initialize(%s, num_processes=%d, process_id=%d, local_device_ids=%s) [%s]",
        settings.coordinator_address,
        settings.num_processes,
        settings.process_id,
        settings.local_device_ids,
        settings.source,
    )
    jax.distributed.initialize(
        coordinator_address=settings.coordinator_address,
        num_processes=settings.num_processes,
        process_id=settings.process_id,
        local_device_ids=list(settings.local_device_ids) if settings.local_device_ids else None,
        # We already resolved everything; jax's own detection could override it differently.
        cluster_detection_method="deactivate",
        initialization_timeout=settings.initialization_timeout_s,
    )
    return True


def is_primary() -> bool:
    """Process 0 writes shared files (metrics, figures, config); everyone joins collectives."""
    return jax.process_index() == 0


def process_slice(global_batch_size: int, mesh: Mesh | None = None) -> slice:
    """Rows of the global batch this process must load, read off the batch sharding itself.

    Derived from the mesh rather than assumed as `process_index * B / P`, because the mesh may
    order devices differently from process order.
    """
    mesh = make_mesh() if mesh is None else mesh
    sharding = batch_sharding(mesh, 1)
    assert_global_batch_divisible(global_batch_size, mesh)
    index_map = sharding.addressable_devices_indices_map((global_batch_size,))
    # Several local devices may hold the same rows (a future replicated axis): dedupe.
    rows = sorted({idx[0].indices(global_batch_size)[:2] for idx in index_map.values() if idx is not None})
    start, stop = rows[0][0], rows[-1][1]
    if sum(b - a for a, b in rows) != stop - start:
        raise ValueError(f"this process's batch rows {rows} are not contiguous; reorder the mesh devices")
    return slice(start, stop)


def global_batch_from_local(local_np: np.ndarray, mesh: Mesh, global_shape: Sequence[int]) -> jax.Array:
    """One global array sharded `P('dp', ...)` from this process's rows (`process_slice`)."""
    global_shape = tuple(global_shape)
    rows = process_slice(global_shape[0], mesh)
    expected = (rows.stop - rows.start, *global_shape[1:])
    if tuple(local_np.shape) != expected:
        raise ValueError(
            f"process {jax.process_index()} passed local data of shape {tuple(local_np.shape)}; "
            f"expected {expected} (rows {rows.start}:{rows.stop} of global {global_shape})"
        )
    sharding = batch_sharding(mesh, len(global_shape))
    return jax.make_array_from_process_local_data(sharding, local_np, global_shape)


def agree_run_id(run_id: str | None, mint: Callable[[], str]) -> str:
    """One run id for every process: process 0's (given or minted) is broadcast to the others.

    Each process would otherwise mint its own id and write to a different run directory.
    """
    if jax.process_count() == 1:
        return run_id or mint()
    from jax.experimental import multihost_utils

    mine = (run_id or mint()) if jax.process_index() == 0 else "p-00000000"  # same length
    raw = np.frombuffer(mine.encode("ascii"), dtype=np.uint8)
    agreed = np.asarray(multihost_utils.broadcast_one_to_all(raw)).astype(np.uint8).tobytes().decode("ascii")
    if run_id is not None and agreed != run_id:
        raise ValueError(f"process {jax.process_index()} was given run id {run_id!r}, process 0 {agreed!r}")
    return agreed


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on any (a collective: all processes must call)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())
