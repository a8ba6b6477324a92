"""A batch's prefill in groups of similar length: the grouping chosen from measured costs, and lossless decoding."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import configured_fastmtp, tiny_fastmtp
from test_batch import greedy, padded_batch

from hf_fastmtp import FastMTPCandidateGenerator
from hf_fastmtp.decoding import modeling_fastmtp, speculative_decoding
from hf_fastmtp.decoding.calibration import CALIBRATED_ROWS, Calibration, calibration_key
from hf_fastmtp.decoding.cpu_kernels import KernelChoice
from hf_fastmtp.decoding.prefill import PREFILL_POSITIONS, forward_cost, plan_prefill, prompt_spans

# Prompts longer and shorter than the tiny models' sliding window (16).
LENGTHS = (5, 9, 3, 20, 9, 4, 18)
GROWING = [float(n) for n in PREFILL_POSITIONS]  # a forward's cost: its positions
FLAT = [1.0] * len(PREFILL_POSITIONS)


def test_forward_cost_interpolates_and_extends_the_measured_forwards():
    cost = forward_cost([1.0, 2.0, 6.0])  # at 16, 64 and 256 positions
    assert cost(1) == cost(16) == 1.0  # a forward costs at least the smallest one measured
    assert cost(40) == pytest.approx(1.5) and cost(64) == pytest.approx(2.0) and cost(160) == pytest.approx(4.0)
    assert cost(448) == pytest.approx(10.0)  # past the last: the last segment's slope
    noisy = forward_cost([1.0, 0.8, 3.0])  # a longer forward timed faster than a shorter one: taken as no cheaper
    assert noisy(64) == 1.0 and noisy(256) == 3.0


def test_a_cost_that_grows_with_positions_computes_no_padding():
    plan = plan_prefill(LENGTHS, max(LENGTHS), lambda positions: positions)
    assert plan.num_positions == sum(LENGTHS)
    assert sorted(row for rows in plan.groups for row in rows) == list(range(len(LENGTHS)))
    for rows, width in zip(plan.groups, plan.widths, strict=True):
        assert width == max(LENGTHS[row] for row in rows)


def test_a_flat_cost_keeps_the_padded_forward():
    assert plan_prefill(LENGTHS, max(LENGTHS), lambda positions: 1.0) is None


def test_columns_of_padding_alone_are_dropped_even_in_one_group():
    plan = plan_prefill((7, 7), 12, lambda positions: positions)  # (padded to a multiple of 12, say)
    assert plan.groups == [[0, 1]] and plan.widths == [7]


def test_a_gain_under_the_margin_keeps_the_padded_forward():
    assert plan_prefill((40, 39), 40, lambda positions: positions) is None  # 79 positions for 80: 1% less
    assert plan_prefill((40, 20), 40, lambda positions: positions) is not None  # 60 for 80


def test_the_plan_is_the_cheapest_of_every_grouping():
    """Against brute force over every partition of the rows, for random lengths and costs growing with positions."""
    rng = random.Random(0)
    for _ in range(30):
        lengths = [rng.randint(1, 40) for _ in range(rng.randint(2, 6))]
        fixed, per_position = rng.uniform(0, 20), rng.uniform(0.1, 2)

        def cost(positions, fixed=fixed, per_position=per_position):
            return fixed + per_position * positions

        def grouping_cost(groups, lengths=lengths, cost=cost):
            return sum(cost(len(rows) * max(lengths[row] for row in rows)) for rows in groups)

        cheapest = min(grouping_cost(groups) for groups in partitions(list(range(len(lengths)))))
        plan = plan_prefill(lengths, max(lengths), cost)
        padded = cost(len(lengths) * max(lengths))
        if plan is None:
            assert cheapest >= 0.97 * padded - 1e-9
        else:
            assert grouping_cost(plan.groups) == pytest.approx(cheapest) and cheapest < 0.97 * padded


def partitions(items: list) -> list[list[list]]:
    """Every way to split `items` into non-empty groups."""
    if not items:
        return [[]]
    first, rest = items[0], items[1:]
    result = []
    for partition in partitions(rest):
        result.append([[first], *partition])
        for index in range(len(partition)):
            result.append([*partition[:index], [first, *partition[index]], *partition[index + 1 :]])
    return result


def test_prompt_spans_start_at_each_rows_first_token():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 0, 1]])
    assert prompt_spans(mask) == [2, 4, 3]


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


@pytest.mark.parametrize("head", ["one-layer", "features"])
def test_grouped_prefill_is_lossless_and_drafts_as_after_a_padded_one(architecture, head, monkeypatch):
    """Rows prefilled apart decode exactly as the padded batch does; the head drafts from the same hidden states."""
    if head == "one-layer":
        model = tiny_fastmtp(architecture, sharpness=3.0)
    else:  # (a head reading several layers: every layer's hidden states are put back in place)
        model = configured_fastmtp(architecture, "features", sharpness=3.0)
    batch = padded_batch(LENGTHS)
    plain = greedy(model, batch, max_new_tokens=24)
    drafts = first_drafts(monkeypatch)
    plans = with_prefill_costs(monkeypatch, GROWING)
    grouped = greedy(model, batch, max_new_tokens=24, fastmtp=True)
    assert len(plans) == 1 and len(plans[0].groups) > 1 and plans[0].num_positions < len(LENGTHS) * max(LENGTHS)
    assert torch.equal(grouped, plain)
    with_prefill_costs(monkeypatch, FLAT)  # one padded forward
    model.calibration(remeasure=True)
    padded = greedy(model, batch, max_new_tokens=24, fastmtp=True)
    assert len(plans) == 1 and torch.equal(padded, plain)  # (no second plan: the padded forward ran)
    assert len(drafts) == 2 and torch.equal(drafts[0], drafts[1])


def test_masked_slots_inside_a_prompt_and_columns_of_padding(monkeypatch):
    """A row with a masked slot inside its prompt, and a batch padded wider than its longest prompt."""
    model = tiny_fastmtp("llama", sharpness=3.0)
    batch = padded_batch((20, 40, 30))
    batch["attention_mask"][1, -5] = 0
    wide = {name: torch.nn.functional.pad(tensor, (3, 0)) for name, tensor in batch.items()}
    plans = with_prefill_costs(monkeypatch, GROWING)
    for inputs in (batch, wide):
        plain = greedy(model, inputs, max_new_tokens=12)
        assert torch.equal(greedy(model, inputs, max_new_tokens=12, fastmtp=True), plain)
    assert [plan.num_positions for plan in plans] == [20 + 40 + 30] * 2  # (the masked slot counted, as computed)


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
    plans = with_prefill_costs(monkeypatch, GROWING)
    greedy(model, padded_batch(LENGTHS), max_new_tokens=4, fastmtp=True)
    greedy(model, padded_batch(LENGTHS[:1]), max_new_tokens=4, fastmtp=True)  # one row: no plan
    assert len(plans) == 1 and observed == [plans[0].num_positions, None]


def test_sampling_after_a_grouped_prefill_draws_what_a_padded_one_does(monkeypatch):
    """The same logits after either prefill: with the same seed, the same samples (sampling's exactness per row is
    `test_batch.test_sampling_distribution_is_exact_per_row`'s)."""
    model = tiny_fastmtp("qwen2", sharpness=3.0)
    batch = padded_batch(LENGTHS)
    samples = []
    for prefill_seconds in (GROWING, FLAT):
        plans = with_prefill_costs(monkeypatch, prefill_seconds)
        model.calibration(remeasure=True)
        torch.manual_seed(0)
        samples.append(model.generate(**batch, do_sample=True, max_new_tokens=16, pad_token_id=0, fastmtp=True))
        assert len(plans) == (prefill_seconds is GROWING)
    assert torch.equal(samples[0], samples[1])
