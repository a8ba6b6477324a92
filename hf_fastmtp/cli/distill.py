"""`fastmtp distill`: the base model answers prompts; its answers become the head's training data."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..embedded import load_base
from ..training.distill import DEFAULT_PROMPTS, KNOWN_SOURCES, DistillError, check_options, distill
from .args import add_device_argument, add_dtype_argument, parse_dtype, resolve_device


def register_cli(commands: argparse._SubParsersAction) -> None:
    """Adds the `distill` subcommand to the `fastmtp` command line."""
    parser = commands.add_parser(
        "distill",
        help="answer prompts with the base model: the FastMTP head's training data (resumable)",
        description="Self-distillation: the base model answers prompts with its own chat template and sampling; the "
        "answers are written as JSONL shards. Rerun the same command to resume an interrupted run.",
    )
    parser.add_argument(
        "--prompts",
        default=str(DEFAULT_PROMPTS),
        help=f"JSONL with id, source, lang, prompt per line (default: {DEFAULT_PROMPTS}, from the current directory)",
    )
    parser.add_argument("--output", required=True, help="folder for the shards and manifest.json")
    parser.add_argument(
        "--source", action="append", help=f"only prompts of this source, repeatable ({', '.join(KNOWN_SOURCES)})"
    )
    parser.add_argument("--lang", action="append", help="only prompts of this language, repeatable (en, zh)")
    parser.add_argument("--num-prompts", type=int, help="answer a seeded random sample of N prompts (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="selects the sample and seeds the sampling (default: 0)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.6, help="0 is greedy (default: 0.6, FastMTP's)")
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-prompt-tokens", type=int, default=512, help="longer prompts are skipped")
    parser.add_argument("--shard-size", type=int, default=1000, help="rows per shard file")
    parser.add_argument("--base", help="base model folder or Hub id (default: embedded SmolLM2-135M-Instruct)")
    add_dtype_argument(parser)
    add_device_argument(parser)
    parser.set_defaults(func=cmd_distill)


def cmd_distill(args: argparse.Namespace) -> None:
    options = {
        "num_prompts": args.num_prompts,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "max_prompt_tokens": args.max_prompt_tokens,
        "shard_size": args.shard_size,
    }
    try:
        # Checked before the model loads, which can take half a minute.
        check_options(**options)
        if not Path(args.prompts).is_file():
            raise DistillError(
                f"Prompts file {args.prompts} not found (the default, {DEFAULT_PROMPTS}, is relative to the current "
                "directory): pass --prompts PATH."
            )
        device = resolve_device(args.device)
        model, tokenizer, model_name = load_base(args.base, parse_dtype(args.dtype))
        model.to(device)
        result = distill(
            model,
            tokenizer,
            args.prompts,
            args.output,
            sources=args.source,
            langs=args.lang,
            seed=args.seed,
            model_name=model_name,
            **options,
        )
    except DistillError as error:
        raise SystemExit(f"fastmtp distill: error: {error}") from None
    print(result.summary())
