"""wandb sink (issue 6, item 3): an offline run folder holding the same metrics as metrics.jsonl,
named and tagged from the config; slow eval adds its figures as images; nothing touches the
network (offline mode, and the API URL points at a closed local port); `--no-progress` keeps
a terminal clean."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from eval_runs import TOY_RUN_ID, FakeTTY, toy_run

from param_decomp_jax.runtime.sinks import ProgressBar, read_metrics


def read_wandb_records(path: Path) -> list:
    """Records of a `.wandb` transaction log: a 7-byte W&B header, then leveldb-log framing
    (32 KiB blocks; each chunk = crc32 (4) + length (2 LE) + type (1: full, 2/3/4: first/middle/last)),
    each record a serialized `wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    if len(data) < 7:  # not written yet
        return []
    assert data[:4] == b":W&B", data[:8]
    block, pos, chunks, partial = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind == 0:  # zero fill to the end of the block
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            partial = chunk
        elif kind == 3:
            partial += chunk
        elif kind == 4:
            chunks.append(partial + chunk)
    records = []
    for c in chunks:
        r = pb.Record()
        r.ParseFromString(c)
        records.append(r)
    return records


def finished_records(path: Path, timeout_s: float = 60.0) -> list:
    """Records of a finished run, waiting (bounded) for its final `exit` record: wandb-core is a
    separate process and may still be flushing the log when `finish()` has returned."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_wandb_records(path) if path.exists() else []
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        if time.monotonic() > deadline:
            kinds = [r.WhichOneof("record_type") for r in records]
            raise AssertionError(f"{path}: no exit record after {timeout_s}s; records {kinds}")
        time.sleep(0.2)


def _offline_runs(wandb_dir: Path) -> list[Path]:
    return sorted((wandb_dir / "wandb").glob(f"offline-run-*-{TOY_RUN_ID}"))


def _history(records: list) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            out.setdefault(r.history.step.num, {}).update(items)
    return out


def test_offline_run_holds_the_same_metrics(tmp_path_factory) -> None:
    run = toy_run(tmp_path_factory)
    folders = _offline_runs(run.wandb_dir)
    assert len(folders) == 2, folders  # the training run, then the slow eval of it
    records = finished_records(folders[0] / f"run-{TOY_RUN_ID}.wandb")
    run_records = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run_records[0].display_name == "tms_5-2_smoke" and run_records[0].project == "param-decomp-jax"
    assert list(run_records[0].tags) == ["eval-test"]
    history = _history(records)
    expected: dict[int, dict] = {}
    for row in read_metrics(run.run_dir / "metrics.jsonl"):
        expected.setdefault(row.pop("step"), {}).update(row)
    assert sorted(history) == sorted(expected) == [5, 10]
    for step, metrics in expected.items():
        for k, v in metrics.items():
            assert k in history[step], (step, k)
            assert math.isclose(history[step][k], v, rel_tol=1e-12, abs_tol=0.0), (step, k)


def test_slow_eval_logs_figures_as_images(tmp_path_factory) -> None:
    run = toy_run(tmp_path_factory)
    eval_folder = _offline_runs(run.wandb_dir)[-1]
    history = _history(finished_records(eval_folder / f"run-{TOY_RUN_ID}.wandb"))
    assert list(history) == [10], (eval_folder, sorted(history))
    logged = history[10]
    assert "eval/recon/ci_masked" in logged and "slow_eval/alive/linear1" in logged, sorted(logged)
    # An image is stored as nested items: <key>/_type == "image-file", <key>/path, ...
    images = {
        k.removesuffix("/_type") for k, v in logged.items() if k.endswith("/_type") and v == "image-file"
    }
    assert images == {
        f"figures/{n}"
        for n in (
            "ci_histograms",
            "mean_ci_per_component",
            "component_density",
            "hidden_recon",
            "permuted_ci",
            "uv_matrices",
        )
    }
    pngs = list((eval_folder / "files" / "media" / "images").rglob("*.png"))
    assert len(pngs) == len(images), pngs


def test_no_progress_keeps_a_terminal_clean(tmp_path_factory, monkeypatch) -> None:
    """`jsp-train --no-progress` wrote nothing to a terminal-like stderr, where a bar would draw."""
    run = toy_run(tmp_path_factory)
    assert "train:" not in run.train_stderr and "it/s" not in run.train_stderr
    fake = FakeTTY()
    monkeypatch.setattr("sys.stderr", fake)
    bar = ProgressBar(3, 0, enabled=True)
    bar.update(1, {"loss/total": 0.5})
    bar.close()
    assert "train" in fake.getvalue()  # the same check would have seen a bar
    quiet = FakeTTY()
    monkeypatch.setattr("sys.stderr", quiet)
    ProgressBar(3, 0, enabled=False).close()
    assert quiet.getvalue() == ""
