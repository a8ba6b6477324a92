"""The weight-first few-row products that FastMTP verifies with on CPUs."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_fastmtp
from torch import nn

from hf_fastmtp import FastMTPCandidateGenerator, cpu_kernels
from hf_fastmtp.cpu_kernels import few_row_linears


def _patched(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if "forward" in vars(module)]


@pytest.mark.parametrize("bias", [False, True])
def test_same_output_as_the_standard_kernel_for_every_row_count(bias):
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


def test_generate_restores_the_linear_layers_even_on_error(monkeypatch):
    model = tiny_fastmtp("llama")
    model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, fastmtp=True)
    assert not _patched(model)

    def interrupted(*args, **kwargs):
        assert "forward" in vars(model.get_output_embeddings())  # verification is under way with the few-row kernel
        raise KeyboardInterrupt

    monkeypatch.setattr(FastMTPCandidateGenerator, "update_candidate_strategy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, fastmtp=True)
    assert not _patched(model)


def test_only_float32_linear_layers_on_a_cpu():
    model = tiny_fastmtp("llama").to(torch.bfloat16)
    with few_row_linears(model) as applied:
        assert not applied and not _patched(model)


def test_bench_runs_every_method_with_the_few_row_kernels(monkeypatch):
    from hf_fastmtp.bench import timed_generate

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
    assert patched_during_call == [True, True] and not _patched(model)
