"""Crash-safe files for long jobs: append-only JSON-lines logs that survive a kill mid-write, and atomic JSON files."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from .decoding.atomic_files import replaced_atomically

logger = logging.getLogger(__name__)


def iter_json_lines(
    path: str | os.PathLike, error: type[Exception] = ValueError, what: str = "File"
) -> Iterator[tuple[int, object]]:
    """`(line number, value)` for each non-blank line of a hand-made JSONL file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} not found.")
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as decode_error:
                raise error(f"{path}, line {number}: not valid JSON ({decode_error.msg}).") from None


def iter_rows(
    path: str | os.PathLike, required: Sequence[str], error: type[Exception] = ValueError
) -> Iterator[tuple[int, dict]]:
    """
    `(offset where the line ends, row)` for each line of an append-only log. Stops quietly at a bad last line, which
    an interrupted append leaves; a bad line anywhere else is corruption and raises `error`, naming file and line.
    """
    end = 0
    with open(path, "rb") as file:
        number = 0
        while line := file.readline():
            number += 1
            row = _parse_line(line, required)
            if row is None:
                if not file.read(1):
                    return
                raise error(f"{path}, line {number}: not a JSON row with the fields {', '.join(required)}.")
            end += len(line)
            yield end, row


def read_rows(path: str | os.PathLike, required: Sequence[str], error: type[Exception] = ValueError) -> list[dict]:
    """The rows of a log (none if it does not exist), cutting off a torn last line so that appends start clean."""
    path = Path(path)
    if not path.exists():
        return []
    lines = list(iter_rows(path, required, error))
    valid_end = lines[-1][0] if lines else 0
    if path.stat().st_size > valid_end:
        logger.warning("%s: removing a torn last line left by an interrupted write.", path)
        os.truncate(path, valid_end)
    return [row for _, row in lines]


def append_rows(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """
    Appends whole lines with one write, then fsyncs: an interrupt can leave only a torn last line, which the next
    reader cuts off, never half a row in the middle of a file.
    """
    data = _lines(rows).encode("utf-8")
    with open(path, "ab") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def read_json(path: str | os.PathLike, error: type[Exception] = ValueError) -> dict:
    """A JSON file such as `write_json` writes; `error` names it when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as decode_error:
        raise error(f"{path} is not valid JSON ({decode_error}).") from None


def write_rows(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Replaces a log's rows at once (the file is always whole), as `append_rows` writes them."""
    _write_whole(path, _lines(rows))


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Written beside the target and renamed over it, so that the file is always whole."""
    _write_whole(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _write_whole(path: str | os.PathLike, text: str) -> None:
    with replaced_atomically(path) as staging, open(staging, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def _lines(rows: Sequence[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _parse_line(line: bytes, required: Sequence[str]) -> dict | None:
    if not line.endswith(b"\n"):
        return None
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return row if isinstance(row, dict) and all(name in row for name in required) else None
