"""The CPU kernels FastMTP verifies with: weight-first few-row products and grouped-query attention without copies."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, tiny_base, tiny_fastmtp
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache

from hf_fastmtp import FastMTPCandidateGenerator
from hf_fastmtp.decoding import cpu_kernels
from hf_fastmtp.decoding.cpu_kernels import (
    DRAFT_WEIGHT,
    DRAFT_WEIGHTS_VARIABLE,
    FOLDED_MAX_QUERIES,
    GROUPED_QUERY_SDPA,
    ONE_ROW_WEIGHT_FIRST_VARIABLE,
    DraftWeight,
    compact_draft_weights,
    draft_linear,
    draft_weights_int8,
    few_row_linears,
    grouped_query_sdpa,
    native_gqa_attention,
)
from hf_fastmtp.decoding.mtp_head import cache_keyword


def _patched(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if "forward" in vars(module)]


def _draft_copies(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if DRAFT_WEIGHT in vars(module)]


@pytest.mark.parametrize("one_row_weight_first", ["0", "1"])
@pytest.mark.parametrize("bias", [False, True])
def test_same_output_as_the_standard_kernel_for_every_row_count(bias, one_row_weight_first, monkeypatch):
    monkeypatch.setenv(ONE_ROW_WEIGHT_FIRST_VARIABLE, one_row_weight_first)
    torch.manual_seed(0)
    linear = nn.Linear(64, 300, bias=bias)
    for shape in [(1, 1), (1, 2), (1, 3), (2, 2), (1, 4), (4, 1), (1, 5), (1, 40), (3,)]:
        hidden = torch.randn(*shape, 64)
        with few_row_linears(linear) as applied:
            assert applied == 1
            output = linear(hidden)
        assert output.shape == (*shape, 300) and output.is_contiguous()
        torch.testing.assert_close(output, nn.functional.linear(hidden, linear.weight, linear.bias))


def test_two_to_four_rows_take_the_padded_weight_first_product(monkeypatch):
    linear = nn.Linear(16, 8, bias=False)
    products = []
    monkeypatch.setattr(cpu_kernels.torch, "mm", lambda a, b: products.append((a.shape, b.shape)) or a @ b)
    with few_row_linears(linear):
        for rows in (1, 2, 3, 4, 5):
            linear(torch.randn(1, rows, 16))
    assert products == [((8, 16), (16, cpu_kernels.PADDED_ROWS))] * 3


@pytest.mark.parametrize("faster", [False, True])
def test_one_row_products_go_weight_first_where_the_probe_times_it_faster(faster, monkeypatch):
    monkeypatch.delenv(ONE_ROW_WEIGHT_FIRST_VARIABLE, raising=False)
    monkeypatch.setattr(cpu_kernels, "MEMORY_BOUND_BYTES", 1)  # these small layers stand in for a large model's
    monkeypatch.setattr(cpu_kernels, "_one_row_weight_first", {})
    probes = []
    monkeypatch.setattr(cpu_kernels, "_weight_first_is_faster", lambda linears: probes.append(linears) or faster)
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 16))
    products = []
    mm = torch.mm
    monkeypatch.setattr(cpu_kernels.torch, "mm", lambda a, b: products.append(a.shape) or mm(a, b))
    for _ in range(2):
        with few_row_linears(model):
            output = model(torch.ones(1, 16))
    assert probes == [[model[0]]]  # timed once, on the first layers up to MEMORY_BOUND_BYTES
    assert products == ([(8, 16), (16, 8)] * 2 if faster else [])
    torch.testing.assert_close(output, model[1](model[0](torch.ones(1, 16))))


def test_models_that_fit_in_a_cache_keep_the_standard_one_row_kernel(monkeypatch):
    monkeypatch.delenv(ONE_ROW_WEIGHT_FIRST_VARIABLE, raising=False)
    monkeypatch.setattr(cpu_kernels, "_weight_first_is_faster", lambda linears: pytest.fail("timed a small model"))
    assert not cpu_kernels.one_row_products_weight_first(tiny_fastmtp("llama"))


def scripted_clock(durations: list[float]):
    """A clock read at the start and the end of each timed round, whose rounds last `durations` in turn."""
    durations, now, started = iter(durations), [0.0], [False]

    def clock():
        if started[0]:
            now[0] += next(durations)
        started[0] = not started[0]
        return now[0]

    return clock


@pytest.mark.parametrize(("weight_first_seconds", "faster"), [(0.85, True), (0.95, False)])
def test_the_probe_wants_a_clear_win_of_the_best_rounds(weight_first_seconds, faster):
    # Rounds alternate standard, weight-first; one stalled weight-first round (5 s) must not decide anything.
    clock = scripted_clock([1.0, weight_first_seconds, 1.0, 5.0, 1.0, weight_first_seconds])
    linears = [nn.Linear(8, 8), nn.Linear(8, 4, bias=False)]
    assert cpu_kernels._weight_first_is_faster(linears, rounds=3, clock=clock) is faster
    assert cpu_kernels._weight_first_is_faster(linears, rounds=1) in (False, True)  # and on a real clock


def test_the_one_row_setting_decides_without_timing(monkeypatch):
    monkeypatch.setattr(
        cpu_kernels, "_weight_first_is_faster", lambda linears: pytest.fail("timed despite the setting")
    )
    model = tiny_fastmtp("llama")
    for setting, expected in (("1", True), ("0", False)):
        monkeypatch.setenv(ONE_ROW_WEIGHT_FIRST_VARIABLE, setting)
        assert cpu_kernels.one_row_products_weight_first(model) is expected
    monkeypatch.setenv(ONE_ROW_WEIGHT_FIRST_VARIABLE, "yes")
    with pytest.raises(ValueError, match=f"{ONE_ROW_WEIGHT_FIRST_VARIABLE} must be 1 or 0"):
        cpu_kernels.one_row_products_weight_first(model)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_greedy_output_is_unchanged_with_one_row_products_weight_first(architecture, draft_weights, monkeypatch):
    from hf_fastmtp.bench.run import timed_generate

    monkeypatch.setenv(ONE_ROW_WEIGHT_FIRST_VARIABLE, "1")
    model = tiny_fastmtp(architecture)
    inputs = {"input_ids": torch.tensor([[5, 9, 2, 7, 5, 9, 3]])}
    settings = {"max_new_tokens": 24, "do_sample": False}
    stock = model.generate(**inputs, **settings)[0, 7:].tolist()
    assert timed_generate(model, inputs, fastmtp=False, **settings).new_token_ids == stock
    assert timed_generate(model, inputs, fastmtp=True, **settings).new_token_ids == stock


def test_every_linear_layer_is_patched_and_restored():
    model = tiny_fastmtp("llama")
    linears = {name for name, module in model.named_modules() if type(module) is nn.Linear}
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with few_row_linears(model) as applied:
        assert applied == len(linears) and set(_patched(model)) == linears
        assert any(name.startswith("mtp_layers") for name in linears)  # the head's too
        with few_row_linears(model) as nested:
            assert not nested  # an enclosing call keeps the modules, and restores them
        assert set(_patched(model)) == linears
    assert not _patched(model)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in state.items())


@pytest.mark.parametrize("bias", [False, True])
def test_one_row_products_use_float16_copies_only_while_active(bias):
    torch.manual_seed(0)
    linear = nn.Linear(64, 300, bias=bias)
    one_row, four_rows = torch.randn(1, 1, 64), torch.randn(1, 4, 64)
    float32 = {
        rows: nn.functional.linear(hidden, linear.weight, linear.bias)
        for rows, hidden in ((1, one_row), (4, four_rows))
    }
    float16_bias = None if linear.bias is None else linear.bias.half()
    float16 = nn.functional.linear(one_row.half(), linear.weight.half(), float16_bias).float()
    assert not torch.equal(float16, float32[1])  # the two are told apart below
    with few_row_linears(linear), compact_draft_weights(linear, int8=False) as applied:
        assert applied == 1
        with compact_draft_weights(linear, int8=False) as nested:
            assert not nested  # an enclosing call keeps the copies, and drops them
        output = linear(one_row)
        assert output.dtype == torch.float32 and torch.equal(output, float16)
        torch.testing.assert_close(linear(four_rows), float32[4])  # several rows: float32, weight-first
    assert not _draft_copies(linear) and not _patched(linear)
    with few_row_linears(linear):
        assert torch.equal(linear(one_row), float32[1])


def test_draft_weights_are_kept_between_calls_while_the_weights_are_unchanged():
    linear = nn.Linear(64, 32)

    def copy(int8: bool) -> DraftWeight:
        with compact_draft_weights(linear, int8=int8):
            return vars(linear)[DRAFT_WEIGHT]

    first = copy(int8=True)
    assert copy(int8=True) is first
    assert copy(int8=False).scales is None and copy(int8=True) is not first  # another format
    current = copy(int8=True)
    with torch.no_grad():
        linear.bias.add_(1.0)  # an in-place update
    updated = copy(int8=True)
    assert updated is not current and torch.equal(updated.bias, (linear.bias.detach() + 0).to(torch.bfloat16))
    linear.load_state_dict({"weight": 2 * linear.weight.detach(), "bias": linear.bias.detach()})
    reloaded = copy(int8=True)
    assert reloaded is not updated and torch.equal(reloaded.scales, (2 * updated.scales.float()).to(torch.bfloat16))
    linear.weight = nn.Parameter(torch.randn(32, 64))  # another tensor
    assert copy(int8=True) is not reloaded


def test_weight_source_tells_changed_weights_apart():
    weight = nn.Parameter(torch.randn(4, 8))
    source = cpu_kernels.WeightSource(weight, None)
    assert source.matches(weight, None)
    assert not source.matches(weight.detach().clone(), None) and not source.matches(weight, weight)
    weight.data = weight.data.double()  # what `module.to(torch.float64)` does: the same parameter, new storage
    assert not source.matches(weight, None)
    with torch.inference_mode():
        inference_weight = torch.randn(4, 8)
    assert not cpu_kernels.WeightSource(inference_weight).matches(inference_weight)  # no version: never reused


@pytest.mark.parametrize("bias", [False, True])
def test_int8_draft_weights_serve_draft_steps_while_active(bias):
    torch.manual_seed(0)
    linear = nn.Linear(64, 301, bias=bias)  # 301 outputs: a last partial block of the kernel's
    int8 = DraftWeight.compact(linear.weight, linear.bias, int8=True)
    with few_row_linears(linear), compact_draft_weights(linear, int8=True) as applied:
        assert applied == 1
        for shape in [(1, 1), (1, 3), (2, 2), (1, 4), (1, cpu_kernels.INT8_MAX_ROWS), (1, 40)]:
            hidden = torch.randn(*shape, 64)
            output = linear(hidden)
            float32 = nn.functional.linear(hidden, linear.weight, linear.bias)
            assert output.dtype == torch.float32 and output.shape == float32.shape
            if hidden.shape[:-1].numel() > cpu_kernels.INT8_MAX_ROWS:  # a pass over a prompt: the standard kernel
                assert torch.equal(output, float32)
                continue
            assert torch.equal(output, draft_linear(hidden, int8))
            assert (output - float32).norm() < 0.02 * float32.norm()  # int8 rows, bfloat16 activations: ~1%
    assert not _draft_copies(linear) and not _patched(linear)


def test_int8_products_take_a_bfloat16_view_as_input():
    weight, hidden = torch.randn(32, 64), torch.randn(1, 72).to(torch.bfloat16)
    int8 = DraftWeight.compact(weight, None, int8=True)
    output = draft_linear(hidden[:, 8:], int8)  # a view 16 bytes into its storage: the kernel needs aligned rows
    torch.testing.assert_close(output.float(), hidden[:, 8:].float() @ weight.T, rtol=0.05, atol=0.05)


def test_int8_draft_weights_quantize_each_row_with_its_own_scale():
    weight = torch.tensor([[0.5, -1.0, 0.25, 0.0], [100.0, 50.0, -25.0, 1.0]]).repeat(1, 4)
    int8 = DraftWeight.compact(weight, torch.tensor([1.0, 2.0]), int8=True)
    assert int8.weight.dtype == torch.int8 and int8.scales.dtype == int8.bias.dtype == torch.bfloat16
    assert int8.weight.abs().amax(dim=1).tolist() == [127, 127]  # each row uses the whole int8 range
    # Each weight within half a step of its row's scale (and bfloat16's rounding of that scale at the row's maximum).
    error = (int8.weight.float() * int8.scales.float()[:, None] - weight).abs()
    assert (error <= 0.5 * int8.scales.float()[:, None] + 0.005 * weight.abs().amax(dim=1, keepdim=True)).all()
    zero = DraftWeight.compact(torch.zeros(3, 16), None, int8=True)  # an all-zero row gets no zero scale
    assert torch.equal(draft_linear(torch.ones(1, 16), zero), torch.zeros(1, 3))


def test_draft_weights_setting_and_probe(monkeypatch):
    head, int8_is_faster = tiny_fastmtp("llama").head, cpu_kernels._int8_is_faster
    monkeypatch.setattr(cpu_kernels, "_int8_is_faster", lambda linears: pytest.fail("timed despite the setting"))
    for setting, expected in (("int8", True), ("float16", False)):
        monkeypatch.setenv(DRAFT_WEIGHTS_VARIABLE, setting)
        assert draft_weights_int8(head) is expected
    monkeypatch.setenv(DRAFT_WEIGHTS_VARIABLE, "bfloat16")
    with pytest.raises(ValueError, match=f"{DRAFT_WEIGHTS_VARIABLE} must be int8 or float16"):
        draft_weights_int8(head)
    monkeypatch.delenv(DRAFT_WEIGHTS_VARIABLE)
    for faster in (True, False):
        probes = []
        monkeypatch.setattr(cpu_kernels, "_int8_draft_weights", {})
        monkeypatch.setattr(
            cpu_kernels,
            "_int8_is_faster",
            lambda linears, probes=probes, faster=faster: probes.append(linears) or faster,
        )
        assert draft_weights_int8(head) is faster and draft_weights_int8(head) is faster
        assert len(probes) == 1  # timed once per process
    assert int8_is_faster(probes[0], rounds=1) in (False, True)  # and on a real clock


def test_int8_draft_weights_only_where_the_kernel_suits_every_row(monkeypatch):
    monkeypatch.setenv(DRAFT_WEIGHTS_VARIABLE, "int8")
    head = nn.Sequential(nn.Linear(32, 8), nn.Linear(48, 5))  # rows of 32 and 48 weights
    assert draft_weights_int8(head) and draft_weights_int8(head, lm_head=nn.Linear(64, 100))
    assert not draft_weights_int8(head, lm_head=nn.Linear(24, 100))  # 24: not a multiple of 16
    assert not draft_weights_int8(nn.Sequential(nn.Linear(32, 8), nn.Linear(8, 48)))
    assert not draft_weights_int8(nn.Sequential(nn.Linear(32, 16)).to(torch.bfloat16))
    with compact_draft_weights(layer := nn.Linear(24, 16), int8=True):  # asked for int8 all the same
        assert vars(layer)[DRAFT_WEIGHT].weight.dtype == torch.float16


@pytest.mark.parametrize(("int8_seconds", "faster"), [(0.99, True), (1.05, False)])
def test_the_draft_weights_probe_wants_int8_at_least_as_fast_in_its_best_round(int8_seconds, faster):
    # Rounds alternate float16, int8; one stalled int8 round (5 s) must not decide anything.
    clock = scripted_clock([1.0, int8_seconds, 1.0, 5.0])
    weights = [(torch.randn(8, 16), None), (torch.randn(4, 16), torch.randn(4))]
    assert cpu_kernels._int8_is_faster(weights, rounds=2, clock=clock) is faster


def test_draft_copies_only_for_float32_linear_layers_on_a_cpu():
    model = tiny_fastmtp("llama")
    with compact_draft_weights(model.to(torch.bfloat16).head, int8=True) as applied:
        assert not applied and not _draft_copies(model)


def _attention_implementations(model: nn.Module) -> set[str]:
    return {
        module.config._attn_implementation for module in model.modules() if hasattr(module, "num_key_value_groups")
    }


def test_generate_restores_the_kernels_even_on_error(monkeypatch):
    model = tiny_fastmtp("llama")
    head_linears = {name for name, module in model.named_modules() if type(module) is nn.Linear and "mtp" in name}
    model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, fastmtp=True)
    assert not _patched(model) and not _draft_copies(model) and _attention_implementations(model) == {"sdpa"}

    def interrupted(*args, **kwargs):
        assert "forward" in vars(model.get_output_embeddings())  # verification is under way with the few-row kernel
        assert _attention_implementations(model) == {GROUPED_QUERY_SDPA}  # and grouped-query attention (head too)
        assert set(_draft_copies(model)) == head_linears  # the head drafts with compact copies, the base does not
        raise KeyboardInterrupt

    monkeypatch.setattr(FastMTPCandidateGenerator, "update_candidate_strategy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, fastmtp=True)
    assert not _patched(model) and not _draft_copies(model) and _attention_implementations(model) == {"sdpa"}
    assert not cpu_kernels._folded_masks


def test_only_float32_linear_layers_on_a_cpu():
    model = tiny_fastmtp("llama").to(torch.bfloat16)
    with few_row_linears(model) as applied:
        assert not applied and not _patched(model)


def test_bench_runs_every_method_but_stock_plain_decoding_with_the_few_row_kernels(monkeypatch):
    from hf_fastmtp.bench.run import timed_generate

    model = tiny_fastmtp("llama")
    inputs = {"input_ids": torch.tensor([[1, 2, 3, 1, 2]])}
    patched_during_call = []
    original_generate = type(model).generate

    def generate(self, *args, **kwargs):
        patched_during_call.append(bool(_patched(self)))
        return original_generate(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", generate)
    timed_generate(model, inputs, fastmtp=False, max_new_tokens=4, prompt_lookup_num_tokens=3)
    timed_generate(model, inputs, fastmtp=True, max_new_tokens=4)
    timed_generate(model, inputs, fastmtp=False, cpu_kernels=False, max_new_tokens=4)
    assert patched_during_call == [True, True, False]
    assert not _patched(model) and _attention_implementations(model) == {"sdpa"}


@pytest.fixture
def folded_masks():
    """The module's folded-mask cache, emptied after the test whatever happens."""
    yield cpu_kernels._folded_masks
    cpu_kernels._folded_masks.clear()


