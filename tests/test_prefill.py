"""A batch's prefill in groups of similar length: the grouping chosen from measured costs, and lossless decoding."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_fastmtp
from test_batch import greedy, padded_batch

from hf_fastmtp import FastMTPCandidateGenerator
from hf_fastmtp.decoding import modeling_fastmtp, speculative_decoding
from hf_fastmtp.decoding.calibration import CALIBRATED_ROWS, Calibration, calibration_key
from hf_fastmtp.decoding.cpu_kernels import KernelChoice
from hf_fastmtp.decoding.prefill import PREFILL_POSITIONS, forward_cost, plan_prefill

LENGTHS = (5, 9, 3, 12, 9, 4)


def test_forward_cost_interpolates_and_extends_the_measured_forwards():
    cost = forward_cost([1.0, 2.0, 6.0])  # at 16, 64 and 256 positions
    assert cost(1) == cost(16) == 1.0  # a forward costs at least the smallest one measured
    assert cost(40) == pytest.approx(1.5) and cost(64) == pytest.approx(2.0) and cost(160) == pytest.approx(4.0)
    assert cost(448) == pytest.approx(10.0)  # past the last: the last segment's slope


def test_a_cost_that_grows_with_positions_groups_equal_lengths():
    plan = plan_prefill(LENGTHS, lambda positions: positions)
    assert plan.num_positions == sum(LENGTHS) and plan.grouped  # no padding computed
    for rows, width in zip(plan.groups, plan.widths, strict=True):
        assert width == max(LENGTHS[row] for row in rows)


def test_a_flat_cost_keeps_one_padded_forward():
    plan = plan_prefill(LENGTHS, lambda positions: 1.0)
    assert plan.groups == [sorted(range(len(LENGTHS)))] and plan.widths == [12] and not plan.grouped
    assert plan.num_positions == 12 * len(LENGTHS)


def test_a_fixed_cost_per_forward_is_weighed_against_the_padding():
    # 10 per forward, 1 per position: 3 and 4 pad to 4 (saves a forward), 12 stays alone (padding 9s to 12 costs 27).
    plan = plan_prefill((3, 4, 12), lambda positions: 10 + positions)
    assert plan.groups == [[0, 1], [2]] and plan.widths == [4, 12]


def with_prefill_costs(monkeypatch, prefill_seconds) -> list:
    """Every model generates with this measured prefill cost (and fixed K); returns the grouped prefills' plans."""

    def calibration(model, remeasure=False):
        forward = [1.0] * CALIBRATED_ROWS
        key = calibration_key(model)
        return Calibration(key, KernelChoice(), forward, forward, 0.01, prefill_seconds=prefill_seconds)

    monkeypatch.setattr(modeling_fastmtp, "load_or_calibrate", calibration)
    plans = []
    grouped_prefill = speculative_decoding.grouped_prefill

    def recorded(base, plan, *args, **kwargs):
        plans.append(plan)
        return grouped_prefill(base, plan, *args, **kwargs)

    monkeypatch.setattr(speculative_decoding, "grouped_prefill", recorded)
    return plans


def first_drafts(monkeypatch) -> list:
    """The candidates of each `generate` call's first drafting cycle."""
    original = FastMTPCandidateGenerator.get_candidates
    drafts = []

    def get_candidates(generator, input_ids, **kwargs):
        candidates, logits = original(generator, input_ids, **kwargs)
        if not kwargs.get("is_first_iteration") and generator.stats.cycles == 0:
            drafts.append(candidates[:, input_ids.shape[1] :].clone())
        return candidates, logits

    monkeypatch.setattr(FastMTPCandidateGenerator, "get_candidates", get_candidates)
    return drafts


def test_grouped_prefill_is_lossless_and_drafts_as_after_a_padded_one(architecture, monkeypatch):
    """Rows prefilled apart decode exactly as the padded batch does; the head drafts from the same hidden states."""
    model = tiny_fastmtp(architecture, sharpness=3.0)
    batch = padded_batch(LENGTHS)
    plain = greedy(model, batch, max_new_tokens=24)
    drafts = first_drafts(monkeypatch)
    plans = with_prefill_costs(monkeypatch, [float(n) for n in PREFILL_POSITIONS])
    grouped = greedy(model, batch, max_new_tokens=24, fastmtp=True)
    assert len(plans) == 1 and plans[0].grouped and plans[0].num_positions < len(LENGTHS) * max(LENGTHS)
    assert torch.equal(grouped, plain)
    with_prefill_costs(monkeypatch, [1.0] * len(PREFILL_POSITIONS))  # a flat cost: one padded forward
    model.calibration(remeasure=True)
    padded = greedy(model, batch, max_new_tokens=24, fastmtp=True)
    assert len(plans) == 1 and torch.equal(padded, plain)  # (no second plan: the padded forward ran)
    assert len(drafts) == 2 and torch.equal(drafts[0], drafts[1])


def test_the_drafter_is_told_the_positions_a_grouped_prefill_computed(monkeypatch):
    """`auto` prices the head's catch-up from the prefill's cost per position: the positions forwarded, not slots."""
    model = tiny_fastmtp("llama")
    observed = []
    original = FastMTPCandidateGenerator.get_candidates

    def get_candidates(generator, input_ids, **kwargs):
        if kwargs.get("is_first_iteration"):
            observed.append(kwargs.get("prefill_positions"))
        return original(generator, input_ids, **kwargs)

    monkeypatch.setattr(FastMTPCandidateGenerator, "get_candidates", get_candidates)
    plans = with_prefill_costs(monkeypatch, [float(n) for n in PREFILL_POSITIONS])
    greedy(model, padded_batch(LENGTHS), max_new_tokens=4, fastmtp=True)
    greedy(model, padded_batch(LENGTHS[:1]), max_new_tokens=4, fastmtp=True)  # one row: no plan
    assert len(plans) == 1 and observed == [plans[0].num_positions, None]
