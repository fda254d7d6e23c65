"""Slow-eval figures (matplotlib, Agg backend: no display needed). Pure functions of host arrays;
each returns the PNG path it wrote. Per-site figures are one grid of small panels, so a 35-site LM
decomposition is still one file per figure kind.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: slow eval runs on headless machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402

from param_decomp_jax.eval.toy_metrics import columns_by_ci_mass  # noqa: E402

_PANEL_W, _PANEL_H = 3.6, 2.8


def _grid(n: int, max_cols: int = 5, panel: tuple[float, float] = (_PANEL_W, _PANEL_H)):
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(panel[0] * cols, panel[1] * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _save(fig: plt.Figure, path: Path, title: str) -> Path:
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ci_histograms(counts: Mapping[str, np.ndarray], edges: np.ndarray, path: Path, step: int) -> Path:
    """Per site: histogram of every CI value (all positions × components), log count axis."""
    fig, axes = _grid(len(counts))
    width = np.diff(edges)
    for ax, (site, c) in zip(axes, counts.items(), strict=True):
        ax.bar(edges[:-1], np.maximum(c, 0.5), width=width, align="edge", color="tab:blue")
        ax.set_yscale("log")
        ax.set_xlim(edges[0], edges[-1])
        frac_zero = c[0] / max(c.sum(), 1)
        ax.set_title(f"{site}\n{frac_zero:.0%} in first bin", fontsize=9)
        ax.set_xlabel("causal importance")
        ax.set_ylabel("count (log)")
    return _save(fig, path, f"CI value histograms (step {step})")


def sorted_per_component(
    values: Mapping[str, np.ndarray], path: Path, step: int, title: str, ylabel: str, floor: float = 1e-6
) -> Path:
    """Per site: one value per component, sorted descending, log y (mean CI, activation density)."""
    fig, axes = _grid(len(values))
    for ax, (site, v) in zip(axes, values.items(), strict=True):
        s = np.sort(np.asarray(v))[::-1]
        ax.plot(np.arange(len(s)), np.maximum(s, floor), marker=".", ms=3, lw=1)
        ax.set_yscale("log")
        ax.set_ylim(floor / 2, max(1.0, float(s.max()) * 1.5))
        ax.set_title(f"{site}\n{int((s > 0).sum())}/{len(s)} components > 0", fontsize=9)
        ax.set_xlabel("component (sorted)")
        ax.set_ylabel(f"{ylabel} (0 drawn at {floor:.1e})", fontsize=8)
    return _save(fig, path, f"{title} (step {step})")


def probe_permutation(ci_FxC: np.ndarray, threshold: float) -> tuple[np.ndarray, int]:
    """Column order for a probe-CI matrix: the component matched to each feature (Hungarian,
    maximising CI) in feature order, then the other components alive on some probe, by max CI.
    Returns (order, number of matched columns)."""
    rows, cols = linear_sum_assignment(ci_FxC, maximize=True)
    matched = cols[np.argsort(rows)]
    rest = np.setdiff1d(np.arange(ci_FxC.shape[1]), matched)
    rest = rest[ci_FxC[:, rest].max(axis=0) > threshold] if len(rest) else rest
    rest = rest[np.argsort(-ci_FxC[:, rest].max(axis=0))] if len(rest) else rest
    return np.concatenate([matched, rest]).astype(int), len(matched)


def dense_block_order(ci_FxC: np.ndarray, threshold: float, k: int) -> tuple[np.ndarray, int]:
    """Column order for a site expected to be one block of k components: by CI mass over the probes
    (the block the dense-CI error scores comes first), then any other component alive on a probe.
    Returns (order, k)."""
    by_mass = columns_by_ci_mass(ci_FxC)  # the same block the dense-CI error scores
    keep = np.zeros(len(by_mass), dtype=bool)
    keep[:k] = True
    keep[k:] = ci_FxC[:, by_mass[k:]].max(axis=0) > threshold
    return by_mass[keep].astype(int), k


def site_probe_orders(
    probe_ci: Mapping[str, np.ndarray], threshold: float, dense_blocks: Mapping[str, int]
) -> dict[str, tuple[np.ndarray, int]]:
    """Per site (order, split): the dense-block order for the sites in `dense_blocks`, else the
    feature-matched order; `split` is where the red line goes (block size / matched count)."""
    return {
        site: dense_block_order(ci, threshold, dense_blocks[site])
        if site in dense_blocks
        else probe_permutation(ci, threshold)
        for site, ci in probe_ci.items()
    }


def permuted_ci(
    probe_ci: Mapping[str, np.ndarray],
    threshold: float,
    path: Path,
    step: int,
    dense_blocks: Mapping[str, int] | None = None,
    orders: Mapping[str, tuple[np.ndarray, int]] | None = None,
) -> Path:
    """Per site: CI on one-feature probes (rows) for components permuted to match features (columns).
    A recovered toy decomposition shows an identity block and nothing else; a site in `dense_blocks`
    (site -> k) is ordered by CI mass instead and should show k busy columns and nothing else."""
    blocks = dict(dense_blocks or {})
    # `orders`: the caller's `site_probe_orders(...)` when it needs them too (UV plots).
    orders = orders if orders is not None else site_probe_orders(probe_ci, threshold, blocks)
    fig, axes = _grid(len(probe_ci), max_cols=3, panel=(4.8, 3.6))
    fig.subplots_adjust(wspace=0.3)
    im = None
    for ax, (site, ci) in zip(axes, probe_ci.items(), strict=True):
        order, split = orders[site]
        im = ax.imshow(ci[:, order], vmin=0.0, vmax=1.0, cmap="Blues", aspect="auto", interpolation="nearest")
        if len(order) <= 40:  # beyond that the ids are unreadable
            ax.set_xticks(range(len(order)), [str(c) for c in order], fontsize=7)
        if ci.shape[0] <= 40:
            ax.set_yticks(range(ci.shape[0]))
        if len(order) > split:
            ax.axvline(split - 0.5, color="tab:red", lw=1)
        alive = int((ci.max(axis=0) > threshold).sum())
        kind = f"block of {blocks[site]}, by CI mass" if site in blocks else "matched to features"
        ax.set_title(f"{site}\n{alive}/{ci.shape[1]} alive on probes ({kind})", fontsize=9)
        ax.set_xlabel("component id (permuted)")
        ax.set_ylabel("probe: feature on")
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label="causal importance")
    fig.suptitle(f"CI on one-feature probes, components permuted (step {step})", y=1.03)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def uv_matrices(
    components: Mapping[str, Mapping[str, np.ndarray]],
    orders: Mapping[str, Sequence[int] | np.ndarray],
    path: Path,
    step: int,
) -> Path:
    """Per site: V [d_in, C'] and Uᵀ [d_out, C'] of the shown components (same column order as the
    permuted CI plot), diverging colour scale centred at 0."""
    sites = list(components)
    fig, axes = plt.subplots(len(sites), 2, figsize=(9, 2.6 * len(sites)), squeeze=False)
    for row, site in zip(axes, sites, strict=True):
        order = np.asarray(orders[site], dtype=int)
        for ax, (label, mat) in zip(
            row, (("V", components[site]["V"][:, order]), ("Uᵀ", components[site]["U"][order].T)), strict=True
        ):
            lim = float(np.abs(mat).max()) or 1.0
            im = ax.imshow(mat, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
            ax.set_xticks(range(len(order)), [str(c) for c in order], fontsize=7)
            ax.set_title(f"{site}: {label}", fontsize=9)
            ax.set_xlabel("component id")
            ax.set_yticks(range(mat.shape[0]))
            ax.set_ylabel("input dim" if label == "V" else "output dim")
            fig.colorbar(im, ax=ax, shrink=0.8)
    return _save(fig, path, f"Rank-one components: V (read-in) and Uᵀ (write-out) (step {step})")


def grouped_bars(
    values: Mapping[str, Mapping[str, float]], path: Path, step: int, title: str, ylabel: str, xlabel: str
) -> Path:
    """`values[series][item]` as grouped bars over items (e.g. MSE per site for each mask kind),
    each bar labelled with its value. Log scale only when the values span > 1.5 decades: log bars
    over a narrow range exaggerate differences."""
    series = list(values)
    items = list(dict.fromkeys(i for s in series for i in values[s]))
    x = np.arange(len(items))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6.5, 0.55 * len(items) * max(len(series), 1) + 2), 4.5))
    finite = [v for s in series for v in values[s].values() if np.isfinite(v) and v > 0]
    log = bool(finite) and max(finite) / min(finite) > 10**1.5
    for k, s in enumerate(series):
        ys = [values[s].get(i, np.nan) for i in items]
        bars = ax.bar(x + (k - (len(series) - 1) / 2) * width, ys, width=width, label=s)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    rotate = len(items) > 4
    ax.set_xticks(x, items, rotation=45 if rotate else 0, ha="right" if rotate else "center", fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel + (" (log)" if log else ""))
    ax.set_xlabel(xlabel)
    ax.legend(title="mask")
    return _save(fig, path, f"{title} (step {step})")
