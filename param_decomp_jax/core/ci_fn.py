"""What the core needs from a causal-importance network: a pure `apply` over a params pytree."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jaxtyping import Array

PyTree = Any
# apply(params, site_inputs {site: [*leading, d_in]}) -> CI logits {site: [*leading, C_site]}
CIApplyFn = Callable[[PyTree, dict[str, Array]], dict[str, Array]]


@dataclass(frozen=True)
class CIFn:
    """A CI network as data: its expected leading axes and a pure apply function.

    `leading_axes` must equal the model's (`DecomposedModel.leading_axes`); `check_ci_fn_matches`
    enforces it at build time so a per-position network is never silently run over sequences.
    """

    leading_axes: tuple[str, ...]
    apply: CIApplyFn
    description: str = ""
    # True: the network reads each site's component activations `x @ V` instead of `x`, so CI
    # depends on (and sends gradients to) the components.
    reads_component_acts: bool = False


def ci_network_inputs(
    ci_fn: CIFn, site_inputs: dict[str, Array], components: dict | None
) -> dict[str, Array]:
    """What the CI network is fed: site inputs, or their projections on V (per site)."""
    if not ci_fn.reads_component_acts:
        return site_inputs
    if components is None:
        raise ValueError(f"CI function {ci_fn.description} reads component activations; pass components")
    return {n: x @ components[n]["V"].astype(x.dtype) for n, x in site_inputs.items()}


def ci_logits(ci_fn: CIFn, params: PyTree, site_inputs: dict[str, Array], components: dict | None = None):
    """CI logits `{site: [*leading, C]}` for either kind of network."""
    return ci_fn.apply(params, ci_network_inputs(ci_fn, site_inputs, components))


def check_ci_fn_matches(ci_fn: CIFn, model_leading_axes: tuple[str, ...]) -> None:
    if tuple(ci_fn.leading_axes) != tuple(model_leading_axes):
        raise ValueError(
            f"CI function {ci_fn.description or ''} expects leading axes {ci_fn.leading_axes}, "
            f"but the decomposed model's activations have leading axes {model_leading_axes}"
        )
