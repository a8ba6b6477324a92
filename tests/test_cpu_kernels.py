"""The CPU kernels FastMTP computes with: linear kernels per row count, compact draft weights, grouped attention."""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import ARCHITECTURES, every_kernel, tiny_base, tiny_fastmtp, use_kernels
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache

from hf_fastmtp import FastMTPCandidateGenerator
from hf_fastmtp.decoding import cpu_kernels
from hf_fastmtp.decoding.calibration import CALIBRATED_ROWS
from hf_fastmtp.decoding.cpu_kernels import (
    FOLDED_MAX_QUERIES,
    GROUPED_ATTENTION,
    KERNEL_ROWS,
    PADDED_ROWS,
    CalibratedLinear,
    CPUKernels,
    KernelChoice,
    grouped_attention,
    linear_product,
    prepack,
    prepacking_available,
    register_grouped_attention,
    shape_name,
)
from hf_fastmtp.decoding.draft_weights import (
    INT8_MAX_ROWS,
    DraftWeight,
    WeightCopies,
    WeightSource,
    draft_linear,
    int8_kernel_takes,
)
from hf_fastmtp.decoding.transformers_compat import cache_keyword

KERNELS = ["stock", "weight_first"] + (["prepacked"] if prepacking_available() else [])
needs_int8_kernel = pytest.mark.skipif(
    not hasattr(torch, "_weight_int8pack_mm"), reason="needs PyTorch's int8 weight-only kernel"
)


def _wrapped(model: nn.Module) -> dict[str, CalibratedLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, CalibratedLinear)}


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: module for name, module in model.named_modules() if type(module) is nn.Linear}


def _attention_implementations(model: nn.Module) -> set[str]:
    return {
        module.config._attn_implementation for module in model.modules() if hasattr(module, "num_key_value_groups")
    }


def _every_linear(layer: nn.Linear, kernel: str, draft_weights: str = "native") -> KernelChoice:
    return KernelChoice(linear={shape_name(layer.weight): (kernel,) * CALIBRATED_ROWS}, draft_weights=draft_weights)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def folded_masks():
    """The module's folded-mask cache, emptied after the test whatever happens."""
    yield cpu_kernels._folded_masks
    cpu_kernels._folded_masks.clear()


# ---------------------------------------------------------------------------------------------- linear kernels


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kernel", KERNELS)
def test_every_linear_kernel_equals_f_linear(kernel, bias):
    torch.manual_seed(0)
    linear = nn.Linear(64, 300, bias=bias)
    packed = prepack(linear.weight, linear.bias) if kernel == "prepacked" else None
    shapes = [(rows,) for rows in range(1, CALIBRATED_ROWS + 1)]
    shapes += [(1, 1), (1, 2), (1, 3), (2, 2), (1, 4), (4, 1), (1, 5), (2, 3), (1, 8), (1, 40), (3, 1, 2)]
    for shape in shapes:
        hidden = torch.randn(*shape, 64)
        with torch.no_grad():
            output = linear_product(kernel, hidden, linear.weight, linear.bias, packed)
        assert output.shape == (*shape, 300) and output.is_contiguous() and output.dtype == torch.float32, shape
        torch.testing.assert_close(output, nn.functional.linear(hidden, linear.weight, linear.bias))


def test_fewer_than_four_rows_take_the_padded_weight_first_product(monkeypatch):
    linear = nn.Linear(16, 8, bias=False)
    products = []
    mm = torch.mm
    monkeypatch.setattr(cpu_kernels.torch, "mm", lambda a, b: products.append((a.shape, b.shape)) or mm(a, b))
    layer = CalibratedLinear(linear, ("weight_first",) * 5)
    for rows in (1, 2, 3, 4, 5, 6):  # 6 rows: beyond the kernels listed, Transformers' F.linear
        layer(torch.randn(1, rows, 16))
    assert products == [((8, 16), (16, PADDED_ROWS))] * 4 + [((8, 16), (16, 5))]


