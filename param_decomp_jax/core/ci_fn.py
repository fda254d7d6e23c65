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


def check_ci_fn_matches(ci_fn: CIFn, model_leading_axes: tuple[str, ...]) -> None:
    if tuple(ci_fn.leading_axes) != tuple(model_leading_axes):
        raise ValueError(
            f"CI function {ci_fn.description or ''} expects leading axes {ci_fn.leading_axes}, "
            f"but the decomposed model's activations have leading axes {model_leading_axes}"
        )
