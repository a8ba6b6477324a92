"""
Self-distillation: the base model answers prompts with its own chat template, and its answers become the head's
training data, so that the head learns the distribution it will have to predict.

An output folder holds:
    manifest.json        model, tokenizer fingerprint, sampling settings and counts
    shard-00000.jsonl    one row per answer: id, source, lang, prompt, prompt_ids, response_ids, response, finished
                         (shard-rank1-00000.jsonl: the shards of process 1 of several, `accelerate launch`/`torchrun`)
    duplicates.jsonl     ids whose answer repeated an earlier one, so that reruns do not answer them again
    data/*.parquet, README.md   the rows as a Hugging Face dataset with its card, written from the shards by
                         `distilled_dataset.export_dataset` (`fastmtp distill` runs it at the end)

Rows are appended a batch at a time with one write and an fsync, and the folder's state is rebuilt from the files on
every start: an interrupted run loses at most the batch in flight, and rerunning the same command resumes it. A
folder that has the Parquet files but not the log (a clone of a repo that commits only those, a download of the Hub
dataset) gets its log back from them first (`restore_log`), so that it resumes too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from ..decoding.appending_cache import append_in_place
from ..decoding.transformers_compat import cache_keyword
from ..jsonl import append_rows, iter_rows, read_json, read_rows, write_json, write_rows
from ..prompt_sources import DEFAULT_SOURCE_OPTIONS, SourceOptions, read_prompts, with_languages
from ..prompts import encode_chat
from ..run_settings import open_run_folder
from .processes import launched_processes, on_main_process

logger = logging.getLogger(__name__)

KNOWN_SOURCES = ("alpaca_en", "alpaca_zh", "gsm8k_train", "code_alpaca")
MANIFEST_NAME = "manifest.json"
DUPLICATES_NAME = "duplicates.jsonl"
SHARD_NAME = re.compile(r"shard-(?:rank(\d+)-)?(\d+)\.jsonl")
DATA_DIR = "data"  # the log's Parquet copy: data/<shard name>.parquet
FORMAT_VERSION = 1
PROMPT_FIELDS = ("id", "source", "lang", "prompt")
ROW_FIELDS = ("id", "source", "lang", "prompt", "prompt_ids", "response_ids", "response", "finished")
DUPLICATE_FIELDS = ("id", "duplicate_of")
# Data made with other values of these is a different distribution: never mix it into one folder.
IDENTITY_KEYS = ("format_version", "model", "tokenizer", "sampling")


class DistillError(ValueError):
    """A problem with the options, the prompts file or the output folder, explained for the user."""


@dataclass
class DistillResult:
    """What one `distill` call added, and the folder's manifest after it."""

    output_dir: Path
    manifest: dict
    new_rows: int = 0
    new_response_tokens: int = 0
    generated_tokens: int = 0
    duplicates_dropped: int = 0
    skipped_too_long: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        counts = self.manifest["counts"]
        rate = self.generated_tokens / self.seconds if self.seconds else 0.0
        return (
            f"{self.new_rows} new rows ({self.new_response_tokens} response tokens) in {self.seconds:.0f} s, "
            f"{rate:.1f} tok/s; {self.duplicates_dropped} duplicates dropped, {self.skipped_too_long} prompts too "
            f"long; {self.output_dir} now holds {counts['rows']} rows, {counts['response_tokens']} response tokens"
        )


