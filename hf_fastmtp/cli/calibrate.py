"""`fastmtp calibrate`: measure this machine's kernels and verification costs for a model, and show the table."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..decoding.calibration import calibration_key, calibration_path, format_calibration
from .args import add_device_argument, add_dtype_argument, load_model


def register_cli(commands: argparse._SubParsersAction) -> None:
    """Adds the `calibrate` subcommand to the `fastmtp` command line."""
    parser = commands.add_parser(
        "calibrate",
        help="measure which kernels are fastest on this machine, and what verifying n tokens costs",
        description="Shows the calibration FastMTP generates with on this machine (measured on first use and kept "
        "in ~/.cache/hf_fastmtp/calibration): for each linear layer shape and row count, Transformers' own kernel "
        "against the alternatives; attention; draft-step weights; the verification forward's cost for n new tokens, "
        "which num_draft_tokens='auto' chooses K from. --remeasure measures it again.",
    )
    parser.add_argument("--base", help="base model folder or Hub id (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--head", help="FastMTP head folder (default: the shipped head)")
    add_dtype_argument(parser)
    add_device_argument(parser)
    parser.add_argument("--remeasure", action="store_true", help="measure again, even if a calibration is cached")
    parser.add_argument("--output", help="also write the table to this Markdown file")
    parser.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> None:
    model, _ = load_model(args)
    calibration = model.calibration(remeasure=args.remeasure)
    if calibration is None:
        raise SystemExit("fastmtp calibrate: calibration is off (HF_FASTMTP_CALIBRATION=off); unset it to measure.")
    table = format_calibration(calibration)
    print(f"{table}\n\nKept in {calibration_path(calibration_key(model))}.")
    if args.output:
        Path(args.output).write_text(table + "\n", encoding="utf-8")
