"""
`fastmtp generate` and `fastmtp demo`: one streamed answer, and the built-in prompts with stock Transformers' plain
decoding against FastMTP.
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers import TextStreamer

from ..bench.report import format_table
from ..bench.run import timed_generate
from ..prompts import DEMO_PROMPTS, encode_chat
from .args import add_model_arguments, load_model, lookup_kwargs, resolve_confidence_threshold


def register_cli(commands: argparse._SubParsersAction) -> None:
    """Adds the `generate` and `demo` subcommands to the `fastmtp` command line."""
    generate = commands.add_parser("generate", help="answer one prompt, streaming, and report tok/s and tau")
    generate.add_argument("prompt")
    generate.add_argument("--no-fastmtp", action="store_true", help="plain decoding, for comparison")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    add_model_arguments(generate)
    generate.set_defaults(func=cmd_generate)

    demo = commands.add_parser(
        "demo", help="built-in prompts, stock Transformers vs FastMTP: time, tok/s, speedup, tau, identical output"
    )
    demo.add_argument("--prompts", nargs="*", help="your own prompts instead of the built-in ones")
    add_model_arguments(demo)
    demo.set_defaults(func=cmd_demo)


def sampling_kwargs(temperature: float) -> dict:
    if temperature < 0:
        raise SystemExit("--temperature must be >= 0 (0 is greedy).")
    return {"do_sample": False} if temperature == 0 else {"do_sample": True, "temperature": temperature}


def cmd_generate(args: argparse.Namespace) -> None:
    model, tokenizer = load_model(args)
    threshold = resolve_confidence_threshold(args)
    inputs = encode_chat(tokenizer, args.prompt)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if not args.no_fastmtp:
        model.calibration()  # (measured once per machine: not to be timed as generation)
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
        summary += f", tau {run.stats.tau:.2f} (K={args.num_draft_tokens}{gate}{lookup})"
    print(f"\n[{'plain' if args.no_fastmtp else 'FastMTP'}] {summary}", file=sys.stderr)


def cmd_demo(args: argparse.Namespace) -> None:
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
        # Alternate which mode goes first so that neither always gets the warmer machine. Plain decoding runs as
        # stock Transformers does, without this package's kernels: the speedup is over what a user starts from.
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
    header = ("prompt", "stock s", "stock tok/s", "FastMTP s", "FastMTP tok/s", "speedup", "tau", "identical")
    print(
        "\nPlain decoding in stock Transformers (its own generate) against FastMTP; greedy, "
        f"{args.max_new_tokens} new tokens, K={args.num_draft_tokens}, "
        f"confidence gate {threshold or 'off'}, prompt lookup {args.lookup_tokens or 'off'}, "
        f"{model.model.config.name_or_path} on {model.device.type} ({torch.get_num_threads()} threads)\n"
    )
    print(format_table(header, rows))


def shorten(text: str, width: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
