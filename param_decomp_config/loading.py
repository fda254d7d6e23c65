"""Load a YAML into an `ExperimentConfig`, apply `--set` / `--smoke` overrides, explain errors."""

from __future__ import annotations

import copy
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from param_decomp_config.experiment import ExperimentConfig

# What `--smoke` does when a config has no `smoke:` block: a few steps of everything.
DEFAULT_SMOKE = {
    "steps": 10,
    "faithfulness_warmup.steps": 5,
    "eval.eval_every": 5,
    "logging.log_every": 5,
    "checkpoint.save_every": 0,
}


class ConfigError(Exception):
    """A config that cannot be loaded; the message names the file and key path."""


def mint_run_id() -> str:
    return "p-" + secrets.token_hex(4)


def _set_path(raw: dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    keys = dotted.split(".")
    node: Any = raw
    for depth, key in enumerate(keys[:-1]):
        where = ".".join(keys[: depth + 1])
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"{origin}: {where}: no list item {key!r}")
            node = node[int(key)]
        elif isinstance(node, dict):
            if key not in node or node[key] is None:
                node[key] = {}
            node = node[key]
        else:
            raise ConfigError(f"{origin}: {where}: cannot descend into a {type(node).__name__}")
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"{origin}: {dotted}: no list item {last!r}")
        node[int(last)] = value
    else:
        node[last] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.path=value")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


# Fields holding discriminated unions: pydantic puts the chosen tag into the error location
# (`target.tms.n_features`); users wrote `target.n_features`, so the tag is dropped.
_UNION_FIELDS = {"target", "data", "ci_fn", "plan", "routing"}


def _user_location(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for i, part in enumerate(loc):
        prev = loc[i - 1] if i else None
        is_tag = isinstance(part, str) and (
            prev in _UNION_FIELDS or (isinstance(prev, int) and i >= 2 and loc[i - 2] == "losses")
        )
        if not is_tag:
            parts.append(str(part))
    return ".".join(parts)


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config ({err.error_count()} problem{'s' * (err.error_count() > 1)})"]
    for e in err.errors():
        loc = _user_location(tuple(e["loc"]))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {loc}: {msg}" if loc else f"  {msg}")
    return "\n".join(lines)


def load_raw(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return raw


def build_config(
    raw: dict[str, Any],
    source: str,
    overrides: Sequence[str] = (),
    smoke: bool = False,
    out_dir: str | None = None,
    run_id: str | None = None,
) -> ExperimentConfig:
    raw = copy.deepcopy(raw)
    if smoke:
        smoke_block = raw.get("smoke") or DEFAULT_SMOKE
        if not isinstance(smoke_block, dict):
            raise ConfigError(f"{source}: smoke: must be a mapping of key.path: value")
        for key, value in smoke_block.items():
            _set_path(raw, str(key), value, f"{source} (smoke)")
    for text in overrides:
        key, value = parse_override(text)
        _set_path(raw, key, value, f"--set {text}")
    if out_dir is not None:
        raw["out_dir"] = out_dir
    if run_id is not None:
        raw["run_id"] = run_id
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def load_config(
    path: Path | str,
    overrides: Sequence[str] = (),
    smoke: bool = False,
    out_dir: str | None = None,
    run_id: str | None = None,
) -> ExperimentConfig:
    path = Path(path)
    return build_config(load_raw(path), str(path), overrides, smoke, out_dir, run_id)


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