def distill(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts_file: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    sources: Sequence[str] | None = None,
    langs: Sequence[str] | None = None,
    num_prompts: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    max_new_tokens: int = 256,
    temperature: float = 0.6,
    top_k: int = 20,
    top_p: float = 0.95,
    max_prompt_tokens: int = 512,
    shard_size: int = 1000,
    model_name: str | None = None,
    progress: bool = True,
    prompt_options: SourceOptions = DEFAULT_SOURCE_OPTIONS,
) -> DistillResult:
    """
    Answers the selected prompts of `prompts_file` with `model` and appends the answers to `output_dir`.

    `prompts_file` is a JSONL file, a dataset folder or file, or a Hub dataset id, read with `prompt_options`
    (`prompt_sources.read_prompts`). `distilled_dataset.export_dataset(output_dir)` then makes the folder a dataset
    that `datasets.load_dataset` reads.

    Prompts already answered there are skipped, so the same call resumes an interrupted run. Batch `i` of the
    selection is always sampled with the same seed, which makes a resumed run give the same rows as an uninterrupted
    one. `temperature=0` is greedy decoding. `model_name` (default: the model's `name_or_path`) goes into the
    manifest.

    Under `accelerate launch` or `torchrun` (`ACCELERATE_USE_CPU=1` on CPUs) the processes answer every N-th batch
    each, with `model` on their own device, and write the rows that one process writes with the same batch size.
    """
    check_options(
        num_prompts=num_prompts,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        max_prompt_tokens=max_prompt_tokens,
        shard_size=shard_size,
    )
    selection = select_prompts(load_prompts(prompts_file, prompt_options), sources, langs, num_prompts, seed)
    eos_ids, pad_id = _eos_and_pad_ids(model, tokenizer)
    output_dir = Path(output_dir)
    identity = {
        "format_version": FORMAT_VERSION,
        "model": model_name if model_name is not None else model.config.name_or_path,
        "tokenizer": {"vocab_size": len(tokenizer), "fingerprint": tokenizer_fingerprint(tokenizer)},
        "sampling": {"temperature": temperature, "top_k": top_k, "top_p": top_p, "max_new_tokens": max_new_tokens},
    }
    run = {
        "prompts_file": str(prompts_file),
        **({"prompt_options": prompt_options.to_dict()} if prompt_options.to_dict() else {}),
        "sources": sorted(sources) if sources else None,
        "langs": sorted(langs) if langs else None,
        "num_prompts": num_prompts,
        "seed": seed,
        "batch_size": batch_size,
        "max_prompt_tokens": max_prompt_tokens,
        "dtype": str(model.dtype).removeprefix("torch."),
    }
    processes = launched_processes(error=DistillError)  # one, or those of `accelerate launch` / `torchrun`
    rank, num_processes = processes.process_index, processes.num_processes
    # The main process owns the files that the processes share (manifest, duplicates); each appends to its own shards.
    manifest = on_main_process(lambda: _open_folder(output_dir, identity, run))
    on_main_process(lambda: restore_log(output_dir))
    written = _Written.scan(output_dir, shard_size, shard_rank=rank if num_processes > 1 else None)

    # Whole batches go round-robin to the processes. Batch i is sampled with its own seed whichever process answers
    # it, so that N processes write the rows that one writes with the same batch size.
    batches = [selection[start : start + batch_size] for start in range(0, len(selection), batch_size)]
    pending = [index for index, batch in enumerate(batches) if any(p["id"] not in written.ids for p in batch)]
    mine, skipped_here = _encode_pending(
        tokenizer, batches, pending[rank::num_processes], written.ids, max_prompt_tokens
    )
    # Also where every process has read the folder, before any of them appends to it.
    shares = gather_object([(skipped_here, sum(len(batch) for _, batch in mine))])
    skipped, total = (sum(column) for column in zip(*shares))
    if skipped:
        logger.warning("Skipping %d prompts longer than %d tokens (--max-prompt-tokens).", skipped, max_prompt_tokens)
    manifest["counts"] = written.counts(skipped)
    if processes.is_main_process:
        write_json(output_dir / MANIFEST_NAME, manifest)

    result = DistillResult(output_dir, manifest, skipped_too_long=skipped)
    start = time.perf_counter()
    bar = tqdm(total=total, unit="prompt", desc="distill", disable=not (progress and processes.is_main_process))
    with bar:
        for round_index in range(math.ceil(len(pending) / num_processes)):
            index, batch = mine[round_index] if round_index < len(mine) else (None, [])
            rows = []
            if batch:
                choose = _token_chooser(temperature, top_k, top_p, _batch_seed(seed, index), model.device)
                rows = _answer_rows(model, tokenizer, batch, choose, eos_ids, pad_id, max_new_tokens)
            # Every process counts the answers of all, in batch order: they drop the duplicates that one process would.
            answered = gather_object([_Answer.of(row) for row in rows])
            duplicates = written.record(answered)
            dropped = {duplicate["id"] for duplicate in duplicates}
            written.append([row for row in rows if row["id"] not in dropped])
            processes.wait_for_everyone()  # the round's rows are all written before the shared files count them
            manifest["counts"] = written.counts(skipped)
            if processes.is_main_process:
                # After the rows: if a crash falls in between, the duplicates are merely answered again.
                if duplicates:
                    append_rows(output_dir / DUPLICATES_NAME, duplicates)
                write_json(output_dir / MANIFEST_NAME, manifest)

            result.new_rows += len(answered) - len(dropped)
            result.new_response_tokens += sum(answer.tokens for answer in answered if answer.id not in dropped)
            result.generated_tokens += sum(answer.tokens for answer in answered)
            result.duplicates_dropped += len(dropped)
            result.seconds = time.perf_counter() - start
            bar.update(len(answered))
            bar.set_postfix_str(f"{result.generated_tokens / result.seconds:.1f} tok/s")
    return result


