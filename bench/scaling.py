"""Step time and peak memory as C, live sites, seq_len and batch grow; fitted log-log slopes.

Toy sweeps start from ResidMLP 3L at batch 512 (C 500, 6 sites); LM sweeps from stories260K MLP
sites (15 sites, C 64, batch 8, seq 64, its PPGD term included). The LM sites sweep uses the
`all_sites` plan for the stochastic term so that only the number of live sites changes (chunk
plans would also change the number of forwards). Per point: compiled memory analysis (predicted
peak = args + outputs − donated + temps), steady-state step time, and (full mode) the measured
peak of a fresh subprocess (`bench.worker memory`) -> `predicted / measured`.

The slope is the least-squares fit of log(y) on log(x); 1.0 = linear. A fixed cost (the frozen
model, attention, the CI transformer) pulls the slope below 1, so a linear fit's marginal cost
`b` in y = a + b·x and the share of the intercept at the largest x are reported too.

    python -m bench.scaling [--quick] [--no-measure-memory]
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import math
import shutil
import tempfile
import time
from typing import Any

from bench.common import (
    RESULTS_DIR,
    build_step,
    load_case,
    memory_stats,
    mib,
    print_table,
    run_worker,
    time_steps,
    write_results,
)

TOY = "resid_mlp_3l"
TOY_BASE = ["batch_size=512"]
LM = "stories260k_mlp"
ALL_SITES_PLAN = "losses.2.plan={type: all_sites}"


def _toy_sites(n: int) -> list[str]:
    names = [f"layers.{i}.{k}" for i in range(3) for k in ("mlp_in", "mlp_out")][:n]
    return ["sites=[" + ", ".join(f"{{name: '{s}', C: 500}}" for s in names) + "]"]


def _lm_sites(n_layers: int) -> list[str]:
    pats = [f"layers.{i}.mlp.*" for i in range(n_layers)]
    return ["sites=[" + ", ".join(f"{{name: '{p}', C: 64}}" for p in pats) + "]", ALL_SITES_PLAN]


def _lm_c(c: int) -> list[str]:
    return [f"sites.{i}.C={c}" for i in range(3)]


def sweeps(quick: bool) -> list[dict[str, Any]]:
    """Each sweep: name, x label, points [(x, config, overrides)]."""
    if quick:
        return [
            {
                "sweep": "toy C",
                "x": "C",
                "points": [
                    (c, TOY, ["batch_size=128", f"sites.0.C={c}", f"sites.1.C={c}"]) for c in (125, 250)
                ],
            },
            {
                "sweep": "LM C",
                "x": "C",
                "points": [(c, LM, ["batch_size=2", "data.seq_len=32", *_lm_c(c)]) for c in (32, 64)],
            },
        ]
    return [
        {
            "sweep": "toy C",
            "x": "C",
            "points": [
                (c, TOY, [*TOY_BASE, f"sites.0.C={c}", f"sites.1.C={c}"]) for c in (125, 250, 500, 1000)
            ],
        },
        {
            "sweep": "toy live sites",
            "x": "sites",
            "points": [(n, TOY, [*TOY_BASE, *_toy_sites(n)]) for n in (1, 2, 4, 6)],
        },
        {
            "sweep": "toy batch",
            "x": "batch",
            "points": [(b, TOY, [f"batch_size={b}"]) for b in (256, 512, 1024, 2048)],
        },
        {"sweep": "LM C", "x": "C", "points": [(c, LM, _lm_c(c)) for c in (32, 64, 128, 256, 512)]},
        {"sweep": "LM live sites", "x": "sites", "points": [(3 * n, LM, _lm_sites(n)) for n in (1, 2, 3, 5)]},
        {
            "sweep": "LM seq_len",
            "x": "seq_len",
            "points": [(t, LM, [f"data.seq_len={t}"]) for t in (32, 64, 128, 256)],
        },
        {"sweep": "LM batch", "x": "batch", "points": [(b, LM, [f"batch_size={b}"]) for b in (4, 8, 16, 32)]},
    ]


def loglog_slope(xs: list[float], ys: list[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    var = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / var if var else float("nan")


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(intercept a, slope b) of y = a + b·x."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else float("nan")
    return my - b * mx, b


def r_squared(xs: list[float], ys: list[float], a: float, b: float) -> float:
    my = sum(ys) / len(ys)
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True))
    return 1 - ss_res / ss_tot if ss_tot else float("nan")


def fit_sweep(name: str, x_label: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Log-log slope, linear-fit marginal cost, fixed share and linear R² of time and memory."""
    xs = [float(r["x"]) for r in rows]
    fit: dict[str, Any] = {"sweep": name, "x": x_label, "range": f"{int(xs[0])}..{int(xs[-1])}"}
    for metric, label in (("step_ms", "time"), ("predicted_peak_mib", "mem")):
        ys = [r[metric] for r in rows]
        a, b = linear_fit(xs, ys)
        fit[f"{label}_slope"] = loglog_slope(xs, ys)
        fit[f"{label}_marginal"] = b
        fit[f"{label}_fixed_share"] = a / ys[-1] if ys[-1] else float("nan")
        fit[f"{label}_linear_r2"] = r_squared(xs, ys, a, b)
    return fit


