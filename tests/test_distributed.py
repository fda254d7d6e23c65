"""Multi-process settings (SLURM / JSP env), batch slicing, and a real 2-process x 2-device job."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT
from runtime_state import assert_bitwise_equal

from param_decomp_jax.runtime.checkpoint import CheckpointStore
from param_decomp_jax.runtime.distributed import (
    DistributedSettings,
    expand_nodelist,
    global_batch_from_local,
    is_primary,
    maybe_initialize,
    process_slice,
    resolve_settings,
)
from param_decomp_jax.runtime.mesh import make_mesh, state_shardings, with_shardings

SUBPROCESS_TIMEOUT_S = 120


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node01", ["node01"]),
        ("node[01-03],gpu7", ["node01", "node02", "node03", "gpu7"]),
        ("gpu7,node[1,3-4]", ["gpu7", "node1", "node3", "node4"]),
        ("rack[1-2]-n[08-09]", ["rack1-n08", "rack1-n09", "rack2-n08", "rack2-n09"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


SLURM = {
    "SLURM_JOB_ID": "4242",
    "SLURM_NTASKS": "6",
    "SLURM_PROCID": "4",
    "SLURM_LOCALID": "1",
    "SLURM_STEP_NODELIST": "node[01-03],gpu7",
    "SLURM_STEP_NUM_NODES": "3",
}


def test_slurm_settings():
    s = resolve_settings(env=SLURM)
    assert (s.num_processes, s.process_id, s.source) == (6, 4, "slurm")
    assert s.coordinator_address == f"node01:{4242 % 4096 + 61440}"
    assert s.local_device_ids == (1,)  # 6 tasks on 3 nodes: one task per local device
    one_task_per_node = dict(SLURM, SLURM_NTASKS="3", SLURM_PROCID="2")
    assert resolve_settings(env=one_task_per_node).local_device_ids is None
    job_nodelist = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}
    job_nodelist["SLURM_JOB_NODELIST"] = "gpu[7-8]"
    job_nodelist["JSP_COORDINATOR_PORT"] = "5555"
    assert resolve_settings(env=job_nodelist).coordinator_address == "gpu7:5555"


def test_settings_precedence_and_validation():
    jsp = {"JSP_COORDINATOR": "10.0.0.1:1234", "JSP_NUM_PROCESSES": "2", "JSP_PROCESS_ID": "1"}
    s = resolve_settings(env={**SLURM, **jsp})
    assert (s.coordinator_address, s.num_processes, s.process_id, s.source) == (
        "10.0.0.1:1234",
        2,
        1,
        "jsp_env",
    )
    s = resolve_settings("h:1", num_processes=3, process_id=2, env={**SLURM, **jsp})
    assert (s.coordinator_address, s.num_processes, s.process_id, s.source) == ("h:1", 3, 2, "explicit")
    assert resolve_settings(env={}) == DistributedSettings()
    with pytest.raises(ValueError, match="process_id=2, num_processes=2"):
        resolve_settings(env={**jsp, "JSP_PROCESS_ID": "2"})
    with pytest.raises(ValueError, match="coordinator_address"):
        resolve_settings(num_processes=2, process_id=0, env={})


def test_single_process_helpers():
    assert maybe_initialize(DistributedSettings()) is False
    assert is_primary()
    mesh = make_mesh()
    assert process_slice(6, mesh) == slice(0, 6)
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    arr = global_batch_from_local(x, mesh, x.shape)
    np.testing.assert_array_equal(arr, x)
    with pytest.raises(ValueError, match=r"expected \(6, 2\)"):
        global_batch_from_local(x[:3], mesh, x.shape)


# Each process loads only its rows of one global batch; the sum over the 4-way sharded global
# array must equal the single-process answer. Process 0 and 1 also write one sharded checkpoint.
_WORKER = textwrap.dedent(
    """
    import json, sys
    from param_decomp_jax.runtime.distributed import (
        global_batch_from_local, is_primary, maybe_initialize, process_slice, resolve_settings)
    maybe_initialize(resolve_settings())  # before anything starts a jax backend
    import jax, jax.numpy as jnp, numpy as np
    from param_decomp_jax.runtime.compile_cache import enable_compile_cache
    if len(sys.argv) > 2:  # one cache dir per process, to see which processes write entries
        enable_compile_cache(f"{sys.argv[2]}/p{jax.process_index()}")
    from param_decomp_jax.runtime.mesh import make_mesh, place, replicated, state_shardings
    from param_decomp_jax.runtime.checkpoint import CheckpointStore
    mesh = make_mesh()
    x = (np.arange(8 * 3, dtype=np.float32).reshape(8, 3) / 7.0) ** 1.5
    rows = process_slice(8, mesh)
    arr = global_batch_from_local(x[rows], mesh, x.shape)
    total = jax.jit(lambda a: jnp.sum(a * a), out_shardings=replicated(mesh))(arr)
    out = {"process": jax.process_index(), "devices": jax.device_count(), "primary": is_primary(),
           "rows": [rows.start, rows.stop], "total": float(total)}
    if len(sys.argv) > 1:
        state = {"step": np.int32(3), "adversaries": {}, "rng": np.array([1, 2], np.uint32),
                 "components": {"s": {"V": np.arange(12, dtype=np.float32).reshape(3, 4),
                                      "U": np.arange(8, dtype=np.float32).reshape(4, 2)}}}
        placed = place(state, state_shardings(state, mesh, shard_components=True, batch_sharded_terms=()))
        out["local_v_shards"] = [list(s.data.shape) for s in placed["components"]["s"]["V"].addressable_shards]
        with CheckpointStore(sys.argv[1]) as store:
            store.save(3, placed)
            store.wait()
    print("RESULT " + json.dumps(out), flush=True)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(n_devices: int, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "JSP_NUM", "JSP_PROC", "JSP_COORD"))
    }
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def _result(stdout: str) -> dict:
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])


