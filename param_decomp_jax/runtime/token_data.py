"""Pre-tokenized token shards for language-model decomposition: load, order, slice, prefetch.

Host-side only (numpy + pyarrow): batches are plain `np.int32[B, T]` arrays that the trainer places
on the mesh. Order is a pure function of `(seed, step)`, so a resumed run at step N reads the same
batch as an uninterrupted one without replaying the stream, and the global batch is the same for
any number of processes (each process loads only its contiguous slice).
"""

from __future__ import annotations

import glob
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from param_decomp_config.data import TokenDataConfig

T = TypeVar("T")

# Added to the run seed for the eval stream: SeedSequence takes arbitrary non-negative ints, so
# eval orders can never coincide with a train order of any seed below 2**32.
EVAL_SEED_OFFSET = 2**32
# Rows decoded per pyarrow batch: bounds the transient gather index (int64, 2x the output block).
_READ_BATCH_ROWS = 8192


def resolve_shards(path: str | Path) -> list[Path]:
    """Parquet shards named by `path`: a file, a folder of `*.parquet`, or a glob; sorted."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        shards = sorted(p for p in path.glob("*.parquet") if p.is_file())
        if not shards:
            raise FileNotFoundError(f"no *.parquet files in folder {path}")
        return shards
    if glob.has_magic(str(path)):
        shards = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())
        if not shards:
            raise FileNotFoundError(f"glob {path} matches no files")
        return shards
    raise FileNotFoundError(
        f"token data path {path} does not exist (expected a parquet file, folder or glob)"
    )


def _where(path: Path, column: str, seq_len: int) -> str:
    # Every load error names the config fields a user would change to fix it.
    return f"{path} (data.column={column!r}, data.seq_len={seq_len})"


def _check_column_type(path: Path, schema: pa.Schema, column: str, seq_len: int) -> None:
    if column not in schema.names:
        raise ValueError(
            f"{_where(path, column, seq_len)}: no column {column!r}; columns present: {schema.names}"
        )
    typ = schema.field(column).type
    is_list = pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)
    if not (is_list and pa.types.is_integer(typ.value_type)):
        raise ValueError(
            f"{_where(path, column, seq_len)}: column {column!r} has type {typ}, "
            "expected a list of integer token ids per row"
        )


def _rows_to_block(arr: pa.Array, seq_len: int, where: str, first_row: int) -> np.ndarray:
    """One batch of list<int> rows -> int32 [n, seq_len], each row cut to its first seq_len ids."""
    if arr.null_count:
        raise ValueError(f"{where}: {arr.null_count} null rows near row {first_row}")
    n = len(arr)
    if pa.types.is_fixed_size_list(arr.type):
        width = arr.type.list_size
        if width < seq_len:
            raise ValueError(f"{where}: rows have {width} tokens, fewer than data.seq_len")
        values = arr.flatten()
        if values.null_count:
            raise ValueError(f"{where}: null token ids near row {first_row}")
        block = values.to_numpy(zero_copy_only=False).reshape(n, width)[:, :seq_len]
    else:
        lengths = arr.value_lengths().to_numpy(zero_copy_only=False)
        short = np.flatnonzero(lengths < seq_len)
        if short.size:
            i = int(short[0])
            raise ValueError(
                f"{where}: row {first_row + i} has {lengths[i]} tokens, fewer than data.seq_len "
                f"({short.size} short rows in this batch); lower data.seq_len or re-tokenize"
            )
        # `offsets` index the unsliced child `values`, so gather straight from them without a
        # flatten (which would copy every token, including the ones past seq_len).
        values = arr.values
        if values.null_count:
            raise ValueError(f"{where}: null token ids near row {first_row}")
        offsets = arr.offsets.to_numpy()[:-1]
        flat = values.to_numpy(zero_copy_only=False)
        block = flat[offsets[:, None] + np.arange(seq_len)]
    if block.size and (block.min() < 0 or block.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{where}: token ids outside [0, 2**31) near row {first_row}")
    return block.astype(np.int32, copy=False)


def _open_parquet(path: Path, column: str, seq_len: int) -> pq.ParquetFile:
    if not path.is_file():
        raise FileNotFoundError(f"token shard {path} does not exist")
    try:
        # memory_map: pages are read straight from the OS page cache instead of a private buffer.
        return pq.ParquetFile(path, memory_map=True)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{_where(path, column, seq_len)}: not a readable parquet file ({err})") from err


class TokenDataset:
    """All rows of the shards' token column as one `int32[n_rows, seq_len]` array (`tokens`)."""

    def __init__(
        self, paths: str | Path | Sequence[str | Path], column: str = "input_ids", seq_len: int = 256
    ):
        if seq_len <= 0:
            raise ValueError(f"data.seq_len must be positive, got {seq_len}")
        if isinstance(paths, (str, Path)):
            self.paths = resolve_shards(paths)
        else:
            self.paths = [Path(p) for p in paths]
            if not self.paths:
                raise ValueError("TokenDataset needs at least one parquet shard")
        self.column, self.seq_len = column, seq_len

        # Read schemas and row counts from footers first so the output is allocated once and
        # filled shard by shard (no concatenate doubling peak memory).
        files: list[pq.ParquetFile] = []
        try:  # close every opened shard even when a later one fails validation
            for p in self.paths:
                files.append(_open_parquet(p, column, seq_len))
                _check_column_type(p, files[-1].schema_arrow, column, seq_len)
            n_rows = sum(f.metadata.num_rows for f in files)
            if n_rows == 0:
                raise ValueError(f"token shards {[str(p) for p in self.paths]} hold no rows")
            self.tokens = np.empty((n_rows, seq_len), dtype=np.int32)
            start = 0
            for p, f in zip(self.paths, files, strict=True):
                where, row = _where(p, column, seq_len), 0
                for batch in f.iter_batches(batch_size=_READ_BATCH_ROWS, columns=[column]):
                    arr = batch.column(0)
                    block = _rows_to_block(arr, seq_len, where, row)
                    self.tokens[start + row : start + row + len(arr)] = block
                    row += len(arr)
                start += row
        finally:
            for f in files:
                f.close()
        self.tokens.flags.writeable = False  # shared by prefetch threads; never mutated

    @property
    def n_rows(self) -> int:
        return self.tokens.shape[0]

    def __len__(self) -> int:
        return self.n_rows

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Rows at `indices` as a fresh `int32[len(indices), seq_len]` array."""
        return np.take(self.tokens, indices, axis=0)


class BatchSchedule:
    """Deterministic, random-access order of rows: step -> global batch indices.

    Epoch `e` visits rows in `np.random.default_rng([seed, e]).permutation(n_rows)`. Batches are
    consecutive windows of the concatenated epoch permutations, so they cross epoch boundaries
    cleanly: every row is seen exactly once per epoch and nothing is dropped. The price: a batch
    straddling a boundary can hold a row twice (once from the end of one epoch, once from the start
    of the next; about tail * head / n_rows duplicates), which is harmless for training.
    """

    def __init__(self, n_rows: int, global_batch_size: int, seed: int, cache_epochs: int = 2):
        if n_rows <= 0:
            raise ValueError(f"n_rows must be positive, got {n_rows}")
        if global_batch_size <= 0:
            raise ValueError(f"global batch size must be positive, got {global_batch_size}")
        if global_batch_size > n_rows:
            raise ValueError(
                f"global batch size {global_batch_size} exceeds the {n_rows} rows of the data; "
                "lower batch_size or add token shards"
            )
        if seed < 0:
            raise ValueError(f"data order seed must be non-negative, got {seed}")
        self.n_rows, self.global_batch_size, self.seed = n_rows, global_batch_size, seed
        # Consecutive steps touch at most two epochs; caching them avoids re-permuting every step.
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_epochs = max(cache_epochs, 2)
        self._lock = threading.Lock()  # the cache is shared with a prefetch thread

    def permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._cache.get(epoch)
            if perm is None:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)
                self._cache[epoch] = perm
                while len(self._cache) > self._cache_epochs:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(epoch)
            return perm

    def epoch(self, step: int) -> float:
        """Fractional epoch reached at the start of `step` (for logging)."""
        return step * self.global_batch_size / self.n_rows

    def global_indices(self, step: int) -> np.ndarray:
        """Row indices of the global batch at `step`, `int64[global_batch_size]`."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        start = step * self.global_batch_size
        stop = start + self.global_batch_size
        first, last = start // self.n_rows, (stop - 1) // self.n_rows
        parts = []
        for e in range(first, last + 1):
            lo = max(start - e * self.n_rows, 0)
            hi = min(stop - e * self.n_rows, self.n_rows)
            parts.append(self.permutation(e)[lo:hi])
        return parts[0].copy() if len(parts) == 1 else np.concatenate(parts)

    def process_indices(self, step: int, process_index: int = 0, process_count: int = 1) -> np.ndarray:
        """The contiguous slice of the global batch at `step` that process `process_index` loads."""
        local = local_batch_size(self.global_batch_size, process_index, process_count)
        lo = process_index * local
        return self.global_indices(step)[lo : lo + local]


