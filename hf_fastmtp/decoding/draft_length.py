"""
How many tokens to draft in each cycle: a fixed K, or `num_draft_tokens="auto"`, chosen by a cost model.

The auto policy chooses the K (0 = a plain decoding step) that maximises expected tokens per second:

    rate(K) = (1 + sum_{i=1..K} prod_{j=1..i} a_j) / (V(B * (K + 1)) + K * D)

with V(n) the cost of a verification cycle over n new token positions (B is the number of rows a batch still
decodes): this call's own mean where it has verified n positions, else this machine's `Calibration` (n = 1..8,
extended linearly by its marginal cost beyond), scaled by what the call measured at the nearest n; D that of a
draft step (the calibration's at first, then the mean of this call's own head steps, which also reflects the draft
vocabulary it drafts over), and a_j the head's acceptance of draft j given drafts 1..j-1 were accepted: the numerator
is the expected tokens a cycle yields (the base's own token plus each draft, kept only if all before it were). a_j
starts from the head's measured acceptance (`FastMTPConfig.draft_acceptance`, written by training) and follows the
cycles of this call, as a running average that starts from that prior. Plain steps teach it nothing, so after
`PROBE_AFTER` of them in a row (more where a probe costs more, see `probe_due`) one cycle drafts a token, to see
whether the text has become easier to draft, unless drafting could not pay even if every draft were accepted (a large
batch, where verification is compute-bound). A batch's first cycle at each batch size is a plain step, which times
V(B) for the call. The choice reads only past cycles, never a draft, so speculative sampling stays exact.

Drafting after plain steps (or after the prefill) first pays once for the head's catch-up: its cache takes every
position verified since it last drafted, B x P positions (the whole prompt, the first time). That cost, C = c x B x P
with c this call's measured cost per caught-up position (before any, estimated from the prefill's cost per position
and the head's share of the base's layers), must be earned back within the tokens the call has left, R per row:
drafting starts only if R / rate(K) + C < R / rate(0). It is kept apart from D, which would otherwise take a
prompt's catch-up for the cost of every step (and, with a large batch and a long prompt, stop drafting for good).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .stats import FastMTPStats

# Acceptance assumed for a head that records none: about what a small, briefly trained head reaches.
DEFAULT_ACCEPTANCE = 0.5
# How many cycles the prior acceptance counts as, against those this call observed.
PRIOR_CYCLES = 8
# Plain steps in a row after which one cycle drafts a token again (at least; more where a probe costs more).
PROBE_AFTER = 16
# What probes may cost at most, as a share of the time of the plain steps between them.
PROBE_BUDGET = 0.02
# Head steps of this call after which their mean cost replaces the calibration's.
OBSERVED_STEPS = 8


class DraftLength:
    """What the drafter reports of a call's costs (a fixed K needs none of them)."""

    max_draft_tokens: int

    def __call__(
        self, stats: FastMTPStats, batch_size: int = 1, catch_up_positions: int = 0, tokens_left: int | None = None
    ) -> int:
        raise NotImplementedError

    def observe(self, num_positions: int, seconds: float) -> None:
        """One verification cycle: `num_positions` (rows x (K + 1)) took `seconds`."""

    def observe_prefill(self, num_positions: int, seconds: float) -> None:
        """The prefill: `num_positions` (rows x prompt length) took `seconds`."""

    def observe_catch_up(self, num_positions: int, seconds: float) -> None:
        """A catch-up of the head after plain steps or the prefill: `num_positions` (rows x positions), `seconds`."""

    def observe_draft_steps(self, num_steps: int, seconds: float) -> None:
        """A cycle's drafting (apart from a catch-up after plain steps): `num_steps` head steps took `seconds`."""


class FixedDraftLength(DraftLength):
    """K drafts every cycle."""

    def __init__(self, num_draft_tokens: int):
        self.max_draft_tokens = num_draft_tokens

    def __call__(
        self, stats: FastMTPStats, batch_size: int = 1, catch_up_positions: int = 0, tokens_left: int | None = None
    ) -> int:
        return self.max_draft_tokens


