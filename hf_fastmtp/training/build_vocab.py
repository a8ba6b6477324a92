"""`fastmtp build-vocab`: per-language frequent-token maps from self-distilled responses."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..decoding.draft_vocab import detect_language
from ..jsonl import write_json
from .distill import iter_distilled, read_manifest

DEFAULT_SIZES = (4096, 8192, 16384, 32768)
OVERALL = "all"
VOCAB_SECTION = "## Vocabulary maps"


def count_tokens(rows: Iterable[dict], vocab_size: int) -> dict[str, np.ndarray]:
    """Token counts of the responses, overall ("all") and per detected language of each response's text."""
    counts: dict[str, np.ndarray] = {OVERALL: np.zeros(vocab_size, dtype=np.int64)}
    for row in tqdm(rows, desc="counting", unit="response"):
        ids = np.asarray(row["response_ids"], dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(
                f"Row {row.get('id')!r} has token ids outside [0, {vocab_size}): "
                "the data comes from another tokenizer."
            )
        token_counts = np.bincount(ids, minlength=vocab_size)
        counts[OVERALL] += token_counts
        language = detect_language(row.get("response", ""))
        if language is not None:
            counts.setdefault(language, np.zeros(vocab_size, dtype=np.int64))
            counts[language] += token_counts
    return counts


def ranked_token_ids(language_counts: np.ndarray, overall_counts: np.ndarray) -> np.ndarray:
    """All token ids, most frequent in the language first; ties go to the overall count, then to the lower id."""
    ids = np.arange(language_counts.size)
    return np.lexsort((ids, -overall_counts, -language_counts))


def build_maps(
    counts: dict[str, np.ndarray], sizes: Sequence[int], min_tokens: int = 10_000
) -> dict[str, dict[int, torch.LongTensor]]:
    """Top-N maps per language with at least `min_tokens` counted tokens (fewer would give a noisy ranking)."""
    maps = {}
    for language, language_counts in counts.items():
        if language != OVERALL and language_counts.sum() < min_tokens:
            continue
        ranking = torch.from_numpy(ranked_token_ids(language_counts, counts[OVERALL]).copy())
        maps[language] = {size: ranking[:size].clone() for size in sizes if size <= ranking.numel()}
    return maps


def write_maps(maps: dict[str, dict[int, torch.LongTensor]], output_dir: Path, counts: dict[str, np.ndarray]) -> dict:
    """Writes `freq_<lang>_<N>.pt` files and `vocab_manifest.json`; returns the manifest."""
    output_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for language, by_size in maps.items():
        for size, token_ids in by_size.items():
            name = f"freq_{language}_{size}.pt"
            torch.save(token_ids, output_dir / name)
            files.setdefault(language, {})[size] = name
    coverage = {
        language: {
            size: float(counts[language][by_size[size].numpy()].sum() / max(counts[language].sum(), 1))
            for size in by_size
        }
        for language, by_size in maps.items()
    }
    manifest = {
        "files": files,
        "tokens_counted": {language: int(counts[language].sum()) for language in maps},
        "coverage": coverage,
    }
    (output_dir / "vocab_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def install_into_head(head_dir: Path, output_dir: Path, manifest: dict, default: str, size: int | None = None) -> None:
    """
    Points a head folder's config at one map per language, so `from_pretrained` loads them: the `size` map (what
    `draft_vocab="auto"` drafts over), or the largest, whose top-N `draft_vocab="<lang>:<N>"` also gives.
    """
    config_path = head_dir / "config.json"
    config = json.loads(config_path.read_text())
    relative = os.path.relpath(output_dir, head_dir)
    chosen = {}
    for language, by_size in manifest["files"].items():
        by_size = {int(available): name for available, name in by_size.items()}  # JSON keys are strings
        pick = size if size is not None else max(by_size)
        if pick not in by_size:
            raise ValueError(f"No {pick}-token map for {language!r}: it has {sorted(by_size)} (--sizes).")
        chosen[language] = f"{relative}/{by_size[pick]}"
    config["draft_vocab_maps"] = chosen
    config["default_draft_vocab"] = default
    write_json(config_path, config)
    add_to_model_card(head_dir / "README.md", chosen, manifest, default)


def add_to_model_card(card_path: Path, chosen: dict[str, str], manifest: dict, default: str) -> None:
    """Appends (or replaces) the model card's section on the installed maps: languages, sizes and coverage."""
    if not card_path.is_file():
        return
    rows = ["| language | map | tokens counted | coverage of those tokens |", "| --- | --- | --- | --- |"]
    for language, path in chosen.items():
        size = int(Path(path).stem.rsplit("_", 1)[1])
        coverage = {int(k): v for k, v in manifest["coverage"][language].items()}[size]
        rows.append(f"| {language} | `{path}` | {manifest['tokens_counted'][language]:,} | {coverage:.1%} |")
    section = (
        f"{VOCAB_SECTION}\n\nDrafts are chosen among the frequent tokens of the prompt's language "
        f'(`draft_vocab="auto"`, the default; `"{default}"` when the language is not detected or has no map; '
        '`draft_vocab="full"` turns this off). Verification always uses the full vocabulary, so the output does '
        "not change.\n\n" + "\n".join(rows) + "\n"
    )
    card = card_path.read_text(encoding="utf-8")
    card = card.split(f"\n{VOCAB_SECTION}")[0].rstrip("\n") + "\n\n" + section
    card_path.write_text(card, encoding="utf-8")


def build_vocab(
    data: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    head: str | os.PathLike | None = None,
    sizes: Iterable[int] = DEFAULT_SIZES,
    install_size: int | None = None,
    max_rows: int | None = None,
    default: str = OVERALL,
    min_tokens: int = 10_000,
) -> dict:
    """
    Counts the responses of a distilled folder (the first `max_rows`: the rows a head was trained on) and writes the
    maps to `output_dir` (default: `head/vocab`); with `head`, installs them there. Returns the maps' manifest.
    """
    if output_dir is None and head is None:
        raise ValueError("build_vocab needs output_dir, head, or both.")
    vocab_size = read_manifest(data)["tokenizer"]["vocab_size"]
    counts = count_tokens(itertools.islice(iter_distilled(data), max_rows), vocab_size)
    maps = build_maps(counts, sorted(set(sizes)), min_tokens=min_tokens)
    output_dir = Path(head) / "vocab" if output_dir is None else Path(output_dir)
    manifest = write_maps(maps, output_dir, counts)
    if head is not None:
        install_into_head(Path(head), output_dir, manifest, default=default, size=install_size)
    return manifest
