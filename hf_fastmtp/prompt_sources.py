"""
Prompts from wherever a user keeps them: a JSONL file, a local dataset (folder or data file) or a Hub dataset id.

Every source becomes the same rows, `id`, `source`, `lang`, `prompt`, for `fastmtp distill` (what the base answers)
and `fastmtp bench` (what is timed; `source` is the category). Columns are found by name unless named:
    prompt   `prompt`, else `turns` (Spec-Bench: the first turn), else `messages` (a chat: the first user turn)
    id       `id`, else `question_id`, else `<source>-<row index>`
    source   `source`, else `category`, else the dataset's name (file stem, folder or Hub id)
    lang     `lang`, else `language`, else None: `with_languages` detects it (~1 ms a prompt: only where needed)
JSONL files are read line by line, so that errors name the line; everything else goes through `datasets`, which
honours `HF_HUB_OFFLINE` and its cache.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .decoding.draft_vocab import detect_language
from .jsonl import iter_json_lines

SPEC_BENCH = Path(__file__).resolve().parent / "data" / "spec_bench.jsonl"
PROMPT_COLUMNS = ("prompt", "turns", "messages")
ID_COLUMNS = ("id", "question_id")
SOURCE_COLUMNS = ("source", "category")
LANG_COLUMNS = ("lang", "language")
UNKNOWN_LANG = "und"  # ISO 639-2 "undetermined": too short, mostly code, or not recognised
DATA_FILE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


@dataclass(frozen=True)
class SourceOptions:
    """How to read a dataset: which split and subset, and which columns hold the prompt and the id."""

    split: str | None = None
    subset: str | None = None
    prompt_column: str | None = None
    messages_column: str | None = None
    id_column: str | None = None

    def to_dict(self) -> dict[str, str]:
        """The options that were set: what a manifest records so that the same rows can be read again."""
        return {name: value for name, value in asdict(self).items() if value is not None}


DEFAULT_SOURCE_OPTIONS = SourceOptions()


def read_prompts(
    source: str | os.PathLike,
    options: SourceOptions = DEFAULT_SOURCE_OPTIONS,
    *,
    error: type[Exception] = ValueError,
    what: str = "Prompts",
) -> list[dict]:
    """
    The rows of `source` as `id`, `source`, `lang`, `prompt` dicts, in order; ids are kept as they are (str or int).

    `lang` is None where the data has no language column (`with_languages` detects it). Raises `error` for a missing
    source, a row without a prompt, a duplicated id or an empty dataset, naming the row and what to pass instead.
    """
    if options.prompt_column and options.messages_column:
        raise error("Give --prompt-column or --messages-column, not both.")
    name = source_name(source)
    prompts, position_of_id = [], {}
    for index, (label, position, row) in enumerate(iter_source_rows(source, options, error, what)):
        where = f"{label}, {position}"
        prompt = _prompt(row, options, where, error)
        row_id = _first(row, (options.id_column,) if options.id_column else ID_COLUMNS)
        if row_id is None and options.id_column:
            raise error(f"{where}: no {options.id_column!r} (--id-column).")
        row_id = f"{name}-{index}" if row_id is None else row_id
        if not isinstance(row_id, (str, int)) or isinstance(row_id, bool):
            raise error(f"{where}: the id {row_id!r} is not a string or an integer.")
        if row_id in position_of_id:
            raise error(f"{where}: id {row_id!r} is already used on {position_of_id[row_id]}.")
        position_of_id[row_id] = position
        lang = _first(row, LANG_COLUMNS)
        prompts.append(
            {"id": row_id, "source": str(_first(row, SOURCE_COLUMNS) or name), "lang": lang, "prompt": prompt}
        )
    if not prompts:
        raise error(f"{what} {source} {_split_note(options)}is empty.")
    return prompts


def with_languages(prompts: Iterable[dict]) -> list[dict]:
    """The prompts, each with a `lang`: the data's, or detected (`und` where it cannot be told: short, code)."""
    return [
        prompt if prompt["lang"] is not None else {**prompt, "lang": detect_language(prompt["prompt"]) or UNKNOWN_LANG}
        for prompt in prompts
    ]


def iter_source_rows(
    source: str | os.PathLike, options: SourceOptions, error: type[Exception] = ValueError, what: str = "Prompts"
) -> Iterator[tuple[str, str, Any]]:
    """`(label, position, row)` for each row: the file and its line, or the dataset (and split) and row index."""
    path = Path(source)
    if path.is_file() and path.suffix == ".jsonl":
        for number, row in iter_json_lines(path, error, f"{what} file"):
            yield str(path), f"line {number}", row
        return
    dataset = load_dataset_split(source, options, error, what)
    if len(dataset) == 0:
        return
    named = {options.prompt_column, options.messages_column, options.id_column} - {None}
    if missing := sorted(named - set(dataset.column_names)):
        raise error(
            f"{what} {source} has no column {', '.join(map(repr, missing))}; its columns are "
            f"{', '.join(map(repr, dataset.column_names))}."
        )
    if not named and not set(PROMPT_COLUMNS) & set(dataset.column_names):
        raise error(
            f"{what} {source} has no prompt column among {', '.join(map(repr, dataset.column_names))}; looked for "
            f"{', '.join(PROMPT_COLUMNS)}. Name it with --prompt-column (text, or a list of turns) or "
            "--messages-column (a chat)."
        )
    # Only the columns that are read, so that long unused ones (reference answers, metadata) are never decoded.
    wanted = named | {*PROMPT_COLUMNS, *ID_COLUMNS, *SOURCE_COLUMNS, *LANG_COLUMNS}
    dataset = dataset.select_columns([name for name in dataset.column_names if name in wanted])
    label = f"{source} ({dataset.split})" if dataset.split else str(source)
    for index, row in enumerate(dataset):
        yield label, f"row {index}", row


