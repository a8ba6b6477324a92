"""`fastmtp distill`: the base model answers prompts; its answers become the head's training data."""

from __future__ import annotations

import argparse

from ..embedded import load_base
from ..prompt_sources import read_prompts
from ..training.distill import KNOWN_SOURCES, DistillError, check_options, distill
from ..training.distilled_dataset import export_dataset, push_to_hub
from ..training.processes import launched_processes
from .args import (
    BASE_HELP,
    add_device_argument,
    add_dtype_argument,
    add_gguf_file_argument,
    parse_dtype,
    resolve_device,
)
from .source_args import add_source_arguments, source_options

NO_PROMPTS = (
    "fastmtp distill needs prompts: pass --prompts with a JSONL file (a prompt per line: prompt, and optionally id, "
    "source, lang), a dataset folder or data file, or a Hub dataset id (e.g. --prompts tatsu-lab/alpaca "
    "--prompt-column instruction). No prompt set ships with hf_fastmtp: the ones its head was trained on are under "
    "non-commercial licences."
)


def register_cli(commands: argparse._SubParsersAction) -> None:
    """Adds the `distill` subcommand to the `fastmtp` command line."""
    parser = commands.add_parser(
        "distill",
        help="answer prompts with the base model: the FastMTP head's training data (resumable)",
        description="Self-distillation: the base model answers prompts with its own chat template and sampling; the "
        "answers are written as JSONL shards and as a Parquet dataset with its card (`datasets.load_dataset(OUTPUT)`)."
        " Rerun the same command to resume an interrupted run.",
    )
    parser.add_argument(
        "--prompts",
        metavar="PATH_OR_ID",
        help="required: a JSONL file, a dataset folder or data file, or a Hub dataset id (see the column options)",
    )
    parser.add_argument("--output", required=True, help="folder for the shards, manifest.json and the dataset")
    parser.add_argument(
        "--push-to-hub", metavar="REPO_ID", help="then upload the dataset (card, manifest, Parquet) to this Hub repo"
    )
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
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
    parser.add_argument("--base", help=BASE_HELP)
    add_gguf_file_argument(parser)
    add_dtype_argument(parser)
    add_device_argument(parser)
    add_source_arguments(parser, "--prompts")
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
        if args.prompts is None:
            raise DistillError(NO_PROMPTS)
        read_prompts(args.prompts, source_options(args), error=DistillError, what="Prompts")
        device = resolve_device(args.device)
        # One process, or those of `accelerate launch` / `torchrun` (each on its own GPU): refused if they are apart.
        processes = launched_processes(cpu=device.type == "cpu", error=DistillError)
        model, tokenizer, model_name = load_base(args.base, parse_dtype(args.dtype), args.gguf_file)
        model.to(processes.device if processes.num_processes > 1 else device)
        result = distill(
            model,
            tokenizer,
            args.prompts,
            args.output,
            sources=args.source,
            langs=args.lang,
            seed=args.seed,
            model_name=model_name,
            prompt_options=source_options(args),
            **options,
        )
        if processes.is_main_process:
            export_dataset(args.output)  # the shards as Parquet files with a dataset card: `load_dataset(OUTPUT)`
    except DistillError as error:
        raise SystemExit(f"fastmtp distill: error: {error}") from None
    if not processes.is_main_process:
        return  # the main process reports (and uploads) for all
    print(result.summary())
    if args.push_to_hub:
        print(f"Uploaded to {upload(args.output, args.push_to_hub, args.private)}")


def upload(folder: str, repo_id: str, private: bool) -> str:
    """`--push-to-hub`: the dataset repo's URL; a failure keeps the data and says how to retry."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return push_to_hub(folder, repo_id, private=private or None)
    except (HfHubHTTPError, ConnectionError) as error:
        raise SystemExit(
            f"fastmtp distill: error: uploading {folder} to {repo_id} failed ({error}). The data is safe in {folder}: "
            "rerun the same command to upload it (nothing is generated again)."
        ) from None
