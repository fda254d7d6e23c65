"""Read a compiled step: dot FLOPs from its HLO text, and a `jax.profiler` trace summarised by op.

The CPU trace records one event per executed HLO instruction (thunk) on the XLA thread-pool
lines; while loops nest their body's events, so time is counted exclusive of children.
"""

from __future__ import annotations

import collections
import glob
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_DEF = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = (\w+)\[([\d,]*)\]\S*\s+([\w\-]+)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_TUPLE_DEF = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = \(.*\)\S*\s+(while|call|conditional)\((.*)$")
_OPNAME = re.compile(r'op_name="([^"]*)"')


@dataclass
class Instr:
    name: str
    dtype: str
    dims: tuple[int, ...]
    opcode: str
    rest: str
    computation: str


def parse_hlo(text: str) -> dict[str, Instr]:
    """Instruction name -> (shape, opcode, rest of line, enclosing computation); names are module-unique.

    Insertion order follows the text, where a computation comes after everything it calls.
    """
    out: dict[str, Instr] = {}
    comp = ""
    for line in text.splitlines():
        m = _COMP.match(line)  # computation headers are the only unindented lines ending in "{"
        if m:
            comp = m.group(1)
            continue
        m = _DEF.match(line)
        if m:
            dims = tuple(int(d) for d in m.group(3).split(",") if d)
            out[m.group(1)] = Instr(m.group(1), m.group(2), dims, m.group(4), m.group(5), comp)
        elif (w := _TUPLE_DEF.match(line)) and w.group(2) in ("while", "call", "conditional"):
            out[w.group(1)] = Instr(w.group(1), "tuple", (), w.group(2), w.group(3), comp)
    return out


def execution_counts(instrs: dict[str, Instr]) -> dict[str, float]:
    """Computation -> times it runs per step: while bodies × their known trip count (1 if unknown)."""
    comps: list[str] = []
    for ins in instrs.values():
        if not comps or comps[-1] != ins.computation:
            comps.append(ins.computation)
    counts: dict[str, float] = collections.defaultdict(float)
    counts[comps[-1]] = 1.0  # ENTRY is printed last
    for comp in reversed(comps):
        for ins in (i for i in instrs.values() if i.computation == comp):
            trips = 1.0
            if ins.opcode == "while":
                m = re.search(r'known_trip_count":\{"n":"(\d+)"', ins.rest)
                trips = float(m.group(1)) if m else 1.0
            for key in ("body", "calls", "condition") if ins.opcode != "call" else ("to_apply",):
                for callee in re.findall(key + r"=%([\w.\-]+)", ins.rest):
                    counts[callee] += counts[comp] * trips
    return counts


def _dims_attr(rest: str, key: str) -> list[int]:
    m = re.search(key + r"=\{([\d,]*)\}", rest)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def dot_flops(instrs: dict[str, Instr]) -> dict[str, float]:
    """Σ 2·|out|·|contracted| over every dot: `static` counts loop bodies once (like XLA's
    cost analysis), `executed` multiplies them by their trip counts."""
    counts = execution_counts(instrs)
    static = executed = 0.0
    n = 0
    for ins in instrs.values():
        if ins.opcode != "dot":
            continue
        operands = re.findall(r"%([\w.\-]+)", ins.rest.split(")")[0])
        lhs = instrs.get(operands[0]) if operands else None
        if lhs is None:
            continue
        k = 1
        for d in _dims_attr(ins.rest, "lhs_contracting_dims"):
            k *= lhs.dims[d]
        out = 1
        for d in ins.dims:
            out *= d
        static += 2.0 * out * k
        executed += 2.0 * out * k * counts.get(ins.computation, 1.0)
        n += 1
    return {"static": static, "executed": executed, "n_dots": float(n)}


def _computations_with_dot(instrs: dict[str, Instr]) -> set[str]:
    return {i.computation for i in instrs.values() if i.opcode == "dot"}


def categorize(name: str, instrs: dict[str, Instr], dot_comps: set[str]) -> str:
    ins = instrs.get(name)
    if ins is None:
        return "other"
    m = _OPNAME.search(ins.rest)
    op_name = m.group(1) if m else ""
    if ins.opcode == "dot":
        return "dot"
    if ins.opcode == "fusion":
        called = re.search(r"calls=%([\w.\-]+)", ins.rest)
        if called and called.group(1) in dot_comps:
            return "dot"
        if "reduce" in name:
            return "reduce fusion"
        return "elementwise fusion"
    if ins.opcode == "while":
        if any(k in op_name for k in ("random", "uniform", "threefry", "bernoulli", "randint")):
            return "RNG (threefry while loop)"
        return "while loop"
    if ins.opcode in ("copy", "transpose"):
        return "copy/transpose"
    if ins.opcode in ("sort",):
        return "sort"
    if ins.opcode in ("reduce", "reduce-window"):
        return "reduce"
    return ins.opcode


def trace_self_times(run: Callable[[], Any]) -> tuple[dict[str, float], float]:
    """Run `run()` under `jax.profiler.trace`; (exclusive ns per HLO instruction name, wall ns)."""
    import time

    import jax
    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        with jax.profiler.trace(d):
            jax.block_until_ready(run())
        wall = (time.perf_counter() - t0) * 1e9
        files = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
        data = ProfileData.from_file(files[0])
        self_ns: dict[str, float] = collections.defaultdict(float)
        for plane in data.planes:
            if not plane.name.startswith("/host:CPU"):
                continue
            for line in plane.lines:
                if not line.name.startswith("tf_XLA"):
                    continue
                evs = sorted(
                    ((e.start_ns, e.duration_ns, e.name) for e in line.events), key=lambda e: (e[0], -e[1])
                )
                _accumulate_exclusive(evs, self_ns)
    return dict(self_ns), wall


def _accumulate_exclusive(evs: list[tuple[float, float, str]], acc: dict[str, float]) -> None:
    """Exclusive time of nested intervals on one thread line (children subtract from parents)."""
    stack: list[list[Any]] = []  # [end, name, self_ns]

    def pop() -> None:
        end, name, own = stack.pop()
        if not name.startswith("ThunkExecutor"):
            acc[name] += own

    for start, dur, name in evs:
        while stack and stack[-1][0] <= start:
            pop()
        if stack:
            stack[-1][2] -= min(dur, stack[-1][0] - start)
        stack.append([start + dur, name, float(dur)])
    while stack:
        pop()


def summarise_profile(self_ns: dict[str, float], hlo_text: str, top: int = 12) -> dict[str, Any]:
    """Top instructions and categories by exclusive thread time (summed over the thread pool)."""
    instrs = parse_hlo(hlo_text)
    dot_comps = _computations_with_dot(instrs)
    total = sum(self_ns.values()) or 1.0
    by_cat: dict[str, float] = collections.defaultdict(float)
    for name, ns in self_ns.items():
        by_cat[categorize(name, instrs, dot_comps)] += ns
    rows = []
    for name, ns in sorted(self_ns.items(), key=lambda kv: -kv[1])[:top]:
        ins = instrs.get(name)
        op_name = ""
        if ins is not None and (m := _OPNAME.search(ins.rest)):
            op_name = m.group(1)
        rows.append(
            {
                "op": name,
                "category": categorize(name, instrs, dot_comps),
                "share": ns / total,
                "ms": ns / 1e6,
                "shape": f"{ins.dtype}{list(ins.dims)}" if ins else "",
                "jax_op": op_name[-80:],
            }
        )
    by_op: dict[str, float] = collections.defaultdict(float)
    for name, ns in self_ns.items():
        by_op[jax_op_key(instrs.get(name), categorize(name, instrs, dot_comps))] += ns
    jax_ops = [
        {"jax_op": k, "share": ns / total, "ms": ns / 1e6}
        for k, ns in sorted(by_op.items(), key=lambda kv: -kv[1])
    ]
    cats = [
        {"category": c, "share": ns / total, "ms": ns / 1e6}
        for c, ns in sorted(by_cat.items(), key=lambda kv: -kv[1])
    ]
    return {"top_ops": rows, "by_category": cats, "by_jax_op": jax_ops[:top], "thread_ms": total / 1e6}


def jax_op_key(ins: Instr | None, category: str) -> str:
    """`<phase>: <jax primitive>` from the HLO metadata, phase = forward / backward / PPGD warmup loop."""
    if ins is None:
        return "runtime (not an HLO op)"
    m = _OPNAME.search(ins.rest)
    op_name = m.group(1) if m else ""
    phase = "backward" if "transpose(" in op_name else "forward"
    if "while/body" in op_name:
        phase = f"warmup loop {phase}"
    prim = op_name.rsplit("/", 1)[-1] if op_name else ins.opcode
    return f"{phase}: {prim} ({category})"
