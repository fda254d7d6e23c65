"""FLOPs per step (XLA cost analysis, HLO dots, analytic count), achieved FLOP/s, % of matmul peak.

- `cost_flops`: `compiled.cost_analysis()["flops"]` (all ops; while-loop bodies counted ONCE).
- `hlo_dot_flops`: Σ 2·M·N·K over the optimized HLO's dots, loop bodies × known trip counts.
- `analytic_flops`: `bench.analytic.step_flops` from the config (CSE-shared values counted once);
  `analytic/hlo` is the cross-check ratio. `naive` counts every forward's matmuls in full.
- `peak`: best fp32 GFLOP/s of a jitted square `jnp.dot` measured in THIS process (same threads).
- The compute-bound LM cases (all sites, C = 512, seq 256, of stories260K (d_model 64) and of a
  random-init Llama of the same family at d_model 512, `bench.wide_llama`) are also profiled with
  `jax.profiler`; top ops by exclusive thread time, by instruction and by category.

    python -m bench.flops [--quick] [--no-profile]
"""

from __future__ import annotations

import argparse
import gc
from functools import partial
from typing import Any

from bench import analytic, hlo
from bench.common import (
    StepBundle,
    build_step,
    cost_flops,
    is_lm,
    load_case,
    matmul_peak,
    memory_stats,
    mib,
    print_table,
    time_steps,
    write_results,
)

# (label, config, ppgd, overrides); ppgd None keeps the config's own losses.
CASES: list[tuple[str, str, bool | None, list[str]]] = [
    ("tms_5-2", "tms_5-2", None, []),
    ("tms_40-10", "tms_40-10", None, []),
    ("resid_mlp_1l", "resid_mlp_1l", None, []),
    ("resid_mlp_3l", "resid_mlp_3l", None, []),
    ("stories260k_mlp", "stories260k_mlp", None, []),
    ("stories260k_all", "stories260k_all", None, []),
]
# The compute-bound LM cases, each profiled: stories260K as the issue names it (d_model 64), and
# the same architecture at d_model 512 (`bench.wide_llama`, random weights), where the component
# matmuls have an inner dimension large enough to outweigh the elementwise mask traffic.
LM_C512_T256 = ["sites.0.C=512", "sites.1.C=512", "data.seq_len=256"]
COMPUTE_BOUND: list[tuple[str, str, bool | None, list[str]]] = [
    ("stories260k_all C512 T256", "stories260k_all", None, LM_C512_T256),
    (
        "llama d512 2L all C512 T256 B4",
        "stories260k_all",
        None,
        [*LM_C512_T256, "batch_size=4", "target.checkpoint_dir=<wide>"],
    ),
]
QUICK_CASES: list[tuple[str, str, bool | None, list[str]]] = [("tms_40-10", "tms_40-10", None, [])]
QUICK_COMPUTE_BOUND: list[tuple[str, str, bool | None, list[str]]] = [
    (
        "stories260k_mlp C256 B2 T64",
        "stories260k_mlp",
        None,
        ["sites.0.C=256", "sites.1.C=256", "sites.2.C=256", "batch_size=2"],
    ),
]


def _resolve(overrides: list[str]) -> list[str]:
    """`<wide>` stands for the folder of the random wide Llama (written on first use)."""
    if not any("<wide>" in o for o in overrides):
        return overrides
    from bench.wide_llama import write_random_llama

    wide = str(write_random_llama())
    return [o.replace("<wide>", wide) for o in overrides]


def _two_steps(bundle: StepBundle) -> Any:
    bundle.step()
    return bundle.step()


