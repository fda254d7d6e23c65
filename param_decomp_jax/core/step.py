"""The train state and ONE fused training step (SPEC §6), plus the faithfulness warmup.

`make_train_step` returns a pure `step(state, frozen, residual) -> (state, metrics)`; the caller
jits it once with its shardings (see `runtime/trainer.py`). The CI network runs once per step
(`jax.vjp`), its output feeds the PPGD warmup detached and the main loss with gradients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array

from param_decomp_config.experiment import ExperimentConfig
from param_decomp_config.losses import (
    CIMaskedReconLoss,
    FaithfulnessLoss,
    ImportanceMinimalityLoss,
    PersistentPGDReconLoss,
    PGDReconLoss,
    StochasticReconLoss,
    UnmaskedReconLoss,
    term_name,
)
from param_decomp_jax.core import adversary as adv_lib
from param_decomp_jax.core.ci_fn import CIFn, ci_logits
from param_decomp_jax.core.losses import annealed_p, faithfulness_loss, importance_minimality_loss
from param_decomp_jax.core.model import Components, DecomposedModel, PyTree
from param_decomp_jax.core.recon import (
    SourceFn,
    channel_counts,
    constant_source_fn,
    masks_from_sources,
    plan_recon_loss,
    resolve_plan,
    sample_routes,
    stochastic_sources,
)
from param_decomp_jax.core.schedules import make_adamw
from param_decomp_jax.core.squash import lower_leaky_hard, squash_pair

TrainState = dict[str, Any]
ReconTerm = (
    StochasticReconLoss | CIMaskedReconLoss | UnmaskedReconLoss | PersistentPGDReconLoss | PGDReconLoss
)


@dataclass(frozen=True)
class LossSpec:
    """Everything static about the loss: coefficients, plans and the schedule horizon."""

    total_steps: int
    use_delta: bool
    faithfulness_coeff: float
    importance: ImportanceMinimalityLoss | None
    recon_terms: tuple[ReconTerm, ...]
    ci_l0_threshold: float = 0.0
    alive_threshold: float = 0.1

    @staticmethod
    def from_config(cfg: ExperimentConfig) -> LossSpec:
        faith = [t for t in cfg.losses if isinstance(t, FaithfulnessLoss)]
        imp = [t for t in cfg.losses if isinstance(t, ImportanceMinimalityLoss)]
        return LossSpec(
            total_steps=cfg.steps,
            use_delta=cfg.use_delta_component,
            faithfulness_coeff=faith[0].coeff if faith else 0.0,
            importance=imp[0] if imp else None,
            recon_terms=tuple(cfg.recon_terms()),
            alive_threshold=cfg.eval.ci_alive_threshold,
        )

    def ppgd_terms(self) -> tuple[PersistentPGDReconLoss, ...]:
        return tuple(t for t in self.recon_terms if isinstance(t, PersistentPGDReconLoss))


@dataclass(frozen=True)
class Optimizers:
    components: optax.GradientTransformation
    ci_fn: optax.GradientTransformation

    @staticmethod
    def from_config(cfg: ExperimentConfig) -> Optimizers:
        return Optimizers(
            make_adamw(cfg.components_optimizer, cfg.steps), make_adamw(cfg.ci_optimizer, cfg.steps)
        )


def init_train_state(
    key: Array,
    model: DecomposedModel,
    components: Components,
    ci_params: PyTree,
    optimizers: Optimizers,
    spec: LossSpec,
    leading_shape: tuple[int, ...],
) -> TrainState:
    """One pytree with ALL trajectory state (checkpointed whole)."""
    adv_key, rng = jax.random.split(key)
    channels = channel_counts(model, spec.use_delta)
    adversaries = {
        term_name(t): adv_lib.init_ppgd_state(k, t, channels, leading_shape)
        for t, k in zip(
            spec.ppgd_terms(), jax.random.split(adv_key, max(len(spec.ppgd_terms()), 1)), strict=False
        )
    }
    # Strong dtypes everywhere: a weakly typed leaf would come back strong from the step and
    # force a second trace (SPEC T1).
    state = {
        "step": jnp.zeros((), jnp.int32),
        "components": components,
        "ci_params": ci_params,
        "components_opt": optimizers.components.init(components),
        "ci_opt": optimizers.ci_fn.init(ci_params),
        "adversaries": adversaries,
        "rng": rng,
    }
    return jax.tree.map(lambda x: jnp.asarray(x, dtype=x.dtype), state)


def _sg(tree: Any) -> Any:
    return jax.tree.map(jax.lax.stop_gradient, tree)


def _active(term: ReconTerm, step: Array, total_steps: int) -> Array:
    """SPEC P6: off while `step / total_steps < start_frac`, i.e. before the first step at or past it.

    Flooring `start_frac * total_steps` would switch a term on early (0.25 of 10 steps: at step 2).
    """
    frac = getattr(term, "start_frac", 0.0)
    start = math.ceil(frac * total_steps)
    while start > 0 and (start - 1) / total_steps >= frac:  # 0.3 * 10 rounds up to 3.0000000000000004
        start -= 1
    while start / total_steps < frac:
        start += 1
    return step >= start


def make_train_step(model: DecomposedModel, ci_fn: CIFn, spec: LossSpec, optimizers: Optimizers):
    """Build the pure fused step. Recon terms are evaluated in config order."""
    site_names = model.site_names
    channels = channel_counts(model, spec.use_delta)
    plans = {term_name(t): resolve_plan(t.plan, site_names) for t in spec.recon_terms}
    for t in spec.ppgd_terms():
        if t.coeff <= 0:
            # SPEC P3: the final ascent is the main backward with the coefficient divided out; at 0
            # there is no gradient to recover, and Adam would step on its stale momentum alone.
            raise ValueError(f"persistent_pgd_recon term {term_name(t)!r} needs coeff > 0 (got {t.coeff})")

    def step_fn(state: TrainState, frozen: PyTree, residual: Array) -> tuple[TrainState, dict[str, Array]]:
        step = state["step"]
        rng, step_key = jax.random.split(state["rng"])
        term_keys = dict(
            zip(
                [term_name(t) for t in spec.recon_terms],
                jax.random.split(step_key, max(len(spec.recon_terms), 1)),
                strict=False,
            )
        )
        clean, site_inputs = model.clean_output_and_site_inputs(frozen, residual)
        clean, site_inputs = _sg(clean), _sg(site_inputs)
        # One CI evaluation per step; a network reading `x @ V` also sends gradients to V.
        logits, ci_vjp = jax.vjp(
            lambda p, c: ci_logits(ci_fn, p, site_inputs, c), state["ci_params"], state["components"]
        )
        leading_shape = next(iter(logits.values())).shape[:-1]
        ci_lower_detached = _sg({k: lower_leaky_hard(v) for k, v in logits.items()})
        components_detached = _sg(state["components"])
        metrics: dict[str, Array] = {}

        def all_sites_loss(sources: Mapping[str, Array]) -> Array:
            """Detached adversary objective: every site live, routed everywhere."""
            full = {n: adv_lib.broadcast_sources(sources[n], leading_shape) for n in site_names}
            masks, deltas = masks_from_sources(ci_lower_detached, full, site_names, spec.use_delta)
            out = model.masked_output(frozen, components_detached, residual, masks, deltas, None, site_names)
            return model.recon_loss(out, clean)

        # -- PPGD warmup ascents (SPEC P2) --
        adversaries = dict(state["adversaries"])
        ppgd_lrs: dict[str, Array] = {}
        for ppgd_term in spec.ppgd_terms():
            name = term_name(ppgd_term)
            ppgd_lrs[name] = adv_lib.ppgd_lr(ppgd_term, step, spec.total_steps)
            adversaries[name], warm_loss = adv_lib.ppgd_warmup(
                ppgd_term,
                adversaries[name],
                all_sites_loss,
                ppgd_lrs[name],
                _active(ppgd_term, step, spec.total_steps),
            )
            metrics[f"ppgd/{name}/warmup_loss"] = warm_loss

        # -- fresh PGD: routing drawn once, shared by the ascents and the loss forward (SPEC P7) --
        pgd_sources: dict[str, dict[str, Array]] = {}
        pgd_routes: dict[str, list] = {}
        for term in spec.recon_terms:
            if not isinstance(term, PGDReconLoss):
                continue
            name = term_name(term)
            init_key, route_key = jax.random.split(jax.random.fold_in(term_keys[name], 1))
            routes = [
                sample_routes(k, term.routing, live, leading_shape)
                for live, k in zip(plans[name], jax.random.split(route_key, len(plans[name])), strict=True)
            ]
            pgd_routes[name] = routes

            def pgd_objective(
                src: Mapping[str, Array], name=name, routes=routes, routing=term.routing
            ) -> Array:
                def source_fn(_k: Array, live_sites: tuple[str, ...]) -> dict[str, Array]:
                    return {n: adv_lib.broadcast_sources(src[n], leading_shape) for n in live_sites}

                return plan_recon_loss(
                    term_keys[name],
                    model,
                    frozen,
                    components_detached,
                    residual,
                    clean,
                    ci_lower_detached,
                    plans[name],
                    routing,
                    1,
                    source_fn,
                    spec.use_delta,
                    fixed_routes=routes,
                )

            src0 = adv_lib.init_pgd_sources(init_key, term, channels, leading_shape)
            pgd_sources[name] = _sg(adv_lib.pgd_attack(src0, pgd_objective, term.n_steps, term.step_size))

        # -- the main loss --
        def loss_fn(components: Components, ci_logits: dict[str, Array], ppgd_raw: dict[str, dict]):
            ci_lower, ci_upper = squash_pair(ci_logits)
            parts: dict[str, Array] = {}
            faith = faithfulness_loss(model.weight_deltas(frozen, components))
            parts["loss/faithfulness"] = faith
            total = spec.faithfulness_coeff * faith
            if spec.importance is not None:
                imp = spec.importance
                p = annealed_p(
                    step, spec.total_steps, imp.p_start, imp.p_end, imp.anneal_start_frac, imp.anneal_end_frac
                )
                imp_loss, _ = importance_minimality_loss(ci_upper, p, imp.eps, imp.beta)
                parts["loss/importance_minimality"] = imp_loss
                total = total + imp.coeff * imp_loss
            for term in spec.recon_terms:
                name = term_name(term)
                key = term_keys[name]
                use_delta = spec.use_delta
                fixed_routes = None
                source_fn: SourceFn
                if isinstance(term, StochasticReconLoss):

                    def source_fn(
                        k: Array, live: tuple[str, ...], term: StochasticReconLoss = term
                    ) -> dict[str, Array]:
                        return stochastic_sources(k, term.sampling, live, channels, leading_shape)

                    n_draws = term.n_draws
                elif isinstance(term, CIMaskedReconLoss | UnmaskedReconLoss):
                    source_fn = constant_source_fn(
                        0.0 if isinstance(term, CIMaskedReconLoss) else 1.0, ci_lower
                    )
                    use_delta, n_draws = False, 1
                elif isinstance(term, PersistentPGDReconLoss):
                    eff = adv_lib.effective_sources(ppgd_raw[name], term.parameterisation)

                    def source_fn(_k, live, eff=eff):
                        return {n: adv_lib.broadcast_sources(eff[n], leading_shape) for n in live}

                    n_draws = 1
                else:
                    src = pgd_sources[name]

                    def source_fn(_k, live, src=src):
                        return {n: adv_lib.broadcast_sources(src[n], leading_shape) for n in live}

                    n_draws, fixed_routes = 1, pgd_routes[name]
                value = plan_recon_loss(
                    key,
                    model,
                    frozen,
                    components,
                    residual,
                    clean,
                    ci_lower,
                    plans[name],
                    term.routing,
                    n_draws,
                    source_fn,
                    use_delta,
                    fixed_routes=fixed_routes,
                )
                parts[f"loss/{name}"] = value
                coeff = jnp.where(_active(term, step, spec.total_steps), term.coeff, 0.0)
                total = total + coeff * value
            parts["loss/total"] = total
            return total, (parts, ci_lower)

        ppgd_raw = {n: a["sources"] for n, a in adversaries.items()}
        (_, (parts, ci_lower)), (g_comp, g_logits, g_raw) = jax.value_and_grad(
            loss_fn, argnums=(0, 1, 2), has_aux=True
        )(state["components"], logits, ppgd_raw)
        g_ci, g_comp_via_ci = ci_vjp(g_logits)
        g_comp = jax.tree.map(jnp.add, g_comp, g_comp_via_ci)
        metrics.update(parts)

        # -- updates: sources (fused final ascent, coefficient divided out), components, CI fn --
        for term in spec.ppgd_terms():
            name = term_name(term)
            scale = 1.0 / term.coeff  # > 0, checked above
            grads = jax.tree.map(lambda g, scale=scale: g * scale, g_raw[name])
            adversaries[name] = adv_lib.ppgd_ascend(
                term, adversaries[name], grads, ppgd_lrs[name], _active(term, step, spec.total_steps)
            )
        comp_updates, comp_opt = optimizers.components.update(
            g_comp, state["components_opt"], state["components"]
        )
        components = optax.apply_updates(state["components"], comp_updates)
        ci_updates, ci_opt = optimizers.ci_fn.update(g_ci, state["ci_opt"], state["ci_params"])
        ci_params = optax.apply_updates(state["ci_params"], ci_updates)

        metrics["grad_norm/components"] = optax.tree.norm(g_comp)
        metrics["grad_norm/ci_fn"] = optax.tree.norm(g_ci)
        for n, ci in ci_lower.items():
            flat = ci.reshape(-1, ci.shape[-1])
            metrics[f"ci_l0/{n}"] = jnp.mean(
                jnp.sum(flat > spec.ci_l0_threshold, axis=-1).astype(jnp.float32)
            )
            metrics[f"alive/{n}"] = jnp.sum(jnp.max(flat, axis=0) > spec.alive_threshold)
        new_state = {
            "step": step + 1,
            "components": components,
            "ci_params": ci_params,
            "components_opt": comp_opt,
            "ci_opt": ci_opt,
            "adversaries": adversaries,
            "rng": rng,
        }
        return new_state, metrics

    return step_fn


def make_faithfulness_warmup(model: DecomposedModel, steps: int, lr: float, weight_decay: float = 0.0):
    """`warmup(components, frozen) -> (components, final_loss)`: faithfulness-only AdamW, optimizer discarded."""
    tx = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)

    def warmup(components: Components, frozen: PyTree) -> tuple[Components, Array]:
        def loss(c: Components) -> Array:
            return faithfulness_loss(model.weight_deltas(frozen, c))

        def body(carry, _):
            comps, opt = carry
            value, grads = jax.value_and_grad(loss)(comps)
            updates, opt = tx.update(grads, opt, comps)
            return (optax.apply_updates(comps, updates), opt), value

        if steps == 0:
            return components, loss(components)
        (components, _), values = jax.lax.scan(body, (components, tx.init(components)), None, length=steps)
        return components, loss(components)

    return warmup
