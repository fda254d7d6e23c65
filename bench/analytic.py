"""Analytic matmul FLOPs of one training step, derived from the config (cross-check for XLA's count).

Counts every dot (2·M·N·K) the step's math implies, before XLA's CSE/DCE, in the order of SPEC §5:
the clean forward; the CI network forward + backward; faithfulness (V@U, forward + backward);
each recon forward (plan entry × draw) with its backward w.r.t. components and masks; PPGD warmup
ascents and fresh-PGD attacks (backward w.r.t. sources only, components detached). Elementwise
work (squashing, RNG, softmax, optimizer updates) is not counted.

Backward rule for a dot: a gradient w.r.t. an operand costs one forward's FLOPs; an activation
operand needs one only when a decomposed site earlier in the same forward feeds it ("upstream").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from param_decomp_config.losses import AllRouting, PersistentPGDReconLoss, PGDReconLoss, StochasticReconLoss


@dataclass(frozen=True)
class Op:
    """One dot of the target's forward, in forward order: a linear through `site_fn` (maybe a site),
    or another dot (`flops` forward, `act_operands` 1 = act @ frozen weight, 2 = act @ act)."""

    name: str
    d_in: int = 0
    d_out: int = 0
    flops: float = 0.0
    act_operands: int = 0

    @property
    def is_linear(self) -> bool:
        return self.flops == 0.0


def target_ops(exp: Any) -> tuple[list[Op], int]:
    """(ops in forward order, positions N) for the experiment's target and batch shape."""
    cfg, model = exp.cfg, exp.model
    lead = exp.leading_shape()
    N = 1
    for d in lead:
        N *= d
    weights = model.site_weights(exp.frozen)
    t = cfg.target.type
    if t == "tms":
        order = [n for n in ("linear1", "hidden", "linear2") if n in weights]
        return [Op(n, *weights[n].shape) for n in order], N
    if t == "resid_mlp":
        F, D = cfg.target.n_features, cfg.target.d_embed
        ops = [Op("embed", flops=2.0 * N * F * D, act_operands=1)]
        for i in range(cfg.target.n_layers):
            ops += [Op(n, *weights[n].shape) for n in (f"layers.{i}.mlp_in", f"layers.{i}.mlp_out")]
        return ops + [Op("unembed", flops=2.0 * N * D * F, act_operands=1)], N
    if t == "llama":
        from param_decomp_jax.targets.llama import layer_site_names, load_llama_arch

        arch = load_llama_arch(cfg.target.checkpoint_dir)
        B, T = lead
        start = min(int(s.name.split(".")[1]) for s in model.sites)
        attn = 4.0 * B * arch.num_attention_heads * T * T * arch.head_dim  # QK^T and PV
        ops = []
        for i in range(start, arch.num_hidden_layers):
            for n in layer_site_names(i):
                ops.append(Op(n, *weights[n].shape))
                if n.endswith("v_proj"):
                    ops.append(Op(f"layers.{i}.attention", flops=attn, act_operands=2))
        lm_head = 2.0 * N * arch.hidden_size * arch.vocab_size
        return ops + [Op("lm_head", flops=lm_head, act_operands=1)], N
    raise ValueError(f"no analytic model for target {t!r}")


def _forward_flops(
    ops: list[Op],
    N: int,
    Cs: dict[str, int],
    live: set[str],
    delta: bool,
    routed: bool,
    grads: str,
    seen: set[tuple[str, str]] | None = None,
) -> tuple[float, float]:
    """(forward, backward) FLOPs of one forward. grads: "none", "params" (V, U, masks), "sources".

    With `seen` (shared across the step's forwards), values XLA's CSE computes once per step are
    counted once: everything before the first live site (it equals the clean forward), `x @ V` of
    a site fed by clean activations, and `V @ U` of each site.
    """
    fwd = bwd = 0.0
    upstream = False

    def once(key: tuple[str, str], flops: float) -> float:
        if seen is None:
            return flops
        if key in seen:
            return 0.0
        seen.add(key)
        return flops

    for i, op in enumerate(ops):
        dense = 2.0 * N * op.d_in * op.d_out if op.is_linear else op.flops
        if not upstream and op.name not in live:  # still on the clean path
            fwd += once(("clean", str(i)), dense)
            continue
        if not op.is_linear:
            fwd += op.flops
            bwd += op.flops * op.act_operands if grads != "none" else 0.0
            continue
        if op.name not in live:
            fwd += dense
            bwd += dense if grads != "none" else 0.0
            continue
        a, b, C = op.d_in, op.d_out, Cs[op.name]
        xv, iu, vu = 2.0 * N * a * C, 2.0 * N * C * b, 2.0 * a * C * b
        fwd += (once(("xv", op.name), xv) if not upstream else xv) + iu
        fwd += (once(("vu", op.name), vu) + dense) if delta else 0.0
        fwd += (once(("clean", str(i)), dense) if not upstream else dense) if routed else 0.0
        dx = 1.0 if upstream else 0.0  # gradient w.r.t. the site input
        if grads == "params":
            bwd += xv * (1 + dx) + 2 * iu + ((2 * vu + dense * (1 + dx)) if delta else 0.0)
            bwd += dense * dx if routed else 0.0
        elif grads == "sources":
            bwd += xv * dx + iu + (dense * dx if delta else 0.0) + (dense * dx if routed else 0.0)
        upstream = True
    return fwd, bwd


