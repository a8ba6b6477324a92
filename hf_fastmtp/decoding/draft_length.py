"""
How many tokens to draft in each cycle: a fixed K, or `num_draft_tokens="auto"`, chosen by a cost model.

The auto policy chooses the K (0 = a plain decoding step) that maximises expected tokens per second:

    rate(K) = (1 + sum_{i=1..K} prod_{j=1..i} a_j) / (V(K + 1) + K * D)

with V(n) the measured cost of a verification forward over n new tokens (this machine's `Calibration`), D that of a
draft step (the calibration's at first, then the mean of this call's own steps, which also reflects the draft
vocabulary it drafts over), and a_j the head's acceptance of draft j given drafts 1..j-1 were accepted: the numerator
is the expected tokens a cycle yields (the base's own token plus each draft, kept only if all before it were). a_j
starts from the head's measured acceptance (`FastMTPConfig.draft_acceptance`, written by training) and follows the
cycles of this call, as a running average that starts from that prior. Plain steps teach it nothing, so after
`PROBE_AFTER` of them in a row one cycle drafts a token, to see whether the text has become easier to draft. The
choice reads only past cycles, never a draft, so speculative sampling stays exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .candidate_generator import FastMTPStats

# Acceptance assumed for a head that records none: about what a small, briefly trained head reaches.
DEFAULT_ACCEPTANCE = 0.5
# How many cycles the prior acceptance counts as, against those this call observed.
PRIOR_CYCLES = 8
# Plain steps in a row after which one cycle drafts a token again.
PROBE_AFTER = 16
# Head steps of this call after which their mean cost replaces the calibration's.
OBSERVED_STEPS = 8


class FixedDraftLength:
    """K drafts every cycle."""

    def __init__(self, num_draft_tokens: int):
        self.max_draft_tokens = num_draft_tokens

    def __call__(self, stats: FastMTPStats) -> int:
        return self.max_draft_tokens


class AutoDraftLength:
    """The K with the highest expected rate of tokens per second (see the module), re-chosen every cycle."""

    def __init__(
        self, forward_seconds: Sequence[float], draft_step_seconds: float, prior_acceptance: Sequence[float] | None
    ):
        self.forward_seconds = list(forward_seconds)
        self.draft_step_seconds = draft_step_seconds
        self.max_draft_tokens = len(self.forward_seconds) - 1
        prior = list(prior_acceptance or [DEFAULT_ACCEPTANCE])
        # Positions past the recorded ones are assumed as likely as the last recorded one.
        self.prior_acceptance = (prior + prior[-1:] * self.max_draft_tokens)[: self.max_draft_tokens]
        self.plain_steps_in_a_row = 0

    def acceptance(self, stats: FastMTPStats) -> list[float]:
        """a_j for j = 1..max K: the prior, moved by what this call's cycles accepted at each position."""
        return [
            (PRIOR_CYCLES * prior + accepted) / (PRIOR_CYCLES + reached)
            for prior, accepted, reached in zip(
                self.prior_acceptance, stats.accepted_per_position, stats.reached_per_position
            )
        ]

    def draft_step_cost(self, stats: FastMTPStats) -> float:
        """D: the calibration's, until this call has drafted enough steps of its own to tell."""
        if stats.head_steps < OBSERVED_STEPS:
            return self.draft_step_seconds
        return stats.draft_seconds / stats.head_steps

    def expected_rates(self, acceptance: Sequence[float], draft_step_seconds: float) -> list[float]:
        """rate(K) for K = 0..max K."""
        rates, expected_tokens, all_accepted = [], 1.0, 1.0
        for k in range(self.max_draft_tokens + 1):
            if k:
                all_accepted *= acceptance[k - 1]
                expected_tokens += all_accepted
            rates.append(expected_tokens / (self.forward_seconds[k] + k * draft_step_seconds))
        return rates

    def __call__(self, stats: FastMTPStats) -> int:
        rates = self.expected_rates(self.acceptance(stats), self.draft_step_cost(stats))
        k = max(range(len(rates)), key=rates.__getitem__)
        if k == 0 and self.plain_steps_in_a_row >= PROBE_AFTER:
            k = 1
        self.plain_steps_in_a_row = self.plain_steps_in_a_row + 1 if k == 0 else 0
        return k


__all__ = ["AutoDraftLength", "FixedDraftLength"]
