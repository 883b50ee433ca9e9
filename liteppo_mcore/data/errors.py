"""The one exception type of the data layer."""

from __future__ import annotations


class DataError(ValueError):
    """A prompt file, tokenizer or dataset setting cannot be used.

    The message names the file and the line (JSONL, 1-based) or row (Parquet, 0-based) when there is
    one, then the problem, then the fix.
    """
