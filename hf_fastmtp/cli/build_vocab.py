"""`fastmtp build-vocab`: per-language frequent-token maps from self-distilled responses."""

from __future__ import annotations

import argparse

from ..training.build_vocab import DEFAULT_SIZES, OVERALL, build_vocab


def register_cli(commands: argparse._SubParsersAction) -> None:
    """Adds the `build-vocab` subcommand to the `fastmtp` command line."""
    parser = commands.add_parser(
        "build-vocab",
        help="frequent-token maps per language from self-distilled data",
        description="Counts token frequencies in self-distilled responses, per detected language and overall, and "
        "writes top-N maps (freq_<lang>_<N>.pt: 1-D tensors of token ids, most frequent first; the format of "
        "SGLang's --speculative-token-map).",
    )
    parser.add_argument("--data", required=True, help="folder written by `fastmtp distill`")
    parser.add_argument("--output", help="folder for the maps (default: HEAD/vocab)")
    parser.add_argument("--head", help="head folder whose config.json should list the maps")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument(
        "--install-size", type=int, metavar="N", help="with --head: the map size to install (default: the largest)"
    )
    parser.add_argument("--max-rows", type=int, metavar="N", help="only the first N rows (the head's training data)")
    parser.add_argument("--default", default=OVERALL, help="map for undetected languages (default: all)")
    parser.add_argument("--min-tokens", type=int, default=10_000, help="fewer counted tokens: no map for a language")
    parser.set_defaults(func=cmd_build_vocab)


def cmd_build_vocab(args: argparse.Namespace) -> None:
    if not (args.output or args.head):
        raise SystemExit("fastmtp build-vocab: give --output DIR, --head HEAD_DIR, or both.")
    manifest = build_vocab(
        args.data,
        args.output or None,
        head=args.head or None,
        sizes=args.sizes,
        install_size=args.install_size,
        max_rows=args.max_rows,
        default=args.default,
        min_tokens=args.min_tokens,
    )
    for language, coverage in manifest["coverage"].items():
        shares = ", ".join(f"top-{size}: {share:.1%}" for size, share in coverage.items())
        print(f"{language}: {manifest['tokens_counted'][language]} tokens; coverage {shares}")