def load_dataset_split(
    source: str | os.PathLike, options: SourceOptions, error: type[Exception] = ValueError, what: str = "Prompts"
):
    """
    One split of a dataset: a `save_to_disk` folder, a folder of data files or one data file (`load_dataset`), or a
    Hub id (`load_dataset`, offline from the datasets cache under `HF_HUB_OFFLINE=1`).
    """
    import datasets  # (only when a dataset is read: JSONL files and bench runs on the bundled Spec-Bench need none)

    path = Path(source)
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_dir():
            loaded = datasets.load_dataset(str(path), options.subset, split=options.split)
        elif path.is_file() and path.suffix in DATA_FILE_SUFFIXES:
            # One file is one split, whatever --split names (so that one option can serve several sources).
            loaded = datasets.load_dataset(DATA_FILE_SUFFIXES[path.suffix], data_files=str(path), split="train")
        elif path.suffix in DATA_FILE_SUFFIXES:
            raise error(f"{what} file {source} not found.")
        elif not looks_like_hub_id(str(source)):
            raise error(
                f"{what} {source} not found: give a JSONL file, a dataset folder or data file "
                f"({', '.join(DATA_FILE_SUFFIXES)}) or a Hub dataset id."
            )
        else:
            loaded = datasets.load_dataset(str(source), options.subset, split=options.split)
    except ConnectionError as connection_error:
        raise error(
            f"{what} {source}: no such local file or folder, the Hub cannot be reached ({connection_error}), and "
            f"this dataset is not in the datasets cache ({datasets.config.HF_DATASETS_CACHE}). Load it once while "
            "online, or give a local copy."
        ) from None
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as load_error:
        if isinstance(load_error, error):
            raise
        local = "" if path.exists() else "no such local file or folder; "
        raise error(f"{what} {source}: {local}{load_error}") from None
    return _one_split(loaded, source, options, error, what)


def source_name(source: str | os.PathLike) -> str:
    """What a dataset is called in ids and sources: a file's stem, a folder's name, a Hub id's name."""
    path = Path(source)
    return path.stem if path.is_file() else path.name if path.is_dir() else str(source).rstrip("/").split("/")[-1]


def looks_like_hub_id(source: str) -> bool:
    """`name` or `namespace/name` without a data file suffix: other missing paths are reported, not looked up."""
    parts = source.split("/")
    return (
        len(parts) <= 2
        and all(parts)
        and not source.startswith((".", "~"))
        and Path(source).suffix not in DATA_FILE_SUFFIXES
    )


def _one_split(loaded, source: str | os.PathLike, options: SourceOptions, error: type[Exception], what: str):
    """The split asked for; unasked, the only one, or `train` among several."""
    import datasets

    if isinstance(loaded, datasets.Dataset):
        return loaded
    splits = list(loaded)
    if options.split is not None:
        if options.split not in loaded:
            raise error(f"{what} {source} has no split {options.split!r}; it has {', '.join(splits)}.")
        return loaded[options.split]
    if len(splits) == 1 or "train" in loaded:
        return loaded[splits[0] if len(splits) == 1 else "train"]
    raise error(f"{what} {source} has the splits {', '.join(splits)}: choose one with --split.")


def _prompt(row: Any, options: SourceOptions, where: str, error: type[Exception]) -> str:
    """The user message of a row: a string, the first of a list of turns, or the first user turn of a chat."""
    if not isinstance(row, dict):
        raise error(f"{where}: not an object with a prompt.")
    if options.messages_column:
        column, kind = options.messages_column, "messages"
    elif options.prompt_column:
        column, kind = options.prompt_column, "text"
    else:
        column = next((name for name in PROMPT_COLUMNS if row.get(name) is not None), None)
        kind = "messages" if column == "messages" else "text"
        if column is None:
            raise error(
                f"{where}: no prompt column among {', '.join(map(repr, row)) or 'none'}; looked for "
                f"{', '.join(PROMPT_COLUMNS)}. Name it with --prompt-column (text, or a list of turns) or "
                "--messages-column (a chat)."
            )
    if column not in row:
        option = "--messages-column" if kind == "messages" else "--prompt-column"
        raise error(f"{where}: no column {column!r} ({option}); the columns are {', '.join(map(repr, row))}.")
    prompt = _first_user_message(row[column]) if kind == "messages" else _first_turn(row[column])
    if prompt is None:
        expected = (
            "chat messages (role, content) with a user turn"
            if kind == "messages"
            else "a string or a list of turns (a chat goes with --messages-column)"
        )
        raise error(f"{where}: {column!r} is not {expected}: {str(row[column])[:80]!r}.")
    if not prompt.strip():
        raise error(f"{where}: the prompt is empty.")
    return prompt


def _first_turn(value: Any) -> str | None:
    if isinstance(value, list) and value:
        value = value[0]
    return value if isinstance(value, str) else None


def _first_user_message(value: Any) -> str | None:
    if not isinstance(value, list):
        return None
    for message in value:
        if isinstance(message, dict) and message.get("role") == "user":
            return message.get("content") if isinstance(message.get("content"), str) else None
    return None


def _first(row: dict, names: tuple[str, ...]) -> Any:
    return next((row[name] for name in names if row.get(name) is not None), None)


def _split_note(options: SourceOptions) -> str:
    return f"(split {options.split}) " if options.split else ""


__all__ = [
    "DEFAULT_SOURCE_OPTIONS",
    "SPEC_BENCH",
    "SourceOptions",
    "iter_source_rows",
    "load_dataset_split",
    "read_prompts",
    "source_name",
    "with_languages",
]