def check_options(
    *,
    num_prompts: int | None,
    batch_size: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    max_prompt_tokens: int,
    shard_size: int,
) -> None:
    """Raises `DistillError` for an option out of range; cheap, so the CLI runs it before loading a model."""
    positive = {
        "num_prompts": num_prompts,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "max_prompt_tokens": max_prompt_tokens,
        "shard_size": shard_size,
    }
    for name, value in positive.items():
        if value is not None and value < 1:
            raise DistillError(f"{name} must be at least 1, got {value}.")
    if temperature < 0:
        raise DistillError(f"temperature must be >= 0 (0 is greedy), got {temperature}.")
    if top_k < 0:
        raise DistillError(f"top_k must be >= 0 (0 turns it off), got {top_k}.")
    if not 0 < top_p <= 1:
        raise DistillError(f"top_p must be in (0, 1], got {top_p}.")


def load_prompts(source: str | os.PathLike, options: SourceOptions = DEFAULT_SOURCE_OPTIONS) -> list[dict]:
    """
    The prompts of a JSONL file, dataset folder or file, or Hub dataset id, as `id`, `source`, `lang`, `prompt`
    strings; `lang` is None where the data does not give it (`select_prompts` detects it where it is needed).
    """
    rows = read_prompts(source, options, error=DistillError, what="Prompts")
    return [{name: None if row[name] is None else str(row[name]) for name in PROMPT_FIELDS} for row in rows]


def select_prompts(
    prompts: Sequence[dict],
    sources: Iterable[str] | None = None,
    langs: Iterable[str] | None = None,
    num_prompts: int | None = None,
    seed: int = 0,
) -> list[dict]:
    """
    The prompts matching the filters, in an order shuffled by `seed`; `num_prompts` keeps the first N of that order.

    The shuffle mixes sources and languages, so that a run stopped early still has a representative sample, and a
    larger N with the same seed extends a smaller one instead of replacing it.
    """
    # Languages that the data does not give are detected for the prompts that need one: all to filter, else the chosen.
    everything = with_languages(prompts) if langs else list(prompts)
    order = list(everything)
    for name, wanted in (("source", sources), ("lang", langs)):
        if wanted:
            available = {prompt[name] for prompt in everything}
            if unknown := set(wanted) - available:
                raise DistillError(f"No prompt has {name} {sorted(unknown)}; the prompts have {sorted(available)}.")
            order = [prompt for prompt in order if prompt[name] in wanted]
    if not order:
        raise DistillError("No prompt is left after filtering by source and language.")
    random.Random(seed).shuffle(order)
    if num_prompts is not None:
        if num_prompts > len(order):
            raise DistillError(f"num_prompts is {num_prompts}, but only {len(order)} prompts match the filters.")
        order = order[:num_prompts]
    return with_languages(order)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of the vocabulary: data made with one tokenizer is meaningless token ids for another."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(vocab.encode("utf-8")).hexdigest()[:16]


def read_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of a distilled folder."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {folder} is not a folder written by `fastmtp distill`.")
    return read_json(path, DistillError)


def selected_prompt_ids(folder: str | os.PathLike) -> set[str]:
    """
    Ids of every prompt that the runs recorded in `folder`'s manifest selected, answered yet or not, and of every
    answered row: prompts outside this set are held out from any head trained on this data, now or after more runs.
    """
    manifest = read_manifest(folder)
    ids = {str(row["id"]) for row in iter_distilled(folder)}
    for run in manifest.get("runs", []):
        prompts = load_prompts(run["prompts_file"], SourceOptions(**run.get("prompt_options", {})))
        selection = select_prompts(prompts, run["sources"], run["langs"], run["num_prompts"], run["seed"])
        ids.update(prompt["id"] for prompt in selection)
    return ids


