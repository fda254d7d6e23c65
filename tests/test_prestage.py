"""`pd-jax-prestage`: tokenize, pack, write shards, read back through TokenDataset."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from param_decomp_jax.cli.prestage import main
from param_decomp_jax.runtime.token_data import TokenDataset

STORIES = [
    "Once upon a time, there was a little cat named Tom.\nTom liked to play in the sun.",
    "One day, a big red ball rolled into the garden. The dog was happy!",
    "Lily saw a bird. She said, \u201chello, bird\u201d and smiled.",
]
BOS, EOS = 0, 1


@pytest.fixture
def tokenizer_file(tmp_path: Path) -> Path:
    # Byte-level BPE decodes back to the exact text, so the round trip can compare strings.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(STORIES, trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "stories.txt"
    path.write_text("\n\n".join(STORIES * 4) + "\n", encoding="utf-8")
    return path


def test_round_trip(tmp_path: Path, tokenizer_file: Path, text_file: Path, capsys) -> None:
    out = tmp_path / "shards"
    argv = ["--tokenizer", str(tokenizer_file), "--seq-len", "16", "--out", str(out), "--shard-rows", "5"]
    assert main([*argv, "--eos-id", str(EOS), str(text_file)]) == 0
    assert "rows x 16 tokens" in capsys.readouterr().out

    shards = sorted(out.glob("*.parquet"))
    assert shards[0].name == "train-00000.parquet" and len(shards) >= 2
    table = pq.read_table(shards[0])
    assert table.schema.field("input_ids").type == pa.list_(pa.int32())
    assert table.num_rows == 5 and all(len(r) == 16 for r in table.column("input_ids").to_pylist())
    assert table.schema.metadata[b"pd_jax.seq_len"] == b"16"

    ds = TokenDataset(out, "input_ids", 16)
    assert ds.tokens[0, 0] == BOS  # the default BOS is the tokenizer's <s>
    stream = ds.tokens.reshape(-1).tolist()
    docs = _split_docs(stream)
    tok = Tokenizer.from_file(str(tokenizer_file))
    complete = docs[:-1]  # the last document may be cut by the dropped partial row
    assert len(complete) >= len(STORIES)
    for i, doc in enumerate(complete):
        assert doc[-1] == EOS
        assert tok.decode(doc[:-1]) == STORIES[i % len(STORIES)]

    # Re-running into the same folder refuses unless told to overwrite.
    assert main([*argv, str(text_file)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--split", "file", "--bos-id", "-1", str(text_file)]) == 0
    again = TokenDataset(out, "input_ids", 16).tokens.reshape(-1).tolist()
    whole = tok.encode("\n\n".join(STORIES * 4) + "\n", add_special_tokens=False).ids
    assert BOS not in again and again == whole[: len(again)]


def _split_docs(stream: list[int]) -> list[list[int]]:
    starts = [i for i, t in enumerate(stream) if t == BOS] + [len(stream)]
    return [stream[a + 1 : b] for a, b in zip(starts, starts[1:], strict=False)]


def test_line_split_and_multiple_files(tmp_path: Path, tokenizer_file: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("Tom liked to play.\n\nThe dog was happy!\n", encoding="utf-8")
    b.write_text("Lily saw a bird.\n" * 20, encoding="utf-8")
    out = tmp_path / "out"
    argv = ["--tokenizer", str(tokenizer_file), "--seq-len", "8", "--out", str(out), "--split", "line"]
    assert main([*argv, "--prefix", "val", str(a), str(b)]) == 0
    tokens = TokenDataset(out / "val-00000.parquet", "input_ids", 8).tokens
    tok = Tokenizer.from_file(str(tokenizer_file))
    docs = _split_docs(tokens.reshape(-1).tolist())
    assert [tok.decode(d) for d in docs[:3]] == [
        "Tom liked to play.",
        "The dog was happy!",
        "Lily saw a bird.",
    ]


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_text", "text file"),
        ("missing_tokenizer", "tokenizer file"),
        ("bad_tokenizer", "cannot load tokenizer"),
        ("bad_bos", "--bos-id 9999 is outside"),
        ("too_short", "fewer than one row"),
        ("not_utf8", "not UTF-8"),
    ],
)
def test_errors_exit_2_with_one_line(
    tmp_path: Path, tokenizer_file: Path, text_file: Path, capsys, case: str, message: str
) -> None:
    tokenizer, text, extra = tokenizer_file, text_file, []
    if case == "missing_text":
        text = tmp_path / "absent.txt"
    elif case == "missing_tokenizer":
        tokenizer = tmp_path / "absent.json"
    elif case == "bad_tokenizer":
        tokenizer = tmp_path / "bad.json"
        tokenizer.write_text("{not json")
    elif case == "bad_bos":
        extra = ["--bos-id", "9999"]
    elif case == "too_short":
        extra = ["--seq-len", "100000"]
    elif case == "not_utf8":
        text = tmp_path / "latin1.bin"
        text.write_bytes(b"caf\xe9\n")
    argv = ["--tokenizer", str(tokenizer), "--seq-len", "16", "--out", str(tmp_path / "o"), *extra, str(text)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_process_exit_code_and_help(tmp_path: Path, tokenizer_file: Path) -> None:
    cmd = [sys.executable, "-m", "param_decomp_jax.cli.prestage"]
    proc = subprocess.run(
        [*cmd, "--tokenizer", str(tokenizer_file), "--seq-len", "8", "--out", str(tmp_path), "missing.txt"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "missing.txt" in proc.stderr
    assert main(["--help"]) == 0
    assert main(["--seq-len", "0"]) == 2  # argparse usage error, same exit code
