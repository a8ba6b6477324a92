"""
Self-distilled data as a Hugging Face dataset: out of `fastmtp distill`, onto the Hub, and back into `fastmtp train`.

The JSONL shards stay the crash-safe log that a running distill appends to. Beside them, `export_dataset` writes
    data/shard-NNNNN.parquet   the same rows, one Parquet file per shard (rewritten only when its shard changed)
    README.md                  a dataset card: YAML front matter (`configs` for `load_dataset`, licence, languages)
                               and the base model, sampling settings, prompt sources and their licences
so that `datasets.load_dataset(folder)` reads the folder, and `push_to_hub` uploads a repo that loads the same way.
Token ids are kept as `prompt_ids` and `response_ids` (int32 lists): the compact form, and what training reads.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

from ..decoding.atomic_files import replaced_atomically
from ..jsonl import iter_rows, read_json
from ..prompt_sources import SourceOptions, load_dataset_split, looks_like_hub_id
from .distill import DATA_DIR, MANIFEST_NAME, ROW_FIELDS, DistillError, iter_distilled, read_manifest, restore_log

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
UPLOADED = (CARD_NAME, MANIFEST_NAME, f"{DATA_DIR}/*.parquet")  # the JSONL log stays local: the Parquet files hold it
TOKEN_COLUMNS = ("prompt_ids", "response_ids")
# Parquet compression: zstd keeps 20k SmolLM2 answers, text included, near 9 MB (snappy, datasets' own: 1.4x that).
COMPRESSION = {"compression": "zstd", "compression_level": 19}
# Licences of the prompt sets this project distils from (../shared/data/README.md); others: see their own card.
SOURCE_LICENCES = {
    "alpaca_en": "cc-by-nc-4.0",
    "alpaca_zh": "cc-by-nc-4.0",
    "code_alpaca": "cc-by-nc-4.0",
    "gsm8k_train": "mit",
}


def export_dataset(folder: str | os.PathLike, repo_id: str | None = None) -> Path:
    """
    Brings the Parquet files and the card of a distilled folder up to date with its shards; returns the card.
    `repo_id` (where it is pushed) goes into the card's example code.
    """
    import datasets
    import pyarrow.parquet

    folder = Path(folder)
    manifest = read_manifest(folder)
    restore_log(folder)  # rows whose log is gone (a clone of the Parquet files) stay in the export
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "source": datasets.Value("string"),
            "lang": datasets.Value("string"),
            "prompt": datasets.Value("string"),
            "prompt_ids": datasets.List(datasets.Value("int32")),
            "response_ids": datasets.List(datasets.Value("int32")),
            "response": datasets.Value("string"),
            "finished": datasets.Value("bool"),
        }
    )
    (folder / DATA_DIR).mkdir(exist_ok=True)
    shards = sorted(folder.glob("shard-*.jsonl"))
    for shard in shards:
        target = folder / DATA_DIR / f"{shard.stem}.parquet"
        if target.exists() and target.stat().st_mtime >= shard.stat().st_mtime:
            continue
        rows = [{name: row[name] for name in features} for _, row in iter_rows(shard, ROW_FIELDS, DistillError)]
        with replaced_atomically(target) as staging:
            # pyarrow's own writer: `Dataset.to_parquet` sets snappy on every column. The schema carries the features.
            pyarrow.parquet.write_table(
                pyarrow.Table.from_pylist(rows, schema=features.arrow_schema), staging, **COMPRESSION
            )
    for stale in set((folder / DATA_DIR).glob("shard-*.parquet")) - {
        folder / DATA_DIR / f"{s.stem}.parquet" for s in shards
    }:
        stale.unlink()
    card = folder / CARD_NAME
    with replaced_atomically(card) as staging:
        staging.write_text(dataset_card(manifest, _row_counts(folder), repo_id), encoding="utf-8")
    return card


def dataset_card(manifest: dict, sources: dict[str, dict[str, int]], repo_id: str | None = None) -> str:
    """README.md of a distilled dataset; `sources` maps each prompt source to its rows per language."""
    from huggingface_hub import DatasetCardData

    licences = {SOURCE_LICENCES.get(source) for source in sources}
    licence = licences.pop() if len(licences) == 1 and None not in licences else None
    languages = sorted({lang for langs in sources.values() for lang in langs} - {"und"})
    rows = manifest["counts"]["rows"]
    data = DatasetCardData(
        license=licence or "other",
        license_name=None if licence else "mixed-see-prompt-sources",
        language=languages or None,
        task_categories=["text-generation"],
        tags=["fastmtp", "self-distillation", "synthetic"],
        size_categories=[_size_category(rows)],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": f"{DATA_DIR}/*.parquet"}]}],
        base_model=manifest["model"],
        fastmtp={key: manifest[key] for key in ("format_version", "tokenizer", "sampling", "counts")},
    )
    sampling = manifest["sampling"]
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        "# Self-distilled data for a FastMTP head",
        "",
        f"Answers of `{manifest['model']}` to {rows} prompts, made with `fastmtp distill` (hf_fastmtp): each prompt "
        "in the model's own chat template, answered with "
        + (
            "greedy decoding"
            if sampling["temperature"] == 0
            else f"temperature {sampling['temperature']}, top-k {sampling['top_k']}, top-p {sampling['top_p']}"
        )
        + f", at most {sampling['max_new_tokens']} new tokens. A FastMTP head trained on them (`fastmtp train --data "
        f"{repo_id or 'REPO_ID_OR_FOLDER'}`) learns the distribution it will draft for.",
        "",
        f"Token ids are those of this tokenizer only (vocabulary size {manifest['tokenizer']['vocab_size']}, "
        f"fingerprint `{manifest['tokenizer']['fingerprint']}`); `manifest.json` holds every setting and run.",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        f'rows = load_dataset("{repo_id or "REPO_ID_OR_FOLDER"}", split="train")  # id, source, lang, prompt, '
        "prompt_ids, response_ids, response, finished",
        "```",
        "",
        "## Prompt sources and licences",
        "",
        "| source | rows | languages | licence of the prompts |",
        "| --- | --- | --- | --- |",
        *(
            f"| {source} | {sum(langs.values())} | "
            f"{', '.join(f'{lang} {count}' for lang, count in sorted(langs.items()))} | "
            f"{SOURCE_LICENCES.get(source, 'see the prompt dataset')} |"
            for source, langs in sorted(sources.items())
        ),
        "",
        f"Prompts read from: {', '.join(sorted({_run_source(run) for run in manifest.get('runs', [])}))}.",
        "The answers are outputs of the base model: its licence's terms on outputs apply too. Data made from "
        "non-commercial prompts (CC BY-NC) is for research and demonstration.",
        "",
    ]
    return "\n".join(lines)


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload self-distilled data (fastmtp distill)",
) -> str:
    """Exports `folder` and uploads its card, manifest and Parquet files to the dataset repo `repo_id`; its URL."""
    from huggingface_hub import HfApi

    export_dataset(folder, repo_id)
    api = HfApi(token=token)
    url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_folder(
        repo_id=repo_id,
        repo_type="dataset",
        folder_path=str(folder),
        allow_patterns=list(UPLOADED),
        delete_patterns=[f"{DATA_DIR}/*.parquet"],  # shards that are gone here (a new shard size) go there too
        commit_message=commit_message,
    )
    return str(url)


def open_distilled(data: str | os.PathLike) -> tuple[Iterator[dict], dict | None]:
    """
    The rows and manifest (None if there is none) of a `fastmtp distill` folder (its JSONL log, the freshest; its
    Parquet files where the log is absent, as in a download of the Hub repo), a dataset folder or data file of such
    rows, or a Hub dataset id.
    """
    path = Path(data)
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        if any(path.glob("shard-*.jsonl")) or not any(path.glob(f"{DATA_DIR}/*.parquet")):
            return iter_distilled(path), read_manifest(path)  # (which says so when there are no shards)
    elif not path.exists() and not looks_like_hub_id(str(data)):
        raise FileNotFoundError(
            f"{data} not found: give a `fastmtp distill` folder, a dataset folder or data file, or a Hub dataset id."
        )
    try:
        dataset = load_dataset_split(data, SourceOptions(), DistillError, "Distilled data")
    except DistillError as error:
        if path.is_dir() and not (path / MANIFEST_NAME).is_file():
            raise DistillError(
                f"{data} is not a folder written by `fastmtp distill` (no {MANIFEST_NAME}). {error}"
            ) from None
        raise
    if missing := [name for name in TOKEN_COLUMNS if name not in dataset.column_names]:
        raise DistillError(
            f"{data} has no {' or '.join(missing)} column: it is not data written by `fastmtp distill` (its columns "
            f"are {', '.join(dataset.column_names)})."
        )
    manifest = _local_manifest(path) if path.exists() else _hub_manifest(str(data))
    return _dataset_rows(dataset), manifest


def _dataset_rows(dataset) -> Iterator[dict]:
    for index, row in enumerate(dataset):
        yield {"id": row.get("id", f"row-{index}"), "source": row.get("source", "dataset"), **row}


def _local_manifest(path: Path) -> dict | None:
    manifest = (path if path.is_dir() else path.parent) / MANIFEST_NAME
    return read_json(manifest, DistillError) if manifest.is_file() else None


def _hub_manifest(repo_id: str) -> dict | None:
    """The manifest that `push_to_hub` uploaded beside the data, from the Hub or (offline) the Hub cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        return read_json(hf_hub_download(repo_id, MANIFEST_NAME, repo_type="dataset"), DistillError)
    except (EntryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
        logger.info("No %s for %s (%s).", MANIFEST_NAME, repo_id, error)
        return None


def _row_counts(folder: Path) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for row in iter_distilled(folder):
        langs = counts.setdefault(str(row["source"]), {})
        langs[str(row["lang"])] = langs.get(str(row["lang"]), 0) + 1
    return counts


def _run_source(run: dict) -> str:
    options = ", ".join(f"{key}={value}" for key, value in sorted(run.get("prompt_options", {}).items()))
    return f"`{run['prompts_file']}`" + (f" ({options})" if options else "")


def _size_category(rows: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if rows < limit:
            return label
    return "1M<n<10M"


__all__ = ["dataset_card", "export_dataset", "open_distilled", "push_to_hub"]
