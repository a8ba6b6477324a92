"""
A cheaper verification forward and cheaper draft steps on CPUs: linear layers and attention.

A FastMTP cycle verifies K drafts with one base forward over K+1 tokens. On a GPU that costs about as much as a
forward over one token; on a CPU with PyTorch's float32 BLAS (MKL) it does not: `x @ W.T` over one row is a
matrix-vector product at memory speed, but over 2-4 rows it becomes a small matrix product that takes 2-3x as long,
in every linear layer. Taken weight-first, `W @ x.T` with x padded to 4 rows, the same product costs about what one
row does. So while FastMTP generates on a CPU, the float32 linear layers compute 2-4 row products that way: for
SmolLM2-135M a 4-token forward drops from ~1.7x to ~1.1x the cost of a 1-token one (2 threads). It is the same
arithmetic in another order: outputs agree to float32 rounding, like those of any two BLAS kernels, and decoding stays
exact (every greedy identity test runs through it). Some CPUs run even one-row products faster that way, where MKL's
matrix-vector kernel keeps to one core: that is timed once per model and process (`one_row_products_weight_first`),
so plain decoding under these kernels (the bench's baseline) is as fast as this CPU allows too.

Attention has the same kind of cost. For grouped-query attention, Transformers' SDPA path first copies every key and
value head `num_key_value_groups` times (`repeat_kv`) whenever a mask is given, which a K+1-token verification
forward with a cache always has: a copy of the whole KV cache in every layer (SmolLM2-135M: 3x, 110 MB at 800
tokens). PyTorch's CPU kernel takes the grouped heads as they are (`enable_gqa`) and computes the very same numbers.

A draft step is a one-row forward of the head, memory-bound like any: its products read float16 copies of the head's
weights, as the draft vocabulary's lm_head rows already are (`draft_rows_dtype`). Drafts only choose what the model
verifies in its own dtype, so the output does not change.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers.utils import is_torch_greater_or_equal

logger = logging.getLogger(__name__)

PADDED_ROWS = 4  # MKL's weight-first product is fastest at 4 columns; beyond them the standard kernel is as good
# Transformers' own switch (read at every attention call, transformers >= 5.23): SDPA with `enable_gqa` even when a
# mask is given. Off by default because GPU kernels then fall back to the math kernel; on a CPU it is the fast one.
FORCE_GQA_VARIABLE = "TRANSFORMERS_SDPA_FORCE_GQA"
# Where `float16_one_row_products` keeps a layer's float16 copies while it is active.
FLOAT16_WEIGHT, FLOAT16_BIAS = "_fastmtp_float16_weight", "_fastmtp_float16_bias"
# A heuristic: more weights than most CPU caches hold, so that one-row products over them run at memory speed, as in
# a real model's forward (a CPU with a larger cache may time them cached, and keep the standard kernel).
MEMORY_BOUND_BYTES = 64 * 2**20
# "1" or "0": always or never compute one-row products weight-first, without timing them.
ONE_ROW_WEIGHT_FIRST_VARIABLE = "HF_FASTMTP_ONE_ROW_WEIGHT_FIRST"
# (threads, probed weight shapes) -> whether one-row products are faster weight-first: timed once per process.
_one_row_weight_first: dict[tuple, bool] = {}


def few_row_linear(self: nn.Linear, input: torch.Tensor, min_rows: int = 2) -> torch.Tensor:
    # Called ~200 times per forward, so its own overhead counts: sparing a slice and a reshape took ~3 ms off a pass.
    *leading, in_features = input.shape
    rows = math.prod(leading)
    if rows == 1 and (float16_weight := vars(self).get(FLOAT16_WEIGHT)) is not None:
        float16_bias = vars(self)[FLOAT16_BIAS]
        return nn.functional.linear(input.to(torch.float16), float16_weight, float16_bias).to(input.dtype)
    if not min_rows <= rows <= PADDED_ROWS:
        return nn.functional.linear(input, self.weight, self.bias)
    flat = input.reshape(rows, in_features)
    if rows == PADDED_ROWS:  # K=3's four-row verification: no padding copy, no slice
        output = torch.mm(self.weight, flat.t())
    else:
        output = torch.mm(self.weight, nn.functional.pad(flat, (0, 0, 0, PADDED_ROWS - rows)).t())[:, :rows]
    # A contiguous result: the transposed view would make every later element-wise op slower than the product saved.
    output = output.t().contiguous()
    if self.bias is not None:
        output += self.bias
    return output.view(*leading, self.out_features)


def _is_cpu_float32_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear and module.weight.device.type == "cpu" and module.weight.dtype == torch.float32


@contextmanager
def few_row_linears(model: nn.Module) -> Iterator[int]:
    """
    While active, the model's float32 `nn.Linear` layers on a CPU compute 2-4 row products weight-first, and one-row
    products too where that is faster on this CPU (`one_row_products_weight_first`); elsewhere the standard kernel is
    already right. Nothing is copied and the modules are restored on exit, even on error. Yields how many layers it
    applied to.
    """
    # A forward already replaced by someone else (or by an enclosing call) is left alone.
    linears = [
        module for module in model.modules() if _is_cpu_float32_linear(module) and "forward" not in vars(module)
    ]
    # Only asked when there is something to patch: nested calls and accelerator models never walk the probe.
    one_row = bool(linears) and one_row_products_weight_first(model)
    forward = functools.partial(few_row_linear, min_rows=1 if one_row else 2)
    for linear in linears:
        linear.forward = types.MethodType(forward, linear)
    try:
        yield len(linears)
    finally:
        for linear in linears:
            del linear.forward


def one_row_products_weight_first(model: nn.Module) -> bool:
    """
    Whether this CPU computes the model's one-row products (plain decoding's) faster weight-first, padded to 4 rows,
    than with the standard matrix-vector kernel. That depends on the CPU: MKL's matrix-vector kernel may stay on one
    core where the padded product uses every thread (a 2-core AVX-512 EPYC: SmolLM2-135M's one-token forward 39 ->
    26 ms), or be as fast (a 2-core AVX2 EPYC). Timed once per process, thread count and model, on the model's own
    weights, unless `HF_FASTMTP_ONE_ROW_WEIGHT_FIRST` is 1 or 0. A model whose linear layers fit in a CPU cache keeps
    the standard kernel, faster on cached weights.
    """
    if (setting := os.environ.get(ONE_ROW_WEIGHT_FIRST_VARIABLE)) is not None:
        if setting not in ("0", "1"):
            raise ValueError(f"{ONE_ROW_WEIGHT_FIRST_VARIABLE} must be 1 or 0 (or unset: timed), got {setting!r}.")
        return setting == "1"
    probed, probed_bytes = [], 0
    for module in model.modules():
        if _is_cpu_float32_linear(module) and FLOAT16_WEIGHT not in vars(module):
            probed.append(module)
            probed_bytes += module.weight.nbytes
            if probed_bytes >= MEMORY_BOUND_BYTES:
                break
    else:
        return False
    key = (torch.get_num_threads(), tuple(linear.weight.shape for linear in probed))
    if key not in _one_row_weight_first:
        _one_row_weight_first[key] = faster = _weight_first_is_faster(probed)
        logger.info(
            "One-row products %s weight-first on this CPU (timed over %d linear layers, %d threads; %s=1 or 0 "
            "decides instead).",
            "run faster" if faster else "do not run faster",
            len(probed),
            key[0],
            ONE_ROW_WEIGHT_FIRST_VARIABLE,
        )
    return _one_row_weight_first[key]


def _weight_first_is_faster(
    linears: list[nn.Linear], rounds: int = 10, clock: Callable[[], float] = time.perf_counter
) -> bool:
    """
    Times one-row products over `linears`, in a forward's order, with either kernel in turn for `rounds` rounds, and
    compares each kernel's best round: another process on a core only ever adds time (and more to the kernel that uses
    every thread), so the best rounds are the kernels' own speed. Only a clear win (10%) replaces the standard kernel.
    """
    inputs = {linear.in_features: torch.ones(1, linear.in_features) for linear in linears}
    seconds = {"standard": [], "weight_first": []}
    with torch.no_grad():
        for _ in range(rounds):
            for kernel, timings in seconds.items():
                start = clock()
                for linear in linears:
                    if kernel == "standard":
                        nn.functional.linear(inputs[linear.in_features], linear.weight, linear.bias)
                    else:
                        few_row_linear(linear, inputs[linear.in_features], min_rows=1)
                timings.append(clock() - start)
    return min(seconds["weight_first"]) < 0.9 * min(seconds["standard"])


@contextmanager
def float16_one_row_products(module: nn.Module) -> Iterator[int]:
    """
    While active, and while `few_row_linears` is, the module's float32 linear layers on a CPU compute one-row products
    with float16 copies of their weights: a one-row product is memory-bound, so half the bytes take about half the time
    (the SmolLM2 head's layers: 1.43 -> 0.68 ms per draft step). Only for modules whose numbers choose drafts (the
    FastMTP head): the model verifies every draft in its own dtype, so output does not change. The copies are made on
    entry and dropped on exit, so they never go stale. Yields how many layers it applied to.
    """
    linears = [
        linear for linear in module.modules() if _is_cpu_float32_linear(linear) and FLOAT16_WEIGHT not in vars(linear)
    ]
    for linear in linears:
        setattr(linear, FLOAT16_WEIGHT, linear.weight.detach().to(torch.float16))
        setattr(linear, FLOAT16_BIAS, None if linear.bias is None else linear.bias.detach().to(torch.float16))
    try:
        yield len(linears)
    finally:
        for linear in linears:
            delattr(linear, FLOAT16_WEIGHT)
            delattr(linear, FLOAT16_BIAS)


@contextmanager
def native_gqa_attention(model: nn.Module) -> Iterator[bool]:
    """
    While active, SDPA attention of a model on a CPU computes grouped-query attention on the grouped key and value heads
    instead of copies of them, also under a mask (Transformers' `TRANSFORMERS_SDPA_FORCE_GQA`). SmolLM2-135M: a
    4-token verification forward after 800 cached tokens costs 1.08 one-token forwards instead of 1.23 (after 256:
    1.06 instead of 1.14), with bit-identical logits. The switch is process-wide while active, so it is left alone
    when the user set it, and it is only used when every weight is on a CPU and PyTorch has `enable_gqa` (2.5).
    Yields whether it applied.
    """
    applies = (
        FORCE_GQA_VARIABLE not in os.environ
        and is_torch_greater_or_equal("2.5")
        and all(parameter.device.type == "cpu" for parameter in model.parameters())
    )
    if applies:
        os.environ[FORCE_GQA_VARIABLE] = "1"
    try:
        yield applies
    finally:
        if applies:
            os.environ.pop(FORCE_GQA_VARIABLE, None)


@contextmanager
def cpu_verification_kernels(model: nn.Module) -> Iterator[None]:
    """Both of the above: what FastMTP verifies and drafts with, and the bench runs every mode but `ar-stock` with."""
    with few_row_linears(model), native_gqa_attention(model):
        yield


__all__ = ["cpu_verification_kernels", "few_row_linears", "native_gqa_attention", "one_row_products_weight_first"]
