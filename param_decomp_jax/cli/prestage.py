"""`pd-jax-prestage`: tokenize text files into packed, fixed-length parquet token shards.

Documents become `BOS + tokens [+ EOS]` and are concatenated into one stream that is cut into
rows of exactly `--seq-len` tokens (documents run across row boundaries, as in packed pretraining
data); the last partial row is dropped. Rows go to `<out>/<prefix>-00000.parquet`, ... with one
column `input_ids` (`list<int32>`), which `runtime.token_data.TokenDataset` reads.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

COLUMN = "input_ids"
# Characters handed to the tokenizer per encode_batch call: big enough for its thread pool to help,
# small enough to keep memory flat on multi-GB inputs.
_ENCODE_CHARS = 1 << 20
# Tried in order when --bos-id is not given.
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>", "[BOS]", "<|endoftext|>")


class PrestageError(Exception):
    """A user-facing problem: printed as one line, exit code 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pd-jax-prestage",
        description="Tokenize text files and pack them into fixed-length parquet token shards "
        f"(column '{COLUMN}', list<int32>) for language-model decomposition.",
    )
    p.add_argument(
        "texts", nargs="+", type=Path, metavar="TEXT_FILES", help="UTF-8 text files to tokenize, in order."
    )
    p.add_argument(
        "--tokenizer",
        required=True,
        type=Path,
        help="A Hugging Face `tokenizers` JSON file (tokenizer.json), loaded with Tokenizer.from_file.",
    )
    p.add_argument(
        "--seq-len",
        required=True,
        type=_positive,
        help="Tokens per row; a run reads the first data.seq_len <= this of each row.",
    )
    p.add_argument("--out", required=True, type=Path, help="Output folder (created if missing).")
    p.add_argument(
        "--shard-rows", type=_positive, default=16384, help="Rows per parquet shard (default: 16384)."
    )
    p.add_argument(
        "--bos-id",
        type=int,
        default=None,
        help="Token id put before every document (default: the tokenizer's <s>-like token; -1: none).",
    )
    p.add_argument(
        "--eos-id", type=int, default=None, help="Token id put after every document (default: none)."
    )
    p.add_argument(
        "--split",
        choices=("blank-line", "line", "file"),
        default="blank-line",
        help="What one document is: paragraphs separated by blank lines (default), each "
        "non-empty line, or each whole file.",
    )
    p.add_argument(
        "--prefix", default="train", help="Shard name prefix: <prefix>-00000.parquet (default: train)."
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace existing <prefix>-*.parquet shards in --out (otherwise refuse, so stale shards "
        "are never mixed with new ones).",
    )
    return p


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _documents(path: Path, split: str) -> Iterator[str]:
    """Documents of one file, streamed so large files never sit in memory whole."""
    with path.open(encoding="utf-8") as f:
        if split == "file":
            yield f.read()
            return
        lines: list[str] = []
        for line in f:
            if split == "line":
                if line.strip():
                    yield line.rstrip("\n")
                continue
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines).rstrip("\n")
                lines = []
        if lines:
            yield "".join(lines).rstrip("\n")


def _load_tokenizer(path: Path):
    from tokenizers import Tokenizer  # deferred: `--help` should not pay for it

    if not path.is_file():
        raise PrestageError(f"tokenizer file {path} does not exist")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust side raises a bare Exception for any parse problem
        raise PrestageError(f"cannot load tokenizer {path}: {str(err).splitlines()[0]}") from err


def _special_ids(tok, bos_id: int | None, eos_id: int | None) -> tuple[int | None, int | None]:
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if bos_id is None:
        found = [i for i in (tok.token_to_id(n) for n in _BOS_NAMES) if i is not None]
        if not found:
            raise PrestageError(
                f"no BOS token found in the tokenizer (looked for {', '.join(_BOS_NAMES)}); "
                "pass --bos-id ID, or --bos-id -1 for none"
            )
        bos_id = found[0]
    bos = None if bos_id == -1 else bos_id
    for name, value in (("--bos-id", bos), ("--eos-id", eos_id)):
        if value is not None and not 0 <= value < vocab:
            raise PrestageError(f"{name} {value} is outside the tokenizer's vocabulary [0, {vocab})")
    return bos, eos_id


