"""Calibration (which kernel is faster here, what verifying n tokens costs) and the draft length chosen from it."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import ARCHITECTURES, COMMON, tiny_fastmtp, use_kernels
from test_core import chi_square_p_value, exact_joint_distribution, sample_first_tokens
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from hf_fastmtp import FastMTPForCausalLM, FastMTPStats
from hf_fastmtp.decoding import calibration, cpu_kernels, draft_length, modeling_fastmtp
from hf_fastmtp.decoding.calibration import (
    CALIBRATED_ROWS,
    MARGIN,
    Calibration,
    best_rounds,
    calibrate,
    calibration_key,
    calibration_path,
    fastest,
    fastest_per_row,
    format_calibration,
    load_or_calibrate,
    without_slower_rows,
)
from hf_fastmtp.decoding.cpu_kernels import KERNEL_ROWS, CalibratedLinear, KernelChoice
from hf_fastmtp.decoding.draft_length import DEFAULT_ACCEPTANCE, AutoDraftLength, FixedDraftLength
from hf_fastmtp.decoding.prefill import PREFILL_POSITIONS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A calibration cache of the test's own."""
    monkeypatch.setattr(calibration, "calibration_dir", lambda: tmp_path / "calibration")
    monkeypatch.delenv(calibration.CALIBRATION_VARIABLE, raising=False)
    return tmp_path / "calibration"


def greedy(model, input_ids, **kwargs) -> torch.LongTensor:
    return model.generate(input_ids, do_sample=False, max_new_tokens=20, **kwargs)


# ---------------------------------------------------------------------------------------------- choosing


def test_fastest_wants_a_clear_win_over_the_stock_kernel():
    assert fastest({"stock": 1.0, "weight_first": 1.0}) == "stock"  # a tie
    assert fastest({"stock": 1.0, "weight_first": 1.2}) == "stock"
    assert fastest({"stock": 1.0, "weight_first": 1 - MARGIN / 2}) == "stock"  # faster, but within the margin
    assert fastest({"stock": 1.0, "weight_first": 1 - MARGIN}) == "stock"
    assert fastest({"stock": 1.0, "weight_first": 1 - 2 * MARGIN}) == "weight_first"
    assert fastest({"stock": 1.0, "weight_first": 0.9, "prepacked": 0.5}) == "prepacked"  # the fastest of them
    assert fastest({"stock": 1.0, "weight_first": float("inf")}) == "stock"  # never measured
    assert fastest({"native": 2.0, "float16": 1.0, "int8": 1.5}) == "float16"  # the first entry is the reference
    timings = {"stock": [1.0, 1.0, 1.0], "weight_first": [0.5, 1.0, 2.0], "prepacked": [0.9, 0.99, 0.1]}
    assert fastest_per_row(timings) == ["weight_first", "stock", "prepacked"]


def scripted_clock(durations: list[float]):
    """A clock read at the start and the end of each timed round, whose rounds last `durations` in turn."""
    durations, now, started = iter(durations), [0.0], [False]

    def clock():
        if started[0]:
            now[0] += next(durations)
        started[0] = not started[0]
        return now[0]

    return clock


@pytest.mark.parametrize(("weight_first_seconds", "chosen"), [(0.85, "weight_first"), (0.98, "stock"), (1.0, "stock")])
def test_the_best_round_of_each_candidate_decides(weight_first_seconds, chosen):
    # Rounds alternate stock, weight-first; one stalled weight-first round (5 s) must not decide anything.
    clock = scripted_clock([1.2, 5.0, 1.0, weight_first_seconds, 1.1, weight_first_seconds])
    ran, prepared = [], []
    candidates = {"stock": lambda: ran.append("stock"), "weight_first": lambda: ran.append("weight_first")}
    seconds = best_rounds(candidates, rounds=3, clock=clock, before_each=lambda: prepared.append(len(ran)))
    assert seconds == pytest.approx({"stock": 1.0, "weight_first": weight_first_seconds})
    assert ran == ["stock", "weight_first"] * 3 and prepared == list(range(6))  # before each, untimed
    assert fastest(seconds) == chosen


