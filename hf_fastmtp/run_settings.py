"""Run folders (distill, bench, train) refuse to mix work made with other settings: one way to say which changed."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from .jsonl import read_json


def changed_settings(saved: dict, current: dict, keys: Iterable[str] | None = None) -> list[str]:
    """`"<key> <saved> there, <current> now"` for each of `keys` (default: `current`'s) whose value differs."""
    return [
        f"{key} {saved.get(key)!r} there, {current[key]!r} now"
        for key in (current if keys is None else keys)
        if saved.get(key) != current[key]
    ]


def open_run_folder(
    settings_path: Path, identity: dict, run: dict, keys: Sequence[str], error: type[Exception]
) -> tuple[dict, list[str]]:
    """
    The settings a resumable folder recorded, with `run` added to its runs (a new folder is made with `identity`),
    and how they differ from `identity` at `keys`: the caller refuses to mix in its work if they do. Not written.
    """
    if settings_path.exists():
        settings = read_json(settings_path, error)
        changed = changed_settings(settings, identity, keys)
    else:
        settings_path.parent.mkdir(parents=True, exist_ok=True)
        settings, changed = {**identity, "runs": []}, []
    if run not in settings["runs"]:
        settings["runs"].append(run)
    return settings, changed


__all__ = ["changed_settings", "open_run_folder"]