def restore_log(folder: str | os.PathLike) -> list[Path]:
    """
    Writes back each JSONL shard whose Parquet copy (`data/<shard>.parquet`) exists without it, and returns them: the
    folder then resumes as if it had never lost its log, and a later export does not drop those rows. The restored
    shard takes its copy's modification time, so that the export sees the copy as up to date.
    """
    import pyarrow.parquet  # a dependency of datasets

    folder = Path(folder)
    restored = []
    for copy in sorted(folder.glob(f"{DATA_DIR}/shard-*.parquet")):
        shard = folder / f"{copy.stem}.jsonl"
        if shard.exists() or not SHARD_NAME.fullmatch(shard.name):
            continue
        rows = pyarrow.parquet.read_table(copy, columns=list(ROW_FIELDS)).to_pylist()
        write_rows(shard, rows)
        os.utime(shard, (copy.stat().st_atime, copy.stat().st_mtime))
        restored.append(shard)
    if restored:
        logger.info("Restored %d log shards of %s from their Parquet copies.", len(restored), folder)
    return restored


def iter_distilled(folder: str | os.PathLike) -> Iterator[dict]:
    """
    Every row of a distilled folder, shard by shard.

    A torn last line of a shard is skipped, not an error: it is the row a running (or killed) distill is writing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Distilled data folder {folder} not found.")
    shards = _shard_paths(folder)
    if not shards:
        raise FileNotFoundError(f"{folder} has no shard-*.jsonl files: run `fastmtp distill --output {folder}` first.")
    for path in shards:
        for _, row in iter_rows(path, ROW_FIELDS, DistillError):
            yield row


@dataclass
class _Written:
    """
    What the output folder holds, rebuilt from its files on every start so that it survives any crash. Every process
    counts all rows (its own and the others'); it appends only to its own shards (`shard_rank`, None for one process).
    """

    folder: Path
    shard_size: int
    shard_rank: int | None = None
    ids: set[str] = field(default_factory=set)
    response_owner: dict[int, str] = field(default_factory=dict)  # hash of response_ids -> id of the row kept
    rows: int = 0
    response_tokens: int = 0
    finished: int = 0
    duplicates: int = 0
    shard_index: int = 0
    rows_in_shard: int = 0

    @classmethod
    def scan(cls, folder: Path, shard_size: int, shard_rank: int | None = None) -> _Written:
        written = cls(folder, shard_size, shard_rank)
        for path in _shard_paths(folder):
            rows = read_rows(path, ROW_FIELDS, DistillError)
            for row in rows:
                written._count(_Answer.of(row))
            rank, index = _shard_key(path)
            if rank == (-1 if shard_rank is None else shard_rank):  # where this process goes on appending
                written.shard_index, written.rows_in_shard = index, len(rows)
        for duplicate in read_rows(folder / DUPLICATES_NAME, DUPLICATE_FIELDS, DistillError):
            written.ids.add(duplicate["id"])
            written.duplicates += 1
        return written

    def record(self, answers: Sequence[_Answer]) -> list[dict]:
        """Counts the answers in order; returns a duplicate record for each one that repeats an earlier response."""
        duplicates = []
        for answer in answers:
            owner = self.response_owner.get(answer.key)
            if owner is None:
                self._count(answer)
            else:
                self.ids.add(answer.id)
                self.duplicates += 1
                duplicates.append({"id": answer.id, "duplicate_of": owner})
        return duplicates

    def counts(self, skipped_too_long: int) -> dict[str, int]:
        return {
            "rows": self.rows,
            "response_tokens": self.response_tokens,
            "finished": self.finished,
            "duplicates_dropped": self.duplicates,
            "skipped_too_long": skipped_too_long,
        }

    def append(self, rows: list[dict]) -> None:
        """Appends rows to this process's shards, a new shard every `shard_size` rows."""
        while rows:
            if self.rows_in_shard >= self.shard_size:
                self.shard_index, self.rows_in_shard = self.shard_index + 1, 0
            room = self.shard_size - self.rows_in_shard
            append_rows(self.folder / _shard_name(self.shard_index, self.shard_rank), rows[:room])
            self.rows_in_shard += len(rows[:room])
            rows = rows[room:]

    def _count(self, answer: _Answer) -> None:
        self.ids.add(answer.id)
        self.response_owner.setdefault(answer.key, answer.id)
        self.rows += 1
        self.response_tokens += answer.tokens
        self.finished += answer.finished


class _Answer(NamedTuple):
    """What every process learns of an answer that one of them made: enough to count it and to spot a duplicate."""

    id: str
    key: int  # a hash of the response ids
    tokens: int
    finished: bool

    @classmethod
    def of(cls, row: dict) -> _Answer:
        return cls(row["id"], hash(tuple(row["response_ids"])), len(row["response_ids"]), bool(row["finished"]))


def _open_folder(folder: Path, identity: dict, run: dict) -> dict:
    """The manifest to continue with; refuses a folder whose data was made with another model or settings."""
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.exists() and folder.is_dir() and _shard_paths(folder):
        raise DistillError(f"{folder} has shard files but no {MANIFEST_NAME}; refusing to add data of unknown origin.")
    manifest, changed = open_run_folder(manifest_path, identity, run, IDENTITY_KEYS, DistillError)
    if changed:
        raise DistillError(
            f"{folder} holds data made with other settings ({'; '.join(changed)}). Mixing them would spoil the "
            "training data: use another --output folder, or the settings it was made with."
        )
    return manifest


def _encode_pending(
    tokenizer: PreTrainedTokenizerBase,
    batches: list[list[dict]],
    indices: Sequence[int],
    done: set[str],
    max_prompt_tokens: int,
) -> tuple[list[tuple[int, list[dict]]], int]:
    """
    `(batch index, prompts with prompt_ids)` for the prompts left to answer in each batch of `indices` (none, when
    all of them are too long), and how many prompts were too long.
    """
    todo, skipped = [], 0
    for index in indices:
        pending = []
        for prompt in batches[index]:
            if prompt["id"] in done:
                continue
            prompt_ids = encode_chat(tokenizer, prompt["prompt"])["input_ids"][0].tolist()
            if len(prompt_ids) > max_prompt_tokens:
                skipped += 1
            else:
                pending.append({**prompt, "prompt_ids": prompt_ids})
        todo.append((index, pending))
    return todo, skipped


def _answer_rows(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch: list[dict],
    choose: Callable[[torch.Tensor], torch.Tensor],
    eos_ids: list[int],
    pad_id: int,
    max_new_tokens: int,
) -> list[dict]:
    """The rows of a batch: each prompt with its answer."""
    answers = _answer(model, batch, choose, eos_ids, pad_id, max_new_tokens)
    return [
        {**prompt, "response_ids": ids, "response": tokenizer.decode(ids, skip_special_tokens=True), "finished": done}
        for prompt, (ids, done) in zip(batch, answers, strict=True)
    ]


def _eos_and_pad_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], int]:
    """Every EOS id of the model and tokenizer, so that answers are cut where they end, and the id to left-pad with."""
    configured = model.generation_config.eos_token_id
    eos_ids = set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    if not eos_ids:
        raise DistillError("Neither the model's generation config nor the tokenizer defines an EOS token.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    return sorted(eos_ids), pad_id


class TopKNucleusSampler:
    """
    Draws each next token as `do_sample=True` with `temperature`, `top_k` and `top_p` would.

    Transformers' top-p sorts the whole vocabulary and then samples from a full-vocabulary softmax, even when top-k has
    left 20 candidates; on a CPU that is a third of a decoding step of a batch (SmolLM2: 49,152 tokens). Here both run
    over the top-k candidates only. The distribution is the same, except that a tie at the k-th score keeps exactly k
    tokens where Transformers keeps every tied one.
    """

    def __init__(self, temperature: float, top_k: int, top_p: float, generator: torch.Generator):
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.generator = generator

    def __call__(self, scores: torch.FloatTensor) -> torch.LongTensor:
        """One token id per row of `scores`."""
        top_scores, top_ids = scores.float().topk(min(self.top_k, scores.shape[-1]), dim=-1)  # sorted, descending
        probs = (top_scores / self.temperature).softmax(dim=-1)
        # Transformers' top-p drops a token once the tokens more likely than it hold top_p of the mass.
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= self.top_p, 0.0)
        return top_ids.gather(-1, torch.multinomial(probs, 1, generator=self.generator)).squeeze(-1)


