"""Token shards: loading, deterministic random-access order, per-process slices, prefetch."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from param_decomp_config.data import TokenDataConfig
from param_decomp_jax.runtime.token_data import (
    EVAL_SEED_OFFSET,
    BatchSchedule,
    Prefetcher,
    TokenBatches,
    TokenDataset,
    resolve_shards,
    token_streams,
)


def _write(path: Path, rows: list[list[int]], column: str = "input_ids", typ=pa.list_(pa.int32())) -> Path:
    pq.write_table(pa.table({column: pa.array(rows, type=typ)}), path)
    return path


def _rows(n: int, length: int, start: int = 0) -> list[list[int]]:
    # Row i is [start+i, start+i+1, ...]: its first token identifies it.
    return [list(range(start + i, start + i + length)) for i in range(n)]


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    folder = tmp_path / "tok"
    folder.mkdir()
    _write(folder / "train-00000.parquet", _rows(10, 12))
    _write(folder / "train-00001.parquet", _rows(6, 9, start=100))
    return folder


def test_resolve_shards_file_folder_glob(shards: Path) -> None:
    both = [shards / "train-00000.parquet", shards / "train-00001.parquet"]
    (shards / "notes.txt").write_text("not a shard")
    assert resolve_shards(shards) == both
    assert resolve_shards(str(shards / "train-*.parquet")) == both
    assert resolve_shards(both[1]) == [both[1]]


def test_resolve_shards_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        resolve_shards(tmp_path / "nope.parquet")
    with pytest.raises(FileNotFoundError, match=r"glob .*\*\.parquet"):
        resolve_shards(tmp_path / "*.parquet")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        resolve_shards(tmp_path)


def test_dataset_cuts_rows_across_shards(shards: Path) -> None:
    ds = TokenDataset(shards, "input_ids", seq_len=8)
    assert ds.tokens.shape == (16, 8) and ds.tokens.dtype == np.int32 and len(ds) == 16
    np.testing.assert_array_equal(ds.tokens[:, 0], [*range(10), *range(100, 106)])
    np.testing.assert_array_equal(ds.tokens[11], np.arange(101, 109))
    assert not ds.tokens.flags.writeable


def test_dataset_sliced_and_fixed_size_lists(tmp_path: Path) -> None:
    # int64 large lists and fixed-size lists are accepted and converted to int32.
    a = _write(tmp_path / "a.parquet", _rows(3, 5), typ=pa.large_list(pa.int64()))
    b = _write(tmp_path / "b.parquet", _rows(2, 4, start=50), typ=pa.list_(pa.int16(), 4))
    ds = TokenDataset([a, b], "input_ids", 4)
    np.testing.assert_array_equal(ds.tokens[:, 0], [0, 1, 2, 50, 51])
    np.testing.assert_array_equal(ds.tokens[4], [51, 52, 53, 54])


def test_dataset_reads_in_batches_keeps_row_numbers(tmp_path: Path) -> None:
    # More rows than one pyarrow read batch (8192): rows stay in order, errors name the file row.
    rows = _rows(9000, 3)
    ds = TokenDataset(_write(tmp_path / "big.parquet", rows), "input_ids", 3)
    np.testing.assert_array_equal(ds.tokens[:, 0], np.arange(9000))
    rows[8500] = [1, 2]
    with pytest.raises(ValueError, match="row 8500 has 2 tokens"):
        TokenDataset(_write(tmp_path / "short.parquet", rows), "input_ids", 3)


def test_dataset_errors_name_file_column_and_seq_len(shards: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"train-00001\.parquet.*input_ids.*data\.seq_len=10.*row 0 has 9 tokens"
    ):
        TokenDataset(shards, "input_ids", seq_len=10)
    with pytest.raises(ValueError, match=r"no column 'tokens'.*columns present: \['input_ids'\]"):
        TokenDataset(shards, "tokens", seq_len=4)
    text = tmp_path / "text.parquet"
    pq.write_table(pa.table({"input_ids": ["a", "b"]}), text)
    with pytest.raises(ValueError, match=r"text\.parquet.*data\.seq_len=4.*type string"):
        TokenDataset(text, "input_ids", seq_len=4)
    floats = _write(tmp_path / "f.parquet", [[0.5] * 4], typ=pa.list_(pa.float32()))
    with pytest.raises(ValueError, match="list of integer"):
        TokenDataset(floats, "input_ids", seq_len=4)
    with pytest.raises(FileNotFoundError, match="matches no files"):
        TokenDataset(tmp_path / "none-*.parquet", "input_ids", seq_len=4)


def test_schedule_is_deterministic_and_random_access() -> None:
    s = BatchSchedule(n_rows=10, global_batch_size=4, seed=3)
    again = BatchSchedule(n_rows=10, global_batch_size=4, seed=3)
    # Resume at step 7 without replaying steps 0..6.
    np.testing.assert_array_equal(again.global_indices(7), s.global_indices(7))
    stream = np.concatenate([s.global_indices(i) for i in range(5)])  # 20 rows = 2 epochs
    np.testing.assert_array_equal(stream[:10], np.random.default_rng([3, 0]).permutation(10))
    np.testing.assert_array_equal(stream[10:], np.random.default_rng([3, 1]).permutation(10))
    assert not np.array_equal(s.global_indices(0), BatchSchedule(10, 4, seed=4).global_indices(0))


def test_schedule_errors() -> None:
    with pytest.raises(ValueError, match="global batch size 11 exceeds the 10 rows"):
        BatchSchedule(10, 11, 0)
    s = BatchSchedule(12, 6, 0)
    with pytest.raises(ValueError, match="not divisible by 4 processes"):
        s.process_indices(0, 0, 4)
    with pytest.raises(ValueError, match="process_index 2"):
        s.process_indices(0, 2, 2)


@pytest.mark.parametrize("step", [0, 1, 5])
def test_global_batch_same_for_any_process_count(shards: Path, step: int) -> None:
    ds = TokenDataset(shards, "input_ids", 8)
    batches = TokenBatches(ds, BatchSchedule(len(ds), 12, seed=0))
    whole = batches.global_batch(step)
    assert whole.shape == (12, 8) and whole.dtype == np.int32
    for count in (1, 2, 4):
        parts = [batches.local_batch(step, i, count) for i in range(count)]
        assert all(p.shape == (12 // count, 8) for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_token_streams_eval_differs_and_fixed_eval_is_stable(shards: Path, tmp_path: Path) -> None:
    cfg = TokenDataConfig(train_path=shards, seq_len=8)
    train, evals = token_streams(cfg, batch_size=8, seed=0, eval_batch_size=4)
    assert evals.dataset is train.dataset  # eval_path defaults to the train shards
    assert evals.schedule.seed == EVAL_SEED_OFFSET
    assert not np.array_equal(train.global_batch(0)[:4], evals.global_batch(0))
    first = evals.fixed_eval_batches(3, 4)
    assert first.shape == (3, 4, 8)
    np.testing.assert_array_equal(first, evals.fixed_eval_batches(3, 4))
    np.testing.assert_array_equal(first[2], evals.global_batch(2))
    halves = [evals.fixed_eval_batches(3, 4, i, 2) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves, axis=1), first)

    val = _write(tmp_path / "val.parquet", _rows(5, 8, start=900))
    _, evals = token_streams(cfg.model_copy(update={"eval_path": val}), batch_size=4, seed=0)
    assert evals.dataset.n_rows == 5 and evals.global_batch(0).min() >= 900


def test_prefetcher_matches_direct_calls_and_restarts() -> None:
    calls: list[int] = []

    def fn(step: int) -> np.ndarray:
        calls.append(step)
        return np.full(3, step)

    with Prefetcher(fn, start_step=2) as pf:
        for step in (2, 3, 4, 9, 10, 0):  # 9 and 0 are out of order: the worker restarts there
            np.testing.assert_array_equal(pf.get(step), np.full(3, step))
        thread = pf._thread
    assert thread is None or not thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        pf.get(1)


def test_prefetcher_reraises_and_recovers() -> None:
    def fn(step: int) -> int:
        if step == 1:
            raise KeyError("boom")
        return step

    pf = Prefetcher(fn, 0)
    assert pf.get(0) == 0
    with pytest.raises(KeyError, match="boom"):
        pf.get(1)
    assert pf.get(2) == 2
    pf.close()
    assert not any(t.name == "token-prefetch" and t.is_alive() for t in threading.enumerate())


@pytest.mark.data
def test_stories260k_train_shard(stories260k_dir: Path) -> None:
    ds = TokenDataset(stories260k_dir / "train-00000.parquet", "input_ids", 256)
    assert ds.tokens.shape == (2048, 256) and ds.tokens.dtype == np.int32
    assert (ds.tokens[:, 0] == 1).all() and ds.tokens.min() >= 0 and ds.tokens.max() < 512
    with pytest.raises(ValueError, match=r"train-00000\.parquet.*data\.seq_len=257"):
        TokenDataset(stories260k_dir / "train-00000.parquet", "input_ids", 257)

    train, evals = token_streams(
        TokenDataConfig(train_path=stories260k_dir / "train-00000.parquet", seq_len=128),
        batch_size=64,
        seed=0,
    )
    batches = TokenBatches(ds, BatchSchedule(len(ds), 64, seed=0))
    # A different seq_len is the same rows cut shorter.
    np.testing.assert_array_equal(train.local_batch(40), batches.local_batch(40)[:, :128])
    for count in (2, 4):
        parts = [train.local_batch(40, i, count) for i in range(count)]
        np.testing.assert_array_equal(np.concatenate(parts), train.local_batch(40))
    assert not np.array_equal(train.local_batch(0), evals.local_batch(0))
