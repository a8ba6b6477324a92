"""The `fastmtp` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from .prompts import DEMO_PROMPTS, encode_chat

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


def load_model(args: argparse.Namespace):
    """The embedded default, or `--base`/`--head` when given, in `--dtype`, on `--device`."""
    from .embedded import SHIPPED_HEAD_DIR, load_base, load_default

    dtype = parse_dtype(args.dtype)
    device = resolve_device(args.device)
    if args.base is None:
        model, tokenizer = load_default(
            head=args.head or SHIPPED_HEAD_DIR, dtype=torch.float32 if dtype == "auto" else dtype
        )
        return model.to(device), tokenizer
    from .modeling_fastmtp import FastMTPForCausalLM

    base, tokenizer, _ = load_base(args.base, dtype)
    if args.head is None:
        model = FastMTPForCausalLM.from_base(base, base_model_name_or_path=args.base)
    else:
        model = FastMTPForCausalLM.from_pretrained(args.head, base_model=base)
    model.prompt_tokenizer = tokenizer
    return model.to(device), tokenizer


def resolve_confidence_threshold(args: argparse.Namespace) -> float | None:
    """`--confidence-threshold`; absent or 0, no gate (ungated drafting was ahead on CPUs too, docs/results.md)."""
    if args.confidence_threshold is None:
        return None
    try:
        return parse_probability(args.confidence_threshold) or None
    except argparse.ArgumentTypeError as error:
        raise SystemExit(f"--confidence-threshold: {error}") from None


def parse_probability(value: str | float) -> float:
    """A `--confidence-threshold` value, checked as `generate` checks it."""
    from .configuration_fastmtp import check_draft_confidence_threshold

    try:
        return check_draft_confidence_threshold(float(value))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_lookup_tokens(value: str) -> int | None:
    """A `--lookup-tokens` value: prompt lookup's tokens per cycle; 0 (None) runs without lookup."""
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of tokens (0: no lookup), got {value!r}")
    return int(value) or None


def lookup_kwargs(args: argparse.Namespace) -> dict:
    """FastMTP's prompt lookup option; never given to plain decoding, where Transformers would run prompt lookup."""
    return {"prompt_lookup_num_tokens": args.lookup_tokens} if args.lookup_tokens else {}


def sampling_kwargs(temperature: float) -> dict:
    if temperature < 0:
        raise SystemExit("--temperature must be >= 0 (0 is greedy).")
    return {"do_sample": False} if temperature == 0 else {"do_sample": True, "temperature": temperature}


def cmd_generate(args: argparse.Namespace) -> None:
    from transformers import TextStreamer

    from .bench import timed_generate

    model, tokenizer = load_model(args)
    threshold = resolve_confidence_threshold(args)
    inputs = encode_chat(tokenizer, args.prompt)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    run = timed_generate(
        model,
        inputs,
        fastmtp=not args.no_fastmtp,
        max_new_tokens=args.max_new_tokens,
        num_draft_tokens=args.num_draft_tokens,
        draft_confidence_threshold=threshold,
        streamer=streamer,
        **({} if args.no_fastmtp else lookup_kwargs(args)),
        **sampling_kwargs(args.temperature),
    )
    summary = f"{len(run.new_token_ids)} tokens in {run.seconds:.2f} s: {run.tokens_per_second:.1f} tok/s"
    if run.stats is not None:
        gate = f", confidence gate {threshold:g}" if threshold else ""
        lookup = f", {run.stats.lookup_cycles} cycles by prompt lookup" if args.lookup_tokens else ""
        summary += f", tau {run.stats.tau:.2f} (K={run.stats.num_draft_tokens}{gate}{lookup})"
    print(f"\n[{'plain' if args.no_fastmtp else 'FastMTP'}] {summary}", file=sys.stderr)


