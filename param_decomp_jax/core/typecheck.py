"""The runtime checker used by jaxtyping at the waist (shapes/dtypes are checked while tracing)."""

from beartype import beartype as typechecker

__all__ = ["typechecker"]