def _token_chooser(
    temperature: float, top_k: int, top_p: float, seed: int, device: torch.device
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Picks the next token of every row from its logits: greedy, the fast top-k sampler, or Transformers' warpers."""
    if temperature == 0:
        return lambda logits: logits.argmax(dim=-1)
    generator = torch.Generator(device).manual_seed(seed)
    if top_k > 0:
        return TopKNucleusSampler(temperature, top_k, top_p, generator)
    # A nucleus over the whole vocabulary needs the whole vocabulary sorted anyway.
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)])
    return lambda logits: torch.multinomial(warpers(None, logits.float()).softmax(-1), 1, generator=generator)[:, 0]


def _batch_seed(seed: int, batch_index: int) -> int:
    # Hashed rather than `seed + batch_index`, so that runs with neighbouring seeds share no sampling streams.
    return int.from_bytes(hashlib.sha256(f"{seed}/{batch_index}".encode()).digest()[:8], "little")


def _answer(
    model: PreTrainedModel,
    batch: list[dict],
    choose: Callable[[torch.Tensor], torch.Tensor],
    eos_ids: list[int],
    pad_id: int,
    max_new_tokens: int,
) -> list[tuple[list[int], bool]]:
    """
    `(response ids up to and including the first EOS, whether there was one)` for each prompt of the batch.

    The loop is `generate`'s, less its padding: a row leaves the batch (and its cache) as soon as its answer ends.
    Most answers end well before `max_new_tokens`, and `generate` would keep decoding them to the longest one.
    """
    # Left-padded by hand from the ids already encoded: the model sees exactly the `prompt_ids` that are stored.
    width = max(len(prompt["prompt_ids"]) for prompt in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, prompt in enumerate(batch):
        input_ids[row, width - len(prompt["prompt_ids"]) :] = torch.tensor(prompt["prompt_ids"])
        attention_mask[row, width - len(prompt["prompt_ids"]) :] = 1
    input_ids, attention_mask = input_ids.to(model.device), attention_mask.to(model.device)
    # Positions count real tokens only, as in `generate`, so a left-padded row sees the positions it would alone.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    cache = append_in_place(DynamicCache(config=model.config), capacity=width + max_new_tokens)
    cache_kwargs = {cache_keyword(model.forward): cache}
    eos_set = set(eos_ids)
    responses: list[list[int]] = [[] for _ in batch]
    active = list(range(len(batch)))  # batch rows still answering, in the order of the cache's rows
    with torch.inference_mode():
        for step in range(max_new_tokens):
            logits = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                logits_to_keep=1,
                **cache_kwargs,
            ).logits[:, -1]
            next_tokens = choose(logits)
            ongoing = []  # indices into `active` of the rows whose answer goes on
            for index, (row, token) in enumerate(zip(active, next_tokens.tolist(), strict=True)):
                responses[row].append(token)
                if token not in eos_set:
                    ongoing.append(index)
            if step == max_new_tokens - 1 or not ongoing:
                break
            if len(ongoing) < len(active):
                keep = torch.tensor(ongoing, device=model.device)
                cache.batch_select_indices(keep)
                active = [active[index] for index in ongoing]
                next_tokens, attention_mask, position_ids = next_tokens[keep], attention_mask[keep], position_ids[keep]
            input_ids = next_tokens[:, None]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(active), 1))], dim=-1)
            position_ids = position_ids[:, -1:] + 1
    return [(ids, ids[-1] in eos_set) for ids in responses]


def _shard_name(index: int, rank: int | None) -> str:
    """`shard-00000.jsonl` for one process; process 1 of several appends to `shard-rank1-00000.jsonl` alone."""
    return f"shard-{index:05d}.jsonl" if rank is None else f"shard-rank{rank}-{index:05d}.jsonl"


def _shard_key(path: Path) -> tuple[int, int]:
    """`(rank, index)` of a shard; rank -1 for the shards of a single process."""
    rank, index = SHARD_NAME.fullmatch(path.name).groups()
    return (-1 if rank is None else int(rank)), int(index)


def _shard_paths(folder: Path) -> list[Path]:
    return sorted((path for path in folder.glob("shard-*.jsonl") if SHARD_NAME.fullmatch(path.name)), key=_shard_key)


__all__ = [
    "DistillError",
    "DistillResult",
    "check_options",
    "distill",
    "iter_distilled",
    "load_prompts",
    "read_manifest",
    "select_prompts",
    "tokenizer_fingerprint",
]
