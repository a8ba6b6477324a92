"""
The `fastmtp` command line: one entry point, one subcommand per job.

Argparse only: each job's module here turns flags into plain arguments for the library, which never imports this.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from . import bench, build_vocab, calibrate, distill, export, generate, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmtp", description="FastMTP speculative decoding for Transformers.")
    commands = parser.add_subparsers(dest="command", required=True)
    for job in (generate, distill, train, build_vocab, bench, calibrate, export):  # the order of `fastmtp --help`
        job.register_cli(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)