class _ShardWriter:
    """Accumulates packed tokens and writes full shards of `shard_rows` rows."""

    def __init__(self, out: Path, prefix: str, seq_len: int, shard_rows: int, metadata: dict[str, str]):
        self.out, self.prefix, self.seq_len, self.shard_rows = out, prefix, seq_len, shard_rows
        self.metadata = {k.encode(): v.encode() for k, v in metadata.items()}
        self.pending: list[np.ndarray] = []
        self.n_pending = 0
        self.n_shards = self.n_rows = 0

    def add(self, ids: np.ndarray) -> None:
        self.pending.append(ids)
        self.n_pending += ids.size
        while self.n_pending >= self.shard_rows * self.seq_len:
            self._flush(self.shard_rows)

    def finish(self) -> int:
        """Writes the last (smaller) shard; returns the tokens dropped from the final partial row."""
        rows = self.n_pending // self.seq_len
        if rows:
            self._flush(rows)
        return self.n_pending

    def _flush(self, rows: int) -> None:
        stream = np.concatenate(self.pending)
        take = rows * self.seq_len
        values, rest = stream[:take], stream[take:]
        self.pending, self.n_pending = [rest], rest.size
        offsets = np.arange(0, take + 1, self.seq_len, dtype=np.int32)
        column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int32()))
        table = pa.table({COLUMN: column}).replace_schema_metadata(self.metadata)
        path = self.out / f"{self.prefix}-{self.n_shards:05d}.parquet"
        # Write then rename, so an interrupted run never leaves a truncated shard that looks valid.
        tmp = path.with_suffix(".parquet.tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)
        self.n_shards += 1
        self.n_rows += rows


def prestage(args: argparse.Namespace) -> tuple[int, int, int]:
    """Runs the tokenize-and-pack pipeline; returns (rows, shards, dropped tokens)."""
    for path in args.texts:
        if not path.is_file():
            raise PrestageError(f"text file {path} does not exist")
    tok = _load_tokenizer(args.tokenizer)
    bos, eos = _special_ids(tok, args.bos_id, args.eos_id)

    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PrestageError(f"cannot create output folder {args.out}: {err}") from err
    existing = sorted(args.out.glob(f"{args.prefix}-*.parquet"))
    if existing and not args.overwrite:
        raise PrestageError(
            f"{args.out} already holds {len(existing)} {args.prefix}-*.parquet shards; pass --overwrite"
        )
    for path in existing:
        path.unlink()

    metadata = {
        "pd_jax.tokenizer": args.tokenizer.name,
        "pd_jax.seq_len": str(args.seq_len),
        "pd_jax.bos_id": str(bos),
        "pd_jax.eos_id": str(eos),
    }
    writer = _ShardWriter(args.out, args.prefix, args.seq_len, args.shard_rows, metadata)
    prefix_ids = [] if bos is None else [bos]
    suffix_ids = [] if eos is None else [eos]

    def encode(docs: list[str]) -> None:
        for enc in tok.encode_batch(docs, add_special_tokens=False):
            writer.add(np.asarray(prefix_ids + enc.ids + suffix_ids, dtype=np.int32))

    sizes = [p.stat().st_size for p in args.texts]
    # disable=None: a bar on terminals only, so logs of batch jobs stay readable.
    with tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="prestage", disable=None) as bar:
        done = 0
        for path, size in zip(args.texts, sizes, strict=True):
            batch: list[str] = []
            chars = 0
            try:
                for doc in _documents(path, args.split):
                    batch.append(doc)
                    chars += len(doc)
                    if chars >= _ENCODE_CHARS:
                        encode(batch)
                        # Characters never exceed UTF-8 bytes, so the bar cannot overshoot.
                        bar.update(chars)
                        bar.set_postfix(rows=writer.n_rows)
                        batch, chars = [], 0
            except UnicodeDecodeError as err:
                raise PrestageError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
            encode(batch)
            done += size
            bar.update(done - bar.n)
        dropped = writer.finish()
        bar.set_postfix(rows=writer.n_rows)
    if writer.n_rows == 0:
        raise PrestageError(
            f"the texts hold {dropped} tokens, fewer than one row of --seq-len {args.seq_len}"
        )
    return writer.n_rows, writer.n_shards, dropped


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # argparse already printed usage/help
        return int(exit_.code or 0)
    try:
        rows, shards, dropped = prestage(args)
    except PrestageError as err:
        print(f"pd-jax-prestage: error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {rows} rows x {args.seq_len} tokens in {shards} shard(s) to {args.out} "
        f"({dropped} trailing tokens dropped)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