def test_calibrated_linear_takes_the_kernel_of_each_row_count(monkeypatch):
    linear = nn.Linear(32, 8)
    packed = prepack(linear.weight) if prepacking_available() else None
    kernels = ("stock", "weight_first", "prepacked" if packed is not None else "stock")
    chosen = []
    product = cpu_kernels.linear_product
    monkeypatch.setattr(cpu_kernels, "linear_product", lambda name, *args: chosen.append(name) or product(name, *args))
    layer = CalibratedLinear(linear, kernels, packed)
    assert layer.weight is linear.weight and layer.bias is linear.bias  # the very same parameters
    assert list(layer.state_dict()) == ["weight", "bias"]
    with torch.no_grad():
        for rows in range(1, 6):
            hidden = torch.randn(rows, 32)
            torch.testing.assert_close(layer(hidden), linear(hidden))
    assert chosen == [*kernels, "stock", "stock"]


def test_calibrated_linear_serves_a_batchs_row_counts_with_the_entry_measured_next_above(monkeypatch):
    linear = nn.Linear(16, 4)
    chosen = []
    product = cpu_kernels.linear_product
    monkeypatch.setattr(cpu_kernels, "linear_product", lambda name, *args: chosen.append(name) or product(name, *args))
    # Entries for 1..8 rows, then for up to 12, 16 and 24 rows (the entries after them are not listed: stock).
    assert KERNEL_ROWS[8:11] == (12, 16, 24)
    layer = CalibratedLinear(linear, ("stock",) * 8 + ("weight_first", "stock", "weight_first"))
    with torch.no_grad():
        for rows in (8, 9, 12, 13, 16, 17, 24, 25, KERNEL_ROWS[-1] + 1):
            hidden = torch.randn(rows, 16)
            torch.testing.assert_close(layer(hidden), linear(hidden))
    assert (
        chosen
        == ["stock", "weight_first", "weight_first", "stock", "stock", "weight_first", "weight_first"] + ["stock"] * 2
    )


# ---------------------------------------------------------------------------------------------- CPUKernels


def test_cpu_kernels_wrap_every_linear_layer_and_restore_them():
    model = tiny_fastmtp("llama")
    linears = _linears(model)
    assert any(name.startswith("mtp_layers") for name in linears)  # the head's too
    parameters = dict(model.named_parameters())
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    input_ids = torch.tensor([[5, 9, 2, 7]])
    with torch.no_grad():
        expected = model.model(input_ids).logits
    with CPUKernels(model, every_kernel(model, "weight_first", "native")) as kernels:
        wrapped = _wrapped(model)
        assert set(wrapped) == set(linears) and not _linears(model)
        assert all(wrapped[name].wrapped == [linear] for name, linear in linears.items())
        assert model.state_dict().keys() == state.keys()  # the wrapped layers stay out of the state dict
        assert all(parameter is parameters[name] for name, parameter in model.named_parameters())
        with CPUKernels(model, every_kernel(model, "stock", "float16"), draft_modules=model.head) as nested:
            assert not nested._wrapped and not nested._switched  # wrapped layers are not wrapped again
        assert _wrapped(model) == wrapped
        with torch.no_grad():
            torch.testing.assert_close(model.model(input_ids).logits, expected)
        assert len(kernels._wrapped) == len(linears)
    assert _linears(model) == linears and all(model.get_submodule(n) is m for n, m in linears.items())
    assert not _wrapped(model) and _attention_implementations(model) == {"sdpa"}
    assert all(parameter is parameters[name] for name, parameter in model.named_parameters())
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in state.items())


def test_cpu_kernels_restore_the_model_on_error(folded_masks):
    model = tiny_fastmtp("llama")
    linears = _linears(model)
    with pytest.raises(KeyboardInterrupt), CPUKernels(model, every_kernel(model, "weight_first", "int8"), model.head):
        assert _wrapped(model) and _attention_implementations(model) != {"sdpa"}
        with torch.no_grad():
            model.model(torch.tensor([[1, 2, 3]]))
        raise KeyboardInterrupt
    assert _linears(model) == linears and not _wrapped(model)
    assert _attention_implementations(model) == {"sdpa"} and not folded_masks


