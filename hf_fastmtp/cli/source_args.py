"""Options that say how to read a dataset of prompts, shared by `fastmtp distill --prompts` and `bench --questions`."""

from __future__ import annotations

import argparse

from ..prompt_sources import SourceOptions


def add_source_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """`--split`, `--subset` and the column options, applied to every dataset that `what` names."""
    group = parser.add_argument_group(
        f"reading {what}",
        "JSONL files are read line by line; dataset folders, data files (.parquet, .csv, .json) and Hub dataset ids "
        "with `datasets.load_dataset` (offline from its cache under HF_HUB_OFFLINE=1). Columns are found by name: "
        "prompt, turns (the first) or messages (the first user turn); id or question_id; source or category; lang.",
    )
    group.add_argument("--split", help="dataset split (default: the only one, or train)")
    group.add_argument("--subset", metavar="NAME", help="dataset configuration (load_dataset's `name`)")
    group.add_argument(
        "--prompt-column", metavar="NAME", help="column holding the prompt: a string, or a list of turns (the first)"
    )
    group.add_argument(
        "--messages-column", metavar="NAME", help="column holding a chat (role, content): its first user turn is asked"
    )
    group.add_argument(
        "--id-column", metavar="NAME", help="column of unique row ids (default: id, else the row index)"
    )


def source_options(args: argparse.Namespace) -> SourceOptions:
    return SourceOptions(
        split=args.split,
        subset=args.subset,
        prompt_column=args.prompt_column,
        messages_column=args.messages_column,
        id_column=args.id_column,
    )
