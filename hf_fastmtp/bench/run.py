"""
Timing plain decoding against FastMTP and other speculative methods, fairly: same inputs, interleaved runs.

`fastmtp bench` runs Spec-Bench prompts (first turns) with every chosen mode of decoding and writes an output folder:
    settings.json   the model (base name, head weights hash, dtype), max_new_tokens, and the options of each run
    records.jsonl   one row per prompt and mode: question_id, category, mode, new_token_ids, seconds, stats
    results.json    the aggregates of `aggregate(records)`, the settings and the hardware
    results.md      speedup / tau / tok/s per category, per-position acceptance, lossless check, hardware
    *.png           speedup by category, acceptance by position, and tau and tok/s against K and vocabulary size

Fairness: one warm-up generation per mode before the first prompt, then for each prompt all modes back to back, in
an order rotated from prompt to prompt, so that machine noise and cache warmth hit every mode alike.
Resume: records are appended one line at a time with an fsync; a rerun skips the (question_id, mode) pairs already
in records.jsonl, cuts off a torn last line, and refuses a folder made with another model or max_new_tokens.
The metric arithmetic (`aggregate`) is a pure function of the records, separate from running them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import statistics
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import product, zip_longest
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicCache

from ..decoding.candidate_generator import FastMTPStats
from ..decoding.cpu_kernels import cpu_verification_kernels, one_row_products_weight_first
from ..decoding.modeling_fastmtp import FastMTPForCausalLM
from ..decoding.transformers_compat import cache_keyword
from ..jsonl import append_rows, iter_json_lines, read_rows, write_json
from ..prompts import encode_chat
from ..run_settings import changed_settings

logger = logging.getLogger(__name__)

DEFAULT_QUESTIONS = Path("..", "shared", "data", "spec_bench.jsonl")
REFERENCE = "ar"
# Plain greedy decoding as Transformers runs it, without this package's CPU kernels: what a user starts from.
STOCK = "ar-stock"
METHODS = ("ar", STOCK, "fastmtp", "pld", "assisted")
DEFAULT_METHODS = ("ar", "fastmtp", "pld")
SETTINGS_NAME = "settings.json"
RECORDS_NAME = "records.jsonl"
RESULTS_JSON_NAME = "results.json"
RESULTS_MD_NAME = "results.md"
FORMAT_VERSION = 1
# Records made with other values of these are not comparable: never mix them into one folder.
IDENTITY_KEYS = ("format_version", "model", "max_new_tokens")
RECORD_FIELDS = ("question_id", "category", "mode", "method", "options", "new_token_ids", "seconds", "stats")
WARM_UP_PROMPT = "Hello!"
WARM_UP_TOKENS = 8


class BenchError(ValueError):
    """A problem with the options, the questions file or the output folder, explained for the user."""


@dataclass
class Run:
    """One timed generate() call."""

    new_token_ids: list[int]
    seconds: float
    stats: FastMTPStats | None = None

    @property
    def tokens_per_second(self) -> float:
        return len(self.new_token_ids) / self.seconds if self.seconds else 0.0


def timed_generate(
    model: FastMTPForCausalLM,
    inputs: dict[str, torch.Tensor],
    fastmtp: bool,
    cpu_kernels: bool = True,
    **generate_kwargs,
) -> Run:
    """
    One generate() call, timed end to end (prefill included), with the FastMTP stats it left. Every method runs with
    the CPU kernels FastMTP verifies with (few-row linears, grouped-query attention without copies), so that plain
    decoding, prompt lookup and assisted decoding are compared on the same footing; `cpu_kernels=False` times plain
    decoding as Transformers runs it (FastMTP always uses them).
    """
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    start = time.perf_counter()
    with cpu_verification_kernels(model) if cpu_kernels else contextlib.nullcontext():
        output = model.generate(**inputs, fastmtp=fastmtp, **generate_kwargs)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    seconds = time.perf_counter() - start
    prompt_length = inputs["input_ids"].shape[1]
    return Run(output[0, prompt_length:].tolist(), seconds, model.last_fastmtp_stats)


def forward_cost(
    model: FastMTPForCausalLM, max_new_tokens: int, context: int = 256, repeats: int = 7
) -> dict[int, float]:
    """
    Median milliseconds of one base-model forward over n = 1..`max_new_tokens` new tokens after a `context`-token
    cache: what verifying K drafts (n = K + 1) costs against a plain decoding step (n = 1) on this hardware, with the
    kernels that FastMTP verifies with.
    """
    base = model.model
    context = min(context, getattr(base.config, "max_position_embeddings", context) - max_new_tokens)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(model.vocab_size, (1, context + max_new_tokens), generator=generator).to(model.device)
    cache = DynamicCache(config=base.config)
    cache_kwargs = {cache_keyword(base.forward): cache, "use_cache": True}
    with torch.inference_mode(), cpu_verification_kernels(model):
        base(input_ids=input_ids[:, :context], **cache_kwargs)
        timings = {n: [] for n in range(1, max_new_tokens + 1)}
        for repeat in range(repeats + 1):  # the first round warms up
            for n in rotated(list(timings), repeat):
                if model.device.type == "cuda":
                    torch.cuda.synchronize(model.device)
                start = time.perf_counter()
                base(input_ids=input_ids[:, context : context + n], **cache_kwargs)
                if model.device.type == "cuda":
                    torch.cuda.synchronize(model.device)
                if repeat:
                    timings[n].append(1000 * (time.perf_counter() - start))
                cache.crop(-n)
    return {n: statistics.median(values) for n, values in timings.items()}


# ---------------------------------------------------------------------------------------------- what to run


@dataclass
class Mode:
    """One way of decoding: the label used in records and tables, and the generate() options it stands for."""

    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)


def build_modes(
    methods: Iterable[str],
    num_draft_tokens: Sequence[int],
    draft_vocabs: Sequence[str | int] = ("full",),
    pld_tokens: int = 10,
    confidence_thresholds: Sequence[float | None] = (None,),
    lookup_tokens: Sequence[int | None] = (None,),
) -> list[Mode]:
    """
    The modes to compare: `ar` (always, first: it is the reference) and every K x vocabulary x confidence threshold x
    prompt lookup length (None: without lookup) for `fastmtp`.
    """
    methods = list(dict.fromkeys([REFERENCE, *methods]))
    if unknown := set(methods) - set(METHODS):
        raise BenchError(f"Unknown mode(s) {sorted(unknown)}; choose from {', '.join(METHODS)}.")
    modes = []
    for method in methods:
        if method == "fastmtp":
            for k in dict.fromkeys(num_draft_tokens):
                for vocab, threshold, lookup in product(
                    dict.fromkeys(draft_vocabs), dict.fromkeys(confidence_thresholds), dict.fromkeys(lookup_tokens)
                ):
                    options = {"num_draft_tokens": k, "draft_vocab": vocab}
                    label = f"fastmtp-k{k}-{vocab}"
                    if threshold is not None:
                        options["draft_confidence_threshold"] = threshold
                        label += f"-c{threshold:g}"
                    if lookup is not None:
                        options["prompt_lookup_num_tokens"] = lookup
                        label += f"-lookup{lookup}"
                    modes.append(Mode(label, method, options))
        elif method == "pld":
            modes.append(Mode(f"pld-{pld_tokens}", method, {"prompt_lookup_num_tokens": pld_tokens}))
        else:
            modes.append(Mode(method, method))
    return modes


def rotated(modes: Sequence[Mode], index: int) -> list[Mode]:
    """The modes in the order prompt `index` runs them: each mode goes first equally often."""
    shift = index % len(modes)
    return [*modes[shift:], *modes[:shift]]


def load_questions(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    per_category: int | None = None,
    *,
    categories: Sequence[str] | None = None,
    exclude_ids: Iterable[str] = (),
) -> list[dict]:
    """
    Questions as `question_id`, `category`, `prompt`, in file order, from one or more JSONL files.

    A row is a Spec-Bench question (`question_id`, `category`, `turns`: the first turn is asked) or a prompt in the
    distillation format (`id`, `source`, `prompt`: the source is the category). `categories` keeps only those,
    `exclude_ids` drops prompts (e.g. those a head was trained on), and `per_category` then keeps the first N of each
    category, so that the same N always selects the same prompts.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    excluded = set(exclude_ids)
    questions, seen, taken = [], set(), Counter()
    for path in paths:
        for number, row in iter_json_lines(path, BenchError, "Questions file"):
            question = _as_question(row)
            if question is None:
                raise BenchError(
                    f"{path}, line {number}: needs question_id, category and turns (a Spec-Bench question), or id, "
                    "source and prompt (a distillation prompt)."
                )
            if question["question_id"] in seen:
                raise BenchError(f"{path}, line {number}: question_id {question['question_id']!r} is used twice.")
            seen.add(question["question_id"])
            category = question["category"]
            if categories is not None and category not in categories:
                continue
            if question["question_id"] in excluded:
                continue
            if per_category is None or taken[category] < per_category:
                taken[category] += 1
                questions.append(question)
    if categories is not None and (missing := set(categories) - set(taken)):
        raise BenchError(f"No question of the categories {sorted(missing)} in {', '.join(map(str, paths))}.")
    if not questions:
        raise BenchError(f"No questions in {', '.join(map(str, paths))}.")
    return questions


