"""The weight-first lm_head product that FastMTP verifies with on CPUs."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_fastmtp
from torch import nn

from hf_fastmtp import FastMTPCandidateGenerator, cpu_kernels
from hf_fastmtp.cpu_kernels import weight_first_lm_head


@pytest.mark.parametrize("bias", [False, True])
def test_same_logits_as_the_standard_kernel_for_every_row_count(bias):
    torch.manual_seed(0)
    lm_head = nn.Linear(64, 300, bias=bias)
    model = nn.Module()
    model.get_output_embeddings = lambda: lm_head
    for rows in (1, 2, 5, cpu_kernels.MAX_ROWS, cpu_kernels.MAX_ROWS + 1, 40):
        hidden = torch.randn(1, rows, 64)
        with weight_first_lm_head(model) as applied:
            assert applied
            logits = lm_head(hidden)
        torch.testing.assert_close(logits, nn.functional.linear(hidden, lm_head.weight, lm_head.bias))


def test_few_rows_take_the_weight_first_product_and_the_module_is_restored(monkeypatch):
    model = tiny_fastmtp("llama")
    lm_head = model.get_output_embeddings()
    products = []
    monkeypatch.setattr(cpu_kernels.torch, "mm", lambda a, b: products.append(a.shape) or a @ b)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with weight_first_lm_head(model):
        lm_head(torch.randn(1, 4, lm_head.in_features))
        lm_head(torch.randn(1, 1, lm_head.in_features))  # one row: already the fast kernel
        with weight_first_lm_head(model) as nested:
            assert not nested  # an enclosing call keeps the module, and restores it
        assert "forward" in vars(lm_head)
    assert products == [lm_head.weight.shape]
    assert "forward" not in vars(lm_head)
    assert model.state_dict().keys() == state.keys()


def test_generate_restores_the_lm_head_even_on_error(monkeypatch):
    model = tiny_fastmtp("llama")
    lm_head = model.get_output_embeddings()
    model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, fastmtp=True)
    assert "forward" not in vars(lm_head)

    def interrupted(*args, **kwargs):
        assert "forward" in vars(lm_head)  # verification is under way with the weight-first product
        raise KeyboardInterrupt

    monkeypatch.setattr(FastMTPCandidateGenerator, "update_candidate_strategy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, fastmtp=True)
    assert "forward" not in vars(lm_head)


def test_only_float32_linear_lm_heads_on_a_cpu():
    model = tiny_fastmtp("llama").to(torch.bfloat16)
    with weight_first_lm_head(model) as applied:
        assert not applied and "forward" not in vars(model.get_output_embeddings())