@pytest.mark.parametrize("architecture", [*ARCHITECTURES, "qwen3"])
def test_native_gqa_attention_gives_the_same_logits(architecture, monkeypatch, folded_masks):
    base = tiny_base(architecture)
    groups = base.config.num_attention_heads // base.config.num_key_value_heads
    assert groups > 1  # grouped heads: the path that changes
    input_ids = torch.randint(1, 97, (2, 60), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :5] = 0  # a left-padded second row: a mask per sequence, and fully masked query rows

    def logits(num_queries: int, cached: int = 36) -> torch.Tensor:
        cache_kwargs = {cache_keyword(base.forward): DynamicCache(config=base.config), "use_cache": True}
        if cached:  # past the sliding windows (16)
            base(input_ids=input_ids[:, :cached], attention_mask=attention_mask[:, :cached], **cache_kwargs)
        end = cached + num_queries
        return base(input_ids=input_ids[:, cached:end], attention_mask=attention_mask[:, :end], **cache_kwargs).logits

    kernel_calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(query, key, *args, **kwargs):
        kernel_calls.append((tuple(query.shape[1:3]), key.shape[1], kwargs.get("enable_gqa", False)))
        return sdpa(query, key, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    kv_heads, layers = base.config.num_key_value_heads, base.config.num_hidden_layers
    cases = [(1, 36), (2, 36), (4, 36), (FOLDED_MAX_QUERIES, 36), (FOLDED_MAX_QUERIES + 1, 36), (12, 0)]
    with torch.inference_mode():
        for num_queries, cached in cases:
            standard = logits(num_queries, cached)
            with native_gqa_attention(base) as applied:
                assert applied and _attention_implementations(base) == {GROUPED_QUERY_SDPA}
                kernel_calls.clear()
                grouped = logits(num_queries, cached)
            assert _attention_implementations(base) == {"sdpa"} and not folded_masks
            # Without a cache, the padded positions see no token: what they hold is never used, so not compared.
            for real in [(slice(None),)] if cached else [(0,), (1, slice(5, None))]:
                torch.testing.assert_close(grouped[real], standard[real])
                assert torch.isfinite(grouped[real]).all()
            # Every layer attends to the grouped heads: folded for a few queries, with `enable_gqa` otherwise.
            if 1 < num_queries <= FOLDED_MAX_QUERIES:
                expected = ((kv_heads, groups * num_queries), kv_heads, False)
            else:
                expected = ((kv_heads * groups, num_queries), kv_heads, True)
            assert kernel_calls[-layers:] == [expected] * layers


def test_folded_masks_are_made_once_per_mask(folded_masks):
    mask = torch.tensor([[[[True, True, False], [True, True, True]]]])
    folded = cpu_kernels._folded_additive_mask(mask, 3, torch.float32)
    assert folded.shape == (1, 1, 6, 3) and folded.dtype == torch.float32
    assert torch.equal(folded.isfinite(), mask.repeat(1, 1, 3, 1)) and not folded[folded.isfinite()].any()
    assert cpu_kernels._folded_additive_mask(mask, 3, torch.float32) is folded  # the next layer reuses it
    assert cpu_kernels._folded_additive_mask(mask.clone(), 3, torch.float32) is not folded  # the next forward not


def test_grouped_query_sdpa_leaves_other_attention_to_transformers(monkeypatch, folded_masks):
    module = nn.Module()
    module.num_key_value_groups = 3
    query, key = torch.randn(1, 6, 4, 8), torch.randn(1, 2, 10, 8)
    mask = torch.ones(1, 1, 4, 10, dtype=torch.bool)
    delegated = []
    monkeypatch.setitem(
        AttentionInterface._global_mapping, "sdpa", lambda *args, **kwargs: delegated.append(kwargs) or (None, None)
    )
    output, _ = grouped_query_sdpa(module, query, key, key, attention_mask=mask)  # folded: not delegated
    assert output.shape == (1, 4, 6, 8) and not delegated
    for kwargs in (
        {"attention_mask": None},  # a causal prefill: Transformers' is_causal path
        {"attention_mask": torch.zeros(1, 1, 4, 10)},  # an additive mask
        {"attention_mask": mask, "dropout": 0.1},
        {"attention_mask": mask, "softcap": 50.0},
        {"attention_mask": mask, "position_bias": torch.zeros(1, 6, 4, 10)},
    ):
        grouped_query_sdpa(module, query, key, key, **kwargs)
    assert len(delegated) == 5
    module.num_key_value_groups = 1
    grouped_query_sdpa(module, torch.randn(1, 2, 4, 8), key, key, attention_mask=mask)
    assert len(delegated) == 6


def test_native_gqa_attention_leaves_other_settings_models_and_devices_alone():
    model = tiny_fastmtp("llama")
    with native_gqa_attention(model) as outer, native_gqa_attention(model) as nested:
        assert outer and not nested  # the enclosing call owns the switch, and restores it
        assert _attention_implementations(model) == {GROUPED_QUERY_SDPA}
    assert _attention_implementations(model) == {"sdpa"}
    with native_gqa_attention(model.model):
        model.model.set_attn_implementation("eager")  # the user's choice, made meanwhile, stays
    assert _attention_implementations(model.model) == {"eager"}

    with native_gqa_attention(model.model) as applied:  # not SDPA
        assert not applied and _attention_implementations(model.model) == {"eager"}
    other = tiny_base("llama")
    other.config.model_type = "llama-like"  # its code might branch on the name "sdpa": left alone
    with native_gqa_attention(other) as applied:
        assert not applied and _attention_implementations(other) == {"sdpa"}
    with native_gqa_attention(tiny_fastmtp("llama").to("meta")) as applied:  # GPU kernels would take a slower path
        assert not applied
