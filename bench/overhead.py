"""Host time per step outside the jitted call, as a fraction of the step, with default cadences.

Two runs of the real `Trainer` (no progress bar; the loop code is untouched, some of its calls
are wrapped by timers):
- run A, default cadences, fewer steps than `eval_every` / `save_every`: `loop_step_ms` is the
  trainer's own `time/step_s` (wall time per step over each logging interval, compile
  excluded), median over intervals: dispatch + data + metrics logging of the loop. Run twice,
  alternating with the pure timing (pure, A, pure, A, pure); medians of each are compared.
- run B, `eval_every` = `save_every` shortened: warm per-call time of the in-loop eval
  (`eval_ms`) and of a checkpoint save INCLUDING its async write (`ckpt_ms`, save + wait: an
  upper bound of what the async save costs), amortised over the DEFAULT cadences.
- `pure_step_ms`: the trainer's own jitted call (`make_loop_step`: on-device toy batch or the
  token batch, frozen prefix, step; `steps_per_call` steps per call for toys, runtime.steps_per_call)
  timed alone in a tight loop (`bench.common.time_steps`), divided by its steps per call;
  `core_step_ms`: the core step alone on a fixed residual (what the batch and prefix add on
  device is `pure - core`, device work, not host overhead); `data_ms`: host time of
  `step_inputs(step)` in run A (`flush_wait_ms`, the metrics fetch, mostly waits for queued steps).
- `overhead_pct` = (loop − pure + eval/eval_every + ckpt/save_every) / pure.

    python -m bench.overhead [--quick]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from bench.common import TARGET_CACHE, build_step, load_case, time_steps, write_table_results

# (config, steps of run A, steps of run B, eval/save cadence of run B).
CASES = [("tms_5-2", 1500, 300, 100), ("resid_mlp_1l", 300, 60, 20), ("stories260k_mlp", 100, 30, 10)]
QUICK_CASES = [("tms_5-2", 1000, 60, 20)]


def _timed(fn: Callable[..., Any], sink: list[float]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        sink.append(time.perf_counter() - t0)
        return out

    return wrapper


def instrumented_run(cfg: Any) -> tuple[dict[str, list[float]], list[float], float]:
    """(per-call host seconds by component, trainer's time/step_s per interval, run wall s)."""
    import param_decomp_jax.runtime.trainer as trainer_mod

    calls: dict[str, list[float]] = collections.defaultdict(list)
    orig_store, orig_batches = trainer_mod.CheckpointStore, trainer_mod.make_batches

    class TimedStore(orig_store):  # type: ignore[misc, valid-type]
        def save(self, *args: Any, **kwargs: Any) -> Any:
            def save_and_wait() -> Any:
                out = super(TimedStore, self).save(*args, **kwargs)
                self.wait()
                return out

            return _timed(save_and_wait, calls["ckpt"])()

    class TimedBatches:
        def __init__(self, inner: Any, key: str):
            self.inner, self.key = inner, key

        def batch(self, step: int) -> Any:
            return _timed(self.inner.batch, calls[self.key])(step)

        def step_inputs(self, step: int) -> Any:
            return _timed(self.inner.step_inputs, calls[self.key])(step)

        def __getattr__(self, name: str) -> Any:  # input_shardings, batch_in_step
            return getattr(self.inner, name)

    def make_batches(*args: Any, **kwargs: Any) -> Any:
        return TimedBatches(orig_batches(*args, **kwargs), "eval_data" if kwargs.get("stream") else "data")

    setattr(trainer_mod, "CheckpointStore", TimedStore)  # noqa: B010 (patching a module for timing)
    setattr(trainer_mod, "make_batches", make_batches)  # noqa: B010
    try:
        tr = trainer_mod.Trainer(cfg, progress=False, target_cache=TARGET_CACHE)
        tr._flush = _timed(tr._flush, calls["flush"])  # type: ignore[method-assign]
        tr._eval = _timed(tr._eval, calls["eval"])  # type: ignore[method-assign]
        t0 = time.perf_counter()
        result = tr.run_training()
        wall = time.perf_counter() - t0
    finally:
        setattr(trainer_mod, "CheckpointStore", orig_store)  # noqa: B010
        setattr(trainer_mod, "make_batches", orig_batches)  # noqa: B010
    records = [json.loads(line) for line in result.run_dir.metrics.read_text().splitlines() if line.strip()]
    intervals = [r["time/step_s"] for r in records if "time/step_s" in r]
    return dict(calls), intervals, wall


class LoopCallBundle:
    """The trainer's jitted call (`make_loop_step`, with the trainer's `steps_per_call`) on one
    device; `step()` runs one call, i.e. `steps_per_call` training steps."""

    def __init__(self, cfg: Any):
        import jax

        from param_decomp_jax.core.step import make_train_step
        from param_decomp_jax.runtime.build import build_experiment
        from param_decomp_jax.runtime.data import make_batches
        from param_decomp_jax.runtime.trainer import make_loop_step, steps_per_call

        exp = build_experiment(cfg, target_cache=TARGET_CACHE)
        self.batches = make_batches(cfg, None)
        self.steps_per_call = steps_per_call(cfg, self.batches)
        step_fn = make_train_step(exp.model, exp.ci_fn, exp.spec, exp.optimizers)
        loop = make_loop_step(exp, step_fn, self.batches, None, n_steps=self.steps_per_call)
        self.call = jax.jit(loop, donate_argnums=(0,))
        self.state, self.frozen, self.i = jax.jit(exp.fresh_state)(), exp.frozen, 0

    def step(self) -> Any:
        self.state, metrics = self.call(self.state, self.frozen, *self.batches.step_inputs(self.i))
        self.i += self.steps_per_call
        return metrics

    def time_per_step(self) -> float:
        return time_steps(self, warmup=3, budget_s=3.0)["step_s"] / self.steps_per_call


def measure(
    config: str, steps_a: int, steps_b: int, every_b: int, out_dir: str, repeats: int = 2
) -> dict[str, Any]:
    default = load_case(config)
    core = build_step(load_case(config, None, [f"steps={steps_a}"]))
    core_step = time_steps(core, warmup=3, budget_s=3.0)["step_s"]
    del core
    bundle = LoopCallBundle(load_case(config, None, [f"steps={steps_a}"]))
    # The machine is shared: alternate pure timing and run A (pure, A, pure, A, pure) and compare
    # medians, so a load change during one measurement does not decide the result.
    pures = [bundle.time_per_step()]
    loops: list[float] = []
    for rep in range(repeats):
        cfg_a = load_case(config, None, [f"steps={steps_a}", f"out_dir={out_dir}/{config}-a{rep}"])
        calls, intervals, wall = instrumented_run(cfg_a)
        loops.append(statistics.median(intervals[1:] if len(intervals) > 2 else intervals))
        pures.append(bundle.time_per_step())
    pure, loop = statistics.median(pures), statistics.median(loops)
    cfg_b = load_case(
        config,
        None,
        [
            f"steps={steps_b}",
            f"eval.eval_every={every_b}",
            f"checkpoint.save_every={every_b}",
            f"out_dir={out_dir}/{config}-b",
        ],
    )
    calls_b, _, _ = instrumented_run(cfg_b)
    calls.update({k: v for k, v in calls_b.items() if k in ("eval", "ckpt")})
    per_call = bundle.steps_per_call
    del bundle

    def warm(key: str) -> float:  # drop the first call (compiles / sets up), median of the rest
        xs = calls.get(key, [])
        return statistics.median(xs[1:] if len(xs) > 1 else xs) if xs else 0.0

    ev, ck = warm("eval"), warm("ckpt")
    ev_every, ck_every = default.eval.eval_every or 0, default.checkpoint.save_every or 0
    amort = (ev / ev_every if ev_every else 0.0) + (ck / ck_every if ck_every else 0.0)
    return {
        "case": config,
        "steps_run": steps_a,
        "steps_per_call": per_call,
        "pure_step_ms": pure * 1e3,
        "pure_runs_ms": [p * 1e3 for p in pures],
        "loop_runs_ms": [x * 1e3 for x in loops],
        "loop_step_ms": loop * 1e3,
        "loop_overhead_pct": 100 * (loop - pure) / pure,
        "data_ms": warm("data") * 1e3,
        "core_step_ms": core_step * 1e3,
        "flush_wait_ms": warm("flush") * 1e3,  # device_get of queued steps: mostly waiting
        "log_every": default.logging.log_every,
        "eval_ms": ev * 1e3,
        "eval_every": ev_every,
        "first_eval_ms": calls.get("eval", [0.0])[0] * 1e3,
        "ckpt_ms": ck * 1e3,
        "save_every": ck_every,
        "amortised_eval_ckpt_ms": amort * 1e3,
        "overhead_pct": 100 * (loop - pure + amort) / pure,
        "run_wall_s": wall,
        "n_intervals": len(intervals),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as out_dir:
        for config, steps_a, steps_b, every_b in QUICK_CASES if args.quick else CASES:
            rows.append(measure(config, steps_a, steps_b, every_b, out_dir))
            print(
                f"  {config}: loop {rows[-1]['loop_step_ms']:.2f} ms vs pure {rows[-1]['pure_step_ms']:.2f} ms, "
                f"overhead {rows[-1]['overhead_pct']:.1f}%",
                flush=True,
            )
    return write_table_results(
        "overhead",
        rows,
        [
            "case",
            "pure_step_ms",
            "loop_step_ms",
            "loop_overhead_pct",
            "core_step_ms",
            "eval_ms",
            "eval_every",
            "ckpt_ms",
            "save_every",
            "overhead_pct",
        ],
        "Host overhead per step (default cadences)",
        args.quick,
    )


if __name__ == "__main__":
    main()