def test_without_slower_rows_puts_stock_back_where_the_forward_was_not_faster():
    choice = KernelChoice(
        linear={"32x32": ("weight_first", "prepacked", "weight_first", "prepacked"), "64x32": ("prepacked",)},
        grouped_attention_queries=(1, 2, 3),
        draft_weights="int8",
    )
    # Faster at 1 and 3, a tie at 2, slower at 4.
    reverted = without_slower_rows(choice, [1.0, 2.0, 2.5, 5.0], [2.0, 2.0, 3.0, 4.0])
    assert reverted.linear == {"32x32": ("weight_first", "stock", "weight_first", "stock"), "64x32": ("prepacked",)}
    assert reverted.grouped_attention_queries == (1, 3) and reverted.draft_weights == "int8"
    assert without_slower_rows(choice, [1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]) is choice
    everything = without_slower_rows(choice, [2.0] * 4, [1.0] * 4)
    assert everything.linear == {} and not everything.grouped_attention_queries  # (all-stock shapes are not wrapped)


# ---------------------------------------------------------------------------------------------- measuring


class FakeClock:
    """A clock that only moves when a scripted kernel says how long it took."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# Seconds a product over each of `KERNEL_ROWS` rows (1..8, then a batch's) takes with each kernel, as the scripted
# clock reads them.
BATCH_COSTS = [1.0] * (len(KERNEL_ROWS) - 8)
LINEAR_COSTS = {
    "stock": [1.0] * len(KERNEL_ROWS),
    # faster over 1-4 rows; a tie at 5, faster within the margin at 6, slower at 7
    "weight_first": [0.5, 0.5, 0.5, 0.5, 1.0, 1 - MARGIN / 2, 1.2, 1.0, *BATCH_COSTS],
    "prepacked": [0.9, 1.0, 1.0, 0.4, 1.0, 1.0, 1.0, 0.2, 0.5, *BATCH_COSTS[1:]],  # (and faster at 9-12 rows)
}
# ... but in a whole verification forward over 3 tokens, the weight-first product turns out slower.
FORWARD_COSTS = {**LINEAR_COSTS, "weight_first": [0.5, 0.5, 5.0, 0.5, 1.0, 1 - MARGIN / 2, 1.2, 1.0, *BATCH_COSTS]}
GROUPED_ATTENTION_COSTS = [0.5, 0.5, 0.5, 0.5, 1.0, 1.5, 1.0, 1.0]  # against 1.0 for Transformers' SDPA
DRAFT_WEIGHT_COSTS = {torch.float32: 1.0, torch.float16: 0.8, torch.int8: 0.5}


def script_costs(
    monkeypatch,
    clock: FakeClock,
    linear: dict[str, list[float]] = LINEAR_COSTS,
    forward: dict[str, list[float]] = FORWARD_COSTS,
    attention: list[float] = GROUPED_ATTENTION_COSTS,
    draft_weights: dict[torch.dtype, float] = DRAFT_WEIGHT_COSTS,
) -> None:
    """Every product calibration times advances `clock` by its scripted cost (and is computed as well)."""

    def rows(input: torch.Tensor, weight: torch.Tensor) -> int:
        return input.numel() // weight.shape[1]

    def costed(costs, product):
        def linear_product(kernel, input, weight, *args):
            n = rows(input, weight)
            clock.advance(costs[kernel][KERNEL_ROWS.index(n)] if n in KERNEL_ROWS else 1.0)
            return product(kernel, input, weight, *args)

        return linear_product

    monkeypatch.setattr(calibration, "linear_product", costed(linear, calibration.linear_product))
    monkeypatch.setattr(cpu_kernels, "linear_product", costed(forward, cpu_kernels.linear_product))

    def stock_linear(self, input):  # Transformers' kernel, in a forward under `KernelChoice()`
        clock.advance(1.0)
        return nn.functional.linear(input, self.weight, self.bias)

    monkeypatch.setattr(nn.Linear, "forward", stock_linear)
    compute_attention = calibration.grouped_attention

    def grouped_attention(module, query, *args, queries=frozenset(), **kwargs):
        clock.advance(attention[query.shape[2] - 1] if query.shape[2] in queries else 1.0)
        return compute_attention(module, query, *args, queries=queries, **kwargs)

    monkeypatch.setattr(calibration, "grouped_attention", grouped_attention)
    product = calibration.draft_linear

    def draft_linear(input, draft):
        clock.advance(draft_weights[draft.weight.dtype])
        return product(input, draft)

    monkeypatch.setattr(calibration, "draft_linear", draft_linear)


def scripted_calibration(monkeypatch, **costs) -> tuple[Calibration, FakeClock, nn.Module]:
    """A calibration of a tiny model on a clock that reads the scripted costs (`script_costs`)."""
    model = tiny_fastmtp("llama")
    clock = FakeClock()
    script_costs(monkeypatch, clock, **costs)
    return calibrate(model, rounds=2, clock=clock), clock, model


def test_calibrate_chooses_only_what_its_timings_show_faster(monkeypatch):
    measured, clock, model = scripted_calibration(monkeypatch)
    base_linears = [module for module in model.model.modules() if type(module) is nn.Linear]
    shapes = {f"{m.out_features}x{m.in_features}" for m in base_linears}
    assert set(measured.linear_seconds) == set(measured.choice.linear) == shapes
    for shape, timings in measured.linear_seconds.items():
        layers = sum(f"{m.out_features}x{m.in_features}" == shape for m in base_linears)
        for kernel, seconds in timings.items():  # best rounds, each over every layer of the shape
            assert seconds == pytest.approx([layers * cost for cost in LINEAR_COSTS[kernel]])
        for row, kernel in enumerate(measured.choice.linear[shape]):  # never a kernel timed slower
            assert kernel == "stock" or timings[kernel][row] < (1 - MARGIN) * timings["stock"][row]
    pp = "prepacked" if calibration.prepacking_fits(model.model) else None
    # Row 3 goes back to stock: the whole forward over 3 tokens was slower with the weight-first product.
    wf = "weight_first"
    # Products of more rows than a verification's are chosen on their own timings: prepacked at 9-12 rows.
    expected = (wf, wf, "stock", pp or wf, "stock", "stock", "stock", pp or "stock", pp or "stock")
    assert all(kernels == expected + ("stock",) * 5 for kernels in measured.choice.linear.values())
    assert measured.choice.grouped_attention_queries == (1, 2, 4)  # (3 went back, with the linear kernels)
    layers = model.config.text_config.num_hidden_layers
    assert measured.attention_seconds["grouped"] == pytest.approx([layers * s for s in GROUPED_ATTENTION_COSTS])
    assert measured.attention_seconds["stock"] == pytest.approx([layers * 1.0] * CALIBRATED_ROWS)
    draft_format = "int8" if "int8" in measured.draft_weight_seconds else "float16"
    assert measured.choice.draft_weights == draft_format
    head_linears = sum(type(module) is nn.Linear for module in model.head.modules())
    assert measured.draft_weight_seconds["native"] == pytest.approx(head_linears + 1)  # (and the draft rows)
    assert measured.draft_weight_seconds["float16"] == pytest.approx(0.8 * (head_linears + 1))
    # Verification: Transformers' kernels cost 1 per product; the choice less, except where it went back to stock.
    stock = len(base_linears)
    assert measured.stock_forward_seconds == pytest.approx([stock] * CALIBRATED_ROWS)
    per_product = [0.5, 0.5, 1.0, 0.4 if pp else 0.5, 1.0, 1.0, 1.0, 0.2 if pp else 1.0]
    assert measured.forward_seconds == pytest.approx([stock * seconds for seconds in per_product])
    assert measured.draft_step_seconds > 0 and measured.seconds_taken == clock.now
    assert len(measured.prefill_seconds) == len(PREFILL_POSITIONS) and min(measured.prefill_seconds) > 0


def test_calibrate_keeps_stock_kernels_where_nothing_is_faster(monkeypatch):
    # Ties, wins under the margin, losses.
    linear = {
        "stock": [1.0] * len(KERNEL_ROWS),
        "weight_first": [1.0] * len(KERNEL_ROWS),
        "prepacked": [1.0 - MARGIN / 2] * len(KERNEL_ROWS),
    }
    draft_weights = {torch.float32: 1.0, torch.float16: 1.0, torch.int8: 2.0}
    measured, _, _ = scripted_calibration(
        monkeypatch, linear=linear, forward=linear, attention=[1.0] * 8, draft_weights=draft_weights
    )
    assert measured.choice.linear == {}  # every shape stays stock, so no layer is wrapped
    assert measured.choice.grouped_attention_queries == () and measured.choice.draft_weights == "native"
    assert measured.forward_seconds == measured.stock_forward_seconds


def test_calibration_survives_json():
    choice = KernelChoice(linear={"32x32": ("weight_first", "stock")}, grouped_attention_queries=(1, 2))
    forward = [1.0 + n for n in range(CALIBRATED_ROWS)]
    key = {"machine": "x", "shapes": ["32x32"]}
    measured = Calibration(key, choice, forward, forward, 0.1, {}, {}, {}, prefill_seconds=[0.1, 0.2, 0.5])
    assert Calibration.from_json(measured.to_json()) == measured
    assert json.loads(measured.to_json())["format"] == calibration.FORMAT_VERSION


@pytest.mark.parametrize(
    "spoil",
    [
        {"forward_seconds": [1.0]},  # not one per row count
        {"stock_forward_seconds": [float("nan")] * CALIBRATED_ROWS},
        {"draft_step_seconds": -1.0},
        {"prefill_seconds": [0.1, 0.2]},  # not one per prefill length
        {"prefill_seconds": [0.1, 0.2, 0.0]},
        {"choice": {"linear": {"32x32": ["fastest"]}, "grouped_attention_queries": [], "draft_weights": "native"}},
        {"choice": {"linear": {}, "grouped_attention_queries": [99], "draft_weights": "native"}},
        {"choice": {"linear": {}, "grouped_attention_queries": [], "draft_weights": "int4"}},
    ],
)
def test_implausible_values_are_not_trusted(spoil):
    forward = [1.0] * CALIBRATED_ROWS
    text = Calibration({"machine": "x"}, KernelChoice(), forward, forward, 0.1).to_json()
    with pytest.raises(ValueError, match="implausible"):
        Calibration.from_json(json.dumps({**json.loads(text), **spoil}))


def test_format_calibration_shows_every_shape_and_choice(monkeypatch):
    measured, _, _ = scripted_calibration(monkeypatch)
    table = format_calibration(measured)
    lines = table.splitlines()
    assert measured.key["machine"] in lines[0] and str(measured.key["threads"]) in lines[0]
    for shape, kernels in measured.choice.linear.items():
        for row, kernel in zip(KERNEL_ROWS, kernels, strict=True):
            rows = [line for line in lines if line.startswith(f"| {shape} | {row} |")]
            assert len(rows) == 1 and rows[0].endswith(f"| {kernel} |")
    for n in range(1, CALIBRATED_ROWS + 1):
        chosen = "grouped" if n in measured.choice.grouped_attention_queries else "stock"
        assert any(line.startswith(f"| {n} |") and line.endswith(f"| {chosen} |") for line in lines)
    assert f"chosen: {measured.choice.draft_weights}." in table
    verification = lines[lines.index("| new tokens verified | stock forward | chosen kernels | x one stock token |") :]
    one = measured.stock_forward_seconds[0]
    for n, ours in enumerate(measured.forward_seconds, start=1):
        assert verification[n + 1].startswith(f"| {n} | ") and verification[n + 1].endswith(f"| {ours / one:.2f} |")
    assert "A draft step:" in lines[-2]
    assert lines[-1].startswith("A prefill from an empty cache: 16 tokens ")


# ---------------------------------------------------------------------------------------------- the cache


def test_the_cache_folder_follows_hf_fastmtp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_FASTMTP_CACHE", str(tmp_path))
    assert calibration.cache_dir() == tmp_path
    monkeypatch.delenv("HF_FASTMTP_CACHE")
    assert calibration.cache_dir() == Path.home() / ".cache" / "hf_fastmtp"


def test_the_key_changes_with_machine_threads_torch_and_dtype(monkeypatch):
    model = tiny_fastmtp("llama")
    key = calibration_key(model)
    assert key == calibration_key(model) and calibration_path(key) == calibration_path(calibration_key(model))
    keys = []
    with monkeypatch.context() as patch:
        patch.setattr(calibration, "machine_name", lambda device: "Another CPU")
        keys.append(calibration_key(model))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        keys.append(calibration_key(model))
    finally:
        torch.set_num_threads(threads)
    with monkeypatch.context() as patch:
        patch.setattr(calibration.torch, "__version__", "1.0.0")
        keys.append(calibration_key(model))
    keys.append(calibration_key(tiny_fastmtp("llama").to(torch.bfloat16)))
    keys.append(calibration_key(tiny_fastmtp("qwen2")))
    changed = ["machine", "threads", "torch", "dtype", "model_type"]
    for name, other in zip(changed, keys):
        assert other[name] != key[name] and calibration_path(other) != calibration_path(key), name
    assert calibration_key(model) == key


def counting_calibrate(monkeypatch) -> list[dict]:
    """`calibrate` replaced by a quick fake that records the keys it measures for."""
    calls = []

    def fake(model, key=None, rounds=calibration.ROUNDS, clock=None):
        calls.append(key)
        choice = KernelChoice(linear={"32x32": ("weight_first",) * 2}, draft_weights="float16")
        forward = [1.0 + n / 10 for n in range(CALIBRATED_ROWS)]
        return Calibration(key, choice, forward, forward, 0.01, seconds_taken=len(calls))

    monkeypatch.setattr(calibration, "calibrate", fake)
    return calls


def test_a_calibration_is_measured_once_and_then_read(cache, monkeypatch):
    calls = counting_calibrate(monkeypatch)
    model = tiny_fastmtp("llama")
    key = calibration_key(model)
    measured = load_or_calibrate(model)
    assert calls == [key] and calibration_path(key).parent == cache and calibration_path(key).exists()
    assert load_or_calibrate(model) == measured and len(calls) == 1  # read, not measured
    remeasured = load_or_calibrate(model, remeasure=True)
    assert len(calls) == 2 and remeasured.seconds_taken == 2
    assert Calibration.from_json(calibration_path(key).read_text()) == remeasured
    assert [path.name for path in cache.iterdir()] == [calibration_path(key).name]  # no staging file left


def stale(text: str) -> str:
    data = json.loads(text)
    data["key"]["machine"] = "Another CPU"
    return json.dumps(data)


def wrong_format(text: str) -> str:
    return json.dumps({**json.loads(text), "format": calibration.FORMAT_VERSION + 1})


def missing_fields(text: str) -> str:
    data = json.loads(text)
    del data["choice"]["linear"], data["forward_seconds"]
    return json.dumps(data)


@pytest.mark.parametrize(
    "spoil",
    [
        lambda text: text[: len(text) // 2],  # cut short
        lambda text: b"\xff\xfe\x00garbage",  # not text
        wrong_format,
        missing_fields,
        stale,
    ],
    ids=["corrupt", "binary", "wrong-format", "missing-fields", "stale"],
)
def test_a_spoiled_calibration_file_is_measured_again(spoil, cache, monkeypatch):
    calls = counting_calibrate(monkeypatch)
    model = tiny_fastmtp("llama")
    key = calibration_key(model)
    path = calibration_path(key)
    load_or_calibrate(model)
    spoiled = spoil(path.read_text())
    path.write_bytes(spoiled if isinstance(spoiled, bytes) else spoiled.encode())
    remeasured = load_or_calibrate(model)
    assert len(calls) == 2 and remeasured.seconds_taken == 2 and remeasured.key == key
    assert Calibration.from_json(path.read_text()) == remeasured  # rewritten
    assert load_or_calibrate(model) == remeasured and len(calls) == 2


def test_the_model_keeps_its_calibration_per_key(cache, monkeypatch):
    loads = []
    monkeypatch.setattr(modeling_fastmtp, "load_or_calibrate", lambda model, remeasure=False: loads.append(remeasure))
    model = tiny_fastmtp("llama")
    model.calibration()
    model.calibration()
    assert loads == [False]
    model.calibration(remeasure=True)
    assert loads == [False, True]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)  # another key: another calibration
        model.calibration()
    finally:
        torch.set_num_threads(threads)
    assert loads == [False, True, False]


def test_calibration_off_generates_with_transformers_kernels_and_a_fixed_k(cache, monkeypatch):
    monkeypatch.setenv(calibration.CALIBRATION_VARIABLE, "off")
    monkeypatch.setattr(calibration, "calibrate", lambda *args, **kwargs: pytest.fail("measured while off"))
    model = tiny_fastmtp("llama")
    assert load_or_calibrate(model) is None and model.calibration() is None
    wrapped = []
    original = modeling_fastmtp.CPUKernels.__enter__

    def enter(self):
        kernels = original(self)
        wrapped.append(bool(kernels._wrapped or kernels._switched))
        return kernels

    monkeypatch.setattr(modeling_fastmtp.CPUKernels, "__enter__", enter)
    input_ids = torch.tensor([[5, 9, 2, 7, 5]])
    plain = greedy(model, input_ids)
    assert torch.equal(greedy(model, input_ids, fastmtp=True, num_draft_tokens="auto"), plain)
    assert model.last_fastmtp_stats.max_draft_tokens == model.config.num_draft_tokens  # "auto" without costs
    assert wrapped == [False]
    assert not cache.exists()


def test_a_bad_calibration_setting_is_refused(cache, monkeypatch):
    monkeypatch.setenv(calibration.CALIBRATION_VARIABLE, "maybe")
    model = tiny_fastmtp("llama")
    with pytest.raises(ValueError, match="HF_FASTMTP_CALIBRATION must be 'on' or 'off', got 'maybe'"):
        load_or_calibrate(model)
    with pytest.raises(ValueError, match="HF_FASTMTP_CALIBRATION"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, fastmtp=True)


# ---------------------------------------------------------------------------------------------- draft length


def stats_with(cycles: int, drafted: int, accepted: int, max_draft_tokens: int = CALIBRATED_ROWS - 1):
    stats = FastMTPStats(max_draft_tokens=max_draft_tokens)
    for _ in range(cycles):
        stats.record_cycle(drafted, accepted)
    return stats


def test_auto_drafts_nothing_where_verification_is_expensive_and_acceptance_low():
    policy = AutoDraftLength([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], 0.05, [0.3])  # V(n) = n
    assert policy.max_draft_tokens == CALIBRATED_ROWS - 1
    assert policy(stats_with(0, 0, 0)) == 0
    rates = policy.expected_rates([0.3] * 7, policy.draft_step_seconds)
    assert rates[0] == pytest.approx(1.0) and rates[1] == pytest.approx(1.3 / 2.05)


def test_auto_drafts_three_where_verifying_four_tokens_costs_about_one():
    flat_then_steep = [1.0, 1.0, 1.0, 1.0, 3.0, 4.0, 5.0, 6.0]
    policy = AutoDraftLength(flat_then_steep, 0.01, [0.6])
    assert policy.prior_acceptance == [0.6] * 7  # later positions as likely as the last recorded one
    assert policy(stats_with(0, 0, 0)) == 3
    expected = [1.0, 1.6 / 1.01, (1.6 + 0.36) / 1.02, (1.96 + 0.216) / 1.03]
    assert policy.expected_rates(policy.prior_acceptance, policy.draft_step_seconds)[:4] == pytest.approx(expected)


def test_auto_follows_the_acceptance_of_the_call():
    policy = AutoDraftLength([1.0, 1.5, 1.6, 1.7, 3.0, 4.0, 5.0, 6.0], 0.01, [0.9])
    assert policy(stats_with(0, 0, 0)) == 3
    rejected = stats_with(50, 3, 0)  # the head's first draft was rejected in 50 cycles
    assert policy.acceptance(rejected)[0] == pytest.approx(8 * 0.9 / 58) and policy.acceptance(rejected)[1] == 0.9
    assert policy(rejected) == 0
    doubtful = AutoDraftLength([1.0, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9], 0.01, [0.2])
    assert doubtful(stats_with(0, 0, 0)) == 0
    assert doubtful(stats_with(40, 7, 7)) == 7  # every draft accepted: the most drafts
    assert AutoDraftLength([1.0] * 4, 0.01, None).prior_acceptance == [DEFAULT_ACCEPTANCE] * 3
    assert AutoDraftLength([1.0] * 4, 0.01, [0.8, 0.5]).prior_acceptance == [0.8, 0.5, 0.5]
    assert FixedDraftLength(4)(rejected) == 4 and FixedDraftLength(4).max_draft_tokens == 4


def test_auto_costs_verification_as_this_call_measures_it():
    policy = AutoDraftLength([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], 0.01, [0.5])
    assert policy.verification_cost(2) == 2.0  # the calibration's, before the call has measured anything
    policy.observe(4, 8.0)
    assert policy.verification_cost(4) == 8.0  # this call's own
    assert policy.verification_cost(2) == pytest.approx(4.0)  # the calibration's, scaled as measured nearest (x2)
    policy.observe(2, 3.0)
    policy.observe(2, 5.0)
    assert policy.verification_cost(2) == pytest.approx(4.0)  # the mean of the cycles measured
    assert policy.verification_cost(1) == pytest.approx(2.0)  # nearest measured: 2 positions


def test_auto_drafts_again_after_a_run_of_plain_steps():
    # A head this poor never pays here, but one that drafted right would (each extra token costs a tenth of a forward).
    policy = AutoDraftLength([1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7], 0.01, [0.1])
    chosen = [policy(stats_with(0, 0, 0)) for _ in range(2 * (draft_length.PROBE_AFTER + 1))]
    probe = [0] * draft_length.PROBE_AFTER + [1]
    assert chosen == probe + probe  # plain steps teach it nothing: every so often one draft finds out
    # Where a probe costs more (half a forward more, plus its draft step), it comes within the probe budget.
    costly = AutoDraftLength([1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5], 0.05, [0.1])
    chosen = [costly(stats_with(0, 0, 0)) for _ in range(40)]
    assert chosen.index(1) == math.ceil((1.5 + 0.05 - 1.0) / draft_length.PROBE_BUDGET) == 28


def test_auto_costs_draft_steps_as_this_call_measures_them():
    policy = AutoDraftLength([1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7], 0.01, [0.6])
    assert policy.draft_step_cost() == 0.01  # the calibration's, until the call has drafted enough
    policy.observe_draft_steps(draft_length.OBSERVED_STEPS, draft_length.OBSERVED_STEPS * 2.0)
    assert policy.draft_step_cost() == 2.0
    assert policy(stats_with(0, 0, 0)) == 0  # (a draft step that costs two forwards is never worth it)


def test_auto_drafts_after_plain_steps_only_where_the_catch_up_is_earned_back():
    # The best K, 3, yields 2.18 tokens per 1.23 s (rate 1.77) against 1 token per second for plain steps.
    policy = AutoDraftLength([1.0, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6], 0.01, [0.6], head_share=0.5)
    stats = stats_with(0, 0, 0)
    policy.observe_prefill(100, 10.0)  # 0.1 s per position: the head's estimated 0.05 s per caught-up position
    assert policy.catch_up_cost(100) == pytest.approx(5.0)
    assert policy(stats) > 0  # (no catch-up to pay, or no known end: the rates alone)
    # 100 positions to catch up cost 5 s; 10 tokens left save 10 - 10 / 1.77 ~ 4.3 s, 20 tokens ~ 8.7 s.
    assert policy(stats, catch_up_positions=100, tokens_left=10) == 0
    assert policy(stats, catch_up_positions=100, tokens_left=20) > 0
    # A measured catch-up replaces the estimate: at 0.01 s per position, 10 tokens are enough.
    policy.observe_catch_up(200, 2.0)
    assert policy.catch_up_cost(100) == pytest.approx(1.0)
    assert policy(stats, catch_up_positions=100, tokens_left=10) > 0
    # A probe after plain steps is due as often as without a catch-up (waiting only makes the catch-up grow) ...
    probing = AutoDraftLength([1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7], 0.01, [0.1], head_share=0.5)
    probing.observe_prefill(100, 10.0)
    chosen = [probing(stats, catch_up_positions=call, tokens_left=1000) for call in range(1, 40)]
    assert chosen.index(1) == draft_length.PROBE_AFTER
    # ... unless no draft could earn the catch-up back.
    assert not policy.drafting_can_pay(0.01, 1, catch_up_positions=10_000, tokens_left=10)
    assert all(policy(stats, catch_up_positions=10_000, tokens_left=10) == 0 for _ in range(100))


def test_calibrating_leaves_the_random_state_alone(cache):
    model = tiny_fastmtp("llama")
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    model.calibration()
    assert torch.equal(torch.rand(3), expected)


def test_a_calibration_that_fails_falls_back_to_transformers_kernels(cache, monkeypatch, caplog):
    def failing(*args, **kwargs):
        raise RuntimeError("no kernel for this build")

    monkeypatch.setattr(calibration, "calibrate", failing)
    model = tiny_fastmtp("llama")
    assert model.calibration() is None and "Calibration failed" in caplog.text
    input_ids = torch.tensor([[5, 9, 2, 7, 5]])
    assert torch.equal(greedy(model, input_ids, fastmtp=True, num_draft_tokens="auto"), greedy(model, input_ids))


def test_the_setting_is_read_on_every_call(cache, monkeypatch):
    model = tiny_fastmtp("llama")
    assert model.calibration() is not None
    monkeypatch.setenv(calibration.CALIBRATION_VARIABLE, "off")
    assert model.calibration() is None
    monkeypatch.setenv(calibration.CALIBRATION_VARIABLE, "on")
    assert model.calibration() is not None


def test_plain_steps_refuse_prompt_lookup():
    model = tiny_fastmtp("llama")
    with pytest.raises(ValueError, match="num_draft_tokens=0 never drafts"):
        greedy(model, torch.tensor([[5, 9, 2]]), fastmtp=True, num_draft_tokens=0, prompt_lookup_num_tokens=3)


def test_auto_reads_the_calibration_and_the_heads_acceptance(monkeypatch):
    model = tiny_fastmtp("llama")
    model.config.draft_acceptance = [0.7, 0.6]
    measured = Calibration({}, KernelChoice(), [1.0, 1.1, 1.2], [1.0, 1.2, 1.3], 0.02)
    policy = model.draft_length("auto", measured)
    assert isinstance(policy, AutoDraftLength) and policy.forward_seconds == [1.0, 1.1, 1.2]
    assert policy.draft_step_seconds == 0.02 and policy.prior_acceptance == [0.7, 0.6]
    assert model.draft_length("auto", None).max_draft_tokens == model.config.num_draft_tokens
    assert model.draft_length(5, measured).max_draft_tokens == 5


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_greedy_output_is_unchanged_with_a_measured_calibration(architecture, cache):
    model = tiny_fastmtp(architecture)
    measured = model.calibration()
    assert calibration_path(calibration_key(model)).exists()
    assert len(measured.forward_seconds) == len(measured.stock_forward_seconds) == CALIBRATED_ROWS
    assert all(0 < ours <= theirs for ours, theirs in zip(measured.forward_seconds, measured.stock_forward_seconds))
    for kernels in measured.choice.linear.values():
        assert len(kernels) == len(KERNEL_ROWS)
    input_ids = torch.tensor([[5, 9, 2, 7, 5, 9, 3]])
    plain = greedy(model, input_ids)
    for num_draft_tokens in ("auto", 0, 2):
        assert torch.equal(greedy(model, input_ids, fastmtp=True, num_draft_tokens=num_draft_tokens), plain)
    assert not any(isinstance(module, CalibratedLinear) for module in model.modules())


def test_a_model_without_grouped_query_attention_calibrates_and_generates(cache):
    base = LlamaForCausalLM(LlamaConfig(vocab_size=97, **{**COMMON, "num_key_value_heads": 4})).eval()
    model = FastMTPForCausalLM.from_base(base)
    measured = model.calibration()
    assert measured.attention_seconds == {} and measured.choice.grouped_attention_queries == ()
    input_ids = torch.tensor([[5, 9, 2, 7, 5, 9, 3]])
    assert torch.equal(greedy(model, input_ids, fastmtp=True, num_draft_tokens=2), greedy(model, input_ids))


def test_auto_draft_length_falls_back_to_plain_steps_where_a_batch_is_compute_bound():
    # Memory-bound up to 4 positions (nearly flat), then each position costs as much as a whole one-token forward.
    policy = AutoDraftLength([1.0, 1.05, 1.1, 1.15, 2.15, 3.15, 4.15, 5.15], 0.01, [0.7])
    stats = FastMTPStats(max_draft_tokens=7)
    assert policy(stats, batch_size=1) >= 2  # drafts are nearly free
    assert policy.verification_cost(16) == pytest.approx(5.15 + 8 * (5.15 - 1.15) / 4)  # extended linearly
    assert policy(stats, batch_size=8) == 0  # 8 rows x (K + 1) positions: every draft is paid for in full
    # A batch size's first cycle is a plain step, which times it; then drafts are weighed against that time.
    assert policy(stats, batch_size=2) == 0
    policy.observe(2, 1.05)
    assert 0 < policy(stats, batch_size=2) < policy(stats, batch_size=1)
    # Where even perfect acceptance could not pay, plain steps never probe.
    assert not policy.drafting_can_pay(0.01, batch_size=8) and policy.drafting_can_pay(0.01, batch_size=2)
    assert all(policy(stats, batch_size=8) == 0 for _ in range(100))


def test_sampling_distribution_is_preserved_with_auto_draft_length(monkeypatch):
    # Verification costs that make K follow the acceptance: 2 at the prior 0.5, fewer or more as cycles go.
    use_kernels(monkeypatch, "weight_first", "float16", forward_seconds=[1.0, 1.3, 1.5, 1.8, 2.2, 2.6, 3.0, 3.4])
    chosen = Counter()
    choose = draft_length.AutoDraftLength.__call__

    def recording(self, *args) -> int:
        k = choose(self, *args)
        chosen[k] += 1
        return k

    monkeypatch.setattr(draft_length.AutoDraftLength, "__call__", recording)
    model = tiny_fastmtp("llama", vocab_size=6, sharpness=4.0)
    input_ids = torch.tensor([[1, 4, 2]])
    expected = exact_joint_distribution(model, input_ids, 3, lambda logits: logits)
    samples, totals = sample_first_tokens(model, input_ids, 1500, 3, fastmtp=True, num_draft_tokens="auto")
    assert len(chosen) > 1  # K changed between cycles
    assert totals["accepted_tokens"] > 1500 // 4  # drafts are accepted often: the speculative path is what is tested
    assert chi_square_p_value(samples, expected) > 1e-3