def measure(
    label: str,
    config: str,
    ppgd: bool | None,
    overrides: list[str],
    peak_gflops: float,
    budget_s: float,
    profile: bool,
) -> dict[str, Any]:
    cfg = load_case(config, ppgd, _resolve(overrides))
    bundle = build_step(cfg)
    text = bundle.compiled.as_text()
    instrs = hlo.parse_hlo(text)
    dots = hlo.dot_flops(instrs)
    cost = cost_flops(bundle.compiled)
    ana = analytic.step_flops(bundle.exp)
    naive = analytic.step_flops(bundle.exp, reuse=False)["total"]
    mem = memory_stats(bundle.compiled)
    timing = time_steps(bundle, warmup=1 if is_lm(config) else 5, budget_s=budget_s)
    step_s = timing["step_s"]
    row: dict[str, Any] = {
        "case": label,
        "overrides": overrides,
        "step_ms": step_s * 1e3,
        "cost_gflop": cost["flops"] / 1e9,
        "hlo_dot_gflop": dots["executed"] / 1e9,
        "hlo_dot_gflop_loops_once": dots["static"] / 1e9,
        "analytic_gflop": ana["total"] / 1e9,
        "analytic_naive_gflop": naive / 1e9,
        "analytic_over_hlo": ana["total"] / max(dots["executed"], 1.0),
        "cost_over_hlo_dots": cost["flops"] / max(dots["static"], 1.0),
        "analytic_parts_gflop": {k: v / 1e9 for k, v in ana.items()},
        "gbytes_accessed": cost["bytes accessed"] / 1e9,
        "dot_gflops_per_s": dots["executed"] / step_s / 1e9,
        "cost_gflops_per_s": cost["flops"] / step_s / 1e9,
        "arith_intensity": cost["flops"] / max(cost["bytes accessed"], 1.0),
        "predicted_peak_mib": mib(mem["predicted_peak"]),
    }
    row["pct_of_peak"] = 100 * row["dot_gflops_per_s"] / peak_gflops
    if profile:
        self_ns, wall_ns = hlo.trace_self_times(partial(_two_steps, bundle))
        summary = hlo.summarise_profile(self_ns, text)
        summary["wall_ms_2_steps"] = wall_ns / 1e6
        row["profile"] = summary
    del bundle
    gc.collect()
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--bound-only", action="store_true", help="only the compute-bound LM cases (+ profiles)")
    args = ap.parse_args(argv)
    peak_before = matmul_peak(reps=3 if args.quick else 7)
    print(f"  matmul peak (fp32, this process): {peak_before['gflops']:.1f} GFLOP/s", flush=True)
    cases = [] if args.bound_only else QUICK_CASES if args.quick else CASES
    bound = QUICK_COMPUTE_BOUND if args.quick else COMPUTE_BOUND
    rows = []
    for label, config, ppgd, ov in cases:
        rows.append(
            measure(label, config, ppgd, ov, peak_before["gflops"], 0.5 if args.quick else 3.0, False)
        )
        print(
            f"  {label}: {rows[-1]['dot_gflops_per_s']:.2f} GFLOP/s ({rows[-1]['pct_of_peak']:.1f}% of peak)",
            flush=True,
        )
    n_bound = len(bound)
    for case in bound:
        rows.append(measure(*case, peak_before["gflops"], 1.0 if args.quick else 8.0, not args.no_profile))
        print(f"  {case[0]}: {rows[-1]['dot_gflops_per_s']:.2f} GFLOP/s", flush=True)
    peak_after = matmul_peak(reps=3 if args.quick else 7)
    peak = max(peak_before["gflops"], peak_after["gflops"])
    for r in rows:  # against the better of the two peak measurements (the machine is shared)
        r["pct_of_peak"] = 100 * r["dot_gflops_per_s"] / peak
    table = print_table(
        rows,
        [
            "case",
            "step_ms",
            "cost_gflop",
            "hlo_dot_gflop",
            "analytic_gflop",
            "analytic_over_hlo",
            "gbytes_accessed",
            "dot_gflops_per_s",
            "pct_of_peak",
            "predicted_peak_mib",
        ],
        f"FLOPs per step and efficiency (matmul peak {peak:.1f} GFLOP/s fp32)",
    )
    prof_tables = []
    for row in rows[-n_bound:]:
        prof = row.get("profile")
        if not prof:
            continue
        prof_tables.append(
            print_table(
                prof["by_category"],
                ["category", "share", "ms"],
                f"{row['case']}: thread time by op category (2 steps)",
            )
        )
        prof_tables.append(
            print_table(
                prof["by_jax_op"],
                ["jax_op", "share", "ms"],
                f"{row['case']}: thread time by phase and JAX primitive (top)",
            )
        )
        prof_tables.append(
            print_table(
                prof["top_ops"],
                ["op", "category", "share", "ms", "shape", "jax_op"],
                f"{row['case']}: top ops by exclusive thread time",
            )
        )
    payload = {
        "quick": args.quick,
        "peak": {"before": peak_before, "after": peak_after, "gflops": peak},
        "rows": rows,
        "table": table,
        "profile_tables": prof_tables,
    }
    write_results("flops_bound" if args.bound_only else "flops", payload, quick=args.quick)
    return payload


if __name__ == "__main__":
    main()
