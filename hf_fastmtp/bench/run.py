"""
Timing FastMTP and other methods against plain decoding in stock Transformers, fairly: same inputs, interleaved runs.

`fastmtp bench` runs Spec-Bench prompts (first turns) with every chosen mode of decoding and writes an output folder:
    settings.json   the model (base name, head weights hash, dtype), max_new_tokens, and the options of each run
    records.jsonl   one row per prompt and mode: question_id, category, mode, new_token_ids, seconds, stats
    results.json    the aggregates of `aggregate(records)`, the settings and the hardware
    results.md      speedup over stock Transformers / tau / tok/s per category, per-position acceptance, lossless
                    check, hardware
    *.png           speedup by category, acceptance by position, and tau and tok/s against K and vocabulary size

Fairness: one warm-up generation per mode before the first prompt, then for each prompt all modes back to back, in
an order rotated from prompt to prompt, so that machine noise and cache warmth hit every mode alike.
Resume: records are appended one line at a time with an fsync; a rerun skips the (question_id, mode) pairs already
in records.jsonl, cuts off a torn last line, and refuses a folder made with another model or max_new_tokens.
The metric arithmetic (`aggregate`) is a pure function of the records, separate from running them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..decoding.calibration import machine_name
from ..decoding.modeling_fastmtp import FastMTPForCausalLM
from ..decoding.stats import FastMTPStats
from ..jsonl import append_rows, read_rows, write_json
from ..prompt_sources import DEFAULT_SOURCE_OPTIONS, SPEC_BENCH, SourceOptions, read_prompts
from ..prompts import encode_chat
from ..run_settings import open_run_folder
from .metrics import REFERENCE, BenchError, aggregate
from .report import write_reports

logger = logging.getLogger(__name__)

DEFAULT_QUESTIONS = SPEC_BENCH  # shipped in the package (Apache-2.0, hf_fastmtp/data/README.md)
# The reference (stock Transformers) first; `ar` is plain decoding under this package's CPU kernels.
METHODS = (REFERENCE, "ar", "fastmtp", "pld", "assisted")
DEFAULT_METHODS = (REFERENCE, "ar", "fastmtp", "pld")
SETTINGS_NAME = "settings.json"
RECORDS_NAME = "records.jsonl"
FORMAT_VERSION = 2  # 2: `ar` is plain steps in FastMTP's loop, `ar-stock` the reference
# Records made with other values of these are not comparable: never mix them into one folder.
IDENTITY_KEYS = ("format_version", "model", "max_new_tokens")
RECORD_FIELDS = ("question_id", "category", "mode", "method", "options", "new_token_ids", "seconds", "stats")
WARM_UP_PROMPT = "Hello!"
WARM_UP_TOKENS = 8


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
    model: FastMTPForCausalLM, inputs: dict[str, torch.Tensor], fastmtp: bool, **generate_kwargs
) -> Run:
    """One generate() call, timed end to end (prefill included), with the FastMTP stats it left."""
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    start = time.perf_counter()
    output = model.generate(**inputs, fastmtp=fastmtp, **generate_kwargs)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    seconds = time.perf_counter() - start
    prompt_length = inputs["input_ids"].shape[1]
    return Run(output[0, prompt_length:].tolist(), seconds, model.last_fastmtp_stats)


def verification_cost(model: FastMTPForCausalLM) -> dict[str, dict[int, float]] | None:
    """
    Milliseconds of one base forward over n new tokens after a cache, from this machine's calibration: what
    verifying K drafts (n = K + 1) costs against a plain step (n = 1), under the chosen kernels and Transformers' own.
    """
    calibration = model.calibration()
    if calibration is None:
        return None
    return {
        "chosen": {n: 1000 * s for n, s in enumerate(calibration.forward_seconds, start=1)},
        "stock": {n: 1000 * s for n, s in enumerate(calibration.stock_forward_seconds, start=1)},
    }


# ---------------------------------------------------------------------------------------------- what to run


@dataclass
class Mode:
    """One way of decoding: the label used in records and tables, and the generate() options it stands for."""

    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)


def build_modes(
    methods: Iterable[str],
    num_draft_tokens: Sequence[int | str],
    draft_vocabs: Sequence[str | int] = ("full",),
    pld_tokens: int = 10,
    confidence_thresholds: Sequence[float | None] = (None,),
    lookup_tokens: Sequence[int | None] = (None,),
) -> list[Mode]:
    """
    The modes to compare: `ar-stock` (always, first: it is the reference) and every K x vocabulary x confidence
    threshold x prompt lookup length (None: without lookup) for `fastmtp`.
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
                    label = f"fastmtp-{'auto' if k == 'auto' else f'k{k}'}-{vocab}"
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
    options: SourceOptions = DEFAULT_SOURCE_OPTIONS,
) -> list[dict]:
    """
    Questions as `question_id`, `category`, `prompt`, in order, from one or more JSONL files, datasets or Hub ids.

    A row is a Spec-Bench question (`question_id`, `category`, `turns`: the first turn is asked), a prompt in the
    distillation format (`id`, `source`, `prompt`: the source is the category), or any dataset row that `options`
    name the columns of (`prompt_sources.read_prompts`). `categories` keeps only those, `exclude_ids` drops prompts
    (e.g. those a head was trained on), and `per_category` then keeps the first N of each category, so that the same
    N always selects the same prompts.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    excluded = {str(question_id) for question_id in exclude_ids}
    questions, seen, taken = [], set(), Counter()
    for path in paths:
        for row in read_prompts(path, options, error=BenchError, what="Questions"):
            if row["id"] in seen:
                raise BenchError(f"{path}: question_id {row['id']!r} is used twice (also in an earlier file).")
            seen.add(row["id"])
            category = row["source"]
            if categories is not None and category not in categories:
                continue
            if str(row["id"]) in excluded:
                continue
            if per_category is None or taken[category] < per_category:
                taken[category] += 1
                questions.append({"question_id": row["id"], "category": category, "prompt": row["prompt"]})
    if categories is not None and (missing := set(categories) - set(taken)):
        raise BenchError(f"No question of the categories {sorted(missing)} in {', '.join(map(str, paths))}.")
    if not questions:
        raise BenchError(f"No questions in {', '.join(map(str, paths))}.")
    return questions


def check_options(
    *, per_category: int | None, num_draft_tokens: Sequence[int | str] | None, pld_tokens: int, max_new_tokens: int
) -> None:
    """Raises `BenchError` for an option out of range; cheap, so the CLI runs it before loading a model."""
    positive = {"per_category": per_category, "pld_tokens": pld_tokens, "max_new_tokens": max_new_tokens}
    for name, value in positive.items():
        if value is not None and value < 1:
            raise BenchError(f"{name} must be at least 1, got {value}.")
    if num_draft_tokens is not None and (
        not num_draft_tokens or any(k != "auto" and (not isinstance(k, int) or k < 1) for k in num_draft_tokens)
    ):
        raise BenchError(f"every K must be 'auto' or at least 1, got {list(num_draft_tokens)}.")


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
    num_draft_tokens: Sequence[int | str] | None = None,
    draft_vocabs: Sequence[str | int] = ("full",),
    confidence_thresholds: Sequence[float | None] = (None,),
    lookup_tokens: Sequence[int | None] = (None,),
    pld_tokens: int = 10,
    max_new_tokens: int = 128,
    assistant_model: PreTrainedModel | None = None,
    assistant_tokenizer: PreTrainedTokenizerBase | None = None,
    model_name: str | None = None,
    progress: bool = True,
    question_options: SourceOptions = DEFAULT_SOURCE_OPTIONS,
) -> dict:
    """
    Runs every (prompt, mode) pair that `output_dir` does not hold yet, then writes the results and returns them.

    `questions` (with `question_options`), `per_category`, `categories` and `exclude_ids` select the prompts
    (`load_questions`).
    `num_draft_tokens` (ints or "auto") defaults to "auto"; `confidence_thresholds` adds gated FastMTP modes (None:
    ungated), `lookup_tokens` FastMTP modes that also draft by prompt lookup (None: without).
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
    selection = load_questions(
        questions, per_category, categories=categories, exclude_ids=exclude_ids, options=question_options
    )
    modes = build_modes(
        methods,
        num_draft_tokens or ["auto"],
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
        **({"question_options": question_options.to_dict()} if question_options.to_dict() else {}),
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
    if any(mode.method in ("ar", "fastmtp") for mode in modes):
        results["forward_ms"] = verification_cost(model)
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
                    # (`ar` runs FastMTP's loop without drafts: its stats say nothing)
                    "stats": result.stats.to_dict() if mode.method == "fastmtp" else None,
                }
                append_rows(records_path, [record])
                bar.update()


