"""Record readers for local prompt files: JSONL (line by line) and Parquet (pyarrow, batch by batch).

Each reader yields ``(location, record)`` pairs, where ``location`` names the file and the line
(JSONL, 1-based, as editors count) or the row (Parquet, 0-based, as pyarrow and pandas count), so that
every later error about a record can point at it. Problems with the file itself raise ``DataError``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from ..config import choices
from .errors import DataError

Record = dict[str, Any]
FORMAT_BY_EXTENSION = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


def detect_format(path: str, fmt: str = "auto") -> str:
    """``jsonl`` or ``parquet`` (config.choices.EXPLICIT_DATA_FORMATS): ``fmt`` itself, or (auto) the one
    the extension names."""
    if fmt in choices.EXPLICIT_DATA_FORMATS:
        return fmt
    if fmt != choices.AUTO:
        raise DataError(f"data.format={fmt!r} is not a known format. "
                        f"Set data.format: {choices.spoken(choices.DATA_FORMATS)}.")
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMAT_BY_EXTENSION:
        raise DataError(
            f"{path}: cannot tell the format from the extension {ext or '(none)'!r} "
            f"(known: {', '.join(sorted(FORMAT_BY_EXTENSION))}). "
            f"Set data.format: {choices.spoken(choices.EXPLICIT_DATA_FORMATS)}."
        )
    return FORMAT_BY_EXTENSION[ext]


def check_file(path: str, key: str) -> None:
    """Raise a ``DataError`` naming ``key`` unless ``path`` is an existing regular file."""
    if os.path.isdir(path):
        raise DataError(f"{key}={path!r} is a directory, not a file. Point {key} at a .jsonl or .parquet file.")
    if not os.path.isfile(path):
        raise DataError(
            f"{key}={path!r}: no such file (relative paths are read from {os.getcwd()!r}). "
            f"Fix the path, or use data.builtin_task for the built-in prompts."
        )


def iter_records(path: str, fmt: str = "auto") -> Iterator[tuple[str, Record]]:
    """``(location, record)`` for every record of a JSONL or Parquet file, in file order."""
    if detect_format(path, fmt) == "jsonl":
        return iter_jsonl(path)
    return iter_parquet(path)


def iter_jsonl(path: str) -> Iterator[tuple[str, Record]]:
    """One JSON object per line; blank lines are skipped; lines are numbered from 1."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            text = _decode_line(raw, where, first=line_no == 1)
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{where}: malformed JSON ({e.msg} at column {e.colno}). "
                    "Each line must hold exactly one JSON object, e.g. {\"prompt\": \"...\", \"answer\": \"...\"}."
                ) from None
            if not isinstance(record, dict):
                raise DataError(
                    f"{where}: the line holds a JSON {type(record).__name__}, not an object. "
                    "Each line must hold one JSON object with the prompt and answer fields."
                )
            yield where, record


def _decode_line(raw: bytes, where: str, *, first: bool) -> str:
    try:
        # utf-8-sig on the first line only: a byte-order mark is legal there and nowhere else.
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line). "
            "Convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8 in.jsonl > out.jsonl."
        ) from None


def iter_parquet(path: str, batch_rows: int = 4096) -> Iterator[tuple[str, Record]]:
    """Every row of a Parquet file as a dict; rows are numbered from 0."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(
            f"{path}: not a readable Parquet file ({e}). Check the file, or set data.format: jsonl."
        ) from None
    row = 0
    for batch in parquet.iter_batches(batch_size=batch_rows):
        for offset, record in enumerate(_batch_rows(batch, path, row)):
            yield f"{path} row {row + offset} (0-based)", record
        row += batch.num_rows


def _batch_rows(batch: Any, path: str, first_row: int) -> list:
    try:
        return batch.to_pylist()
    except UnicodeDecodeError:
        pass
    # Find the offending row so the error can name it; this path only runs on a broken file.
    for i in range(batch.num_rows):
        try:
            batch.slice(i, 1).to_pylist()
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path} row {first_row + i} (0-based): a string column holds bytes that are not valid UTF-8 "
                f"({e.reason}). "
                "Rewrite the column as UTF-8 text."
            ) from None
    raise DataError(f"{path}: a string column holds bytes that are not valid UTF-8. Rewrite the column as UTF-8 text.")