def measure_point(
    x: int,
    config: str,
    overrides: list[str],
    budget_s: float,
    measure_mem: bool,
    cache: str,
    cached: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    cfg = load_case(config, None, overrides)
    key = cfg.model_dump_json()
    if key in cached:  # the same config point in another sweep (the base point)
        return {**cached[key], "x": x}
    bundle = build_step(cfg)
    mem = memory_stats(bundle.compiled)
    t = time_steps(bundle, warmup=2, budget_s=budget_s)
    row: dict[str, Any] = {
        "x": x,
        "overrides": overrides,
        "step_ms": t["step_s"] * 1e3,
        "compile_s": bundle.compile_s,
        "predicted_peak_mib": mib(mem["predicted_peak"]),
        "temp_mib": mib(mem["temp_bytes"]),
        "argument_mib": mib(mem["argument_bytes"]),
    }
    del bundle
    gc.collect()
    if measure_mem:
        res = run_worker(["memory", _spec(config, overrides), "--cache", cache])
        row["measured_peak_mib"] = mib(res["measured_peak"])
        row["predicted_over_measured"] = res["predicted"]["predicted_peak"] / max(res["measured_peak"], 1)
    cached[key] = row
    return row


def _spec(config: str, overrides: list[str]) -> str:
    return json.dumps({"config": config, "ppgd": None, "overrides": overrides})


def report(results: list[dict[str, Any]], quick: bool) -> dict[str, Any]:
    """Fits, tables and the memory-ratio summary of measured sweeps."""
    fits = [fit_sweep(sw["sweep"], sw["x"], sw["points"]) for sw in results]
    tables = [
        print_table(
            [{"sweep": s["sweep"], **r} for s in results for r in s["points"]],
            [
                "sweep",
                "x",
                "step_ms",
                "predicted_peak_mib",
                "temp_mib",
                "measured_peak_mib",
                "predicted_over_measured",
            ],
            "Scaling points",
        ),
        print_table(
            fits,
            [
                "sweep",
                "x",
                "range",
                "time_slope",
                "time_marginal",
                "time_fixed_share",
                "mem_slope",
                "mem_marginal",
                "mem_fixed_share",
                "time_linear_r2",
                "mem_linear_r2",
            ],
            "Fitted slopes (log-log; marginal = b in y = a + b x, ms or MiB per unit; fixed = a / y_max)",
        ),
    ]
    measured = [r for s in results for r in s["points"] if "predicted_over_measured" in r]

    def ratio_range(rows: list[dict[str, Any]]) -> dict[str, float] | None:
        xs = [r["predicted_over_measured"] for r in rows]
        return {"min": min(xs), "max": max(xs), "n": len(xs)} if xs else None

    payload = {
        "quick": quick,
        "sweeps": results,
        "fits": fits,
        "tables": tables,
        "memory_ratio": ratio_range(measured),
        # Below ~100 MiB the runtime's own allocations (YNNPACK fusion scratch, per-thread malloc
        # arenas: a few to ~12 MiB, not in the compiled analysis) dominate the comparison.
        "memory_ratio_large": ratio_range([r for r in measured if r["predicted_peak_mib"] >= 100]),
    }
    return payload


def refit() -> dict[str, Any]:
    """Recompute fits and tables of the stored full run (no new measurement; machine info kept)."""
    path = RESULTS_DIR / "scaling.json"
    stored = json.loads(path.read_text())
    payload = {**stored, **report(stored["sweeps"], stored.get("quick", False))}
    payload["refit_time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    return payload


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--no-measure-memory", action="store_true", help="skip the fresh-process peak measurement"
    )
    ap.add_argument("--refit", action="store_true", help="recompute fits of bench/results/scaling.json")
    args = ap.parse_args(argv)
    if args.refit:
        return refit()
    cache = tempfile.mkdtemp(prefix="bench-scaling-cache-")
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
    from param_decomp_jax.runtime.compile_cache import enable_compile_cache

    enable_compile_cache(cache)  # the memory subprocess then loads the step instead of recompiling
    measure_mem = not args.no_measure_memory
    results: list[dict[str, Any]] = []
    cached: dict[str, dict[str, Any]] = {}
    for sw in sweeps(args.quick):
        rows = []
        for i, (x, config, ov) in enumerate(sw["points"]):
            mem_here = measure_mem and (not args.quick or i == 0)
            rows.append(measure_point(x, config, ov, 0.5 if args.quick else 2.0, mem_here, cache, cached))
            print(
                f"  {sw['sweep']} {sw['x']}={x}: {rows[-1]['step_ms']:.1f} ms, "
                f"{rows[-1]['predicted_peak_mib']:.1f} MiB predicted",
                flush=True,
            )
        results.append({**sw, "points": rows})
    payload = report(results, args.quick)
    write_results("scaling", payload, quick=args.quick)
    return payload


if __name__ == "__main__":
    main()
