"""Persistent XLA compile cache: a restarted or repeated run skips recompiling its step.

Facts (jax 0.10.2, checked in jax/_src/compiler.py and compilation_cache.py):
- jax initialises the cache once, at the first compile that consults it; set the directory
  BEFORE the first `jax.jit` call or the setting has no effect in this process.
- Only entries whose compile took >= `jax_persistent_cache_min_compile_time_secs` (default 1 s)
  are written; small steps on CPU compile faster than that, hence our default of 0.
- With several processes only process 0 writes entries (`_cache_write` returns early when
  `jax.distributed` process_id != 0, to avoid write contention on shared filesystems); every
  process reads. So all processes may safely point at the same shared directory and no gating
  is needed here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax

log = logging.getLogger(__name__)


def enable_compile_cache(
    cache_dir: Path | str, min_compile_secs: float = 0.0, min_entry_size_bytes: int = 0
) -> Path:
    """Point jax's persistent compile cache at `cache_dir` (created if missing); returns it."""
    path = Path(cache_dir).expanduser().absolute()
    path.mkdir(parents=True, exist_ok=True)
    previous = getattr(jax.config, "jax_compilation_cache_dir", None)
    if previous and Path(previous).absolute() != path:
        # jax binds the directory at its first cached compile; a late switch may be ignored.
        log.warning(
            "compile cache dir changes from %s to %s; effective only if nothing compiled yet", previous, path
        )
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", int(min_entry_size_bytes))
    return path
