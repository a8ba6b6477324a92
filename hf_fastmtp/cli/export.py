"""`fastmtp export`: a head and its base as a checkpoint that a serving engine (SGLang, vLLM) runs at scale."""

from __future__ import annotations

import argparse

from ..checkpoints import export_sglang, export_vllm
from ..decoding.modeling_fastmtp import FastMTPForCausalLM
from ..embedded import gguf_file_of, load_base
from .args import add_gguf_file_argument


def register_cli(commands: argparse._SubParsersAction) -> None:
    """Adds the `export` subcommand to the `fastmtp` command line."""
    parser = commands.add_parser(
        "export",
        help="write a checkpoint for serving at scale (SGLang, vLLM) and print its launch command",
        description="Writes the head and its base as a MiMo-style checkpoint (base weights plus model.mtp_layers.0) "
        "that SGLang (EAGLE) and vLLM (method mtp) serve through their MiMo MTP paths, and prints the command that "
        "launches the chosen engine. Those paths take Qwen2-architecture bases only.",
    )
    parser.add_argument("--format", choices=["sglang", "vllm"], required=True, help="serving engine to export for")
    parser.add_argument("--output", required=True, help="new or empty folder for the checkpoint")
    parser.add_argument(
        "--head", help="FastMTP head folder or Hub repo, or a MiMo checkpoint (e.g. TencentBAC/FastMTP)"
    )
    parser.add_argument("--base", help="base model folder, Hub id or GGUF file (default: the base the head names)")
    add_gguf_file_argument(parser)
    parser.add_argument(
        "--token-map",
        help="SGLang only: language of the vocabulary map to serve with (default: the head's default)",
    )
    parser.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> None:
    if args.head is None:
        raise SystemExit(
            "fastmtp export: pass --head (a head folder or repo, or a MiMo checkpoint such as TencentBAC/FastMTP). "
            "The embedded default (SmolLM2, a Llama model) cannot be served by the engines' MiMo MTP paths."
        )
    if args.format == "vllm" and args.token_map is not None:
        raise SystemExit("fastmtp export: --token-map is SGLang's; vLLM drafts over the whole vocabulary.")
    base, tokenizer = args.base, args.base
    if gguf_file_of(args.base, args.gguf_file) is not None:
        base, tokenizer, _ = load_base(args.base, "auto", args.gguf_file)
    model = FastMTPForCausalLM.from_pretrained(args.head, base_model=base)
    try:
        if args.format == "vllm":
            command = export_vllm(model, args.output, tokenizer=tokenizer)
        else:
            command = export_sglang(model, args.output, token_map=args.token_map, tokenizer=tokenizer)
    except (ValueError, FileExistsError) as error:
        raise SystemExit(f"fastmtp export: {error}") from error
    engine = "vLLM" if args.format == "vllm" else "SGLang"
    print(f"Wrote a MiMo-style checkpoint to {args.output}. Launch {engine} with:\n\n    {command}\n")