class AutoDraftLength(DraftLength):
    """The K with the highest expected rate of tokens per second (see the module), re-chosen every cycle."""

    def __init__(
        self,
        forward_seconds: Sequence[float],
        draft_step_seconds: float,
        prior_acceptance: Sequence[float] | None,
        head_share: float = 0.0,
    ):
        """`head_share`: the head's cost per position as a share of the base's (estimates catch-ups from the
        prefill until one is measured)."""
        self.forward_seconds = list(forward_seconds)
        self.draft_step_seconds = draft_step_seconds
        self.max_draft_tokens = len(self.forward_seconds) - 1
        prior = list(prior_acceptance or [DEFAULT_ACCEPTANCE])
        # Positions past the recorded ones are assumed as likely as the last recorded one.
        self.prior_acceptance = (prior + prior[-1:] * self.max_draft_tokens)[: self.max_draft_tokens]
        self.head_share = head_share
        self.plain_steps_in_a_row = 0
        # Verified positions per cycle -> (seconds, cycles) this call measured.
        self.observed: dict[int, tuple[float, int]] = {}
        # (seconds, count) this call measured: head steps while drafting; positions caught up after plain steps.
        self.draft_steps = (0.0, 0)
        self.catch_ups = (0.0, 0)
        self.prefill_seconds_per_position = 0.0

    def observe(self, num_positions: int, seconds: float) -> None:
        total, cycles = self.observed.get(num_positions, (0.0, 0))
        self.observed[num_positions] = (total + seconds, cycles + 1)

    def observe_prefill(self, num_positions: int, seconds: float) -> None:
        self.prefill_seconds_per_position = seconds / max(num_positions, 1)

    def observe_catch_up(self, num_positions: int, seconds: float) -> None:
        self.catch_ups = (self.catch_ups[0] + seconds, self.catch_ups[1] + num_positions)

    def observe_draft_steps(self, num_steps: int, seconds: float) -> None:
        self.draft_steps = (self.draft_steps[0] + seconds, self.draft_steps[1] + num_steps)

    def catch_up_cost(self, num_positions: int) -> float:
        """C: this call's measured cost per caught-up position, else the prefill's scaled by the head's share."""
        seconds, positions = self.catch_ups
        per_position = seconds / positions if positions else self.prefill_seconds_per_position * self.head_share
        return num_positions * per_position

    def acceptance(self, stats: FastMTPStats) -> list[float]:
        """a_j for j = 1..max K: the prior, moved by what this call's cycles accepted at each position."""
        return [
            (PRIOR_CYCLES * prior + accepted) / (PRIOR_CYCLES + reached)
            for prior, accepted, reached in zip(
                self.prior_acceptance, stats.accepted_per_position, stats.reached_per_position
            )
        ]

    def draft_step_cost(self) -> float:
        """D: the calibration's, until this call has drafted enough steps of its own to tell."""
        seconds, steps = self.draft_steps
        return seconds / steps if steps >= OBSERVED_STEPS else self.draft_step_seconds

    def verification_cost(self, num_positions: int) -> float:
        """V(n): this call's mean at n, else the calibration's, scaled by this call's measure at the nearest n."""
        if num_positions in self.observed:
            total, cycles = self.observed[num_positions]
            return total / cycles
        estimate = self.calibrated_cost(num_positions)
        if self.observed:
            nearest = min(self.observed, key=lambda n: abs(math.log(n / num_positions)))
            total, cycles = self.observed[nearest]
            estimate *= total / cycles / self.calibrated_cost(nearest)
        return estimate

    def calibrated_cost(self, num_positions: int) -> float:
        """The calibration's V(n): measured up to its count, then growing by the marginal cost of its upper half."""
        measured = len(self.forward_seconds)
        if num_positions <= measured:
            return self.forward_seconds[num_positions - 1]
        half = measured // 2
        marginal = max(0.0, (self.forward_seconds[-1] - self.forward_seconds[half - 1]) / (measured - half))
        return self.forward_seconds[-1] + (num_positions - measured) * marginal

    def expected_rates(
        self, acceptance: Sequence[float], draft_step_seconds: float, batch_size: int = 1
    ) -> list[float]:
        """rate(K) for K = 0..max K, per row of a batch of `batch_size` (the batch verifies B * (K + 1) positions)."""
        rates, expected_tokens, all_accepted = [], 1.0, 1.0
        for k in range(self.max_draft_tokens + 1):
            if k:
                all_accepted *= acceptance[k - 1]
                expected_tokens += all_accepted
            cost = self.verification_cost(batch_size * (k + 1)) + k * draft_step_seconds
            rates.append(expected_tokens / cost)
        return rates

    def __call__(
        self, stats: FastMTPStats, batch_size: int = 1, catch_up_positions: int = 0, tokens_left: int | None = None
    ) -> int:
        """K for the next cycle; `catch_up_positions`: what drafting must first catch up (rows x positions);
        `tokens_left`: how many tokens a row may still take (None: unbounded)."""
        if batch_size > 1 and batch_size not in self.observed:
            # A batch's plain step is timed before drafts are weighed against it: the calibration timed one row's
            # forwards, which scaled to a batch misjudge what drafts add (a plain step costs what plain decoding does).
            self.plain_steps_in_a_row += 1
            return 0
        draft_step_seconds = self.draft_step_cost()
        rates = self.expected_rates(self.acceptance(stats), draft_step_seconds, batch_size)
        k = max(range(len(rates)), key=rates.__getitem__)
        if k and not self.earns_back(rates[k], rates[0], catch_up_positions, tokens_left):
            k = 0
        if k == 0 and self.probe_due(draft_step_seconds, batch_size, catch_up_positions, tokens_left):
            k = 1
        self.plain_steps_in_a_row = self.plain_steps_in_a_row + 1 if k == 0 else 0
        return k

    def earns_back(self, rate: float, plain_rate: float, catch_up_positions: int, tokens_left: int | None) -> bool:
        """Whether drafting at `rate` makes up for its catch-up within the tokens left: R/rate + C < R/plain_rate."""
        if not catch_up_positions or tokens_left is None:
            return rate > plain_rate
        return tokens_left / rate + self.catch_up_cost(catch_up_positions) < tokens_left / plain_rate

    def probe_due(
        self, draft_step_seconds: float, batch_size: int, catch_up_positions: int = 0, tokens_left: int | None = None
    ) -> bool:
        """
        After a run of plain steps, whether one cycle should draft a token to re-measure acceptance: when drafting
        could pay at all, its catch-up included, and seldom enough for `PROBE_BUDGET` to cover the probe's extra
        verification and draft step (a batch's cost more). The catch-up does not delay a probe: it only grows while
        plain steps go on.
        """
        plain_step = self.verification_cost(batch_size)
        probe = self.verification_cost(2 * batch_size) + draft_step_seconds
        due_after = max(PROBE_AFTER, math.ceil((probe - plain_step) / plain_step / PROBE_BUDGET))
        return self.plain_steps_in_a_row >= due_after and self.drafting_can_pay(
            draft_step_seconds, batch_size, catch_up_positions, tokens_left
        )

    def drafting_can_pay(
        self, draft_step_seconds: float, batch_size: int, catch_up_positions: int = 0, tokens_left: int | None = None
    ) -> bool:
        """Whether some K beats plain steps even if every draft were accepted (else a probe could only cost)."""
        rates = self.expected_rates([1.0] * self.max_draft_tokens, draft_step_seconds, batch_size)
        best = max(rates[1:], default=0.0)
        return best > 0 and self.earns_back(best, rates[0], catch_up_positions, tokens_left)


__all__ = ["AutoDraftLength", "DraftLength", "FixedDraftLength"]