def local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by {process_count} processes"
        )
    return global_batch_size // process_count


class TokenBatches:
    """Batches of a `TokenDataset` in the order of a `BatchSchedule`."""

    def __init__(self, dataset: TokenDataset, schedule: BatchSchedule):
        if schedule.n_rows != dataset.n_rows:
            raise ValueError(f"schedule covers {schedule.n_rows} rows but the dataset has {dataset.n_rows}")
        self.dataset, self.schedule = dataset, schedule

    @property
    def seq_len(self) -> int:
        return self.dataset.seq_len

    def global_batch(self, step: int) -> np.ndarray:
        """`int32[global_batch_size, seq_len]` (single-process runs and tests)."""
        return self.dataset.take(self.schedule.global_indices(step))

    def local_batch(self, step: int, process_index: int = 0, process_count: int = 1) -> np.ndarray:
        """This process's rows of the global batch at `step`: `int32[global_batch_size // process_count, seq_len]`."""
        return self.dataset.take(self.schedule.process_indices(step, process_index, process_count))

    def fixed_eval_batches(
        self, n: int, batch_size: int, process_index: int = 0, process_count: int = 1
    ) -> np.ndarray:
        """The first `n` batches of this stream's seed at `batch_size`: `int32[n, B_local, seq_len]`.

        Depends only on (data, seed, n, batch_size), so every eval pass (and every resumed run)
        scores exactly the same sequences, making eval metrics comparable across steps.
        """
        if n <= 0:
            raise ValueError(f"number of eval batches must be positive, got {n}")
        schedule = BatchSchedule(self.dataset.n_rows, batch_size, self.schedule.seed)
        return np.stack(
            [self.dataset.take(schedule.process_indices(i, process_index, process_count)) for i in range(n)]
        )


