"""Per-position MLP CI networks: one MLP per site ("layerwise") or one over all sites ("shared").

Both are pointwise over the leading axes, so they fit any target (toys `(batch,)`, LMs
`(batch, sequence)`). They compute in fp32 whatever the activation dtype: CI logits feed the
leaky-hard squashings and the importance-minimality sums, which are fp32 by contract.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from param_decomp_config.ci import ComponentMLPCIConfig, LayerwiseMLPCIConfig, SharedMLPCIConfig
from param_decomp_jax.core.model import SiteSpec

# Fan-in scaled plain normal (std 1/sqrt(fan_in)), biases zero: the method's CI-fn init.
FAN_IN_NORMAL = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")


def fan_in_linear(d_in: int, d_out: int, *, use_bias: bool, rngs: nnx.Rngs) -> nnx.Linear:
    """An fp32 `nnx.Linear` with the CI-fn init (fan-in normal kernel, zero bias)."""
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=use_bias,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        kernel_init=FAN_IN_NORMAL,
        bias_init=nnx.initializers.zeros_init(),
        rngs=rngs,
    )


def gelu(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    # Exact (erf) GELU, the reference's nonlinearity; jax's default is the tanh approximation.
    return jax.nn.gelu(x, approximate=False)


def split_per_site(
    logits: Float[Array, "*leading total_C"], sites: Sequence[SiteSpec]
) -> dict[str, Float[Array, "*leading C"]]:
    """Split the last axis into consecutive `[*leading, C_s]` slices in site order."""
    out: dict[str, Array] = {}
    start = 0
    for s in sites:
        out[s.name] = logits[..., start : start + s.C]
        start += s.C
    if start != logits.shape[-1]:
        raise ValueError(f"logits have {logits.shape[-1]} channels, sites need {start}")
    return out


def project_per_site(
    linear: nnx.Linear, x: Float[Array, "*leading d"], sites: Sequence[SiteSpec]
) -> dict[str, Float[Array, "*leading C"]]:
    """`split_per_site(linear(x), sites)` computed as one matmul per site on the kernel's column slice.

    Same parameters and the same math, but the backward differs where it matters: slicing the
    big `[*leading, Σ C]` logits makes each slice's transpose a full-width pad of the activations,
    summed over sites (the top ops of the LM step profile); slicing the `[d, Σ C]` kernel moves
    that pad onto the small weight gradient instead."""
    kernel = linear.kernel[...]
    bias = linear.bias[...] if linear.bias is not None else None
    out: dict[str, Array] = {}
    start = 0
    for s in sites:
        logits = x @ kernel[:, start : start + s.C]
        out[s.name] = logits if bias is None else logits + bias[start : start + s.C]
        start += s.C
    if start != kernel.shape[-1]:
        raise ValueError(f"projection has {kernel.shape[-1]} outputs, sites need {start}")
    return out


class MLP(nnx.Module):
    """`d_in -> hidden_dims (GELU) -> d_out`, every layer Linear + bias."""

    def __init__(self, d_in: int, hidden_dims: Sequence[int], d_out: int, *, rngs: nnx.Rngs):
        dims = [d_in, *hidden_dims, d_out]
        self.n_layers = len(dims) - 1
        # String keys (not an nnx.List's ints) keep the pure-dict params orbax-friendly.
        self.layers = nnx.Dict(
            {
                f"layer_{i}": fan_in_linear(dims[i], dims[i + 1], use_bias=True, rngs=rngs)
                for i in range(self.n_layers)
            }
        )

    def __call__(self, x: Float[Array, "*leading d_in"]) -> Float[Array, "*leading d_out"]:
        for i in range(self.n_layers):
            x = self.layers[f"layer_{i}"](x)
            if i < self.n_layers - 1:
                x = gelu(x)
        return x


class LayerwiseMLPCI(nnx.Module):
    """Site s's logits depend on site s's input only."""

    # Per-position: valid under whatever leading axes the model has.
    required_leading_axes: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, sites: Sequence[SiteSpec], hidden_dims: Sequence[int], *, rngs: nnx.Rngs):
        self.site_names = tuple(s.name for s in sites)
        self.mlps = nnx.Dict({s.name: MLP(s.d_in, hidden_dims, s.C, rngs=rngs) for s in sites})

    @classmethod
    def from_config(
        cls, cfg: LayerwiseMLPCIConfig, sites: Sequence[SiteSpec], rngs: nnx.Rngs
    ) -> LayerwiseMLPCI:
        return cls(sites, cfg.hidden_dims, rngs=rngs)

    def __call__(
        self, site_inputs: Mapping[str, Float[Array, "*leading d_in"]]
    ) -> dict[str, Float[Array, "*leading C"]]:
        return {n: self.mlps[n](site_inputs[n].astype(jnp.float32)) for n in self.site_names}


class SharedMLPCI(nnx.Module):
    """One MLP over all site inputs concatenated in site order; logits split back per site."""

    required_leading_axes: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, sites: Sequence[SiteSpec], hidden_dims: Sequence[int], *, rngs: nnx.Rngs):
        self.sites = tuple(sites)
        d_in = sum(s.d_in for s in sites)
        self.mlp = MLP(d_in, hidden_dims, sum(s.C for s in sites), rngs=rngs)

    @classmethod
    def from_config(cls, cfg: SharedMLPCIConfig, sites: Sequence[SiteSpec], rngs: nnx.Rngs) -> SharedMLPCI:
        return cls(sites, cfg.hidden_dims, rngs=rngs)

    def __call__(
        self, site_inputs: Mapping[str, Float[Array, "*leading d_in"]]
    ) -> dict[str, Float[Array, "*leading C"]]:
        x = jnp.concatenate([site_inputs[s.name].astype(jnp.float32) for s in self.sites], axis=-1)
        return split_per_site(self.mlp(x), self.sites)


class ComponentMLPCI(nnx.Module):
    """Per site and per component an MLP `1 -> hidden -> 1` on the component activation `x @ V[:, c]`.

    The C small MLPs of a site are stored as stacked weights `[C, d_in, d_out]` and applied with
    one einsum per layer (no Python loop over components).
    """

    required_leading_axes: ClassVar[tuple[str, ...] | None] = None
    reads_component_acts: ClassVar[bool] = True

    def __init__(self, sites: Sequence[SiteSpec], hidden_dims: Sequence[int], *, rngs: nnx.Rngs):
        self.site_names = tuple(s.name for s in sites)
        dims = [1, *hidden_dims, 1]
        self.n_layers = len(dims) - 1
        per_site = {}
        for s in sites:
            layer_params = {}
            for i in range(self.n_layers):
                # Fan-in of ONE component's layer is dims[i] (flax's variance_scaling would count C too).
                w = jax.random.normal(rngs.params(), (s.C, dims[i], dims[i + 1]), jnp.float32) / jnp.sqrt(
                    dims[i]
                )
                layer_params[f"w{i}"] = nnx.Param(w)
                layer_params[f"b{i}"] = nnx.Param(jnp.zeros((s.C, dims[i + 1]), jnp.float32))
            per_site[s.name] = nnx.Dict(layer_params)
        self.weights = nnx.Dict(per_site)

    @classmethod
    def from_config(
        cls, cfg: ComponentMLPCIConfig, sites: Sequence[SiteSpec], rngs: nnx.Rngs
    ) -> ComponentMLPCI:
        return cls(sites, cfg.hidden_dims, rngs=rngs)

    def __call__(
        self, component_acts: Mapping[str, Float[Array, "*leading C"]]
    ) -> dict[str, Float[Array, "*leading C"]]:
        out = {}
        for n in self.site_names:
            h = component_acts[n].astype(jnp.float32)[..., None]  # [*leading, C, 1]
            for i in range(self.n_layers):
                w, b = self.weights[n][f"w{i}"], self.weights[n][f"b{i}"]
                h = jnp.einsum("...ci,cio->...co", h, w[...]) + b[...]
                if i < self.n_layers - 1:
                    h = gelu(h)
            out[n] = h[..., 0]
        return out
