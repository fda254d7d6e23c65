"""Lazy reader for a Hugging Face checkpoint folder (`config.json` + safetensors weights).

Supports a single `model.safetensors` or a sharded `model.safetensors.index.json`. Tensors are
read one at a time with `safetensors.safe_open` (numpy framework, memory-mapped), so building a
target touches only the tensors it asks for, and each is cast to the configured dtype right away:
an 8B bf16 target never needs an fp32 copy of the whole checkpoint in host memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Storage dtypes a frozen target may use (§7: the frozen target may be stored bf16).
_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
_DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16"}


def resolve_dtype(dtype: str) -> np.dtype:
    """Map a config dtype name (`float32`/`fp32`, `bfloat16`/`bf16`) to a numpy dtype."""
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name not in _DTYPES:
        raise ValueError(f"unsupported checkpoint dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


class HFCheckpoint:
    """A checkpoint folder: its parsed `config.json` and a tensor-name → shard-file map.

    Nothing but the config and the (small) safetensors headers is read at construction.
    """

    def __init__(self, checkpoint_dir: Path | str, dtype: str = "float32"):
        self.dir = Path(checkpoint_dir)
        self.dtype = resolve_dtype(dtype)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"checkpoint folder not found: {self.dir}")
        config_path = self.dir / CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(f"checkpoint config not found: {config_path}")
        self.config: dict[str, Any] = json.loads(config_path.read_text())
        self._file_of = self._tensor_files()

    def _tensor_files(self) -> dict[str, Path]:
        index_path = self.dir / INDEX_FILE
        single_path = self.dir / SINGLE_FILE
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index_path} has no 'weight_map' object")
            files = {name: self.dir / fname for name, fname in weight_map.items()}
            for shard in sorted(set(files.values())):
                if not shard.is_file():
                    raise FileNotFoundError(f"shard {shard} listed in {index_path} not found")
            return files
        if single_path.is_file():
            with safe_open(single_path, framework="numpy") as f:
                return {name: single_path for name in f.keys()}  # noqa: SIM118 (not a dict)
        raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in checkpoint folder {self.dir}")

    def keys(self) -> list[str]:
        return sorted(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(self._file(name), framework="numpy") as f:
            return tuple(f.get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        """Read one tensor (as stored: HF linears are `[out, in]`) and cast it to `self.dtype`."""
        with safe_open(self._file(name), framework="numpy") as f:
            if name not in f.keys():  # noqa: SIM118 (safe_open handle is not a dict)
                raise ValueError(f"tensor {name!r} is in the index but not in {self._file(name)}")
            arr = f.get_tensor(name)
        return arr.astype(self.dtype, copy=False)

    def _file(self, name: str) -> Path:
        if name not in self._file_of:
            raise ValueError(f"tensor {name!r} not found in checkpoint {self.dir}")
        return self._file_of[name]
