"""Training data: distilled rows as token ids, batched and packed for the head."""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers import (
    PreTrainedTokenizerBase,
)

from ..jsonl import iter_json_lines
from ..prompts import encode_chat
from . import TrainError
from .distill import DistillError, tokenizer_fingerprint
from .distilled_dataset import open_distilled

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One training sequence: prompt then response token ids, and where the response starts."""

    id: str
    input_ids: tuple[int, ...]
    prompt_length: int

    @property
    def num_pairs(self) -> int:
        """Head inputs (h_p, t_{p+1}) that have a label t_{p+2}: positions 0 .. len-3."""
        return len(self.input_ids) - 2

    @property
    def num_labels(self) -> int:
        """Response tokens the head predicts (at step 1): those at index >= 2 (a pair needs h_p, t_{p+1} before)."""
        return len(self.input_ids) - max(self.prompt_length, 2)


@dataclass
class DataReport:
    """What loading kept and dropped, for the warnings and the training summary."""

    rows_read: int = 0
    truncated: int = 0
    dropped_no_response: int = 0
    dropped_too_long: int = 0
    sources: list[str] = field(default_factory=list)  # the prompts' datasets, for the model card
    manifest: dict | None = None  # the distill manifest (model, sampling) when the data has one


def load_distilled_examples(
    data: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_rows: int | None = None,
    max_seq_len: int,
) -> tuple[list[Example], DataReport]:
    """
    Rows of a `fastmtp distill` folder, a dataset folder or file of its rows, or a Hub dataset id of them (what
    `fastmtp distill --push-to-hub` uploads), refused if their manifest names another tokenizer.
    """
    try:
        rows_iter, manifest = open_distilled(data)
        if manifest is not None:
            check_tokenizer(manifest, tokenizer, data)
        else:
            logger.warning(
                "%s has no manifest.json: the tokenizer its token ids were made with cannot be checked, only that "
                "they fit this vocabulary.",
                data,
            )
        rows, sources = [], set()
        for row in rows_iter:
            if max_rows is not None and len(rows) == max_rows:
                break
            rows.append((str(row["id"]), row["prompt_ids"], row["response_ids"]))
            sources.add(str(row["source"]))
    except (FileNotFoundError, DistillError) as error:
        raise TrainError(str(error)) from None
    vocab_size = len(tokenizer)
    for row_id, prompt_ids, response_ids in rows:
        for name, ids in (("prompt_ids", prompt_ids), ("response_ids", response_ids)):
            if not isinstance(ids, list) or not all(isinstance(t, int) and 0 <= t < vocab_size for t in ids):
                raise TrainError(
                    f"{data}: row {row_id!r} has malformed {name} (not a list of token ids < {vocab_size})."
                )
    examples, report = build_examples(rows, max_seq_len, sources)
    report.manifest = manifest
    return examples, report


def check_tokenizer(manifest: dict, tokenizer: PreTrainedTokenizerBase, folder: str | os.PathLike) -> None:
    """Token ids are only meaningful with the tokenizer that made them."""
    made_with = manifest.get("tokenizer")
    if not isinstance(made_with, dict) or "fingerprint" not in made_with or "vocab_size" not in made_with:
        raise TrainError(f"{folder}/manifest.json does not record the tokenizer its data was made with.")
    ours = {"vocab_size": len(tokenizer), "fingerprint": tokenizer_fingerprint(tokenizer)}
    if made_with["fingerprint"] != ours["fingerprint"] or made_with["vocab_size"] != ours["vocab_size"]:
        raise TrainError(
            f"{folder} was made with another tokenizer (vocab size {made_with['vocab_size']}, fingerprint "
            f"{made_with['fingerprint']}) than this base model's (vocab size {ours['vocab_size']}, fingerprint "
            f"{ours['fingerprint']}, model {manifest.get('model')!r} made the data): its token ids would be "
            "meaningless. Train with the base the data was distilled from, or distill data with this one."
        )


def load_reference_examples(
    path: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_rows: int | None = None,
    max_seq_len: int,
) -> tuple[list[Example], DataReport]:
    """
    The paper's "fixed data" ablation: a prompts JSONL whose rows hold a `prompt` and a human `reference` answer; the
    response is the reference's tokens plus EOS, after the prompt in the base's chat template.
    """
    path = Path(path)
    lines = iter_json_lines(path, TrainError, "Reference data file")
    if tokenizer.eos_token_id is None:
        raise TrainError("The tokenizer has no EOS token to end the reference answers with.")
    rows, sources = [], set()
    for number, row in itertools.islice(lines, max_rows):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("prompt", "reference")):
            raise TrainError(f"{path}, line {number}: needs the string fields prompt and reference.")
        if not row["prompt"].strip():
            raise TrainError(f"{path}, line {number}: the prompt is empty.")
        prompt_ids = encode_chat(tokenizer, row["prompt"])["input_ids"][0].tolist()
        response_ids = tokenizer(row["reference"], add_special_tokens=False)["input_ids"]
        response_ids = response_ids + [tokenizer.eos_token_id] if row["reference"].strip() else []
        rows.append((str(row.get("id", f"line-{number}")), prompt_ids, response_ids))
        sources.add(str(row.get("source", path.name)))
    return build_examples(rows, max_seq_len, sources)


def build_examples(
    rows: Sequence[tuple[str, list[int], list[int]]], max_seq_len: int, sources: Iterable[str] = ()
) -> tuple[list[Example], DataReport]:
    """Examples of `(id, prompt_ids, response_ids)` rows, truncated to `max_seq_len`; rows with nothing to learn go."""
    if not rows:
        raise TrainError("The training data has no rows.")
    report, examples = DataReport(rows_read=len(rows), sources=sorted(sources)), []
    for row_id, prompt_ids, response_ids in rows:
        if not response_ids:
            report.dropped_no_response += 1
            continue
        ids = (*prompt_ids, *response_ids)
        if len(ids) > max_seq_len:
            report.truncated += 1
            ids = ids[:max_seq_len]
        example = Example(row_id, ids, len(prompt_ids))
        if example.num_labels <= 0:
            report.dropped_too_long += 1
            continue
        examples.append(example)
    if report.dropped_no_response == len(rows):
        raise TrainError(f"None of the {len(rows)} rows has a response: there is nothing to train the head on.")
    if not examples:
        raise TrainError(
            f"All {len(rows)} rows are dropped: their prompts leave no response token within --max-seq-len "
            f"{max_seq_len} ({report.dropped_no_response} without a response). Raise --max-seq-len or shorten them."
        )
    if report.truncated:
        logger.warning("Truncated %d rows longer than --max-seq-len %d tokens.", report.truncated, max_seq_len)
    if report.dropped_too_long or report.dropped_no_response:
        logger.warning(
            "Dropped %d rows whose prompt fills --max-seq-len %d and %d rows without a response.",
            report.dropped_too_long,
            max_seq_len,
            report.dropped_no_response,
        )
    return examples, report


def is_validation(row_id: str, fraction: float) -> bool:
    """A row's split, fixed by a hash of its id: the same rows are held out whatever the row order or --max-rows."""
    digest = hashlib.sha256(row_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction
