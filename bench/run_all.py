"""Run every bench (each in a fresh process) and print one combined table of the headline numbers.

python -m bench.run_all [--quick] [--only throughput,flops]     (`make bench` runs the full pass)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from bench.common import REPO_ROOT, RESULTS_DIR, print_table, write_results

BENCHES = ["throughput", "flops", "scaling", "compile", "overhead"]


def _load(name: str, quick: bool) -> dict[str, Any] | None:
    path = (RESULTS_DIR / "quick" if quick else RESULTS_DIR) / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def headline(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """(bench, metric, value) rows from each bench's JSON."""
    rows: list[dict[str, Any]] = []

    def add(bench: str, metric: str, value: Any) -> None:
        rows.append({"bench": bench, "metric": metric, "value": value})

    if tp := results.get("throughput"):
        for r in tp["rows"]:
            add(
                "throughput",
                f"{r['case']} steps/s ({r['unit']}/s)",
                f"{r['steps_per_s']:.3g} ({r['items_per_s']:.3g})",
            )
    if fl := results.get("flops"):
        add("flops", "matmul peak fp32 GFLOP/s", round(fl["peak"]["gflops"], 1))
        ratios = [r["analytic_over_hlo"] for r in fl["rows"]]
        add("flops", "analytic / HLO dot FLOPs (range)", f"{min(ratios):.3f}..{max(ratios):.3f}")
        for r in fl["rows"]:
            add("flops", f"{r['case']} % of matmul peak", round(r["pct_of_peak"], 1))
        prof = fl["rows"][-1].get("profile")
        if prof:
            cats = ", ".join(f"{c['category']} {100 * c['share']:.0f}%" for c in prof["by_category"][:3])
            add("flops", f"{fl['rows'][-1]['case']} thread time", cats)
    if sc := results.get("scaling"):
        for f in sc["fits"]:
            add(
                "scaling",
                f"{f['sweep']} slope time / memory",
                f"{f['time_slope']:.2f} / {f['mem_slope']:.2f}",
            )
        for key, label in (("memory_ratio", "all points"), ("memory_ratio_large", "points >= 100 MiB")):
            if m := sc.get(key):
                add(
                    "scaling",
                    f"predicted / measured peak memory, {label} (n={m['n']})",
                    f"{m['min']:.3f}..{m['max']:.3f}",
                )
    if co := results.get("compile"):
        for r in co["rows"]:
            add(
                "compile",
                f"{r['case']} cached/cold compile (with lowering)",
                f"{r['compile_ratio']:.3f} ({r['total_ratio']:.3f})",
            )
    if ov := results.get("overhead"):
        for r in ov["rows"]:
            add("overhead", f"{r['case']} host overhead % of step", round(r["overhead_pct"], 1))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a fast pass (small cases, short windows)")
    ap.add_argument("--only", default="", help="comma-separated subset of " + ",".join(BENCHES))
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or BENCHES
    failed, durations = [], {}
    for name in names:
        print(f"== bench.{name}{' --quick' if args.quick else ''}", flush=True)
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", f"bench.{name}", *(["--quick"] if args.quick else [])]
        rc = subprocess.run(cmd, cwd=REPO_ROOT, env=os.environ.copy()).returncode
        durations[name] = time.perf_counter() - t0
        if rc != 0:
            failed.append(name)
    results = {n: r for n in BENCHES if (r := _load(n, args.quick)) is not None}
    table = print_table(headline(results), ["bench", "metric", "value"], "Benchmark summary")
    write_results(
        "summary",
        {"quick": args.quick, "table": table, "durations_s": durations, "failed": failed},
        quick=args.quick,
    )
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
