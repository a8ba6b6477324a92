"""`FastMTPStats`: what one `generate(fastmtp=True)` call did: cycles, acceptance per draft position, time spent."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class FastMTPStats:
    """What happened during one `generate(fastmtp=True)` call."""

    max_draft_tokens: int  # the most drafts a cycle may take (K; with "auto", the most it may choose)
    cycles: int = 0
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    reached_per_position: list[int] = field(default_factory=list)
    new_tokens: int = 0
    head_steps: int = 0
    prefill_seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    language: str | None = None
    draft_vocab_size: int | None = None
    lookup_cycles: int = 0
    lookup_drafted: int = 0
    lookup_accepted: int = 0
    # Index n: the cycles whose head drafted n tokens (0: a plain step); prompt-lookup cycles are counted apart.
    cycles_by_drafts: list[int] = field(default_factory=list)
    # A batch's rows, each with its own counts (a cycle of the batch is a cycle of each row); empty for one prompt.
    rows: list[FastMTPStats] = field(default_factory=list)

    def __post_init__(self):
        if not self.drafted_per_position:
            self.drafted_per_position = [0] * self.max_draft_tokens
            self.accepted_per_position = [0] * self.max_draft_tokens
            self.reached_per_position = [0] * self.max_draft_tokens
        if not self.cycles_by_drafts:
            self.cycles_by_drafts = [0] * (self.max_draft_tokens + 1)

    def record_cycle(self, num_drafted: int, num_accepted: int, from_lookup: bool = False) -> None:
        """One verification pass; a pass with no drafts (nothing confident enough) is a plain decoding step."""
        self.cycles += 1
        if from_lookup:  # prompt-lookup drafts are counted apart: they may be longer than K
            self.lookup_cycles += 1
            self.lookup_drafted += num_drafted
            self.lookup_accepted += num_accepted
            return
        self.cycles_by_drafts[num_drafted] += 1
        for position in range(num_drafted):
            self.drafted_per_position[position] += 1
            # Draft k is only judged when drafts 1..k-1 were all accepted.
            self.reached_per_position[position] += position <= num_accepted
            self.accepted_per_position[position] += position < num_accepted

    def empty_copy(self) -> FastMTPStats:
        """No counts yet, the same settings (K, language, draft vocabulary)."""
        return FastMTPStats(self.max_draft_tokens, language=self.language, draft_vocab_size=self.draft_vocab_size)

    @property
    def accepted_tokens(self) -> int:
        return sum(self.accepted_per_position) + self.lookup_accepted

    @property
    def tau(self) -> float:
        """Mean tokens produced per verification pass: accepted drafts plus the base model's own token."""
        return (self.accepted_tokens + self.cycles) / self.cycles if self.cycles else 0.0

    @property
    def acceptance_cumulative(self) -> list[float]:
        """P(drafts 1..k all accepted), per position k, over the cycles that drafted position k."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_position, self.drafted_per_position)]

    @property
    def acceptance_conditional(self) -> list[float]:
        """P(draft k accepted | drafts 1..k-1 accepted), per position k."""
        return [a / r if r else 0.0 for a, r in zip(self.accepted_per_position, self.reached_per_position)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_draft_tokens": self.max_draft_tokens,
            "cycles": self.cycles,
            "cycles_by_drafts": list(self.cycles_by_drafts),
            "new_tokens": self.new_tokens,
            "head_steps": self.head_steps,
            "tau": self.tau,
            "drafted_per_position": list(self.drafted_per_position),
            "accepted_per_position": list(self.accepted_per_position),
            "reached_per_position": list(self.reached_per_position),
            "acceptance_cumulative": self.acceptance_cumulative,
            "acceptance_conditional": self.acceptance_conditional,
            "prefill_seconds": self.prefill_seconds,
            "draft_seconds": self.draft_seconds,
            "verify_seconds": self.verify_seconds,
            "language": self.language,
            "draft_vocab_size": self.draft_vocab_size,
            "lookup_cycles": self.lookup_cycles,
            "lookup_drafted": self.lookup_drafted,
            "lookup_accepted": self.lookup_accepted,
            "rows": [row.to_dict() for row in self.rows],
        }


__all__ = ["FastMTPStats"]
