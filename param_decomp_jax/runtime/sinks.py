"""Where metrics go: metrics.jsonl (always), a terminal progress bar, and wandb (optional)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

# The losses shown on the progress bar (when present).
PROGRESS_KEYS = ("loss/total", "loss/faithfulness", "loss/importance_minimality")


def _clean(value: Any) -> Any:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return value
    return f if math.isfinite(f) else str(f)


class JsonlSink:
    """One JSON object per logged step, flushed at once so a killed run keeps what it logged."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("a")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class ProgressBar:
    """tqdm over training steps; silent when stdout is not a terminal or when disabled."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str = "train"):
        self.enabled = enabled and sys.stderr.isatty()
        self._bar = tqdm(
            total=total, initial=initial, desc=desc, disable=not self.enabled, dynamic_ncols=True
        )

    def update(self, n: int, metrics: dict[str, Any] | None = None) -> None:
        self._bar.update(n)
        if metrics and self.enabled:
            shown = {k.split("/")[-1]: f"{float(metrics[k]):.3g}" for k in PROGRESS_KEYS if k in metrics}
            self._bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        self._bar.close()


class WandbSink:
    """wandb run (offline by default). Imported lazily: most runs never touch it.

    The run id is the run directory's id, so the training run and later slow evals of it share
    one wandb run. Files go under `<run_dir>/wandb/` unless WANDB_DIR is set (wandb's own
    convention, which an explicit `dir=` would silently override).
    """

    def __init__(self, cfg: Any, run_dir: Path, run_id: str, config_dict: dict[str, Any]):
        import wandb

        self._wandb = wandb
        self.run = wandb.init(
            project=cfg.project,
            group=cfg.group,
            tags=list(cfg.tags),
            name=config_dict.get("run_name"),
            id=run_id,
            dir=os.environ.get("WANDB_DIR") or str(run_dir),
            mode=cfg.mode,
            config=config_dict,
            resume="allow",
        )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.run.log({k: _clean(v) for k, v in metrics.items()}, step=int(step))

    def log_images(self, step: int, images: dict[str, Path]) -> None:
        self.run.log({k: self._wandb.Image(str(p)) for k, p in images.items()}, step=int(step))

    def close(self) -> None:
        self.run.finish()


class Sinks:
    """Fan-out to every active sink; only the primary process writes."""

    def __init__(self, jsonl: JsonlSink | None, wandb_sink: WandbSink | None):
        self.jsonl = jsonl
        self.wandb = wandb_sink

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self.jsonl:
            self.jsonl.log(step, metrics)
        if self.wandb:
            self.wandb.log(step, metrics)

    def log_images(self, step: int, images: dict[str, Path]) -> None:
        if self.wandb and images:
            self.wandb.log_images(step, images)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.wandb:
            self.wandb.close()


def drop_records_after(path: Path, step: int) -> int:
    """Remove records with `step` > `step` (a killed run logged past its last checkpoint, and the
    resumed run logs those steps again); returns how many were dropped. Atomic rewrite."""
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(keep) < len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(path)
    return len(lines) - len(keep)
