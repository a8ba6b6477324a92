"""
Throughput by batch size (`fastmtp bench --batch-size 1 2 4 8`): tokens per second over a batch of prompts, plain
batched decoding in stock Transformers against batched FastMTP, greedy.

The same prompts run at every batch size, cut into consecutive batches of B (left-padded); for each batch both modes
run back to back, alternating which goes first. A row's tokens count up to its EOS (finished rows' padding is not
output). Lossless check: FastMTP's sequences equal plain batched decoding's, batch for batch. Writes
throughput.jsonl (one record per batch and mode; a rerun resumes), throughput.json, throughput.md and throughput.png.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..decoding.modeling_fastmtp import FastMTPForCausalLM
from ..jsonl import append_rows, read_rows, write_json
from ..prompts import encode_chats
from .metrics import BenchError
from .report import format_table, hardware_line

MODES = ("plain", "fastmtp")  # plain: stock Transformers' batched generate
RECORDS_NAME = "throughput.jsonl"
RECORD_FIELDS = ("batch_size", "batch", "mode", "seconds", "new_tokens", "sequences", "tau")


def run_throughput(
    model: FastMTPForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str | Path,
    prompts: Sequence[str],
    batch_sizes: Sequence[int],
    *,
    max_new_tokens: int,
    num_draft_tokens: int | str = "auto",
    hardware: dict | None = None,
    progress: bool = True,
) -> dict:
    """Runs (or resumes) the sweep into `output_dir`, writes its reports, and returns the aggregates."""
    if not batch_sizes or any(size < 1 for size in batch_sizes) or len(prompts) < max(batch_sizes):
        raise BenchError(f"--batch-size takes sizes >= 1, at most the number of prompts ({len(prompts)}).")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    records_path = output_dir / RECORDS_NAME
    done = {(r["batch_size"], r["batch"], r["mode"]) for r in read_rows(records_path, RECORD_FIELDS, BenchError)}
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": pad_id(tokenizer)}
    todo = [
        (size, index, prompts[start : start + size])
        for size in batch_sizes
        for index, start in enumerate(range(0, len(prompts) - size + 1, size))
    ]
    warm_up = encode_chats(tokenizer, ["Hello!"] * 2, model.device)
    for mode in MODES:  # (the first calls of each mode and batch shape pay one-off costs: calibration, allocation)
        timed_batch(model, warm_up, mode, {**kwargs, "max_new_tokens": 8}, num_draft_tokens)
    for size, index, batch_prompts in tqdm(todo, desc="throughput", unit="batch", disable=not progress):
        inputs = encode_chats(tokenizer, batch_prompts, model.device)
        for mode in MODES if index % 2 == 0 else MODES[::-1]:
            if (size, index, mode) not in done:
                record = timed_batch(model, inputs, mode, kwargs, num_draft_tokens)
                append_rows(records_path, [{"batch_size": size, "batch": index, **record}])
    results = {
        "by_batch_size": aggregate_throughput(read_rows(records_path, RECORD_FIELDS, BenchError)),
        "max_new_tokens": max_new_tokens,
        "num_draft_tokens": num_draft_tokens,
        "hardware": hardware,
    }
    write_json(output_dir / "throughput.json", results)
    (output_dir / "throughput.md").write_text(render_throughput(results), encoding="utf-8")
    plot_throughput(results, output_dir / "throughput.png")
    return results


def timed_batch(model: FastMTPForCausalLM, inputs: dict, mode: str, kwargs: dict, num_draft_tokens) -> dict:
    """One batched generate() call of `mode`, timed end to end."""
    fastmtp = {"fastmtp": True, "num_draft_tokens": num_draft_tokens} if mode == "fastmtp" else {}
    synchronize(model)
    start = time.perf_counter()
    output = model.generate(**inputs, **kwargs, **fastmtp)
    synchronize(model)
    seconds = time.perf_counter() - start
    new = output[:, inputs["input_ids"].shape[1] :]
    stats = model.last_fastmtp_stats
    return {
        "mode": mode,
        "seconds": seconds,
        "new_tokens": [row_length(row, model.generation_config.eos_token_id, kwargs["pad_token_id"]) for row in new],
        "sequences": new.tolist(),
        "tau": stats.tau if mode == "fastmtp" else None,
    }


def row_length(tokens: torch.LongTensor, eos_token_id, pad_token_id: int) -> int:
    """A row's generated tokens: up to and including its first EOS, else all but trailing padding."""
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    for position, token in enumerate(tokens.tolist()):
        if token in eos:
            return position + 1
    non_pad = (tokens != pad_token_id).nonzero()
    return int(non_pad[-1]) + 1 if len(non_pad) else 0