def _as_question(row: Any) -> dict | None:
    """A row of either format as a question, or None when it is neither."""
    if not isinstance(row, dict):
        return None
    if "turns" in row:
        turns = row["turns"]
        if "question_id" in row and isinstance(row.get("category"), str) and isinstance(turns, list) and turns:
            return _question(row["question_id"], row["category"], turns[0])
        return None
    if all(isinstance(row.get(name), str) for name in ("id", "source", "prompt")):
        return _question(row["id"], row["source"], row["prompt"])
    return None


def _question(question_id: Any, category: str, prompt: Any) -> dict | None:
    if not isinstance(prompt, str) or not prompt.strip():
        return None
    return {"question_id": question_id, "category": category, "prompt": prompt}


def check_options(
    *, per_category: int | None, num_draft_tokens: Sequence[int] | None, pld_tokens: int, max_new_tokens: int
) -> None:
    """Raises `BenchError` for an option out of range; cheap, so the CLI runs it before loading a model."""
    positive = {"per_category": per_category, "pld_tokens": pld_tokens, "max_new_tokens": max_new_tokens}
    for name, value in positive.items():
        if value is not None and value < 1:
            raise BenchError(f"{name} must be at least 1, got {value}.")
    if num_draft_tokens is not None and (not num_draft_tokens or min(num_draft_tokens) < 1):
        raise BenchError(f"every K must be at least 1, got {list(num_draft_tokens)}.")


# ---------------------------------------------------------------------------------------------- running


