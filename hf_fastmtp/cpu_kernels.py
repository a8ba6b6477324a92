"""
A cheaper verification forward on CPUs.

A FastMTP cycle verifies K drafts with one base forward over K+1 tokens. On a GPU that costs about as much as a
forward over one token; on a CPU it does not, and the largest single cost is the lm_head: for SmolLM2 a 49152 x 576
matrix. PyTorch computes `x @ W.T` for one row as a matrix-vector product at memory speed, but for 2-16 rows as a
small matrix product that takes 2-2.5x as long (MKL, float32). The same product taken weight-first, `(W @ x.T).T`,
takes about 1.3x the one-row time, so while FastMTP generates on a CPU the base's lm_head computes few-row products
that way. It is the same arithmetic in another order: the logits agree to float32 rounding, like those of any two BLAS
kernels, and decoding stays exact (every greedy identity test runs through it).
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

MAX_ROWS = 16  # beyond a few rows the small-product penalty fades and the standard kernel is as fast


def weight_first_linear(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    rows = input.numel() // max(input.shape[-1], 1)
    if not 2 <= rows <= MAX_ROWS:
        return nn.functional.linear(input, self.weight, self.bias)
    output = torch.mm(self.weight, input.reshape(rows, -1).t()).t()
    if self.bias is not None:
        output = output + self.bias
    return output.reshape(*input.shape[:-1], self.out_features)


@contextmanager
def weight_first_lm_head(model: nn.Module) -> Iterator[bool]:
    """
    While active, the model's lm_head computes few-row products weight-first, if it is a float32 `nn.Linear` on a
    CPU (elsewhere the standard kernel is already right). Nothing is copied and the module is restored on exit.
    Yields whether it applied.
    """
    lm_head = model.get_output_embeddings()
    applies = (
        type(lm_head) is nn.Linear
        and lm_head.weight.device.type == "cpu"
        and lm_head.weight.dtype == torch.float32
        and "forward" not in vars(lm_head)  # already replaced by someone else (or by an enclosing call)
    )
    if applies:
        lm_head.forward = types.MethodType(weight_first_linear, lm_head)
    try:
        yield applies
    finally:
        if applies:
            del lm_head.forward


__all__ = ["weight_first_lm_head"]
