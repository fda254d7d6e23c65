"""CI network registry: config -> (`CIFn`, plain-dict params).

The networks are flax.nnx modules, but what leaves this package is data: a `CIFn` whose `apply`
is a pure function of a nested dict of arrays. The train step is one `jax.jit` over pytrees
(cheaper than `nnx.jit`), orbax checkpoints the dict, and optax optimizes it. Adding an
architecture = its module (with `from_config` and `required_leading_axes`), its schema in
`param_decomp_config.ci`, and one line in `_REGISTRY`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jaxtyping import Array, Float

from param_decomp_config.ci import (
    CIFnConfig,
    ComponentMLPCIConfig,
    LayerwiseMLPCIConfig,
    SharedMLPCIConfig,
    SharedTransformerCIConfig,
)
from param_decomp_jax.ci.mlp import ComponentMLPCI, LayerwiseMLPCI, SharedMLPCI
from param_decomp_jax.ci.transformer import SharedTransformerCI
from param_decomp_jax.core.ci_fn import CIFn, check_ci_fn_matches
from param_decomp_jax.core.model import SiteSpec

# Nested dict of fp32 arrays, keyed by module attribute names (site names for layerwise MLPs).
CIParams = dict[str, Any]

_REGISTRY: dict[type, type[nnx.Module]] = {
    LayerwiseMLPCIConfig: LayerwiseMLPCI,
    ComponentMLPCIConfig: ComponentMLPCI,
    SharedMLPCIConfig: SharedMLPCI,
    SharedTransformerCIConfig: SharedTransformerCI,
}


def module_as_ci_fn(
    make_module: Callable[[nnx.Rngs], nnx.Module],
    key: jax.Array,
    leading_axes: tuple[str, ...],
    description: str = "",
    reads_component_acts: bool = False,
) -> tuple[CIFn, CIParams]:
    """Wrap `make_module(rngs)` (an nnx module `{site: x} -> {site: logits}`) as a pure `CIFn`.

    Returns the CIFn and the initial params as a plain nested dict of arrays.
    """
    # Trace the constructor once for structure (no arrays), then initialise under one jit: eager
    # init dispatches (and on a cold cache compiles) every initializer op separately.
    abstract = nnx.eval_shape(lambda k: make_module(nnx.Rngs(params=k)), key)
    graphdef, template = nnx.split(abstract)
    params: CIParams = jax.jit(lambda k: nnx.to_pure_dict(nnx.state(make_module(nnx.Rngs(params=k)))))(key)
    params_treedef = jax.tree.structure(params)

    def apply(
        params: CIParams, site_inputs: Mapping[str, Float[Array, "*leading d_in"]]
    ) -> dict[str, Float[Array, "*leading C"]]:
        # Checked while tracing (free at run time): a missing entry would otherwise surface as an
        # obscure error about ShapeDtypeStruct leaves deep inside the module.
        if str(jax.tree.structure(params)) != str(params_treedef):
            raise ValueError(
                f"CI params do not match the network {description!r}: expected {params_treedef}, "
                f"got {jax.tree.structure(params)}"
            )
        # `replace_by_pure_dict` mutates its state, so fill a fresh copy of the template per call.
        fresh = jax.tree.map(lambda a: a, template)
        nnx.replace_by_pure_dict(fresh, params)
        return nnx.merge(graphdef, fresh)(site_inputs)

    ci_fn = CIFn(
        leading_axes=tuple(leading_axes),
        apply=apply,
        description=description,
        reads_component_acts=reads_component_acts,
    )
    return ci_fn, params


def build_ci_fn(
    cfg: CIFnConfig, sites: Sequence[SiteSpec], leading_axes: tuple[str, ...], key: jax.Array
) -> tuple[CIFn, CIParams]:
    """Build the configured CI network for `sites`; fails if it cannot run over `leading_axes`.

    Per-position networks (MLPs) adopt the model's leading axes; the transformer requires
    `("batch", "sequence")` and raises `ValueError` for any other model.
    """
    try:
        module_cls = _REGISTRY[type(cfg)]
    except KeyError:
        raise TypeError(f"no CI network registered for config {type(cfg).__name__}") from None
    if not sites:
        raise ValueError("a CI network needs at least one site")
    required = module_cls.required_leading_axes  # type: ignore[attr-defined]
    ci_leading = tuple(leading_axes) if required is None else tuple(required)
    description = f"{cfg.type}({', '.join(f'{k}={v}' for k, v in cfg if k != 'type')})"
    # Check before initialising: a production transformer's init is not free.
    check_ci_fn_matches(CIFn(ci_leading, apply=_unbuilt, description=description), leading_axes)
    return module_as_ci_fn(
        lambda rngs: module_cls.from_config(cfg, sites, rngs),  # type: ignore[attr-defined]
        key,
        ci_leading,
        description,
        reads_component_acts=getattr(module_cls, "reads_component_acts", False),
    )


def _unbuilt(params: CIParams, site_inputs: Mapping[str, Array]) -> dict[str, Array]:
    raise RuntimeError("placeholder CIFn used only for the leading-axes check")


__all__ = [
    "CIParams",
    "LayerwiseMLPCI",
    "SharedMLPCI",
    "SharedTransformerCI",
    "build_ci_fn",
    "module_as_ci_fn",
]
