"""What a bench run measured: acceptance, throughput and speedups per mode, and whether outputs are identical."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import zip_longest

from ..decoding.stats import FastMTPStats

# The mode every other is measured against: plain greedy decoding as Transformers comes (stock generate, none of
# this package's kernels), what a user starts from.
REFERENCE = "ar-stock"


class BenchError(ValueError):
    """A problem with the options, the questions file or the output folder, explained for the user."""


def aggregate(records: Sequence[dict], reference: str = REFERENCE) -> dict:
    """
    Per mode, overall and per category: prompts, tokens, seconds, tok/s (total tokens / total seconds), speedup over
    `reference` (its total seconds over the mode's, on the prompts both ran), and for FastMTP tau and per-position
    acceptance from summed counts (a ratio of sums, not a mean of per-prompt ratios); plus the lossless check.
    Modes and categories keep the order in which they first appear in `records`.
    """
    modes = list(dict.fromkeys(record["mode"] for record in records))
    categories = list(dict.fromkeys(record["category"] for record in records))
    reference_seconds = {r["question_id"]: r["seconds"] for r in records if r["mode"] == reference}
    by_mode = {}
    for mode in modes:
        own = [record for record in records if record["mode"] == mode]
        by_mode[mode] = {
            "method": own[0]["method"],
            "options": own[0]["options"],
            "overall": summarize(own, reference_seconds),
            "categories": {
                category: summarize(in_category, reference_seconds)
                for category in categories
                if (in_category := [record for record in own if record["category"] == category])
            },
        }
    return {
        "reference": reference,
        "modes": modes,
        "categories": categories,
        "by_mode": by_mode,
        "lossless": check_lossless(records, reference),
    }


def summarize(records: Sequence[dict], reference_seconds: dict) -> dict:
    """Totals and rates of one mode's records; `reference_seconds` maps question_id to the reference's seconds."""
    tokens = sum(len(record["new_token_ids"]) for record in records)
    seconds = sum(record["seconds"] for record in records)
    paired = [record for record in records if record["question_id"] in reference_seconds]
    paired_seconds = sum(record["seconds"] for record in paired)
    summary = {
        "prompts": len(records),
        "new_tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds else None,
        "speedup": (
            sum(reference_seconds[record["question_id"]] for record in paired) / paired_seconds
            if paired and paired_seconds
            else None
        ),
    }
    stats = [record["stats"] for record in records if record["stats"] is not None]
    if stats:
        summary.update(acceptance(stats))
    return summary


LOOKUP_COUNTS = ("lookup_cycles", "lookup_drafted", "lookup_accepted")


def acceptance(stats: Sequence[dict]) -> dict:
    """
    tau and per-position acceptance of several generate() calls: `FastMTPStats`' own rates over their summed counts.
    A rate nothing measured (no cycle, no draft at that position) is None rather than `FastMTPStats`' 0.0.
    """
    drafted = _summed_per_position(entry["drafted_per_position"] for entry in stats)
    reached = _summed_per_position(_reached_per_position(entry) for entry in stats)
    accepted = _summed_per_position(entry["accepted_per_position"] for entry in stats)
    # Cycles that drafted by prompt lookup count in tau; the per-position acceptance is the head's own.
    lookup = {key: sum(entry.get(key, 0) for entry in stats) for key in LOOKUP_COUNTS}
    summed = FastMTPStats(
        max_draft_tokens=len(drafted),
        cycles=sum(entry["cycles"] for entry in stats),
        drafted_per_position=drafted,
        accepted_per_position=accepted,
        reached_per_position=reached,
        **lookup,
    )
    head_steps = sum(entry.get("head_steps", sum(entry["drafted_per_position"])) for entry in stats)
    draft_seconds = sum(entry["draft_seconds"] for entry in stats)
    vocab_sizes = [entry["draft_vocab_size"] for entry in stats if entry.get("draft_vocab_size") is not None]
    return {
        "cycles": summed.cycles,
        "tau": summed.tau if summed.cycles else None,
        **lookup,
        "drafted_per_position": drafted,
        "accepted_per_position": accepted,
        "acceptance_cumulative": _measured(summed.acceptance_cumulative, drafted),
        "acceptance_conditional": _measured(summed.acceptance_conditional, reached),
        "draft_seconds": draft_seconds,
        # The cost of one head step, the part that vocabulary compression cuts; gated cycles also count the step
        # whose draft they dropped.
        "draft_ms_per_step": 1000 * draft_seconds / head_steps if head_steps else None,
        "verify_seconds": sum(entry["verify_seconds"] for entry in stats),
        "mean_draft_vocab_size": sum(vocab_sizes) / len(vocab_sizes) if vocab_sizes else None,
        "languages": dict(Counter(entry.get("language") or "unknown" for entry in stats)),
    }


def _measured(rates: Sequence[float], counts: Sequence[int]) -> list[float | None]:
    return [rate if count else None for rate, count in zip(rates, counts)]


def _summed_per_position(counts: Iterable[list[int]]) -> list[int]:
    return [sum(position) for position in zip_longest(*counts, fillvalue=0)]


def _reached_per_position(stats: dict) -> list[int]:
    """Cycles that judged draft k: drafted it with drafts 1..k-1 all accepted (derived for records that predate it)."""
    if "reached_per_position" in stats:
        return stats["reached_per_position"]
    return stats["drafted_per_position"][:1] + stats["accepted_per_position"][:-1]


def check_lossless(records: Sequence[dict], reference: str = REFERENCE) -> dict:
    """Every mode's output against the reference's on the same prompt: greedy speculation must not change a token."""
    expected = {record["question_id"]: record["new_token_ids"] for record in records if record["mode"] == reference}
    compared = [record for record in records if record["mode"] != reference and record["question_id"] in expected]
    mismatches = [
        {
            "question_id": record["question_id"],
            "category": record["category"],
            "mode": record["mode"],
            "first_difference": first_difference(record["new_token_ids"], expected[record["question_id"]]),
        }
        for record in compared
        if record["new_token_ids"] != expected[record["question_id"]]
    ]
    return {"compared": len(compared), "mismatches": mismatches, "identical": not mismatches}


def first_difference(tokens: Sequence[int], expected: Sequence[int]) -> int:
    """Index of the first token where the two differ (the shorter length if one is a prefix of the other)."""
    return next(
        (index for index, (a, b) in enumerate(zip(tokens, expected)) if a != b), min(len(tokens), len(expected))
    )


__all__ = ["REFERENCE", "BenchError", "acceptance", "aggregate", "check_lossless", "first_difference"]
