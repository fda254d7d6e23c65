"""The training loop: the composition root's second half. All I/O of a run happens here.

The step is jitted ONCE here, with its shardings declared next to it; host metrics are read one
step late so logging never makes the device wait.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax

from param_decomp_config import ExperimentConfig
from param_decomp_jax.core.step import make_faithfulness_warmup, make_train_step
from param_decomp_jax.eval.in_loop import make_eval_step
from param_decomp_jax.runtime import mesh as mesh_lib
from param_decomp_jax.runtime.build import Experiment, build_experiment
from param_decomp_jax.runtime.checkpoint import CheckpointStore
from param_decomp_jax.runtime.data import BatchProvider, make_batches
from param_decomp_jax.runtime.distributed import any_process
from param_decomp_jax.runtime.provenance import provenance_record
from param_decomp_jax.runtime.run_dir import RunDir, pin_config, run_dir_for
from param_decomp_jax.runtime.sinks import JsonlSink, ProgressBar, Sinks, WandbSink, drop_records_after

# Exit code after a SIGTERM-triggered checkpoint: the SLURM script requeues on it.
REQUEUE_EXIT_CODE = 75


@dataclass
class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it between steps, saves, and leaves."""

    signum: int | None = None
    stopped: bool = False
    previous: dict[int, Any] = field(default_factory=dict)

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread (e.g. under some test runners)
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signum = signum

    def should_stop(self, can_agree: bool) -> bool:
        """Leave the loop now? Sets `stopped`, the decision every process acts on after the loop.

        Processes must leave at the same step (they share collectives), so with several processes
        a signal counts only at steps where all of them call `any_process` (`can_agree`); checking
        every step would make each step wait for the previous one (a host sync).
        """
        if jax.process_count() == 1:
            self.stopped = self.signum is not None
        elif can_agree and any_process(self.signum is not None):
            self.signum = self.signum or signal.SIGTERM  # signalled elsewhere: requeue like it
            self.stopped = True
        return self.stopped

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@dataclass
class RunResult:
    run_dir: RunDir
    final_step: int
    exit_code: int
    summary: dict[str, Any]