def run_bench(
    model: FastMTPForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str | os.PathLike,
    *,
    questions: str | os.PathLike | Sequence[str | os.PathLike] = DEFAULT_QUESTIONS,
    per_category: int | None = None,
    categories: Sequence[str] | None = None,
    exclude_ids: Iterable[str] = (),
    methods: Sequence[str] = DEFAULT_METHODS,
    num_draft_tokens: Sequence[int] | None = None,
    draft_vocabs: Sequence[str | int] = ("full",),
    confidence_thresholds: Sequence[float | None] = (None,),
    lookup_tokens: Sequence[int | None] = (None,),
    pld_tokens: int = 10,
    max_new_tokens: int = 128,
    assistant_model: PreTrainedModel | None = None,
    assistant_tokenizer: PreTrainedTokenizerBase | None = None,
    model_name: str | None = None,
    progress: bool = True,
) -> dict:
    """
    Runs every (prompt, mode) pair that `output_dir` does not hold yet, then writes the results and returns them.

    `questions`, `per_category`, `categories` and `exclude_ids` select the prompts (`load_questions`).
    `num_draft_tokens` defaults to the head's K; `confidence_thresholds` adds gated FastMTP modes (None: ungated),
    `lookup_tokens` FastMTP modes that also draft by prompt lookup (None: without).
    `assistant_model` is needed for the `assisted` method; give `assistant_tokenizer` too when it does not share the
    model's tokenizer. `model_name` (default: the base model's
    `name_or_path`) identifies the base in settings.json, next to a hash of the head's weights.
    """
    check_options(
        per_category=per_category,
        num_draft_tokens=num_draft_tokens,
        pld_tokens=pld_tokens,
        max_new_tokens=max_new_tokens,
    )
    if "assisted" in methods and assistant_model is None:
        raise BenchError("The `assisted` mode needs a draft model: pass --assistant PATH_OR_ID.")
    exclude_ids = set(exclude_ids)
    selection = load_questions(questions, per_category, categories=categories, exclude_ids=exclude_ids)
    modes = build_modes(
        methods,
        num_draft_tokens or [model.config.num_draft_tokens],
        draft_vocabs,
        pld_tokens,
        confidence_thresholds,
        lookup_tokens,
    )
    output_dir = Path(output_dir)
    identity = {
        "format_version": FORMAT_VERSION,
        "model": model_identity(model, model_name),
        "max_new_tokens": max_new_tokens,
    }
    run = {
        "questions": [str(path) for path in ([questions] if isinstance(questions, (str, os.PathLike)) else questions)],
        "per_category": per_category,
        "categories": list(categories) if categories is not None else None,
        "excluded_ids": len(exclude_ids),
        "modes": [mode.label for mode in modes],
        "head": model.name_or_path or None,
        "assistant": None if assistant_model is None else assistant_model.config.name_or_path,
    }
    hardware = hardware_info(model)
    _open_output(output_dir, identity, {**run, "hardware": hardware})

    records_path = output_dir / RECORDS_NAME
    done = {(record["question_id"], record["mode"]) for record in read_rows(records_path, RECORD_FIELDS, BenchError)}
    todo = [
        (question, [mode for mode in rotated(modes, index) if (question["question_id"], mode.label) not in done])
        for index, question in enumerate(selection)
    ]
    todo = [(question, pending) for question, pending in todo if pending]
    if todo:
        generate_kwargs = _greedy_kwargs(model, tokenizer, max_new_tokens)
        assistant_kwargs = _assistant_kwargs(tokenizer, assistant_model, assistant_tokenizer)
        _run_pending(model, tokenizer, todo, modes, records_path, generate_kwargs, assistant_kwargs, progress)

    # This run's plan only, in its order: the folder may also hold records of other modes or prompts.
    planned = {
        (question["question_id"], mode.label): (q, m)
        for q, question in enumerate(selection)
        for m, mode in enumerate(modes)
    }
    records = sorted(
        (
            record
            for record in read_rows(records_path, RECORD_FIELDS, BenchError)
            if (record["question_id"], record["mode"]) in planned
        ),
        key=lambda record: planned[record["question_id"], record["mode"]],
    )
    results = {"settings": {**identity, **run}, "hardware": hardware, **aggregate(records)}
    if any(mode.method == "fastmtp" for mode in modes):
        most_drafts = max(
            max(mode.options["num_draft_tokens"], mode.options.get("prompt_lookup_num_tokens", 0))
            for mode in modes
            if mode.method == "fastmtp"
        )
        results["forward_ms"] = forward_cost(model, most_drafts + 1)
    write_reports(results, output_dir)
    return results