def test_generate_restores_the_kernels_even_on_error(monkeypatch):
    use_kernels(monkeypatch, "weight_first", "float16")
    model = tiny_fastmtp("llama")
    linears = _linears(model)
    head_linears = {name for name in linears if name.startswith("mtp_layers")}
    model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, fastmtp=True)
    assert _linears(model) == linears and _attention_implementations(model) == {"sdpa"}

    def interrupted(*args, **kwargs):
        wrapped = _wrapped(model)
        assert set(wrapped) == set(linears)  # verification is under way with the chosen kernels
        assert _attention_implementations(model) == {register_grouped_attention(tuple(range(1, 9)))}  # head too
        # The head drafts with compact copies, the base does not.
        assert {name for name, layer in wrapped.items() if layer.draft_weight is not None} == head_linears
        raise KeyboardInterrupt

    monkeypatch.setattr(FastMTPCandidateGenerator, "update_candidate_strategy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, fastmtp=True)
    assert _linears(model) == linears and not _wrapped(model) and _attention_implementations(model) == {"sdpa"}
    assert not cpu_kernels._folded_masks


def test_layers_with_hooks_are_left_alone():
    model = tiny_fastmtp("llama")
    linears = _linears(model)
    hooked = model.model.model.layers[0].self_attn.q_proj
    pre_hooked = model.model.model.layers[1].mlp.down_proj
    hooked.register_forward_hook(lambda module, args, output: None)
    pre_hooked.register_forward_pre_hook(lambda module, args: None)
    with CPUKernels(model, every_kernel(model, "weight_first", "float16"), draft_modules=model.head):
        assert model.model.model.layers[0].self_attn.q_proj is hooked
        assert model.model.model.layers[1].mlp.down_proj is pre_hooked
        assert set(_wrapped(model)) == set(linears) - {
            "model.model.layers.0.self_attn.q_proj",
            "model.model.layers.1.mlp.down_proj",
        }


def test_only_float32_linear_layers_on_a_cpu():
    model = tiny_fastmtp("llama").to(torch.bfloat16)
    with CPUKernels(model, every_kernel(model, "weight_first", "int8"), draft_modules=model.head) as kernels:
        assert not kernels._wrapped and not _wrapped(model)


def test_shapes_without_a_choice_are_not_wrapped():
    model = tiny_fastmtp("llama")
    choice = KernelChoice(linear={"64x32": ("weight_first",)})  # the MLPs' gate and up projections
    with CPUKernels(model, choice):
        wrapped = _wrapped(model)
        assert wrapped and {shape_name(layer.weight) for layer in wrapped.values()} == {"64x32"}
    with CPUKernels(model, KernelChoice()) as kernels:  # Transformers' kernels everywhere: nothing to wrap
        assert not kernels._wrapped and _attention_implementations(model) == {"sdpa"}


@pytest.mark.parametrize("draft_weights", ["native", "float16", "int8"])
def test_draft_weights_only_under_the_draft_modules(draft_weights):
    model = tiny_fastmtp("llama")
    head = {name for name in _linears(model) if name.startswith("mtp_layers")}
    with CPUKernels(model, every_kernel(model, "stock", draft_weights), draft_modules=model.head):
        with_copies = {name: layer.draft_weight for name, layer in _wrapped(model).items() if layer.draft_weight}
        if draft_weights == "native":
            assert not with_copies
        else:
            assert set(with_copies) == head
            expected = torch.int8 if draft_weights == "int8" and int8_kernel_takes(torch.zeros(1, 32)) else torch.half
            assert {copy.weight.dtype for copy in with_copies.values()} == {expected}
    with CPUKernels(model, every_kernel(model, "stock", draft_weights)):  # no draft modules: no copies
        assert not any(layer.draft_weight for layer in _wrapped(model).values())
    with CPUKernels(model, KernelChoice(draft_weights=draft_weights), draft_modules=model.head):
        # Draft copies alone wrap the head's layers, with Transformers' kernels for their other products.
        assert set(_wrapped(model)) == (head if draft_weights != "native" else set())


@pytest.mark.parametrize("bias", [False, True])
def test_one_row_products_use_float16_copies_only_while_active(bias):
    torch.manual_seed(0)
    linear = nn.Linear(64, 300, bias=bias)
    container = nn.Sequential(linear)
    one_row, four_rows = torch.randn(1, 1, 64), torch.randn(1, 4, 64)
    with torch.no_grad():
        float32 = {rows: linear(hidden) for rows, hidden in ((1, one_row), (4, four_rows))}
        float16_bias = None if linear.bias is None else linear.bias.half()
        float16 = nn.functional.linear(one_row.half(), linear.weight.half(), float16_bias).float()
    assert not torch.equal(float16, float32[1])  # the two are told apart below
    choice = _every_linear(linear, "weight_first", "float16")
    with torch.no_grad(), CPUKernels(container, choice, draft_modules=container):
        output = container(one_row)
        assert output.dtype == torch.float32 and torch.equal(output, float16)
        torch.testing.assert_close(container(four_rows), float32[4])  # several rows: float32, weight-first
    assert container[0] is linear
    with torch.no_grad():
        assert torch.equal(container(one_row), float32[1])


@needs_int8_kernel
@pytest.mark.parametrize("bias", [False, True])
def test_int8_draft_weights_serve_draft_steps_while_active(bias):
    torch.manual_seed(0)
    linear = nn.Linear(64, 301, bias=bias)  # 301 outputs: a last partial block of the kernel's
    container = nn.Sequential(linear)
    int8 = DraftWeight.compact(linear.weight, linear.bias, "int8")
    with torch.no_grad(), CPUKernels(container, _every_linear(linear, "weight_first", "int8"), container):
        for shape in [(1, 1), (1, 3), (2, 2), (1, 4), (1, INT8_MAX_ROWS), (1, INT8_MAX_ROWS + 1), (1, 40)]:
            hidden = torch.randn(*shape, 64)
            output = container(hidden)
            float32 = nn.functional.linear(hidden, linear.weight, linear.bias)
            assert output.dtype == torch.float32 and output.shape == float32.shape
            if hidden.shape[:-1].numel() > INT8_MAX_ROWS:  # a pass over a prompt: Transformers' kernel
                assert torch.equal(output, float32)
                continue
            assert torch.equal(output, draft_linear(hidden, int8))
            assert (output - float32).norm() < 0.02 * float32.norm()  # int8 rows, bfloat16 activations: ~1%
    assert container[0] is linear


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("num_draft_tokens", [3, "auto"])
def test_greedy_output_is_unchanged_under_every_kernel_setting(
    architecture, draft_weights, num_draft_tokens, request, monkeypatch
):
    kernel, _ = request.node.callspec.params["draft_weights"]
    used = []
    product = cpu_kernels.linear_product
    monkeypatch.setattr(cpu_kernels, "linear_product", lambda name, *args: used.append(name) or product(name, *args))
    model = tiny_fastmtp(architecture)
    input_ids = torch.tensor([[5, 9, 2, 7, 5, 9, 3]])
    settings = {"max_new_tokens": 24, "do_sample": False}
    plain = model.generate(input_ids, **settings)
    assert not used  # plain generation keeps Transformers' kernels
    fast = model.generate(input_ids, fastmtp=True, num_draft_tokens=num_draft_tokens, **settings)
    assert torch.equal(fast, plain)
    assert kernel in used and set(used) <= {kernel, "stock"}  # (beyond the calibrated row counts: stock)
    stats = model.last_fastmtp_stats
    assert stats.new_tokens == 24
    assert stats.max_draft_tokens == (3 if num_draft_tokens == 3 else CALIBRATED_ROWS - 1)
    # With "auto", the costs `use_kernels` gives (flat, cheap drafts) have the first cycle draft 5 (at the prior
    # acceptance of 0.5), later ones fewer as this random head's drafts are rejected.
    assert stats.drafted_per_position[2] > 0 and (num_draft_tokens == 3 or stats.drafted_per_position[4] > 0)


# ---------------------------------------------------------------------------------------------- draft weights


def test_weight_copies_are_kept_while_the_weights_are_unchanged():
    linear = nn.Linear(64, 32)
    copies = WeightCopies()
    made = []

    def copy(weight_format: str) -> DraftWeight:
        def make(weight, bias):
            made.append(weight_format)
            return DraftWeight.compact(weight, bias, weight_format)

        return copies.get(linear, weight_format, make)

    first = copy("int8")
    assert copy("int8") is first and made == ["int8"]
    assert copy("float16").scales is None and copy("float16") is copy("float16") and copy("int8") is first
    assert made == ["int8", "float16"]  # one copy per kind
    with torch.no_grad():
        linear.bias.add_(1.0)  # an in-place update
    updated = copy("int8")
    assert updated is not first
    expected_bias = linear.bias.detach().to(torch.bfloat16 if int8_kernel_takes(linear.weight) else torch.float16)
    assert torch.equal(updated.bias, expected_bias)
    linear.load_state_dict({"weight": 2 * linear.weight.detach(), "bias": linear.bias.detach()})
    reloaded = copy("int8")
    assert reloaded is not updated
    if reloaded.is_int8:
        assert torch.equal(reloaded.scales, (2 * updated.scales.float()).to(torch.bfloat16))
    linear.weight = nn.Parameter(torch.randn(32, 64))  # another tensor
    assert copy("int8") is not reloaded
    current = copy("int8")
    linear.to(torch.float64)  # the same parameters, new storage
    assert copy("int8") is not current


def test_weight_copies_are_dropped_with_the_layer():
    copies = WeightCopies()
    linear = nn.Linear(32, 16)
    copy = copies.get(linear, "float16", lambda weight, bias: DraftWeight.compact(weight, bias, "float16"))
    assert len(copies._copies) == 1
    del linear
    gc.collect()
    assert not len(copies._copies) and copy.weight.dtype == torch.float16


def test_weight_copies_of_inference_tensors_are_never_reused():
    with torch.inference_mode():
        linear = nn.Linear(32, 16)
    copies = WeightCopies()

    def make(weight, bias):
        return DraftWeight.compact(weight, bias, "float16")

    assert copies.get(linear, "float16", make) is not copies.get(linear, "float16", make)


def test_cpu_kernels_reuse_their_weight_copies_between_calls():
    model = tiny_fastmtp("llama")
    copies = WeightCopies()
    choice = every_kernel(model, "prepacked" if prepacking_available() else "stock", "float16")

    def copies_made() -> list:
        with CPUKernels(model, choice, draft_modules=model.head, copies=copies):
            return [(layer.packed, layer.draft_weight) for layer in _wrapped(model).values()]

    first = copies_made()
    assert all(a is b for old, new in zip(first, copies_made()) for a, b in zip(old, new))
    with torch.no_grad():
        next(iter(_linears(model.head).values())).weight.mul_(2.0)  # an in-place update of one of the head's layers
    changed = [old[1] is not new[1] for old, new in zip(first, copies_made())]
    assert sum(changed) == 1


def test_weight_source_tells_changed_weights_apart():
    weight = nn.Parameter(torch.randn(4, 8))
    source = WeightSource(weight, None)
    assert source.matches(weight, None)
    assert not source.matches(weight.detach().clone(), None) and not source.matches(weight, weight)
    assert not source.matches(weight)  # another number of tensors
    with torch.no_grad():
        weight.mul_(1.0)  # an in-place update, even one that changes no value
    assert not source.matches(weight, None)
    source = WeightSource(weight, None)
    weight.data = weight.data.double()  # what `module.to(torch.float64)` does: the same parameter, new storage
    assert not source.matches(weight, None)
    with torch.inference_mode():
        inference_weight = torch.randn(4, 8)
    assert not WeightSource(inference_weight).matches(inference_weight)  # no version: never reused


def test_int8_rows_only_for_row_lengths_a_multiple_of_16():
    takes = hasattr(torch, "_weight_int8pack_mm")
    assert int8_kernel_takes(torch.zeros(8, 32)) is takes and int8_kernel_takes(torch.zeros(5, 48)) is takes
    assert not int8_kernel_takes(torch.zeros(8, 24))  # 24: not a multiple of 16
    assert not int8_kernel_takes(torch.zeros(8, 8))
    assert not int8_kernel_takes(torch.zeros(8, 32, dtype=torch.bfloat16))  # float32 weights only
    assert not int8_kernel_takes(torch.zeros(8, 32, device="meta"))
    fallback = DraftWeight.compact(torch.randn(16, 24), torch.randn(16), "int8")  # asked for int8 all the same
    assert not fallback.is_int8 and fallback.weight.dtype == fallback.bias.dtype == torch.float16
    weight = torch.randn(16, 32)
    native = DraftWeight.compact(weight, None, "native").weight
    assert native.data_ptr() == weight.data_ptr() and native.dtype == weight.dtype  # the weights themselves
    assert DraftWeight.compact(weight, None, "int8").is_int8 is takes


def test_draft_weights_serve_the_row_counts_of_draft_steps():
    float16 = DraftWeight.compact(torch.randn(8, 24), None, "float16")
    assert float16.serves(1) and not float16.serves(2)
    int8 = DraftWeight(torch.zeros(8, 32, dtype=torch.int8), None, torch.ones(8, dtype=torch.bfloat16))
    assert all(int8.serves(rows) for rows in range(1, INT8_MAX_ROWS + 1)) and not int8.serves(INT8_MAX_ROWS + 1)


@needs_int8_kernel
def test_int8_products_take_a_bfloat16_view_as_input():
    torch.manual_seed(0)
    weight, hidden = torch.randn(32, 64), torch.randn(1, 72).to(torch.bfloat16)
    int8 = DraftWeight.compact(weight, None, "int8")
    output = draft_linear(hidden[:, 8:], int8)  # a view 16 bytes into its storage: the kernel needs aligned rows
    assert torch.equal(output, draft_linear(hidden[:, 8:].clone(), int8))  # as from an aligned copy
    exact = hidden[:, 8:].float() @ weight.T
    assert output.dtype == torch.bfloat16 and (output.float() - exact).norm() < 0.02 * exact.norm()


@needs_int8_kernel
def test_int8_draft_weights_quantize_each_row_with_its_own_scale():
    weight = torch.tensor([[0.5, -1.0, 0.25, 0.0], [100.0, 50.0, -25.0, 1.0]]).repeat(1, 4)
    int8 = DraftWeight.compact(weight, torch.tensor([1.0, 2.0]), "int8")
    assert int8.weight.dtype == torch.int8 and int8.scales.dtype == int8.bias.dtype == torch.bfloat16
    assert int8.weight.abs().amax(dim=1).tolist() == [127, 127]  # each row uses the whole int8 range
    # Each weight within half a step of its row's scale (and bfloat16's rounding of that scale at the row's maximum).
    error = (int8.weight.float() * int8.scales.float()[:, None] - weight).abs()
    assert (error <= 0.5 * int8.scales.float()[:, None] + 0.005 * weight.abs().amax(dim=1, keepdim=True)).all()
    zero = DraftWeight.compact(torch.zeros(3, 16), None, "int8")  # an all-zero row gets no zero scale
    assert torch.equal(draft_linear(torch.ones(1, 16), zero), torch.zeros(1, 3))


# ---------------------------------------------------------------------------------------------- grouped attention


@pytest.mark.parametrize("architecture", [*ARCHITECTURES, "qwen3"])
def test_grouped_attention_gives_the_same_logits_as_sdpa(architecture, monkeypatch, folded_masks):
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
    queries = (*range(1, CALIBRATED_ROWS + 1), FOLDED_MAX_QUERIES, FOLDED_MAX_QUERIES + 1)
    cases = [(n, 36) for n in queries] + [(12, 0)]
    choice = KernelChoice(grouped_attention_queries=(*queries, 12))
    with torch.inference_mode():
        for num_queries, cached in cases:
            standard = logits(num_queries, cached)
            with CPUKernels(base, choice) as kernels:
                assert kernels._switched and _attention_implementations(base) == {
                    register_grouped_attention(choice.grouped_attention_queries)
                }
                assert not kernels._wrapped
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
            assert kernel_calls[-layers:] == [expected] * layers, num_queries


def test_query_counts_not_chosen_keep_transformers_attention(monkeypatch):
    base = tiny_base("llama")
    heads = base.config.num_attention_heads
    queries = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(query, *args, **kwargs):
        queries.append(tuple(query.shape[1:3]))
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    cache = DynamicCache(config=base.config)
    with torch.no_grad(), CPUKernels(base, KernelChoice(grouped_attention_queries=(1,))):
        base(input_ids=torch.tensor([[1, 2, 3, 4, 5]]), **{cache_keyword(base.forward): cache}, use_cache=True)
        queries.clear()
        base(input_ids=torch.tensor([[6, 7, 8, 9]]), **{cache_keyword(base.forward): cache}, use_cache=True)
    assert queries == [(heads, 4)] * base.config.num_hidden_layers  # 4 queries: not folded


def test_folded_masks_are_made_once_per_mask(folded_masks):
    mask = torch.tensor([[[[True, True, False], [True, True, True]]]])
    folded = cpu_kernels._folded_additive_mask(mask, 3, torch.float32)
    assert folded.shape == (1, 1, 6, 3) and folded.dtype == torch.float32
    assert torch.equal(folded.isfinite(), mask.repeat(1, 1, 3, 1)) and not folded[folded.isfinite()].any()
    assert cpu_kernels._folded_additive_mask(mask, 3, torch.float32) is folded  # the next layer reuses it
    assert cpu_kernels._folded_additive_mask(mask.clone(), 3, torch.float32) is not folded  # the next forward not
    for _ in range(cpu_kernels.FOLDED_MASKS_KEPT + 1):
        cpu_kernels._folded_additive_mask(mask.clone(), 3, torch.float32)
    assert len(folded_masks) <= cpu_kernels.FOLDED_MASKS_KEPT


def test_grouped_attention_leaves_other_attention_to_transformers(monkeypatch, folded_masks):
    module = nn.Module()
    module.num_key_value_groups = 3
    query, key = torch.randn(1, 6, 4, 8), torch.randn(1, 2, 10, 8)
    mask = torch.ones(1, 1, 4, 10, dtype=torch.bool)
    delegated = []
    monkeypatch.setitem(
        AttentionInterface._global_mapping, "sdpa", lambda *args, **kwargs: delegated.append(kwargs) or (None, None)
    )
    four = frozenset({4})
    output, _ = grouped_attention(module, query, key, key, attention_mask=mask, queries=four)  # folded
    assert output.shape == (1, 4, 6, 8) and not delegated
    for kwargs in (
        {"attention_mask": mask, "queries": frozenset({1, 2})},  # a query count not chosen
        {"attention_mask": None},  # a causal prefill: Transformers' is_causal path
        {"attention_mask": torch.zeros(1, 1, 4, 10)},  # an additive mask
        {"attention_mask": torch.ones(1, 6, 4, 10, dtype=torch.bool)},  # a mask per head
        {"attention_mask": mask, "dropout": 0.1},
        {"attention_mask": mask, "softcap": 50.0},
        {"attention_mask": mask, "position_bias": torch.zeros(1, 6, 4, 10)},
    ):
        grouped_attention(module, query, key, key, **{"queries": four, **kwargs})
    assert len(delegated) == 7
    module.num_key_value_groups = 1
    grouped_attention(module, torch.randn(1, 2, 4, 8), key, key, attention_mask=mask, queries=four)
    assert len(delegated) == 8


def test_grouped_attention_is_registered_once_per_set_of_query_counts():
    name = register_grouped_attention((3, 1, 2))
    assert name == f"{GROUPED_ATTENTION}_1_2_3" and register_grouped_attention((1, 2, 3)) == name
    assert name in AttentionInterface._global_mapping


def test_grouped_attention_leaves_other_settings_models_and_devices_alone():
    model = tiny_fastmtp("llama")
    choice = KernelChoice(grouped_attention_queries=(1, 2, 3, 4))
    grouped = register_grouped_attention(choice.grouped_attention_queries)
    with CPUKernels(model, choice) as outer, CPUKernels(model, choice) as nested:
        assert outer._switched and not nested._switched  # the enclosing one owns the switch, and restores it
        assert _attention_implementations(model) == {grouped}
    assert _attention_implementations(model) == {"sdpa"}
    with CPUKernels(model.model, choice):
        model.model.set_attn_implementation("eager")  # the user's choice, made meanwhile, stays
    assert _attention_implementations(model.model) == {"eager"}
    with CPUKernels(model.model, choice) as kernels:  # not SDPA
        assert not kernels._switched and _attention_implementations(model.model) == {"eager"}
    other = tiny_base("llama")
    other.config.model_type = "llama-like"  # its code might branch on the name "sdpa": left alone
    with CPUKernels(other, choice) as kernels:
        assert not kernels._switched and _attention_implementations(other) == {"sdpa"}
    meta = tiny_fastmtp("llama").to("meta")  # GPU kernels would take a slower path: only CPUs switch
    with CPUKernels(meta, choice) as kernels:
        assert not kernels._switched
