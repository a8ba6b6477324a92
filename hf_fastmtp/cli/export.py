"""`fastmtp export`: a head and its base as a checkpoint that a serving engine (SGLang) runs at scale."""

from __future__ import annotations

import argparse

from ..checkpoints import export_sglang
from ..decoding.modeling_fastmtp import FastMTPForCausalLM


def register_cli(commands: argparse._SubParsersAction) -> None:
    """Adds the `export` subcommand to the `fastmtp` command line."""
    parser = commands.add_parser(
        "export",
        help="write a checkpoint for serving at scale (SGLang) and print its launch command",
        description="Writes the head and its base as a MiMo-style checkpoint (base weights plus model.mtp_layers.0) "
        "that SGLang serves with EAGLE speculative decoding, and prints the command that launches it. SGLang's MiMo "
        "MTP path takes Qwen2-architecture bases only.",
    )
    parser.add_argument("--format", choices=["sglang"], required=True, help="serving engine to export for")
    parser.add_argument("--output", required=True, help="new or empty folder for the checkpoint")
    parser.add_argument(
        "--head", help="FastMTP head folder or Hub repo, or a MiMo checkpoint (e.g. TencentBAC/FastMTP)"
    )
    parser.add_argument("--base", help="base model folder or Hub id (default: the base the head names)")
    parser.add_argument(
        "--token-map", help="language of the vocabulary map to serve with (default: the head's default)"
    )
    parser.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> None:
    if args.head is None:
        raise SystemExit(
            "fastmtp export: pass --head (a head folder or repo, or a MiMo checkpoint such as TencentBAC/FastMTP). "
            "The embedded default (SmolLM2, a Llama model) cannot be served by SGLang's MiMo MTP path."
        )
    model = FastMTPForCausalLM.from_pretrained(args.head, base_model=args.base)
    try:
        command = export_sglang(model, args.output, token_map=args.token_map, tokenizer=args.base)
    except (ValueError, FileExistsError) as error:
        raise SystemExit(f"fastmtp export: {error}") from error
    print(f"Wrote a MiMo-style checkpoint to {args.output}. Launch SGLang with:\n\n    {command}\n")
