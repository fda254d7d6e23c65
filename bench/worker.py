"""Fresh-process measurements, run by the benches through `bench.common.run_worker`.

    python -m bench.worker compile '{"config": ..., "ppgd": ..., "overrides": [...]}' --cache DIR
        time to lower and compile the step with the persistent compile cache at DIR.
    python -m bench.worker memory '{...}' [--cache DIR]
        measured memory of running the step vs the compiled memory analysis.

Memory method: compile first (from the warm cache when given), allocate the arguments, run one
step, then `gc` + `malloc_trim` and reset the kernel's peak-RSS mark (`/proc/self/clear_refs` 5);
run 3 steps and read VmHWM. `measured_peak` = (VmHWM − RSS before the steps) + bytes of the
arguments (resident before the window), the same quantity the compiled analysis predicts.
The last stdout line is a JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import re
import time
from pathlib import Path
from typing import Any


def _status_kib() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(k + r":\s+(\d+)", text).group(1)) for k in ("VmRSS", "VmHWM")}  # type: ignore[union-attr]


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _tree_bytes(tree: Any) -> int:
    import jax

    return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


def run_compile(spec: dict[str, Any], cache: str) -> dict[str, Any]:
    from param_decomp_jax.runtime.compile_cache import enable_compile_cache

    enable_compile_cache(cache)
    from bench.common import build_experiment, compile_step, load_case

    t0 = time.perf_counter()
    exp = build_experiment(load_case(spec["config"], spec.get("ppgd"), spec.get("overrides", [])))
    build_s = time.perf_counter() - t0
    _, lower_s, compile_s = compile_step(exp)
    return {
        "build_s": build_s,
        "lower_s": lower_s,
        "compile_s": compile_s,
        "cache_files": sum(1 for _ in Path(cache).iterdir()),
    }


def run_memory(spec: dict[str, Any], cache: str | None, steps: int = 3) -> dict[str, Any]:
    if cache:
        from param_decomp_jax.runtime.compile_cache import enable_compile_cache

        enable_compile_cache(cache)
    import jax

    from bench.common import build_experiment, compile_step, concrete_args, load_case, memory_stats

    exp = build_experiment(load_case(spec["config"], spec.get("ppgd"), spec.get("overrides", [])))
    compiled, _, compile_s = compile_step(exp)
    predicted = memory_stats(compiled)
    state, frozen, residual = concrete_args(exp)
    arg_bytes = _tree_bytes((state, frozen, residual))
    state, metrics = compiled(state, frozen, residual)  # first run: one-time runtime allocations
    jax.block_until_ready((state, metrics))
    del metrics
    _trim()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kib()
    for _ in range(steps):
        state, metrics = compiled(state, frozen, residual)
    jax.block_until_ready((state, metrics))
    after = _status_kib()
    delta = (after["VmHWM"] - before["VmRSS"]) * 1024
    return {
        "predicted": predicted,
        "arg_bytes_actual": arg_bytes,
        "measured_exec_bytes": delta,
        "measured_peak": delta + arg_bytes,
        "predicted_exec_bytes": predicted["temp_bytes"]
        + predicted["output_bytes"]
        - predicted["alias_bytes"],
        "rss_before_kib": before["VmRSS"],
        "hwm_kib": after["VmHWM"],
        "compile_s": compile_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["compile", "memory"])
    ap.add_argument("spec", help="JSON: {config, ppgd, overrides}")
    ap.add_argument("--cache", default=None)
    args = ap.parse_args()
    spec = json.loads(args.spec)
    out = run_compile(spec, args.cache) if args.kind == "compile" else run_memory(spec, args.cache)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