def token_streams(
    cfg: TokenDataConfig, batch_size: int, seed: int, eval_batch_size: int | None = None
) -> tuple[TokenBatches, TokenBatches]:
    """(train, eval) streams for a `TokenDataConfig`.

    The eval stream reads `cfg.eval_path` (default: the train shards) with seed
    `seed + EVAL_SEED_OFFSET`, so its order never matches the train order.
    """
    train = TokenDataset(cfg.train_path, cfg.column, cfg.seq_len)
    eval_shards = train.paths if cfg.eval_path is None else resolve_shards(cfg.eval_path)
    # Same shards: share the loaded array instead of holding the tokens twice.
    evals = train if eval_shards == train.paths else TokenDataset(eval_shards, cfg.column, cfg.seq_len)
    return (
        TokenBatches(train, BatchSchedule(train.n_rows, batch_size, seed)),
        TokenBatches(
            evals, BatchSchedule(evals.n_rows, eval_batch_size or batch_size, seed + EVAL_SEED_OFFSET)
        ),
    )


class Prefetcher(Generic[T]):
    """Computes `fn(step + 1)` on a background thread while the caller works on step `step`.

    `get(step)` returns `fn(step)`. Values are whatever `fn` returns for that step, so results are
    deterministic as long as `fn` is a pure function of the step; asking for a step out of order
    (e.g. after a resume or a skip) restarts the worker there. Use as a context manager or call
    `close()`; the thread is a daemon so a crashed caller cannot hang interpreter exit.
    """

    def __init__(self, fn: Callable[[int], T], start_step: int = 0, depth: int = 1):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._fn, self._depth = fn, depth
        self._closed = False
        self._thread: threading.Thread | None = None
        self._start(start_step)

    def _start(self, step: int) -> None:
        self._next: int | None = step
        self._stop = threading.Event()
        self._queue: queue.Queue[tuple[int, T | None, BaseException | None]] = queue.Queue(self._depth)
        self._thread = threading.Thread(
            target=self._run, args=(step, self._stop, self._queue), name="token-prefetch", daemon=True
        )
        self._thread.start()

    def _run(self, step: int, stop: threading.Event, q: queue.Queue) -> None:
        while not stop.is_set():
            item: tuple[int, T | None, BaseException | None]
            try:
                item = (step, self._fn(step), None)
            except BaseException as err:  # handed to the caller, who re-raises it in `get`
                item = (step, None, err)
            # Poll so that `close()` can stop a worker blocked on a full queue.
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return
            step += 1

    def _halt(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def get(self, step: int) -> T:
        if self._closed:
            raise RuntimeError("Prefetcher is closed")
        if step != self._next:
            self._halt()
            self._start(step)
        got, value, err = self._queue.get()
        assert got == step, (got, step)  # the worker produces steps strictly in order
        if err is not None:
            self._halt()
            self._next = None  # the worker stopped; the next get restarts it
            raise err
        self._next = step + 1
        return value  # type: ignore[return-value]

    def close(self) -> None:
        self._halt()
        self._closed = True

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