def aggregate_throughput(records: Sequence[dict]) -> dict[int, dict]:
    """Per batch size: tokens per second of each mode, FastMTP's speedup and tau, and the lossless count."""
    by_size: dict[int, dict] = {}
    for size in sorted({record["batch_size"] for record in records}):
        mine = {(r["batch"], r["mode"]): r for r in records if r["batch_size"] == size}
        batches = sorted({batch for batch, mode in mine if all((batch, m) in mine for m in MODES)})
        if not batches:
            continue
        tokens_per_second = {
            mode: sum(sum(mine[b, mode]["new_tokens"]) for b in batches)
            / sum(mine[b, mode]["seconds"] for b in batches)
            for mode in MODES
        }
        taus = [mine[b, "fastmtp"]["tau"] for b in batches]
        by_size[size] = {
            "batches": len(batches),
            "tokens_per_second": tokens_per_second,
            "speedup": tokens_per_second["fastmtp"] / tokens_per_second["plain"],
            "tau": sum(taus) / len(taus),
            "identical_batches": sum(
                mine[b, "plain"]["sequences"] == mine[b, "fastmtp"]["sequences"] for b in batches
            ),
        }
    return by_size


def render_throughput(results: dict) -> str:
    rows = [
        [
            str(size),
            str(row["batches"]),
            f"{row['tokens_per_second']['plain']:.1f}",
            f"{row['tokens_per_second']['fastmtp']:.1f}",
            f"{row['speedup']:.2f}x",
            f"{row['tau']:.2f}",
            f"{row['identical_batches']}/{row['batches']}",
        ]
        for size, row in results["by_batch_size"].items()
    ]
    header = ["batch size", "batches", "plain tok/s", "FastMTP tok/s", "speedup", "tau", "identical"]
    lines = [
        "# Throughput by batch size",
        "",
        f"Greedy, {results['max_new_tokens']} new tokens at most per prompt, K={results['num_draft_tokens']}; "
        "plain is stock Transformers' batched `generate`; tok/s counts every row's tokens up to its EOS.",
        "",
        format_table(header, rows),
    ]
    if results.get("hardware"):
        lines += ["", hardware_line(results["hardware"])]
    return "\n".join(lines) + "\n"


def plot_throughput(results: dict, path: Path) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return
    sizes = list(results["by_batch_size"])
    rows = list(results["by_batch_size"].values())
    figure = Figure(figsize=(9, 4), layout="constrained")
    rate, speedup = figure.subplots(1, 2)
    for mode, label in (("plain", "stock Transformers"), ("fastmtp", "FastMTP")):
        rate.plot(sizes, [row["tokens_per_second"][mode] for row in rows], marker="o", label=label)
    rate.set(xscale="log", xlabel="batch size", ylabel="tokens / s (whole batch)", title="Throughput")
    rate.set_xticks(sizes, [str(size) for size in sizes])
    rate.legend()
    speedup.plot(sizes, [row["speedup"] for row in rows], marker="o", color="tab:green")
    speedup.axhline(1.0, color="grey", linewidth=0.8)
    speedup.set(xscale="log", xlabel="batch size", ylabel="FastMTP / plain", title="Speedup")
    speedup.set_xticks(sizes, [str(size) for size in sizes])
    figure.savefig(path, dpi=120)


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def synchronize(model: FastMTPForCausalLM) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


__all__ = ["run_throughput"]
