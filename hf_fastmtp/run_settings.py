"""Run folders (distill, bench, train) refuse to mix work made with other settings: one way to say which changed."""

from __future__ import annotations

from collections.abc import Iterable


def changed_settings(saved: dict, current: dict, keys: Iterable[str] | None = None) -> list[str]:
    """`"<key> <saved> there, <current> now"` for each of `keys` (default: `current`'s) whose value differs."""
    return [
        f"{key} {saved.get(key)!r} there, {current[key]!r} now"
        for key in (current if keys is None else keys)
        if saved.get(key) != current[key]
    ]


__all__ = ["changed_settings"]