def _run_pending(
    model: FastMTPForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    todo: list[tuple[dict, list[Mode]]],
    modes: Sequence[Mode],
    records_path: Path,
    generate_kwargs: dict,
    assistant_kwargs: dict,
    progress: bool,
) -> None:
    """One warm-up call per mode, then the pending runs, each record appended as soon as it is measured."""
    pending_labels = {mode.label for _, pending in todo for mode in pending}
    warm_up = {key: value.to(model.device) for key, value in encode_chat(tokenizer, WARM_UP_PROMPT).items()}
    for mode in modes:
        if mode.label in pending_labels:
            fastmtp, kwargs = _mode_kwargs(mode, assistant_kwargs)
            # Also fails fast, before the long run, on a mode the model cannot run (e.g. an unknown draft vocabulary).
            try:
                timed_generate(
                    model, warm_up, fastmtp, **{**generate_kwargs, **kwargs, "max_new_tokens": WARM_UP_TOKENS}
                )
            except ValueError as error:
                raise BenchError(f"Mode {mode.label} cannot run: {error}") from error

    total = sum(len(pending) for _, pending in todo)
    with tqdm(total=total, unit="run", desc="bench", disable=not progress) as bar:
        for question, pending in todo:
            inputs = {key: value.to(model.device) for key, value in encode_chat(tokenizer, question["prompt"]).items()}
            for mode in pending:
                bar.set_postfix_str(f"{question['category']} {question['question_id']} {mode.label}")
                fastmtp, kwargs = _mode_kwargs(mode, assistant_kwargs)
                result = timed_generate(model, inputs, fastmtp, **generate_kwargs, **kwargs)
                record = {
                    "question_id": question["question_id"],
                    "category": question["category"],
                    "mode": mode.label,
                    "method": mode.method,
                    "options": mode.options,
                    "prompt_tokens": inputs["input_ids"].shape[1],
                    "new_token_ids": result.new_token_ids,
                    "seconds": result.seconds,
                    "stats": None if result.stats is None else result.stats.to_dict(),
                }
                append_rows(records_path, [record])
                bar.update()


def _mode_kwargs(mode: Mode, assistant_kwargs: dict) -> tuple[bool, dict]:
    """`(fastmtp, timed_generate() arguments)` for a mode."""
    if mode.method == "assisted":
        return False, assistant_kwargs
    if mode.method == STOCK:
        return False, {"cpu_kernels": False}
    return mode.method == "fastmtp", dict(mode.options)


def _greedy_kwargs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int) -> dict:
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False}
    # Without it generate() warns on every call.
    if model.generation_config.pad_token_id is None:
        kwargs["pad_token_id"] = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
    return kwargs


def _assistant_kwargs(
    tokenizer: PreTrainedTokenizerBase,
    assistant_model: PreTrainedModel | None,
    assistant_tokenizer: PreTrainedTokenizerBase | None,
) -> dict:
    if assistant_model is None:
        return {}
    if assistant_tokenizer is None or assistant_tokenizer.get_vocab() == tokenizer.get_vocab():
        return {"assistant_model": assistant_model}
    # Another vocabulary: Transformers' universal assisted decoding translates between the two tokenizers.
    return {"assistant_model": assistant_model, "tokenizer": tokenizer, "assistant_tokenizer": assistant_tokenizer}


