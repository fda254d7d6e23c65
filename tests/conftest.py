"""Shared test setup and the project's float-tolerance policy.

Tolerance policy (fp32 on CPU), cited by tests instead of ad-hoc numbers:
- SINGLE_OP_RTOL: one op or one small composition (a matmul, a loss on given inputs): XLA may
  reorder a reduction, so allow ~1e-6 relative.
- TRAJECTORY_RTOL: whole-step / multi-step trajectories compared across device counts or fusion
  choices: reassociated reductions compound over steps, so allow ~1e-5 relative.
- Bitwise equality is asserted only where the same program runs on the same device count
  (e.g. resume after kill on CPU).
Tests that need several devices run in a subprocess with XLA_FLAGS set there, because the device
count is fixed when jax first initialises its backend.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SINGLE_OP_RTOL = 1e-6
SINGLE_OP_ATOL = 1e-7
TRAJECTORY_RTOL = 1e-5

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
STORIES260K = SHARED_DATA / "stories260K"

# A compile cache shared by the whole suite keeps repeated small compiles cheap across processes.
os.environ.setdefault("JSP_TEST_COMPILE_CACHE", str(REPO_ROOT / ".jax_cache" / "tests"))
os.environ.setdefault("WANDB_MODE", "disabled")
# Pretrained toy targets are shared by every test run (and subprocess) instead of per tmp out_dir.
os.environ.setdefault("JSP_TARGET_CACHE", str(REPO_ROOT / ".jax_cache" / "targets"))

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JSP_TEST_COMPILE_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_data = pytest.mark.skip(reason=f"shared data not found at {SHARED_DATA}")
    for item in items:
        if "data" in item.keywords and not STORIES260K.exists():
            item.add_marker(skip_data)


@pytest.fixture
def stories260k_dir() -> Path:
    if not STORIES260K.exists():
        pytest.skip(f"shared data not found at {STORIES260K}")
    return STORIES260K
