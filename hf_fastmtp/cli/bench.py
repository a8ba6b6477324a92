"""`fastmtp bench` and `fastmtp compare`: Spec-Bench timing runs, and several runs side by side."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..bench.metrics import REFERENCE, BenchError
from ..bench.report import (
    RESULTS_MD_NAME,
    comparison_table,
    load_results,
    lossless_line,
    summary_table,
    write_comparison,
)
from ..bench.run import (
    DEFAULT_METHODS,
    DEFAULT_QUESTIONS,
    METHODS,
    check_options,
    hardware_info,
    load_questions,
    run_bench,
)
from ..bench.throughput import render_throughput, run_throughput
from ..embedded import DEFAULT_BASE_NAME
from ..training.distill import DistillError, selected_prompt_ids
from .args import (
    BASE_HELP,
    add_device_argument,
    add_dtype_argument,
    add_gguf_file_argument,
    draft_length_arg,
    load_model,
    parse_lookup_tokens,
    parse_probability,
)
from .source_args import add_source_arguments, source_options


def parse_draft_vocab(value: str) -> str | int:
    """A `--draft-vocab` value: digits are a vocabulary size, anything else a name ("full", "auto", "en", ...)."""
    if value.isdigit():
        if int(value) < 1:
            raise argparse.ArgumentTypeError("a draft vocabulary size must be at least 1")
        return int(value)
    return value


def parse_confidence_threshold(value: str) -> float | None:
    """A `--confidence-threshold` value: a probability; 0 (None) runs without the gate."""
    return parse_probability(value) or None


def register_cli(commands: argparse._SubParsersAction) -> None:
    """Adds the `bench` and `compare` subcommands to the `fastmtp` command line."""
    parser = commands.add_parser(
        "bench",
        help="Spec-Bench: speedup, tau, acceptance and tok/s of FastMTP and other methods against plain decoding in "
        "stock Transformers",
        description="Times greedy decoding modes on Spec-Bench prompts (first turns), interleaved per prompt, and "
        "writes records.jsonl, results.json, results.md and plots to --output. Rerun the same command to resume.",
    )
    parser.add_argument(
        "--output", required=True, metavar="DIR", help="folder for settings, records, results and plots"
    )
    parser.add_argument(
        "--questions",
        nargs="+",
        default=[str(DEFAULT_QUESTIONS)],
        metavar="PATH_OR_ID",
        help="JSONL files, dataset folders or files, or Hub dataset ids: Spec-Bench questions (question_id, category, "
        "turns), distillation prompts (id, source as the category, prompt) or any prompts the column options name "
        "(default: Spec-Bench, 480 questions, shipped with hf_fastmtp)",
    )
    parser.add_argument("--categories", nargs="+", metavar="NAME", help="only these categories (default: all)")
    parser.add_argument(
        "--held-out-from",
        metavar="DIR",
        help="skip every prompt that the `fastmtp distill` runs of DIR selected: prompts the head was not trained on",
    )
    parser.add_argument(
        "--per-category", type=int, metavar="N", help="the first N questions of each category (default: all)"
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=METHODS,
        help=f"what to compare (default: {' '.join(DEFAULT_METHODS)}, plus assisted with --assistant); "
        f"{REFERENCE}, plain decoding in stock Transformers (its own generate, none of this package's kernels), "
        "always runs first, as the reference for speedups and the lossless check; ar is plain decoding under this "
        "package's CPU kernels",
    )
    parser.add_argument(
        "--k",
        type=draft_length_arg,
        nargs="+",
        metavar="K",
        help="FastMTP drafts per cycle, one mode each: 'auto' (the default: chosen per cycle) or an int",
    )
    parser.add_argument(
        "--draft-vocab",
        type=parse_draft_vocab,
        nargs="+",
        metavar="VOCAB",
        default=["full"],
        help="FastMTP draft vocabularies, one run each: full, auto, a language code or a size (default: full)",
    )
    parser.add_argument(
        "--confidence-threshold",
        type=parse_confidence_threshold,
        nargs="+",
        metavar="P",
        default=[None],
        help="FastMTP runs that stop drafting where the head's top probability falls below P, one run each; 0 runs "
        "ungated (default: 0)",
    )
    parser.add_argument(
        "--lookup-tokens",
        type=parse_lookup_tokens,
        nargs="+",
        metavar="N",
        default=[None],
        help="FastMTP runs that also draft up to N tokens by prompt lookup where it agrees with the head, one run "
        "each; 0 runs without lookup (default: 0)",
    )
    parser.add_argument(
        "--pld-tokens", type=int, default=10, metavar="N", help="prompt lookup decoding: tokens per lookup"
    )
    parser.add_argument("--assistant", metavar="PATH_OR_ID", help="draft model folder or Hub id for assisted decoding")
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="per prompt (default: 128)")
    parser.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        metavar="B",
        help="instead of the modes: throughput by batch size, plain batched decoding in stock Transformers against "
        "batched FastMTP (the first --k), over the selected prompts cut into batches of B (throughput.md, .png)",
    )
    parser.add_argument("--base", metavar="PATH_OR_ID", help=BASE_HELP)
    add_gguf_file_argument(parser)
    parser.add_argument(
        "--head", metavar="PATH", help="FastMTP head folder (default: the shipped head; with --base: a new head)"
    )
    add_dtype_argument(parser)
    add_device_argument(parser)
    add_source_arguments(parser, "--questions")
    parser.set_defaults(func=cmd_bench)

    compare = commands.add_parser(
        "compare",
        help="tables and a plot of several `fastmtp bench` runs side by side (heads, training recipes)",
        description="Reads the results.json of each run and writes comparison.md (tau and speedup per K, each over "
        "its run's reference, and acceptance by draft position) and comparison.png (tau against K, acceptance by "
        "position) to --output.",
    )
    compare.add_argument("runs", nargs="+", metavar="LABEL=DIR", help="a label and a `fastmtp bench --output` folder")
    compare.add_argument("--output", required=True, metavar="DIR", help="folder for comparison.md and comparison.png")
    compare.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> None:
    runs = {}
    try:
        for run in args.runs:
            label, separator, folder = run.partition("=")
            if not separator or not label or not folder:
                raise BenchError(f"{run!r}: give each run as LABEL=DIR, e.g. vanilla=runs/table1-vanilla.")
            runs[label] = load_results(folder)
    except BenchError as error:
        raise SystemExit(f"fastmtp compare: error: {error}") from None
    written = write_comparison(runs, args.output)
    print(comparison_table(runs))
    print("\nWritten: " + ", ".join(str(path) for path in written))


def cmd_bench(args: argparse.Namespace) -> None:
    methods = args.modes or [*DEFAULT_METHODS, *(["assisted"] if args.assistant else [])]
    try:
        # Checked before the model loads, which can take half a minute.
        check_options(
            per_category=args.per_category,
            num_draft_tokens=args.k,
            pld_tokens=args.pld_tokens,
            max_new_tokens=args.max_new_tokens,
        )
        if "assisted" in methods and not args.assistant:
            raise BenchError("The `assisted` mode needs a draft model: pass --assistant PATH_OR_ID.")
        exclude_ids = held_out_exclusions(args.held_out_from) if args.held_out_from else set()
        # Read before the model loads too, so that a missing file or column fails at once.
        questions = load_questions(
            args.questions,
            args.per_category,
            categories=args.categories,
            exclude_ids=exclude_ids,
            options=source_options(args),
        )
        if args.batch_size:
            return cmd_throughput(args, [question["prompt"] for question in questions])
        model, tokenizer = load_model(args)
        assistant_model, assistant_tokenizer = (
            _load_assistant(args.assistant, model) if "assisted" in methods else (None, None)
        )
        results = run_bench(
            model,
            tokenizer,
            args.output,
            questions=args.questions,
            per_category=args.per_category,
            categories=args.categories,
            exclude_ids=exclude_ids,
            methods=methods,
            num_draft_tokens=args.k,
            draft_vocabs=args.draft_vocab,
            confidence_thresholds=args.confidence_threshold,
            lookup_tokens=args.lookup_tokens,
            pld_tokens=args.pld_tokens,
            max_new_tokens=args.max_new_tokens,
            assistant_model=assistant_model,
            assistant_tokenizer=assistant_tokenizer,
            model_name=args.base or DEFAULT_BASE_NAME,
            question_options=source_options(args),
        )
    except BenchError as error:
        raise SystemExit(f"fastmtp bench: error: {error}") from None
    print(summary_table(results))
    print(f"\n{lossless_line(results)}\nFull results: {Path(args.output) / RESULTS_MD_NAME}")


def cmd_throughput(args: argparse.Namespace, prompts: list[str]) -> None:
    """`fastmtp bench --batch-size ...`: the throughput sweep (`bench/throughput.py`)."""
    model, tokenizer = load_model(args)
    results = run_throughput(
        model,
        tokenizer,
        args.output,
        prompts,
        args.batch_size,
        max_new_tokens=args.max_new_tokens,
        num_draft_tokens=(args.k or ["auto"])[0],
        hardware=hardware_info(model),
    )
    print(render_throughput(results))
    print(f"Written to {args.output}: throughput.md, throughput.png, throughput.json")


def held_out_exclusions(distilled: str | os.PathLike) -> set[str]:
    """`--held-out-from`: the prompt ids that a head trained on that data may have seen."""
    try:
        return selected_prompt_ids(distilled)
    except (DistillError, FileNotFoundError) as error:
        raise BenchError(f"--held-out-from {distilled}: {error}") from None


def _load_assistant(name: str, model: PreTrainedModel) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    assistant = AutoModelForCausalLM.from_pretrained(name, dtype=model.dtype).to(model.device).eval()
    return assistant, AutoTokenizer.from_pretrained(name)
