"""Flags that several `fastmtp` subcommands share, and how their values become the library's plain arguments."""

from __future__ import annotations

import argparse

import torch
from transformers import PreTrainedTokenizerBase

from .. import embedded
from ..decoding.configuration_fastmtp import check_draft_confidence_threshold, check_draft_length
from ..decoding.modeling_fastmtp import FastMTPForCausalLM

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="weights' dtype (default: auto, the checkpoint's; float32 for the embedded model). bfloat16 is faster on "
        "GPUs and on CPUs with AVX512-BF16 or AMX, but its rounding depends on how many tokens a forward holds",
    )


def parse_dtype(name: str) -> torch.dtype | str:
    return name if name == "auto" else getattr(torch, name)


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        help="where the model runs: auto (default: the GPU when torch sees one, else the CPU), cpu, cuda, cuda:1, mps",
    )


def resolve_device(name: str) -> torch.device:
    """`--device` as a torch device, checked now rather than when the first tensor moves there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise SystemExit(f"--device: {error}") from None
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}.get(device.type)
    if available is not None and not available():
        raise SystemExit(f"--device {name}: this torch ({torch.__version__}) sees no {device.type} device; use cpu.")
    return device


def parse_probability(value: str | float) -> float:
    """A `--confidence-threshold` value, checked as `generate` checks it."""
    try:
        return check_draft_confidence_threshold(float(value))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def draft_length_arg(value: str) -> int | str:
    """A K value: "auto" or an int, checked as `generate` checks it."""
    try:
        return check_draft_length(value if value == "auto" else int(value))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_lookup_tokens(value: str) -> int | None:
    """A `--lookup-tokens` value: prompt lookup's tokens per cycle; 0 (None) runs without lookup."""
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of tokens (0: no lookup), got {value!r}")
    return int(value) or None


BASE_HELP = "base model folder, Hub id or GGUF file (default: embedded SmolLM2-135M-Instruct)"


def add_gguf_file_argument(parser: argparse.ArgumentParser) -> None:
    """`--gguf-file`, for a GGUF base given as a folder (`--base`) and a file name in it, as Transformers takes one."""
    parser.add_argument(
        "--gguf-file",
        metavar="NAME",
        help="GGUF file in the --base folder; dequantised once into a float checkpoint in the cache, which heads "
        "trained on it name as their base",
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", help=BASE_HELP)
    add_gguf_file_argument(parser)
    parser.add_argument("--head", help="FastMTP head folder (default: the shipped head; with --base: a new head)")
    parser.add_argument(
        "-k",
        "--num-draft-tokens",
        type=draft_length_arg,
        default="auto",
        help="drafts per cycle: 'auto' (the default: chosen per cycle from this machine's costs) or an int",
    )
    parser.add_argument(
        "--confidence-threshold",
        type=parse_probability,
        metavar="P",
        help="stop drafting where the head's top probability falls below P, which can pay where verifying K+1 "
        "tokens costs much more than 1 (default: 0, never)",
    )
    parser.add_argument(
        "--lookup-tokens",
        type=parse_lookup_tokens,
        metavar="N",
        help="also look the last tokens up in the prompt and the answer so far, and where the continuation starts "
        "with the head's most likely first token, draft up to N tokens of it (default: 0, never)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=128)
    add_dtype_argument(parser)
    add_device_argument(parser)


def load_model(args: argparse.Namespace) -> tuple[FastMTPForCausalLM, PreTrainedTokenizerBase]:
    """The embedded default, or `--base`/`--head` when given, in `--dtype`, on `--device`."""
    dtype = parse_dtype(args.dtype)
    device = resolve_device(args.device)  # before the load, which can take half a minute
    # `fastmtp calibrate` takes no --gguf-file (a GGUF --base file still works there).
    model, tokenizer = embedded.load_model(args.base, args.head, dtype, getattr(args, "gguf_file", None))
    return model.to(device), tokenizer


def resolve_confidence_threshold(args: argparse.Namespace) -> float | None:
    """`--confidence-threshold`; absent or 0, no gate (ungated drafting was ahead on CPUs too, docs/results.md)."""
    if args.confidence_threshold is None:
        return None
    try:
        return parse_probability(args.confidence_threshold) or None
    except argparse.ArgumentTypeError as error:
        raise SystemExit(f"--confidence-threshold: {error}") from None


def lookup_kwargs(args: argparse.Namespace) -> dict:
    """FastMTP's prompt lookup option; never given to plain decoding, where Transformers would run prompt lookup."""
    return {"prompt_lookup_num_tokens": args.lookup_tokens} if args.lookup_tokens else {}