def _to_host(metrics: dict[str, jax.Array]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


# Automatic multi-step calls stop at this many steps: a call of a slow toy step (ResidMLP 3L,
# ~0.7 s) then still returns to the host every few seconds for the progress bar and signals.
MAX_AUTO_STEPS_PER_CALL = 10


def steps_per_call(cfg: ExperimentConfig, batches: BatchProvider) -> int:
    """Training steps per jitted call (`runtime.steps_per_call`, 0 = automatic).

    Only providers that make the batch on device can loop on device; every multi-step call ends on
    a log / eval / checkpoint step (the schema checks an explicit value divides those cadences).
    """
    if batches.input_shardings:  # the batch comes from the host, one per step
        return 1
    if cfg.runtime.steps_per_call:
        return cfg.runtime.steps_per_call
    boundary = math.gcd(*cfg.call_boundaries().values())
    return max(k for k in range(1, MAX_AUTO_STEPS_PER_CALL + 1) if boundary % k == 0)


def make_loop_step(
    exp: Experiment,
    step_fn: Callable[..., Any],
    batches: BatchProvider,
    residual_sharding: Any,
    n_steps: int = 1,
) -> Callable[..., Any]:
    """`loop_step(state, frozen, *batches.step_inputs(step))`: the function the loop jits.

    The batch (sampled on device for toys, the token rows for LMs) and the frozen prefix run
    inside the same call as the step: one dispatch per training step, no host work for toy data.
    With `n_steps > 1` (on-device batches only) the call runs that many steps in a device-side
    loop and returns the metrics of the last one: one dispatch per `n_steps` steps.
    """

    def one_step(state: Any, frozen: Any, *step_inputs: jax.Array) -> Any:
        batch = batches.batch_in_step(state["step"], *step_inputs)
        residual = jax.lax.stop_gradient(exp.residual_fn(frozen, batch))
        if residual_sharding is not None:
            residual = jax.lax.with_sharding_constraint(residual, residual_sharding)
        return step_fn(state, frozen, residual)

    if n_steps > 1 and batches.input_shardings:
        raise ValueError("several steps per call need a batch made on device (toy data)")

    def loop_step(state: Any, frozen: Any, *step_inputs: jax.Array) -> Any:
        if n_steps == 1:
            return one_step(state, frozen, *step_inputs)
        # The scan stacks each step's (scalar) metrics; the call returns the last step's.
        state, metrics = jax.lax.scan(lambda s, _: one_step(s, frozen), state, length=n_steps)
        return state, jax.tree.map(lambda m: m[-1], metrics)

    return loop_step


class Trainer:
    def __init__(self, cfg: ExperimentConfig, progress: bool = True, target_cache: Path | None = None):
        assert cfg.run_id is not None
        self.cfg = cfg
        self.run = run_dir_for(cfg)
        self.primary = jax.process_index() == 0
        self.progress = progress and cfg.logging.progress
        self.mesh = mesh_lib.make_mesh()
        mesh_lib.assert_global_batch_divisible(cfg.batch_size, self.mesh)
        # Pretrained toy targets are cached per out_dir; JSP_TARGET_CACHE shares one cache (tests, CI).
        cache = target_cache or Path(os.environ.get("JSP_TARGET_CACHE", Path(cfg.out_dir) / ".target_cache"))
        t0 = time.perf_counter()
        self.exp: Experiment = build_experiment(cfg, target_cache=cache)
        self.build_s = time.perf_counter() - t0
        # Data batches are 2-D for every target: [B, F] features or [B, T] token ids.
        self.batch_sharding = mesh_lib.batch_sharding(self.mesh, 2)
        self.replicated = mesh_lib.replicated(self.mesh)
        self.warmup_faithfulness: float | None = None

    # ---- state -----------------------------------------------------------------------------
    def _shardings(self, abstract_state: Any) -> Any:
        bsc_terms = [t.name or t.type for t in self.exp.spec.ppgd_terms() if t.scope.type == "bsc"]
        return mesh_lib.state_shardings(
            abstract_state,
            self.mesh,
            shard_components=self.cfg.runtime.shard_components,
            batch_sharded_terms=bsc_terms,
        )

    def _initial_state(self, store: CheckpointStore) -> tuple[Any, Any, bool]:
        """(state, shardings, restored). Resume beats provenance beats a fresh start."""
        abstract = jax.eval_shape(self.exp.fresh_state)
        shardings = self._shardings(abstract)
        restored = store.restore_latest_valid(mesh_lib.with_shardings(abstract, shardings))
        if restored is not None:
            return restored[1], shardings, True
        state = jax.jit(self.exp.fresh_state, out_shardings=shardings)()
        if self.cfg.resume_provenance is not None:
            from param_decomp_jax.runtime.provenance import init_from_parent

            state = init_from_parent(self.cfg, state, shardings)
        elif self.cfg.faithfulness_warmup.steps > 0:
            fw = self.cfg.faithfulness_warmup
            warm = make_faithfulness_warmup(self.exp.model, fw.steps, fw.lr, fw.weight_decay)
            comps, loss = jax.jit(warm, out_shardings=(shardings["components"], self.replicated))(
                state["components"], self.exp.frozen
            )
            state = {**state, "components": comps}
            self.warmup_faithfulness = float(loss)
        return state, shardings, False

    # ---- loop ------------------------------------------------------------------------------
    def run_training(self) -> RunResult:
        cfg, exp = self.cfg, self.exp
        pin_config(self.run, cfg, write=False)  # refuse a changed config before touching state
        self.warmup_faithfulness = None
        store = CheckpointStore(self.run.root, keep_last=cfg.checkpoint.keep_last)
        state, shardings, resumed = self._initial_state(store)
        # Pinned only once the state exists: a refused fine-tune (provenance mismatch) leaves no
        # config.yaml behind, so the corrected config can reuse the run id.
        pin_config(self.run, cfg, write=self.primary)
        start = int(jax.device_get(state["step"]))
        if resumed and self.primary:  # the metrics of steps redone after a kill are logged again
            drop_records_after(self.run.metrics, start)
        if not resumed:
            store.save(0, state, force=True)

        frozen = jax.device_put(exp.frozen, self.replicated)
        train_batches = make_batches(cfg, self.batch_sharding)
        eval_bs = cfg.eval.batch_size or cfg.batch_size
        eval_batches = make_batches(cfg, self.batch_sharding, stream=1, batch_size=eval_bs)
        residual_fn = jax.jit(
            lambda f, b: jax.lax.stop_gradient(exp.residual_fn(f, b)),
            out_shardings=self.batch_sharding_like_residual(),
        )

        step_fn = make_train_step(exp.model, exp.ci_fn, exp.spec, exp.optimizers)
        # A resumed run starts on a call boundary of its own config; gcd keeps it one otherwise.
        per_call = math.gcd(steps_per_call(cfg, train_batches), start)
        loop_step = make_loop_step(
            exp, step_fn, train_batches, self.batch_sharding_like_residual(), n_steps=per_call
        )
        # THE jit site of the training step: state donated, data on `dp`, frozen replicated.
        train_step = jax.jit(
            loop_step,
            in_shardings=(shardings, self.replicated, *train_batches.input_shardings),
            out_shardings=(shardings, self.replicated),
            donate_argnums=(0,),
        )
        eval_step = jax.jit(
            make_eval_step(exp.model, exp.ci_fn, exp.spec.use_delta, cfg.eval), out_shardings=self.replicated
        )

        sinks = Sinks(
            JsonlSink(self.run.metrics) if self.primary else None,
            WandbSink(cfg.wandb, self.run.root, cfg.run_id or "", cfg.model_dump(mode="json"))
            if (self.primary and cfg.wandb.enabled)
            else None,
        )
        stop = StopFlag()
        stop.install()
        # runtime.transfer_guard: an implicit host<->device copy in the training call (e.g. a numpy
        # batch) raises instead of silently syncing every step.
        guard = (
            (lambda: jax.transfer_guard("disallow")) if cfg.runtime.transfer_guard else contextlib.nullcontext
        )
        bar = ProgressBar(cfg.steps, start, self.progress)
        pending: tuple[int, dict[str, jax.Array], float] | None = None
        last: dict[str, float] = {}
        compile_s = 0.0
        exit_code = 0
        t_prev = time.perf_counter()
        step = logged_step = start
        try:
            for step in range(start, cfg.steps, per_call):
                step_inputs = train_batches.step_inputs(step)
                t_call = time.perf_counter()
                with guard():
                    state, metrics = train_step(state, frozen, *step_inputs)
                done = step + per_call  # steps finished after this call
                if step == start:
                    jax.block_until_ready(metrics)
                    compile_s = time.perf_counter() - t_call
                    t_prev, logged_step = time.perf_counter(), done  # keep compile out of step time
                if pending is not None:  # read the previous logged step while this one runs
                    last = self._flush(sinks, *pending)
                    pending = None
                if done % cfg.logging.log_every == 0 or done == cfg.steps:
                    # Wall time per step over the interval (dispatch is async; the fetch above syncs).
                    now = time.perf_counter()
                    pending = (done, metrics, (now - t_prev) / max(done - logged_step, 1))
                    t_prev, logged_step = now, done
                bar.update(per_call, last)
                if cfg.eval.eval_every and done % cfg.eval.eval_every == 0 and done < cfg.steps:
                    self._eval(sinks, eval_step, eval_batches, state, frozen, residual_fn, done)
                if cfg.checkpoint.save_every and done % cfg.checkpoint.save_every == 0:
                    if pending is not None:
                        # Write the checkpointed step's metrics first: a resume starts after it and
                        # would never log them again (one sync per checkpoint, not per step).
                        last = self._flush(sinks, *pending)
                        pending = None
                    store.save(done, state)
                if stop.should_stop(done % cfg.logging.log_every == 0 or done == cfg.steps):
                    break
            step = int(jax.device_get(state["step"]))
            if pending is not None:
                last = self._flush(sinks, *pending)
            if stop.stopped and step < cfg.steps:
                store.save(step, state, force=True)
                store.wait()
                exit_code = REQUEUE_EXIT_CODE if stop.signum == signal.SIGTERM else 130
                return RunResult(self.run, step, exit_code, {"interrupted_at": step})
            final_eval = self._eval(sinks, eval_step, eval_batches, state, frozen, residual_fn, step)
            store.save(step, state, force=True)
            store.wait()
            extra = self._final_metrics(state, sinks, step)
            summary = {
                "run_id": cfg.run_id,
                "steps": step,
                "compile_s": compile_s,
                "steps_per_call": per_call,
                "build_s": self.build_s,
                "warmup_faithfulness": self.warmup_faithfulness,
                **last,
                **final_eval,
                **extra,
                "resume_provenance": provenance_record(cfg, self.run),
            }
            if self.primary:
                self.run.summary.write_text(json.dumps(summary, indent=2, default=str))
            return RunResult(self.run, step, exit_code, summary)
        finally:
            bar.close()
            stop.restore()
            sinks.close()
            store.close()

    def batch_sharding_like_residual(self) -> Any:
        return mesh_lib.batch_sharding(self.mesh, len(self.exp.model.leading_axes) + 1)

    def _flush(
        self, sinks: Sinks, step: int, metrics: dict[str, jax.Array], step_s: float
    ) -> dict[str, float]:
        host = _to_host(metrics)
        host["time/step_s"] = step_s
        sinks.log(step, host)
        return host

    def _eval(
        self, sinks, eval_step, eval_batches, state, frozen, residual_fn, step: int
    ) -> dict[str, float]:
        batch = eval_batches.batch(0)
        residual = residual_fn(frozen, batch)
        key = jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed + 17), step)
        # LM batches are token ids: the eval adds next-token CE of every masked output.
        tokens = batch if len(self.exp.model.leading_axes) == 2 else None
        metrics = _to_host(eval_step(state["components"], state["ci_params"], frozen, residual, key, tokens))
        sinks.log(step, metrics)
        return metrics

    def _final_metrics(self, state: Any, sinks: Sinks, step: int) -> dict[str, Any]:
        """Target-specific end-of-run diagnostics (toy identity/dense CI)."""
        if self.cfg.target.type not in ("tms", "resid_mlp"):
            return {}
        from param_decomp_jax.eval.toy_eval import toy_probe_metrics

        metrics = toy_probe_metrics(
            self.exp,
            jax.device_get(state["ci_params"]),
            self.cfg.eval.ci_alive_threshold,
            jax.device_get(state["components"]),
        )
        sinks.log(step, metrics)
        return metrics


def train(cfg: ExperimentConfig, progress: bool = True) -> RunResult:
    return Trainer(cfg, progress=progress).run_training()