def _mode_kwargs(mode: Mode, assistant_kwargs: dict) -> tuple[bool, dict]:
    """`(fastmtp, timed_generate() arguments)` for a mode."""
    if mode.method == "assisted":
        return False, assistant_kwargs
    if mode.method == "ar":  # plain steps in FastMTP's loop, with this machine's calibrated kernels
        return True, {"num_draft_tokens": 0}
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
        "cpu": machine_name(torch.device("cpu")),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        # The kernels calibration chose here (`fastmtp calibrate` shows why).
        "kernels": kernels_summary(model),
    }


def kernels_summary(model: FastMTPForCausalLM) -> str:
    """The kernels FastMTP and `ar` compute with on this machine, in a few words."""
    calibration = model.calibration()
    if calibration is None:
        return "Transformers' own (calibration off)"
    choice = calibration.choice
    used = sorted({kernel for kernels in choice.linear.values() for kernel in kernels} - {"stock"})
    return (
        f"linear {', '.join(used) or 'stock'} where measured faster; grouped attention at "
        f"{list(choice.grouped_attention_queries) or 'no'} queries; {choice.draft_weights} draft weights"
    )


# ---------------------------------------------------------------------------------------------- output folder


def _open_output(folder: Path, identity: dict, run: dict) -> None:
    """Records this run in settings.json; refuses a folder whose records were made with another model or settings."""
    path = folder / SETTINGS_NAME
    if not path.exists() and (folder / RECORDS_NAME).exists():
        raise BenchError(
            f"{folder} has {RECORDS_NAME} but no {SETTINGS_NAME}; refusing to mix in records of unknown origin."
        )
    settings, changed = open_run_folder(path, identity, run, IDENTITY_KEYS, BenchError)
    assistants = {entry["assistant"] for entry in settings["runs"]} - {None}
    if len(assistants) > 1:
        changed.append(f"assistant {sorted(assistants)}")
    if changed:
        raise BenchError(
            f"{folder} holds records made with other settings ({'; '.join(changed)}). Their timings and outputs "
            "are not comparable with this run's: use another --output folder, or the settings it was made with."
        )
    write_json(path, settings)


__all__ = ["Mode", "Run", "build_modes", "load_questions", "run_bench", "timed_generate"]