def _ci_flops(exp: Any, N: int, seen: set[tuple[str, str]] | None) -> float:
    """CI network forward + backward (params; V too for networks reading x @ V)."""
    ci, sites = exp.cfg.ci_fn, exp.model.sites

    def mlp(dims: list[int]) -> float:
        total = 0.0
        for i in range(len(dims) - 1):
            f = 2.0 * N * dims[i] * dims[i + 1]
            total += f * (2 if i == 0 else 3)  # first layer: input detached, only dW
        return total

    if ci.type == "layerwise_mlp":
        return sum(mlp([s.d_in, *ci.hidden_dims, s.C]) for s in sites)
    if ci.type == "shared_mlp":
        return mlp([sum(s.d_in for s in sites), *ci.hidden_dims, sum(s.C for s in sites)])
    if ci.type == "component_mlp":
        total = 0.0
        for s in sites:
            xv = 2.0 * N * s.d_in * s.C  # clean x @ V (shared with recon forwards) and its dV
            total += xv + (0.0 if seen is not None and ("xv", s.name) in seen else xv)
            if seen is not None:
                seen.add(("xv", s.name))
            dims = [1, *ci.hidden_dims, 1]
            total += sum(2.0 * N * s.C * dims[i] * dims[i + 1] * 3 for i in range(len(dims) - 1))
        return total
    if ci.type == "shared_transformer":
        B, T = exp.leading_shape()
        D, H = ci.d_model, ci.mlp_hidden
        total = 2.0 * N * sum(s.d_in for s in sites) * D * 2
        per_block = 8.0 * N * D * D + 4.0 * B * T * T * D + 4.0 * N * D * H
        total += ci.n_blocks * per_block * 3
        return total + 2.0 * N * D * sum(s.C for s in sites) * 3
    raise ValueError(f"no analytic model for CI fn {ci.type!r}")


def step_flops(exp: Any, reuse: bool = True) -> dict[str, float]:
    """Analytic matmul FLOPs of one step, by part; `reuse` counts CSE-shared values once."""
    from param_decomp_jax.core.recon import resolve_plan

    ops, N = target_ops(exp)
    spec, model = exp.spec, exp.model
    Cs = {s.name: s.C for s in model.sites}
    names = model.site_names
    seen: set[tuple[str, str]] | None = set() if reuse else None
    parts: dict[str, float] = {}
    parts["clean_forward"] = _forward_flops(ops, N, Cs, set(), False, False, "none", seen)[0]
    parts["ci_fn"] = _ci_flops(exp, N, seen)
    faith = 0.0
    for s in model.sites:
        vu = 2.0 * s.d_in * s.C * s.d_out
        faith += 2 * vu + (0.0 if seen is not None and ("vu", s.name) in seen else vu)
        if seen is not None:
            seen.add(("vu", s.name))
    parts["faithfulness"] = faith
    recon = adversary = 0.0
    for term in spec.recon_terms:
        routed = not isinstance(term.routing, AllRouting)
        delta = spec.use_delta and type(term).__name__ not in ("CIMaskedReconLoss", "UnmaskedReconLoss")
        draws = term.n_draws if isinstance(term, StochasticReconLoss) else 1
        if isinstance(term, PersistentPGDReconLoss):  # warmup ascents: all sites live, routed everywhere
            for _ in range(term.n_warmup):
                f, b = _forward_flops(ops, N, Cs, set(names), delta, False, "sources", seen)
                adversary += f + b
        for live in resolve_plan(term.plan, names):
            if isinstance(term, PGDReconLoss):
                f, b = _forward_flops(ops, N, Cs, set(live), delta, routed, "sources", seen)
                adversary += term.n_steps * (f + b)
            for _ in range(draws):
                f, b = _forward_flops(ops, N, Cs, set(live), delta, routed, "params", seen)
                recon += f + b
    parts["recon_forwards"] = recon
    parts["adversary_ascents"] = adversary
    parts["total"] = sum(parts.values())
    return parts


def count_forwards(exp: Any) -> int:
    """Masked forwards per step (recon plan entries × draws, warmup ascents, PGD steps)."""
    from param_decomp_jax.core.recon import resolve_plan

    n = 0
    for term in exp.spec.recon_terms:
        entries = len(resolve_plan(term.plan, exp.model.site_names))
        draws = term.n_draws if isinstance(term, StochasticReconLoss) else 1
        n += entries * draws
        if isinstance(term, PGDReconLoss):
            n += entries * term.n_steps
        if isinstance(term, PersistentPGDReconLoss):
            n += term.n_warmup
    return n