def cmd_demo(args: argparse.Namespace) -> None:
    from .bench import timed_generate

    model, tokenizer = load_model(args)
    threshold = resolve_confidence_threshold(args)
    settings = {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": False,
        "num_draft_tokens": args.num_draft_tokens,
        "draft_confidence_threshold": threshold,
    }
    warm_up = encode_chat(tokenizer, "Hello!")
    for fastmtp in (False, True):
        model.generate(**warm_up, max_new_tokens=8, fastmtp=fastmtp)

    rows, totals = [], {"plain": [0, 0.0], "fastmtp": [0, 0.0], "accepted": 0, "cycles": 0}
    for index, prompt in enumerate(args.prompts or DEMO_PROMPTS):
        inputs = encode_chat(tokenizer, prompt)
        runs = {}
        # Alternate which mode goes first so that neither always gets the warmer machine.
        for fastmtp in (False, True) if index % 2 == 0 else (True, False):
            runs[fastmtp] = timed_generate(
                model, inputs, fastmtp, **settings, **(lookup_kwargs(args) if fastmtp else {})
            )
        plain, fast = runs[False], runs[True]
        for key, run in (("plain", plain), ("fastmtp", fast)):
            totals[key][0] += len(run.new_token_ids)
            totals[key][1] += run.seconds
        totals["accepted"] += fast.stats.accepted_tokens + fast.stats.cycles
        totals["cycles"] += fast.stats.cycles
        rows.append(
            (
                shorten(prompt),
                f"{plain.seconds:.2f}",
                f"{plain.tokens_per_second:.1f}",
                f"{fast.seconds:.2f}",
                f"{fast.tokens_per_second:.1f}",
                f"{plain.seconds / fast.seconds:.2f}x",
                f"{fast.stats.tau:.2f}",
                "yes" if plain.new_token_ids == fast.new_token_ids else "NO",
            )
        )
    plain_rate = totals["plain"][0] / totals["plain"][1]
    fast_rate = totals["fastmtp"][0] / totals["fastmtp"][1]
    tau = totals["accepted"] / max(totals["cycles"], 1)
    rows.append(
        (
            "overall",
            f"{totals['plain'][1]:.2f}",
            f"{plain_rate:.1f}",
            f"{totals['fastmtp'][1]:.2f}",
            f"{fast_rate:.1f}",
            f"{totals['plain'][1] / totals['fastmtp'][1]:.2f}x",
            f"{tau:.2f}",
            "yes" if all(row[-1] == "yes" for row in rows) else "NO",
        )
    )
    header = ("prompt", "plain s", "plain tok/s", "FastMTP s", "FastMTP tok/s", "speedup", "tau", "identical")
    print(
        f"\nGreedy, {args.max_new_tokens} new tokens, K={args.num_draft_tokens or model.config.num_draft_tokens}, "
        f"confidence gate {threshold or 'off'}, prompt lookup {args.lookup_tokens or 'off'}, "
        f"{model.model.config.name_or_path} on {model.device.type} ({torch.get_num_threads()} threads)\n"
    )
    print(format_table(header, rows))


def shorten(text: str, width: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-markdown table, readable in a terminal too."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |" for line in (header, *rows)]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", help="base model folder or Hub id (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--head", help="FastMTP head folder (default: the shipped head; with --base: a new head)")
    parser.add_argument(
        "-k", "--num-draft-tokens", type=int, default=None, help="drafts per cycle (default: the head's)"
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmtp", description="FastMTP speculative decoding for Transformers.")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="answer one prompt, streaming, and report tok/s and tau")
    generate.add_argument("prompt")
    generate.add_argument("--no-fastmtp", action="store_true", help="plain decoding, for comparison")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    add_model_arguments(generate)
    generate.set_defaults(func=cmd_generate)

    demo = commands.add_parser("demo", help="built-in prompts, plain vs FastMTP: time, tok/s, tau, identical output")
    demo.add_argument("--prompts", nargs="*", help="your own prompts instead of the built-in ones")
    add_model_arguments(demo)
    demo.set_defaults(func=cmd_demo)

    from .bench import register_cli as register_bench
    from .checkpoints import register_cli as register_export
    from .distill import register_cli as register_distill
    from .train import register_cli as register_train
    from .vocab import register_cli as register_vocab

    register_distill(commands)
    register_train(commands)
    register_vocab(commands)
    register_bench(commands)
    register_export(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