def model_identity(model: FastMTPForCausalLM, model_name: str | None = None) -> dict:
    """What makes records comparable: the base model, the head's weights (by hash) and the dtype."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.head.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {
        "base": model_name or model.model.config.name_or_path or model.config.base_model_name_or_path,
        "head_sha256": digest.hexdigest()[:16],
        "dtype": str(model.dtype).removeprefix("torch."),
    }


def hardware_info(model: PreTrainedModel) -> dict:
    device = model.device
    return {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        # Whether `ar` (plain decoding under the CPU kernels) computes its one-row products weight-first here.
        "one_row_weight_first": one_row_products_weight_first(model),
        # Whether FastMTP's draft steps read int8 copies of the head's weights here (float16 ones otherwise).
        "int8_draft_weights": model.int8_draft_weights(),
    }


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------- output folder


def _open_output(folder: Path, identity: dict, run: dict) -> None:
    """Records this run in settings.json; refuses a folder whose records were made with another model or settings."""
    path = folder / SETTINGS_NAME
    if path.exists():
        try:
            settings = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise BenchError(f"{path} is not valid JSON ({error}).") from None
        changed = changed_settings(settings, identity, IDENTITY_KEYS)
        assistants = {entry["assistant"] for entry in settings["runs"]} | {run["assistant"]}
        if len(assistants - {None}) > 1:
            changed.append(f"assistant {sorted(assistants - {None})}")
        if changed:
            raise BenchError(
                f"{folder} holds records made with other settings ({'; '.join(changed)}). Their timings and outputs "
                "are not comparable with this run's: use another --output folder, or the settings it was made with."
            )
    elif (folder / RECORDS_NAME).exists():
        raise BenchError(
            f"{folder} has {RECORDS_NAME} but no {SETTINGS_NAME}; refusing to mix in records of unknown origin."
        )
    else:
        folder.mkdir(parents=True, exist_ok=True)
        settings = {**identity, "runs": []}
    if run not in settings["runs"]:
        settings["runs"].append(run)
    write_json(path, settings)


# ---------------------------------------------------------------------------------------------- metrics


def aggregate(records: Sequence[dict], reference: str = REFERENCE) -> dict:
    """
    Per mode, overall and per category: prompts, tokens, seconds, tok/s (total tokens / total seconds), speedup over
    `reference` (its total seconds over the mode's, on the prompts both ran), and for FastMTP tau and per-position
    acceptance from summed counts (a ratio of sums, not a mean of per-prompt ratios); plus the lossless check.
    Modes and categories keep the order in which they first appear in `records`.
    """
    modes = list(dict.fromkeys(record["mode"] for record in records))
    categories = list(dict.fromkeys(record["category"] for record in records))
    reference_seconds = {r["question_id"]: r["seconds"] for r in records if r["mode"] == reference}
    by_mode = {}
    for mode in modes:
        own = [record for record in records if record["mode"] == mode]
        by_mode[mode] = {
            "method": own[0]["method"],
            "options": own[0]["options"],
            "overall": summarize(own, reference_seconds),
            "categories": {
                category: summarize(in_category, reference_seconds)
                for category in categories
                if (in_category := [record for record in own if record["category"] == category])
            },
        }
    return {
        "reference": reference,
        "modes": modes,
        "categories": categories,
        "by_mode": by_mode,
        "lossless": check_lossless(records, reference),
    }


def summarize(records: Sequence[dict], reference_seconds: dict) -> dict:
    """Totals and rates of one mode's records; `reference_seconds` maps question_id to the reference's seconds."""
    tokens = sum(len(record["new_token_ids"]) for record in records)
    seconds = sum(record["seconds"] for record in records)
    paired = [record for record in records if record["question_id"] in reference_seconds]
    paired_seconds = sum(record["seconds"] for record in paired)
    summary = {
        "prompts": len(records),
        "new_tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds else None,
        "speedup": (
            sum(reference_seconds[record["question_id"]] for record in paired) / paired_seconds
            if paired and paired_seconds
            else None
        ),
    }
    stats = [record["stats"] for record in records if record["stats"] is not None]
    if stats:
        summary.update(acceptance(stats))
    return summary


LOOKUP_COUNTS = ("lookup_cycles", "lookup_drafted", "lookup_accepted")


def acceptance(stats: Sequence[dict]) -> dict:
    """tau and per-position acceptance of several generate() calls, from their summed counts."""
    cycles = sum(entry["cycles"] for entry in stats)
    drafted = _summed_per_position(entry["drafted_per_position"] for entry in stats)
    reached = _summed_per_position(_reached_per_position(entry) for entry in stats)
    head_steps = sum(entry.get("head_steps", sum(entry["drafted_per_position"])) for entry in stats)
    accepted = _summed_per_position(entry["accepted_per_position"] for entry in stats)
    draft_seconds = sum(entry["draft_seconds"] for entry in stats)
    vocab_sizes = [entry["draft_vocab_size"] for entry in stats if entry.get("draft_vocab_size") is not None]
    # Cycles that drafted by prompt lookup count in tau; the per-position acceptance is the head's own.
    lookup = {key: sum(entry.get(key, 0) for entry in stats) for key in LOOKUP_COUNTS}
    return {
        "cycles": cycles,
        "tau": (sum(accepted) + lookup["lookup_accepted"] + cycles) / cycles if cycles else None,
        **lookup,
        "drafted_per_position": drafted,
        "accepted_per_position": accepted,
        "acceptance_cumulative": [a / d if d else None for a, d in zip(accepted, drafted)],
        "acceptance_conditional": [a / r if r else None for a, r in zip(accepted, reached)],
        "draft_seconds": draft_seconds,
        # The cost of one head step, the part that vocabulary compression cuts; gated cycles also count the step
        # whose draft they dropped.
        "draft_ms_per_step": 1000 * draft_seconds / head_steps if head_steps else None,
        "verify_seconds": sum(entry["verify_seconds"] for entry in stats),
        "mean_draft_vocab_size": sum(vocab_sizes) / len(vocab_sizes) if vocab_sizes else None,
        "languages": dict(Counter(entry.get("language") or "unknown" for entry in stats)),
    }


def _summed_per_position(counts: Iterable[list[int]]) -> list[int]:
    return [sum(position) for position in zip_longest(*counts, fillvalue=0)]


def _reached_per_position(stats: dict) -> list[int]:
    """Cycles that judged draft k: drafted it with drafts 1..k-1 all accepted (derived for records that predate it)."""
    if "reached_per_position" in stats:
        return stats["reached_per_position"]
    return stats["drafted_per_position"][:1] + stats["accepted_per_position"][:-1]


def check_lossless(records: Sequence[dict], reference: str = REFERENCE) -> dict:
    """Every mode's output against the reference's on the same prompt: greedy speculation must not change a token."""
    expected = {record["question_id"]: record["new_token_ids"] for record in records if record["mode"] == reference}
    compared = [record for record in records if record["mode"] != reference and record["question_id"] in expected]
    mismatches = [
        {
            "question_id": record["question_id"],
            "category": record["category"],
            "mode": record["mode"],
            "first_difference": first_difference(record["new_token_ids"], expected[record["question_id"]]),
        }
        for record in compared
        if record["new_token_ids"] != expected[record["question_id"]]
    ]
    return {"compared": len(compared), "mismatches": mismatches, "identical": not mismatches}


def first_difference(tokens: Sequence[int], expected: Sequence[int]) -> int:
    """Index of the first token where the two differ (the shorter length if one is a prefix of the other)."""
    return next(
        (index for index, (a, b) in enumerate(zip(tokens, expected)) if a != b), min(len(tokens), len(expected))
    )


# ---------------------------------------------------------------------------------------------- reports


def write_reports(results: dict, output_dir: Path) -> list[Path]:
    """results.json, results.md and the plots; returns the paths written."""
    write_json(output_dir / RESULTS_JSON_NAME, results)
    (output_dir / RESULTS_MD_NAME).write_text(render_markdown(results), encoding="utf-8")
    return [output_dir / RESULTS_JSON_NAME, output_dir / RESULTS_MD_NAME, *write_plots(results, output_dir)]


def render_markdown(results: dict) -> str:
    settings, model = results["settings"], results["settings"]["model"]
    per_category = "all" if settings["per_category"] is None else settings["per_category"]
    sections = [
        "# fastmtp bench",
        (
            f"Greedy, batch 1, at most {settings['max_new_tokens']} new tokens; {model['base'] or 'unnamed base'} "
            f"(head {model['head_sha256']}, {model['dtype']}); questions {settings['questions']}, "
            f"{per_category} per category."
        ),
        summary_table(results),
        (
            "Speedup: the reference's total seconds over the mode's, on the same prompts. tok/s: total new tokens "
            "over "
            "total seconds. tau: tokens per verification pass."
        ),
    ]
    if any(entry["overall"].get("tau") is not None for entry in results["by_mode"].values()):
        sections += ["## Acceptance by draft position (cumulative / conditional)", acceptance_table(results)]
    if results.get("forward_ms"):
        sections += ["## Verification cost on this hardware", forward_cost_table(results["forward_ms"])]
    sections += [lossless_line(results), hardware_line(results["hardware"])]
    return "\n\n".join(sections) + "\n"


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-markdown table, readable in a terminal too."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |" for line in (header, *rows)]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def summary_table(results: dict) -> str:
    """Rows: categories and overall; columns: speedup, tau (FastMTP) and tok/s of each mode."""
    columns = []  # (mode, metric)
    for mode in results["modes"]:
        entry = results["by_mode"][mode]
        if mode != results["reference"]:
            columns.append((mode, "speedup"))
        if entry["overall"].get("tau") is not None:
            columns.append((mode, "tau"))
        columns.append((mode, "tokens_per_second"))
    names = {"speedup": "speedup", "tau": "tau", "tokens_per_second": "tok/s"}
    header = ["category", *(f"{mode} {names[metric]}" for mode, metric in columns)]
    rows = []
    for category in [*results["categories"], "overall"]:
        cells = [category]
        for mode, metric in columns:
            entry = results["by_mode"][mode]
            summary = entry["overall"] if category == "overall" else entry["categories"].get(category, {})
            cells.append(_format(metric, summary.get(metric)))
        rows.append(cells)
    return format_table(header, rows)


def acceptance_table(results: dict) -> str:
    fastmtp = {
        mode: entry["overall"] for mode, entry in results["by_mode"].items() if entry["overall"].get("tau") is not None
    }
    positions = max(len(summary["acceptance_cumulative"]) for summary in fastmtp.values())
    with_lookup = any(summary.get("lookup_cycles") for summary in fastmtp.values())
    header = ["mode", "tau", "cycles", "draft ms/step", *(f"k={k}" for k in range(1, positions + 1))]
    if with_lookup:  # the positions are the head's own cycles'
        header.append("lookup cycles: drafts accepted")
    rows = []
    for mode, summary in fastmtp.items():
        row = [
            mode,
            _format("tau", summary["tau"]),
            str(summary["cycles"]),
            "-" if summary.get("draft_ms_per_step") is None else f"{summary['draft_ms_per_step']:.1f}",
            *(
                f"{_percent(cumulative)} / {_percent(conditional)}"
                for cumulative, conditional in zip(summary["acceptance_cumulative"], summary["acceptance_conditional"])
            ),
            *[""] * (positions - len(summary["acceptance_cumulative"])),
        ]
        if with_lookup:
            row.append(lookup_cell(summary))
        rows.append(row)
    return format_table(header, rows)


def lookup_cell(summary: dict) -> str:
    """How many cycles drafted by prompt lookup, and the share of their drafts the model accepted."""
    if not summary.get("lookup_cycles"):
        return "-"
    accepted = summary["lookup_accepted"] / summary["lookup_drafted"]
    return f"{summary['lookup_cycles']}: {_percent(accepted)} of {summary['lookup_drafted']}"


def forward_cost_table(forward_ms: dict) -> str:
    """One base forward over n new tokens: verifying K drafts costs the n = K + 1 column, a plain step n = 1."""
    costs = {int(n): ms for n, ms in forward_ms.items()}  # JSON keys are strings
    table = format_table(
        ["new tokens n", *map(str, costs)],
        [
            ["ms per forward", *(f"{ms:.1f}" for ms in costs.values())],
            ["relative to n = 1", *(f"{ms / costs[1]:.2f}x" for ms in costs.values())],
        ],
    )
    return (
        f"{table}\n\nMedian of repeated base-model forwards after a 256-token cache. A FastMTP cycle with K drafts "
        "costs one n = K + 1 forward plus K head steps and yields tau tokens; plain decoding costs one n = 1 forward "
        "per token."
    )


def lossless_line(results: dict) -> str:
    check, reference = results["lossless"], results["reference"]
    if not check["compared"]:
        return f"**Lossless**: not checked (no outputs to compare with `{reference}`)."
    if check["identical"]:
        return f"**Lossless**: yes, all {check['compared']} outputs are identical to `{reference}`."
    shown = check["mismatches"][:20]
    listed = "; ".join(
        f"question {m['question_id']} ({m['category']}, {m['mode']}, from token {m['first_difference']})"
        for m in shown
    )
    more = (
        f"; and {len(check['mismatches']) - len(shown)} more (see results.json)"
        if len(check["mismatches"]) > len(shown)
        else ""
    )
    counts = f"{len(check['mismatches'])} of {check['compared']} outputs differ from `{reference}`"
    return f"**Lossless**: NO, {counts}: {listed}{more}."


def hardware_line(hardware: dict) -> str:
    return (
        f"**Hardware**: {hardware['cpu']}, device {hardware['device']}, torch threads {hardware['threads']}, "
        f"torch {hardware['torch']}, transformers {hardware['transformers']}"
        + (", one-row products weight-first" if hardware.get("one_row_weight_first") else "")
        + (", int8 draft weights" if hardware.get("int8_draft_weights") else "")
        + "."
    )


def _format(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    return {"speedup": f"{value:.2f}x", "tau": f"{value:.2f}", "tokens_per_second": f"{value:.1f}"}[metric]


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


# ---------------------------------------------------------------------------------------------- plots


def write_plots(results: dict, output_dir: Path) -> list[Path]:
    """The PNG plots that the results support; none, with a warning, when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure  # a Figure of its own: no pyplot, no global backend state
    except ImportError:
        logger.warning("matplotlib is not installed: no plots (pip install matplotlib).")
        return []
    plots = {"speedup.png": plot_speedup, "acceptance.png": plot_acceptance}
    plots.update({"k_sweep.png": plot_k_sweep, "vocab_sweep.png": plot_vocab_sweep})
    written = []
    for name, plot in plots.items():
        figure = Figure(figsize=(9, 4.5), layout="constrained")
        if plot(figure, results):
            figure.savefig(output_dir / name, dpi=120)
            written.append(output_dir / name)
    return written


def plot_speedup(figure, results: dict) -> bool:
    """Grouped bars: one group per category (and overall), one bar per mode."""
    modes = [mode for mode in results["modes"] if mode != results["reference"]]
    if not modes:
        return False
    groups = [*results["categories"], "overall"]
    axes = figure.subplots()
    width = 0.8 / len(modes)
    for index, mode in enumerate(modes):
        entry = results["by_mode"][mode]
        values = [
            (entry["overall"] if group == "overall" else entry["categories"].get(group, {})).get("speedup") or 0.0
            for group in groups
        ]
        axes.bar([g + (index - (len(modes) - 1) / 2) * width for g in range(len(groups))], values, width, label=mode)
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    axes.set_ylabel(f"speedup over {results['reference']}")
    axes.legend(fontsize="small")
    return True


def plot_acceptance(figure, results: dict) -> bool:
    """Cumulative and conditional acceptance by draft position, one line per FastMTP mode."""
    fastmtp = {m: e["overall"] for m, e in results["by_mode"].items() if e["overall"].get("tau") is not None}
    if not fastmtp:
        return False
    for axes, key in zip(figure.subplots(1, 2, sharey=True), ("acceptance_cumulative", "acceptance_conditional")):
        for mode, summary in fastmtp.items():
            values = [value if value is not None else float("nan") for value in summary[key]]
            axes.plot(range(1, len(values) + 1), values, marker="o", label=mode)
        axes.set_title(key.removeprefix("acceptance_"))
        axes.set_xlabel("draft position k")
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.set_ylim(0, 1)
    figure.axes[0].set_ylabel("acceptance")
    figure.axes[0].legend(fontsize="small")
    return True


def plot_k_sweep(figure, results: dict) -> bool:
    """tau and tok/s against K, one line per draft vocabulary (and confidence threshold)."""
    lines = _sweep(results, along="num_draft_tokens")
    if not lines:
        return False
    for axes, metric in zip(figure.subplots(1, 2), ("tau", "tokens_per_second")):
        for name, points in lines.items():
            axes.plot([k for k, _ in points], [summary[metric] for _, summary in points], marker="o", label=name)
        axes.set_xlabel("K (drafts per cycle)")
        axes.set_ylabel("tau" if metric == "tau" else "tok/s")
        axes.xaxis.get_major_locator().set_params(integer=True)
    figure.axes[0].legend(fontsize="small")
    return True


def plot_vocab_sweep(figure, results: dict) -> bool:
    """tau, draft ms per head step and tok/s against the draft vocabulary (ordered by size), one line per K."""
    lines = _sweep(results, along="draft_vocab")
    if not lines:
        return False
    order = list(_vocab_sizes(results))
    metrics = {"tau": "tau", "draft_ms_per_step": "draft ms per head step", "tokens_per_second": "tok/s"}
    for axes, (metric, label) in zip(figure.subplots(1, 3), metrics.items()):
        for name, points in lines.items():
            points = sorted(points, key=lambda point: order.index(point[0]))
            axes.plot([order.index(v) for v, _ in points], [s[metric] for _, s in points], marker="o", label=name)
        axes.set_xticks(range(len(order)), [str(v) for v in order], rotation=30, ha="right")
        axes.set_xlabel("draft vocabulary")
        axes.set_ylabel(label)
        if metric != "tokens_per_second":  # from 1 token / 0 ms: small differences stay small
            top = max(summary[metric] for points in lines.values() for _, summary in points)
            axes.set_ylim(1.0 if metric == "tau" else 0.0, 1.15 * top)
    figure.axes[0].legend(fontsize="small")
    return True


SWEEP_NAMES = {
    "num_draft_tokens": "K={}",
    "draft_vocab": "vocab {}",
    "draft_confidence_threshold": "confidence {}",
    "prompt_lookup_num_tokens": "lookup {}",
}


def _sweep(results: dict, along: str) -> dict:
    """
    `{the other options, named: [(value of along, overall summary)]}` over the FastMTP modes, if `along` takes several
    values.
    """
    fastmtp = [entry for entry in results["by_mode"].values() if entry["method"] == "fastmtp"]
    if len({entry["options"][along] for entry in fastmtp}) < 2:
        return {}
    lines: dict = {}
    for entry in fastmtp:
        others = {key: value for key, value in entry["options"].items() if key != along}
        name = ", ".join(SWEEP_NAMES.get(key, key + " {}").format(value) for key, value in others.items())
        lines.setdefault(name, []).append((entry["options"][along], entry["overall"]))
    return lines


def _vocab_sizes(results: dict) -> dict:
    """`{draft vocabulary: mean size in the stats}`, small to large; sizes the stats do not give count as infinite."""
    sizes = {}
    for entry in results["by_mode"].values():
        if entry["method"] == "fastmtp":
            size = entry["overall"].get("mean_draft_vocab_size")
            sizes[entry["options"]["draft_vocab"]] = float("inf") if size is None else size
    return dict(sorted(sizes.items(), key=lambda item: (item[1], str(item[0]))))


# ---------------------------------------------------------------------------------------------- comparing runs


COMPARE_MD_NAME = "comparison.md"
COMPARE_PNG_NAME = "comparison.png"


def load_results(folder: str | os.PathLike) -> dict:
    """The results.json of a finished `fastmtp bench --output folder` run."""
    path = Path(folder) / RESULTS_JSON_NAME
    if not path.is_file():
        raise BenchError(f"{folder} has no {RESULTS_JSON_NAME}: run `fastmtp bench --output {folder}` first.")
    return json.loads(path.read_text(encoding="utf-8"))


def fastmtp_lines(runs: dict[str, dict]) -> dict[str, list[dict]]:
    """
    `{label: FastMTP overall summaries with their options, by K}`; a run with several vocabularies, thresholds or
    lookup lengths gets a line for each.
    """
    lines: dict[str, list[dict]] = {}
    for label, results in runs.items():
        entries = [entry for entry in results["by_mode"].values() if entry["method"] == "fastmtp"]
        keys = {key for entry in entries for key in entry["options"]} - {"num_draft_tokens"}
        varying = [key for key in sorted(keys) if len({entry["options"].get(key) for entry in entries}) > 1]
        for entry in entries:
            named = [
                SWEEP_NAMES.get(key, key + " {}").format(entry["options"][key])
                for key in varying
                if key in entry["options"]
            ]
            name = f"{label} ({', '.join(named)})" if named else label
            lines.setdefault(name, []).append({**entry["overall"], **entry["options"]})
    return {name: sorted(points, key=lambda point: point["num_draft_tokens"]) for name, points in lines.items()}


def comparison_table(runs: dict[str, dict]) -> str:
    """One row per run (and vocabulary): tau and speedup at each K, acceptance by position at the largest K."""
    lines = fastmtp_lines(runs)
    ks = sorted({point["num_draft_tokens"] for points in lines.values() for point in points})
    header = ["run", *[f"K={k} {metric}" for k in ks for metric in ("tau", "speedup")], "acceptance at the largest K"]
    rows = []
    for name, points in lines.items():
        by_k = {point["num_draft_tokens"]: point for point in points}
        cells = [name]
        for k in ks:
            cells += (
                [_format("tau", by_k[k]["tau"]), _format("speedup", by_k[k]["speedup"])] if k in by_k else ["-"] * 2
            )
        cells.append(" / ".join(_percent(rate) for rate in points[-1]["acceptance_cumulative"]))
        rows.append(cells)
    return format_table(header, rows)


def plot_comparison(figure, runs: dict[str, dict]) -> bool:
    """tau against K, and cumulative acceptance by draft position at the largest K, one line per run."""
    lines = fastmtp_lines(runs)
    if not lines:
        return False
    tau_axes, acceptance_axes = figure.subplots(1, 2)
    for name, points in lines.items():
        tau_axes.plot([p["num_draft_tokens"] for p in points], [p["tau"] for p in points], marker="o", label=name)
        rates = points[-1]["acceptance_cumulative"]
        acceptance_axes.plot(range(1, len(rates) + 1), rates, marker="o", label=name)
    tau_axes.set_xlabel("K (drafts per cycle)")
    tau_axes.set_ylabel("tau")
    acceptance_axes.set_xlabel("draft position k (at the largest K)")
    acceptance_axes.set_ylabel("P(drafts 1..k accepted)")
    for axes in (tau_axes, acceptance_axes):
        axes.xaxis.get_major_locator().set_params(integer=True)
    tau_axes.legend(fontsize="small")
    return True


def write_comparison(runs: dict[str, dict], output_dir: str | os.PathLike) -> list[Path]:
    """comparison.md (the table, and each run's settings) and comparison.png in `output_dir`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = [
        f"- {label}: head {results['settings']['head'] or 'shipped'}, "
        f"{results['by_mode'][results['reference']]['overall']['prompts']} prompts, "
        f"{results['settings']['max_new_tokens']} new tokens"
        for label, results in runs.items()
    ]
    text = "# FastMTP runs compared\n\n" + comparison_table(runs) + "\n\n" + "\n".join(settings) + "\n"
    (output_dir / COMPARE_MD_NAME).write_text(text, encoding="utf-8")
    written = [output_dir / COMPARE_MD_NAME]
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed: no plot (pip install matplotlib).")
        return written
    figure = Figure(figsize=(9, 4.5), layout="constrained")
    if plot_comparison(figure, runs):
        figure.savefig(output_dir / COMPARE_PNG_NAME, dpi=120)
        written.append(output_dir / COMPARE_PNG_NAME)
    return written


__all__ = [
    "BenchError",
    "Mode",
    "Run",
    "acceptance",
    "aggregate",
    "build_modes",
    "check_lossless",
    "comparison_table",
    "format_table",
    "load_questions",
    "render_markdown",
    "run_bench",
    "timed_generate",
    "write_comparison",
    "write_reports",
]
