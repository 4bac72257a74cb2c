"""Training data: read documents (text, JSONL, Parquet or a `datasets` name), tokenize, pack, collate.

Packing follows the `DataCollatorWithFlattening` convention: documents are laid end to end with
`position_ids` that restart at 0 at every document, and the first label of each document is -100, so no
token is trained to predict the next document. The model turns restarting positions into `cu_seqlens` and
resets its recurrent state at each boundary, so a packed batch computes exactly what the documents
compute one by one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
LONG_DOCUMENT_POLICIES = ("error", "truncate", "split")


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 3..258) with pad 0, bos 1, eos 2: a tokenizer that needs no download.

    Matches the config defaults (pad_token_id 0, bos 1, eos 2); for smoke tests and from-scratch toys.
    """

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    offset = 3
    vocab_size = 256 + offset

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        return [byte + self.offset for byte in text.encode("utf-8")]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i - self.offset for i in ids if i >= self.offset).decode("utf-8", errors="replace")


def _read_text_file(path: Path) -> list[str]:
    # One document per non-empty line, as `datasets.load_dataset("text")` does.
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _read_jsonl_file(path: Path, text_column: str) -> list[str]:
    documents = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict) or text_column not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{path}:{number}: no {text_column!r} column (found {keys}); pick one with --text-column")
        documents.append(_as_text(record[text_column], f"{path}:{number}"))
    return documents


def _read_parquet_file(path: Path, text_column: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    table = pq.read_table(path)
    if text_column not in table.column_names:
        raise ValueError(f"{path}: no {text_column!r} column (found {table.column_names}); pick one with --text-column")
    return [_as_text(value, f"{path} row {row}") for row, value in enumerate(table.column(text_column).to_pylist())]


def _as_text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: the text column holds {type(value).__name__}, not a string")
    return value


def _read_hub_dataset(name: str, text_column: str, split: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"{name!r} is not a local file or folder, and loading it as a Hugging Face dataset needs the "
            "`datasets` package: pip install datasets"
        ) from None
    dataset_name, _, config_name = name.partition(":")
    dataset = datasets.load_dataset(dataset_name, config_name or None, split=split)
    if text_column not in dataset.column_names:
        raise ValueError(f"dataset {name!r}: no {text_column!r} column (found {dataset.column_names})")
    return [_as_text(value, f"dataset {name!r}") for value in dataset[text_column]]


def read_documents(source: str | Path, text_column: str = "text", split: str = "train") -> list[str]:
    """Documents from a file (.txt: one per line; .jsonl/.json lines; .parquet), a folder of them, or a
    `datasets` name ("name" or "name:config"). Raises ValueError for empty or malformed data."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES)
        if not files:
            raise ValueError(f"{path}: no .txt, .jsonl, .json or .parquet files inside")
    elif path.is_file():
        files = [path]
    elif path.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES:
        raise FileNotFoundError(f"data file not found: {path}")
    else:
        return _check_not_empty(_read_hub_dataset(str(source), text_column, split), str(source))
    documents = []
    for file in files:
        if file.suffix in JSONL_SUFFIXES:
            documents += _read_jsonl_file(file, text_column)
        elif file.suffix in PARQUET_SUFFIXES:
            documents += _read_parquet_file(file, text_column)
        elif file.suffix in TEXT_SUFFIXES:
            documents += _read_text_file(file)
        else:
            raise ValueError(f"{file}: unsupported file type {file.suffix!r}; use .txt, .jsonl, .json or .parquet")
    return _check_not_empty(documents, str(path))


def _check_not_empty(documents: list[str], where: str) -> list[str]:
    documents = [doc for doc in documents if doc.strip()]
    if not documents:
        raise ValueError(f"{where}: no documents (the data is empty or every text is blank)")
    return documents


def tokenize_documents(
    documents: Sequence[str],
    encode: Callable[[str], list[int]],
    max_length: int,
    eos_token_id: int | None,
    long_documents: str = "error",
) -> list[list[int]]:
    """Token ids per document, eos appended; documents longer than `max_length` tokens are an error,
    truncated, or split into `max_length` pieces, per `long_documents` ("error" | "truncate" | "split")."""
    if long_documents not in LONG_DOCUMENT_POLICIES:
        raise ValueError(f"long_documents must be one of {LONG_DOCUMENT_POLICIES}; got {long_documents!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens; got {max_length}")
    sequences = []
    for index, document in enumerate(documents):
        ids = list(encode(document)) + ([eos_token_id] if eos_token_id is not None else [])
        if len(ids) > max_length:
            if long_documents == "error":
                raise ValueError(
                    f"document {index} has {len(ids)} tokens, more than --max-length {max_length}; raise "
                    "--max-length, or pass --long-documents truncate or --long-documents split"
                )
            if long_documents == "truncate":
                ids = ids[:max_length]
        sequences += [ids[begin : begin + max_length] for begin in range(0, len(ids), max_length)]
    sequences = [ids for ids in sequences if len(ids) >= 2]  # a 1-token piece has nothing to predict
    if not sequences:
        raise ValueError("no document has at least 2 tokens after tokenization")
    return sequences


def pack_sequences(sequences: Sequence[list[int]], max_length: int) -> list[dict[str, list[int]]]:
    """Greedy first-fit packing, in order, into rows of at most `max_length` tokens; each row carries
    `input_ids`, `position_ids` restarting at 0 per document, and `labels` with -100 at document starts."""
    rows: list[dict[str, list[int]]] = []
    current: dict[str, list[int]] = {"input_ids": [], "position_ids": [], "labels": []}
    for ids in sequences:
        if current["input_ids"] and len(current["input_ids"]) + len(ids) > max_length:
            rows.append(current)
            current = {"input_ids": [], "position_ids": [], "labels": []}
        current["input_ids"] += ids
        current["position_ids"] += list(range(len(ids)))
        current["labels"] += [-100] + ids[1:]
    if current["input_ids"]:
        rows.append(current)
    return rows


class PackedCollator:
    """Lays the packed rows of a batch end to end in one (1, total) row: no padding at all."""

    def __call__(self, rows: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return {key: torch.tensor([sum((row[key] for row in rows), [])]) for key in ("input_ids", "position_ids", "labels")}


class PaddedCollator:
    """One document per row, right-padded with `pad_token_id`; padded positions get attention_mask 0 and
    label -100 (the model zeroes their values, so padding changes nothing)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.tensor(row["input_ids"])
            attention_mask[i, :n] = 1
            labels[i, :n] = torch.tensor(row["input_ids"])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def build_examples(sequences: Sequence[list[int]], max_length: int, packing: bool) -> list[dict[str, list[int]]]:
    """Dataset rows: packed rows (see `pack_sequences`) or one document per row."""
    if packing:
        return pack_sequences(sequences, max_length)
    return [{"input_ids": list(ids)} for ids in sequences]
