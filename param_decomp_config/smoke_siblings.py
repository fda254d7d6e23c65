"""Write `configs/<name>_smoke.yaml` from `configs/<name>.yaml` with its `smoke:` block applied.

Smoke siblings are self-contained YAMLs (one file per run, no includes); a test checks they are
in sync with their base. Regenerate with `python -m param_decomp_config.smoke_siblings configs`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from param_decomp_config.loading import build_config, load_raw

HEADER = "# GENERATED from {base} with its `smoke:` block applied (python -m param_decomp_config.smoke_siblings).\n"


def smoke_text(base: Path) -> str:
    raw = load_raw(base)
    cfg = build_config(raw, str(base), smoke=True)
    data = cfg.model_dump(mode="json", exclude_none=True)
    data.pop("smoke", None)
    data["run_name"] = f"{data['run_name']}_smoke"
    return HEADER.format(base=base.name) + yaml.safe_dump(data, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    folder = Path((argv or sys.argv[1:] or ["configs"])[0])
    for base in sorted(folder.glob("*.yaml")):
        if base.stem.endswith("_smoke"):
            continue
        out = base.with_name(f"{base.stem}_smoke.yaml")
        out.write_text(smoke_text(base))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