def test_two_processes_match_one_process(tmp_path):
    single = subprocess.run(
        [sys.executable, "-c", _WORKER],
        env=_env(4),
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(tmp_path), str(tmp_path / "jax_cache")],
            env=_env(2, JSP_COORDINATOR=f"127.0.0.1:{port}", JSP_NUM_PROCESSES="2", JSP_PROCESS_ID=str(i)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=SUBPROCESS_TIMEOUT_S)
            assert p.returncode == 0, stderr[-3000:]
            outs.append(_result(stdout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    ref = _result(single.stdout)
    assert ref["devices"] == 4 and ref["rows"] == [0, 8]
    assert [o["devices"] for o in outs] == [4, 4]
    assert [o["primary"] for o in outs] == [True, False]
    assert [o["rows"] for o in outs] == [[0, 4], [4, 8]]
    # Same global reduction, same compiler: only reassociation could differ, and here it does not.
    assert [o["total"] for o in outs] == [ref["total"]] * 2
    assert all(o["local_v_shards"] == [[3, 1], [3, 1]] for o in outs)  # C=4 over 4 devices, 2 local
    # jax writes persistent-cache entries from process 0 only; both read.
    assert any((tmp_path / "jax_cache" / "p0").iterdir())
    assert not any((tmp_path / "jax_cache" / "p1").iterdir())

    # The checkpoint both processes wrote restores onto this 1-device process.
    mesh = make_mesh()
    with CheckpointStore(tmp_path, read_only=True) as store:
        meta = store.item_metadata(3)
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta, is_leaf=lambda m: hasattr(m, "shape")
        )
        shardings = state_shardings(abstract, mesh, shard_components=True, batch_sharded_terms=())
        got = store.restore(3, with_shardings(abstract, shardings))
    expected = {
        "step": np.int32(3),
        "adversaries": {},
        "rng": np.array([1, 2], np.uint32),
        "components": {
            "s": {
                "V": np.arange(12, dtype=np.float32).reshape(3, 4),
                "U": np.arange(8, dtype=np.float32).reshape(4, 2),
            }
        },
    }
    assert_bitwise_equal(got, expected)


_CACHE_USER = textwrap.dedent(
    """
    import sys, time
    from param_decomp_jax.runtime.compile_cache import enable_compile_cache
    enable_compile_cache(sys.argv[1])
    import jax, jax.numpy as jnp
    t = time.perf_counter()
    jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((16, 16))).block_until_ready()
    print("COMPILE_S", time.perf_counter() - t)
    """
)


def test_compile_cache_is_written_and_reused(tmp_path):
    cache = tmp_path / "cache"
    seen = []
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "-c", _CACHE_USER, str(cache)],
            env=_env(1),
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT_S,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        seen.append(sorted(p.name for p in cache.iterdir() if p.name.endswith("-cache")))
    assert len([e for e in seen[0] if e.startswith("jit__lambda")]) == 1, seen[0]
    assert seen[1] == seen[0]  # the second process hit every entry instead of adding new ones
