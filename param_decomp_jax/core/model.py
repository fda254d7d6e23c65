"""The waist between targets and the core: sites and the `DecomposedModel` built from one forward.

A target supplies ONE pure forward, `forward(frozen, residual, site_fn) -> output`, that calls
`site_fn(site_name, x_[*leading, d_in]) -> y_[*leading, d_out]` wherever a decomposable weight is
applied, plus `site_weights(frozen) -> {site: W[d_in, d_out]}`. Every other view the core needs
(clean output, site inputs, masked outputs, per-site outputs) is derived here from that forward by
swapping the `site_fn`, so adding a target never touches the core.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from param_decomp_jax.core.linear import decomposed_site_output

PyTree = Any
SiteFn = Callable[[str, Array], Array]
# forward(frozen, residual, site_fn) -> output (e.g. logits [*leading, V] or toy output [*leading, d])
ForwardFn = Callable[[PyTree, Array, SiteFn], Array]
SiteWeightsFn = Callable[[PyTree], dict[str, Array]]
ReconLossFn = Callable[[Array, Array], Array]

# Components: {site: {"V": [d_in, C], "U": [C, d_out]}} (fp32 master copies).
Components = dict[str, dict[str, Array]]


@dataclass(frozen=True)
class SiteSpec:
    """One decomposed weight matrix `W: [d_in, d_out]` (right-multiplied) and its component count."""

    name: str
    d_in: int
    d_out: int
    C: int


class _SiteInputRecorder:
    """A `site_fn` that runs the frozen path and remembers what entered each site."""

    def __init__(self, weights: Mapping[str, Array]):
        self.weights = weights
        self.inputs: dict[str, Array] = {}

    def __call__(self, name: str, x: Array) -> Array:
        self.inputs[name] = x
        return frozen_matmul(x, self.weights[name])


def frozen_matmul(x: Array, w: Array) -> Array:
    """`x @ W` in the activation dtype, accumulating at least in the weight's precision."""
    return jnp.matmul(x, w.astype(x.dtype))


@dataclass(frozen=True)
class DecomposedModel:
    """A frozen network plus the sites we decompose. All functions are pure and jit-safe.

    `leading_axes` names the position axes of activations (`("batch",)` for toys, `("batch",
    "sequence")` for LMs); masks and CI are `[*leading, C]` and routes `bool[*leading]`.
    """

    sites: tuple[SiteSpec, ...]
    leading_axes: tuple[str, ...]
    forward: ForwardFn
    site_weights: SiteWeightsFn
    recon_loss: ReconLossFn

    @property
    def site_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sites)

    def site(self, name: str) -> SiteSpec:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)

    # ---- frozen views -------------------------------------------------------------------------
    def clean_output(self, frozen: PyTree, residual: Array) -> Array:
        weights = self.site_weights(frozen)
        return self.forward(frozen, residual, lambda n, x: frozen_matmul(x, weights[n]))

    def clean_output_and_site_inputs(self, frozen: PyTree, residual: Array) -> tuple[Array, dict[str, Array]]:
        """One clean forward returning the target output and every decomposed site's input."""
        recorder = _SiteInputRecorder(self.site_weights(frozen))
        out = self.forward(frozen, residual, recorder)
        return out, {n: recorder.inputs[n] for n in self.site_names}

    def site_inputs(self, frozen: PyTree, residual: Array) -> dict[str, Array]:
        return self.clean_output_and_site_inputs(frozen, residual)[1]

    # ---- masked views -------------------------------------------------------------------------
    def masked_output(
        self,
        frozen: PyTree,
        components: Components,
        residual: Array,
        masks: Mapping[str, Float[Array, "*leading C"]],
        delta_masks: Mapping[str, Float[Array, "*leading"]] | None = None,
        routes: Mapping[str, Bool[Array, "*leading"]] | None = None,
        live: Sequence[str] | None = None,
    ) -> Array:
        """Forward where `live` sites run the decomposed path; every other site runs `x @ W`.

        `live=None` means every site in `masks`. A live site without a delta mask runs without the
        delta component; without a route it is routed everywhere.
        """
        return self.masked_output_and_site_outputs(
            frozen, components, residual, masks, delta_masks, routes, live
        )[0]

    def masked_output_and_site_outputs(
        self,
        frozen: PyTree,
        components: Components,
        residual: Array,
        masks: Mapping[str, Array],
        delta_masks: Mapping[str, Array] | None = None,
        routes: Mapping[str, Array] | None = None,
        live: Sequence[str] | None = None,
    ) -> tuple[Array, dict[str, Array]]:
        weights = self.site_weights(frozen)
        live_set = set(masks) if live is None else set(live)
        delta_masks = delta_masks or {}
        routes = routes or {}
        site_outputs: dict[str, Array] = {}

        def site_fn(name: str, x: Array) -> Array:
            w = weights[name]
            if name not in live_set:
                y = frozen_matmul(x, w)
            else:
                comp = components[name]
                y = decomposed_site_output(
                    x, w, comp["V"], comp["U"], masks[name], delta_masks.get(name), routes.get(name)
                )
            site_outputs[name] = y
            return y

        out = self.forward(frozen, residual, site_fn)
        return out, site_outputs

    # ---- weights ------------------------------------------------------------------------------
    def weight_deltas(self, frozen: PyTree, components: Components) -> dict[str, Array]:
        """`W_s − V_s U_s` in fp32 for every site."""
        weights = self.site_weights(frozen)
        return {
            n: weights[n].astype(jnp.float32) - components[n]["V"] @ components[n]["U"]
            for n in self.site_names
        }

    def numel(self) -> int:
        return sum(s.d_in * s.d_out for s in self.sites)


def init_components(model: DecomposedModel, key: jax.Array, dtype: Any = jnp.float32) -> Components:
    """Fan-in scaled normal V and U so that V @ U starts small (faithfulness warmup fixes it)."""
    comps: Components = {}
    for s, k in zip(model.sites, jax.random.split(key, len(model.sites)), strict=True):
        kv, ku = jax.random.split(k)
        comps[s.name] = {
            "V": jax.random.normal(kv, (s.d_in, s.C), dtype) / jnp.sqrt(s.d_in),
            "U": jax.random.normal(ku, (s.C, s.d_out), dtype) / jnp.sqrt(s.C),
        }
    return comps
