"""Slow eval of one checkpoint: in-loop metrics averaged over K eval batches, plus diagnostics too
costly for the training loop — CI distributions per component, per-site hidden-activation recon,
attention-pattern KL (LMs with decomposed q/k), probe-CI and UV figures (toys).

Writes `<run>/slow_eval/<step>.json` and `<run>/figures/<name>_<step>.png`; logs both to wandb
when the run has wandb enabled. Runs on whatever devices this process has (see `open_run`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array
from tqdm import tqdm

from param_decomp_jax.core.ci_fn import ci_logits
from param_decomp_jax.core.model import Components, DecomposedModel, PyTree
from param_decomp_jax.core.recon import channel_counts
from param_decomp_jax.core.squash import lower_leaky_hard
from param_decomp_jax.eval import figures as fig_lib
from param_decomp_jax.eval.in_loop import eval_masks, make_eval_step
from param_decomp_jax.eval.open_run import OpenedRun, open_run
from param_decomp_jax.eval.toy_metrics import dense_block_sizes

HIST_BINS = 50
HIDDEN_KINDS = ("ci_masked", "stochastic")  # mask families of the hidden-activation / attention recon
_KEY_OFFSET = 29  # slow-eval randomness: its own stream, independent of training and in-loop eval


@dataclass(frozen=True)
class SlowEvalResult:
    step: int
    json_path: Path
    metrics: dict[str, float]
    figures: dict[str, Path]


def _attention_layers(model: DecomposedModel) -> list[int]:
    """Layers whose q_proj or k_proj is a decomposed site (the attention pattern can change)."""
    from param_decomp_jax.targets.llama import site_layer

    return sorted({site_layer(n) for n in model.site_names if n.endswith((".q_proj", ".k_proj"))})


def _attention_kl(arch: Any, clean: dict[str, Array], masked: dict[str, Array], layer: int) -> Array:
    """KL(clean pattern ‖ masked pattern) summed over keys, mean over batch, heads and queries."""
    from param_decomp_jax.targets.llama import attention_probs

    q, k = f"layers.{layer}.self_attn.q_proj", f"layers.{layer}.self_attn.k_proj"
    p = attention_probs(arch, clean[q], clean[k])
    m = attention_probs(arch, masked[q], masked[k])
    # Masked-out (future) keys have p = 0 and contribute 0; the floor only guards fp32 underflow.
    kl = jax.scipy.special.xlogy(p, p) - jax.scipy.special.xlogy(p, jnp.maximum(m, 1e-30))
    return jnp.mean(jnp.sum(kl, axis=-1))


def make_batch_stats(
    model: DecomposedModel,
    ci_fn: Any,
    use_delta: bool,
    alive_threshold: float,
    rounding_threshold: float,
    arch: Any = None,
):
    """`stats(components, ci_params, frozen, residual, key) -> small per-batch summaries` (jit once).

    Everything is reduced on device (histograms, per-component sums), so host transfer is tiny
    even for LM batches.
    """
    names = model.site_names
    channels = channel_counts(model, use_delta)
    attn_layers = _attention_layers(model) if arch is not None else []
    edges = jnp.linspace(0.0, 1.0, HIST_BINS + 1)

    def stats(components: Components, ci_params: PyTree, frozen: PyTree, residual: Array, key: Array):
        inputs = model.site_inputs(frozen, residual)
        ci = {k: lower_leaky_hard(v) for k, v in ci_logits(ci_fn, ci_params, inputs, components).items()}
        out: dict[str, Any] = {"hist": {}, "sum_ci": {}, "n_active": {}, "max_ci": {}}
        for n in names:
            flat = ci[n].reshape(-1, ci[n].shape[-1])
            out["hist"][n] = jnp.histogram(flat, bins=edges)[0]
            out["sum_ci"][n] = jnp.sum(flat, axis=0)
            out["n_active"][n] = jnp.sum(flat > alive_threshold, axis=0)
            out["max_ci"][n] = jnp.max(flat, axis=0)
        out["n_positions"] = jnp.asarray(next(iter(ci.values())).shape[:-1]).prod()
        # Clean per-site outputs: nothing live, every linear on its frozen path.
        _, clean = model.masked_output_and_site_outputs(frozen, components, residual, {}, None, None, ())
        masks = eval_masks(ci, key, names, channels, use_delta, rounding_threshold)
        out["hidden_mse"], out["hidden_rel_mse"], out["attn_kl"] = {}, {}, {}
        for kind in HIDDEN_KINDS:
            _, masked = model.masked_output_and_site_outputs(
                frozen, components, residual, *masks[kind], None, names
            )
            for n in names:
                c, m = clean[n].astype(jnp.float32), masked[n].astype(jnp.float32)
                mse = jnp.mean(jnp.square(m - c))
                out["hidden_mse"][f"{kind}/{n}"] = mse
                out["hidden_rel_mse"][f"{kind}/{n}"] = mse / (jnp.mean(jnp.square(c)) + 1e-12)
            for layer in attn_layers:
                out["attn_kl"][f"{kind}/layers.{layer}"] = _attention_kl(arch, clean, masked, layer)
        return out

    return stats


class _Accumulator:
    """Host-side sums over batches (float64)."""

    def __init__(self) -> None:
        self.n = 0
        self.scalars: dict[str, float] = {}
        self.sums: dict[str, dict[str, np.ndarray]] = {}
        self.max_ci: dict[str, np.ndarray] = {}
        self.positions = 0

    def add(self, metrics: dict[str, Any], stats: dict[str, Any]) -> None:
        self.n += 1
        flat = {
            **metrics,
            **{f"slow_eval/hidden_mse/{k}": v for k, v in stats["hidden_mse"].items()},
            **{f"slow_eval/hidden_rel_mse/{k}": v for k, v in stats["hidden_rel_mse"].items()},
            **{f"slow_eval/attn_kl/{k}": v for k, v in stats["attn_kl"].items()},
        }
        for k, v in flat.items():
            self.scalars[k] = self.scalars.get(k, 0.0) + float(v)
        for group in ("hist", "sum_ci", "n_active"):
            for site, v in stats[group].items():
                acc = self.sums.setdefault(group, {})
                acc[site] = acc.get(site, 0) + np.asarray(v, np.float64)
        for site, v in stats["max_ci"].items():
            self.max_ci[site] = np.maximum(self.max_ci.get(site, -np.inf), np.asarray(v))
        self.positions += int(stats["n_positions"])

    def means(self) -> dict[str, float]:
        return {k: v / self.n for k, v in self.scalars.items()}


def _toy_extras(r: OpenedRun, threshold: float) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    from param_decomp_jax.eval.toy_eval import probe_ci, probe_metrics

    probe = probe_ci(r.exp, r.ci_params, r.components)  # once: metrics and figures share it
    return probe_metrics(probe, threshold, r.cfg.eval.dense_ci_blocks), probe


def run_slow_eval(
    run_dir: Path | str,
    step: int | None = None,
    n_batches: int = 8,
    figures: bool = True,
    progress: bool = True,
    eval_overrides: Sequence[str] = (),
) -> SlowEvalResult:
    if n_batches < 1:
        raise ValueError(f"--n-batches must be >= 1, got {n_batches}")
    r = open_run(run_dir, step, eval_overrides=eval_overrides)
    cfg, model = r.cfg, r.model
    thr = cfg.eval.ci_alive_threshold
    arch = None
    if cfg.target.type == "llama" and _attention_layers(model):
        from param_decomp_jax.targets.llama import load_llama_arch

        arch = load_llama_arch(cfg.target.checkpoint_dir)  # type: ignore[union-attr]
    eval_step = jax.jit(make_eval_step(model, r.ci_fn, cfg.use_delta_component, cfg.eval))
    stats_fn = jax.jit(
        make_batch_stats(model, r.ci_fn, cfg.use_delta_component, thr, cfg.eval.rounding_threshold, arch)
    )
    batches = r.eval_batches()
    acc = _Accumulator()
    base_key = jax.random.PRNGKey(cfg.seed + _KEY_OFFSET)
    bar = tqdm(
        range(n_batches), desc=f"slow eval step {r.step}", disable=not (progress and sys.stderr.isatty())
    )
    for i in bar:
        batch = batches.batch(i)
        residual = r.residual(batch)
        key = jax.random.fold_in(base_key, i)
        tokens = batch if r.is_lm else None
        metrics = eval_step(r.components, r.ci_params, r.frozen, residual, key, tokens)
        stats = stats_fn(r.components, r.ci_params, r.frozen, residual, jax.random.fold_in(key, 1))
        acc.add(jax.device_get(metrics), jax.device_get(stats))
    bar.close()

    metrics = acc.means()
    n_pos = max(acc.positions, 1)
    # Canonical site order (pytree transfers sort dict keys alphabetically).
    mean_ci = {s: acc.sums["sum_ci"][s] / n_pos for s in model.site_names}
    density = {s: acc.sums["n_active"][s] / n_pos for s in model.site_names}
    for s in model.site_names:
        metrics[f"slow_eval/alive/{s}"] = float((acc.max_ci[s] > thr).sum())
    probe: dict[str, np.ndarray] = {}
    if cfg.target.type in ("tms", "resid_mlp"):
        toy_metrics, probe = _toy_extras(r, thr)
        metrics.update(toy_metrics)

    figs: dict[str, Path] = {}
    if figures:
        figs = _write_figures(r, acc, mean_ci, density, metrics, probe, thr)
    record = {
        "run_id": cfg.run_id,
        "step": r.step,
        "n_batches": n_batches,
        "n_positions": acc.positions,
        "metrics": metrics,
        "per_component": {
            s: {
                "mean_ci": mean_ci[s].tolist(),
                "density": density[s].tolist(),
                "max_ci": acc.max_ci[s].tolist(),
            }
            for s in model.site_names
        },
        "figures": {k: str(p.relative_to(r.run.root)) for k, p in figs.items()},
    }
    r.run.slow_eval.mkdir(parents=True, exist_ok=True)
    json_path = r.run.slow_eval / f"{r.step}.json"
    json_path.write_text(json.dumps(record, indent=1))
    if cfg.wandb.enabled:
        _log_wandb(r, metrics, figs)
    return SlowEvalResult(r.step, json_path, metrics, figs)


def _write_figures(
    r: OpenedRun,
    acc: _Accumulator,
    mean_ci: dict[str, np.ndarray],
    density: dict[str, np.ndarray],
    metrics: dict[str, float],
    probe: dict[str, np.ndarray],
    thr: float,
) -> dict[str, Path]:
    d, step = r.run.figures, r.step
    edges = np.linspace(0.0, 1.0, HIST_BINS + 1)
    figs = {
        "ci_histograms": fig_lib.ci_histograms(
            {s: acc.sums["hist"][s] for s in r.site_names}, edges, d / f"ci_histograms_{step}.png", step
        ),
        "mean_ci_per_component": fig_lib.sorted_per_component(
            mean_ci, d / f"mean_ci_per_component_{step}.png", step, "Mean CI per component", "mean CI"
        ),
        "component_density": fig_lib.sorted_per_component(
            density,
            d / f"component_density_{step}.png",
            step,
            f"Component activation density (fraction of positions with CI > {thr:g})",
            "density",
            floor=1.0 / max(acc.positions, 1),
        ),
    }

    def by_kind(prefix: str, items: list[str]) -> dict[str, dict[str, float]]:
        """`{mask kind: {item: value}}` from `<prefix><kind>/<item>` metrics, items in the given order."""
        return {
            kind: {i: metrics[f"{prefix}{kind}/{i}"] for i in items if f"{prefix}{kind}/{i}" in metrics}
            for kind in HIDDEN_KINDS
        }

    figs["hidden_recon"] = fig_lib.grouped_bars(
        by_kind("slow_eval/hidden_mse/", list(r.site_names)),
        d / f"hidden_recon_{step}.png",
        step,
        "Hidden-activation recon:\nMSE of masked vs clean site outputs",
        "MSE",
        "site",
    )
    attn = by_kind(
        "slow_eval/attn_kl/", [f"layers.{i}" for i in _attention_layers(r.model)] if r.is_lm else []
    )
    if any(attn.values()):
        figs["attention_kl"] = fig_lib.grouped_bars(
            attn,
            d / f"attention_kl_{step}.png",
            step,
            "Attention-pattern KL(clean ‖ masked)",
            "KL (nats, mean over heads and queries)",
            "attention layer",
        )
    if probe:
        blocks = dense_block_sizes(r.cfg.eval.dense_ci_blocks, list(probe))
        site_orders = fig_lib.site_probe_orders(probe, thr, blocks)
        figs["permuted_ci"] = fig_lib.permuted_ci(
            probe, thr, d / f"permuted_ci_{step}.png", step, blocks, site_orders
        )
        orders = {s: order for s, (order, _) in site_orders.items()}
        comps = {
            s: {k: np.asarray(v) for k, v in vu.items()} for s, vu in jax.device_get(r.components).items()
        }
        figs["uv_matrices"] = fig_lib.uv_matrices(comps, orders, d / f"uv_matrices_{step}.png", step)
    return figs


def _log_wandb(r: OpenedRun, metrics: dict[str, float], figs: dict[str, Path]) -> None:
    from param_decomp_jax.runtime.sinks import WandbSink

    sink = WandbSink(r.cfg.wandb, r.run.root, r.cfg.run_id or r.run.root.name, r.cfg.model_dump(mode="json"))
    try:
        sink.log(r.step, metrics)
        sink.log_images(r.step, {f"figures/{k}": p for k, p in figs.items()})
    finally:
        sink.close()
