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
tokens). PyTorch's CPU kernel takes the grouped heads as they are (`enable_gqa`) and computes the very same numbers;
for a few queries, folding each group's query heads into one head reads every key and value head once, not once per
query head (the same numbers to float32 rounding).

A draft step is a one-row forward of the head, memory-bound like any: its products read compact copies of the head's
weights and of the draft vocabulary's lm_head rows (`DraftWeight`): int8 rows with a scale each, where this CPU runs
PyTorch's int8 weight-only product at least as fast (timed once per process, `draft_weights_int8`), float16 copies
otherwise.
Drafts only choose what the model verifies in its own dtype, so the output does not change.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
import types
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
from transformers.utils import is_torch_greater_or_equal

from .transformers_compat import attn_implementation, set_attn_implementation_of_this_config

logger = logging.getLogger(__name__)

PADDED_ROWS = 4  # MKL's weight-first product is fastest at 4 columns; beyond them the standard kernel is as good
# The attention implementation (Transformers' `AttentionInterface`) that `native_gqa_attention` switches SDPA to.
GROUPED_QUERY_SDPA = "fastmtp_grouped_query_sdpa"
# Up to this many queries, `grouped_query_sdpa` folds a group's query heads into one: verification forwards (2-core
# AVX-512 EPYC: faster at 2-16 queries, the same at 32).
FOLDED_MAX_QUERIES = 16
# Model types whose modeling code reaches attention only through `AttentionInterface` (some others branch on the name
# "sdpa", and would change under another one): read, and tested. The others keep Transformers' SDPA attention.
GROUPED_QUERY_SDPA_MODEL_TYPES = frozenset({"gemma3_text", "llama", "mistral", "qwen2", "qwen3"})
# Folded masks kept by `_folded_additive_mask` (a forward has one per layer type).
FOLDED_MASKS_KEPT = 4
# Where `compact_draft_weights` keeps a layer's `DraftWeight` while it is active.
DRAFT_WEIGHT = "_fastmtp_draft_weight"
# A heuristic: more weights than most CPU caches hold, so that one-row products over them run at memory speed, as in
# a real model's forward (a CPU with a larger cache may time them cached, and keep the standard kernel).
MEMORY_BOUND_BYTES = 64 * 2**20
# "1" or "0": always or never compute one-row products weight-first, without timing them.
ONE_ROW_WEIGHT_FIRST_VARIABLE = "HF_FASTMTP_ONE_ROW_WEIGHT_FIRST"
# "int8" or "float16": the draft steps' weights, without timing them.
DRAFT_WEIGHTS_VARIABLE = "HF_FASTMTP_DRAFT_WEIGHTS"
# PyTorch's int8 weight-only CPU kernel reads rows with aligned vector loads: it computes wrong numbers, or crashes,
# unless they are a multiple of 16 long (AVX-512; 8 on AVX2) and start aligned (inputs get a fresh buffer).
INT8_ROW_MULTIPLE = 16
# int8 draft weights serve products of up to this many rows (draft steps); more rows (the head's pass over a prompt)
# keep the standard kernel, which is the faster one there on some CPUs.
INT8_MAX_ROWS = 16
# How many lm_head rows `draft_weights_int8` times with the head's weights: a draft vocabulary's (the shipped size).
DRAFT_VOCAB_ROWS = 8192
# (threads, probed weight shapes) -> whether one-row products are faster weight-first: timed once per process.
_one_row_weight_first: dict[tuple, bool] = {}
# (threads, head weight shapes) -> whether draft steps are faster on int8 weights: timed once per process.
_int8_draft_weights: dict[tuple, bool] = {}
# A head's linear layer -> the `DraftWeight` last made for it, and what from: reused while the weights are unchanged.
_draft_weights: weakref.WeakKeyDictionary[nn.Module, tuple[WeightSource, DraftWeight]] = weakref.WeakKeyDictionary()
# (id(mask), groups, dtype) -> (mask, folded additive mask): see `_folded_additive_mask`.
_folded_masks: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


class DraftWeight(NamedTuple):
    """
    A linear layer's weights as draft steps read them: weights used as they are, in their own dtype (`scales` None:
    float16 copies of float32 ones on a CPU, or a model's own rows elsewhere), or int8 rows with a bfloat16 scale
    each, for PyTorch's int8 weight-only product (activations in bfloat16).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    scales: torch.Tensor | None = None

    @property
    def is_int8(self) -> bool:
        return self.scales is not None

    @classmethod
    def compact(cls, weight: torch.Tensor, bias: torch.Tensor | None, int8: bool) -> DraftWeight:
        """int8 rows (symmetric, one scale per output row) or float16 copies of float32 weights."""
        weight = weight.detach()
        bias = None if bias is None else bias.detach()
        if not int8:
            return cls(weight.to(torch.float16), None if bias is None else bias.to(torch.float16))
        # Rounded to bfloat16 first, so that the rows are quantized with the very scales the product multiplies by.
        scales = (weight.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.bfloat16).tiny).to(torch.bfloat16)
        rows = torch.round(weight / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(rows, None if bias is None else bias.to(torch.bfloat16), scales)


class WeightSource:
    """
    The weights a copy was made from, as they were: the copy is current while a layer still holds these tensors with
    the same storage, dtype, device and version. A reload gives new tensors, `.to()` new storage, and an in-place
    update (an optimizer step, `load_state_dict`) a new version. Writes through `.data` bypass the version counter and
    go unseen: a copy made before them only drafts worse (verification keeps the output exact) until the tensors are
    replaced. Weights without a version (made under `inference_mode`) never match: their copies are made every time.
    """

    def __init__(self, *tensors: torch.Tensor | None):
        # Weak references: a cached copy must not keep weights the model has replaced alive.
        self.tensors = tuple(None if tensor is None else weakref.ref(tensor) for tensor in tensors)
        self.state = self._state(tensors)

    def matches(self, *tensors: torch.Tensor | None) -> bool:
        return (
            self.state is not None
            and len(tensors) == len(self.tensors)
            and all(
                (tensor is None) == (source is None) and (source is None or source() is tensor)
                for tensor, source in zip(tensors, self.tensors)
            )
            and self._state(tensors) == self.state
        )

    @staticmethod
    def _state(tensors: tuple[torch.Tensor | None, ...]) -> tuple | None:
        try:
            return tuple(
                None if tensor is None else (tensor._version, tensor.data_ptr(), tensor.dtype, tensor.device)
                for tensor in tensors
            )
        except RuntimeError:  # an inference tensor keeps no version
            return None


def draft_linear(input: torch.Tensor, draft: DraftWeight) -> torch.Tensor:
    """`input @ W.T + b` with a `DraftWeight`, returned in the input's dtype."""
    if not draft.is_int8:
        return nn.functional.linear(input.to(draft.weight.dtype), draft.weight, draft.bias).to(input.dtype)
    *leading, in_features = input.shape
    # Always a fresh (aligned) buffer, also for an input that is already a bfloat16 view.
    flat = input.reshape(-1, in_features).to(torch.bfloat16, memory_format=torch.contiguous_format, copy=True)
    output = torch._weight_int8pack_mm(flat, draft.weight, draft.scales)
    if draft.bias is not None:
        output += draft.bias
    return output.view(*leading, draft.weight.shape[0]).to(input.dtype)


def few_row_linear(self: nn.Linear, input: torch.Tensor, min_rows: int = 2) -> torch.Tensor:
    # Called ~200 times per forward, so its own overhead counts: sparing a slice and a reshape took ~3 ms off a pass.
    *leading, in_features = input.shape
    rows = math.prod(leading)
    # int8 draft weights serve draft steps of up to INT8_MAX_ROWS rows (the first step of a cycle extends the head's
    # cache over the accepted drafts); float16 ones, one-row products.
    if (draft := vars(self).get(DRAFT_WEIGHT)) is not None and (
        rows == 1 or (draft.is_int8 and rows <= INT8_MAX_ROWS)
    ):
        return draft_linear(input, draft)
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


def is_cpu_float32(tensor: torch.Tensor) -> bool:
    """The weights these kernels apply to: float32 on a CPU."""
    return tensor.device.type == "cpu" and tensor.dtype == torch.float32


def _is_cpu_float32_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear and is_cpu_float32(module.weight)


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
        if _is_cpu_float32_linear(module) and DRAFT_WEIGHT not in vars(module):
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
    """Whether one-row products over `linears` are clearly (10%) faster weight-first (`_best_rounds`)."""
    inputs = {linear.in_features: torch.ones(1, linear.in_features) for linear in linears}

    def standard():
        for linear in linears:
            nn.functional.linear(inputs[linear.in_features], linear.weight, linear.bias)

    def weight_first():
        for linear in linears:
            few_row_linear(linear, inputs[linear.in_features], min_rows=1)

    seconds = _best_rounds({"standard": standard, "weight_first": weight_first}, rounds, clock)
    return seconds["weight_first"] < 0.9 * seconds["standard"]


def _best_rounds(
    kernels: dict[str, Callable[[], None]],
    rounds: int,
    clock: Callable[[], float],
    before_each: Callable[[], object] | None = None,
) -> dict[str, float]:
    """
    Times each kernel in turn for `rounds` rounds (after `before_each`, untimed) and returns each one's best round:
    another process on a core only ever adds time (and more to a kernel that uses every thread), so the best rounds
    are the kernels' own speed.
    """
    seconds = {name: math.inf for name in kernels}
    with torch.no_grad():
        for _ in range(rounds):
            for name, kernel in kernels.items():
                if before_each is not None:
                    before_each()
                start = clock()
                kernel()
                seconds[name] = min(seconds[name], clock() - start)
    return seconds


def draft_weights_int8(head: nn.Module, lm_head: nn.Module | None = None) -> bool:
    """
    Whether draft steps read int8 weights (`DraftWeight`) rather than float16 copies: the head's, and the rows of the
    model's `lm_head` that a draft vocabulary keeps. Both are memory-bound one-row products; PyTorch's int8
    weight-only kernel reads half the bytes, and where PyTorch runs its AVX-512 version it computes faster too (a
    2-core AVX-512 EPYC: SmolLM2's head and 8192 draft rows 0.67 -> 0.39 ms per draft step, cold); its AVX2 version
    does not, cold. Timed once per process, thread count and shapes, unless `HF_FASTMTP_DRAFT_WEIGHTS` is int8 or
    float16.
    """
    weights = [(linear.weight, linear.bias) for linear in head.modules() if type(linear) is nn.Linear]
    if lm_head is not None:  # a draft vocabulary's worth of its rows
        rows = slice(0, DRAFT_VOCAB_ROWS)
        bias = getattr(lm_head, "bias", None)
        weights.append((lm_head.weight[rows], None if bias is None else bias[rows]))
    if (setting := os.environ.get(DRAFT_WEIGHTS_VARIABLE)) is not None:
        if setting not in ("int8", "float16"):
            raise ValueError(f"{DRAFT_WEIGHTS_VARIABLE} must be int8 or float16 (or unset: timed), got {setting!r}.")
        return setting == "int8" and _int8_product_applies(weights)
    if not _int8_product_applies(weights):
        return False
    key = (torch.get_num_threads(), tuple(weight.shape for weight, _ in weights))
    if key not in _int8_draft_weights:
        try:
            faster = _int8_is_faster(weights)
        except (NotImplementedError, RuntimeError):  # a PyTorch build without the kernel for this CPU
            faster = False
        _int8_draft_weights[key] = faster
        logger.info("Draft steps use %s weights on this CPU (timed).", "int8" if faster else "float16")
    return _int8_draft_weights[key]


def _int8_product_applies(weights: list[tuple[torch.Tensor, torch.Tensor | None]]) -> bool:
    """float32 weights on a CPU whose rows all suit PyTorch's int8 weight-only kernel."""
    return (
        hasattr(torch, "_weight_int8pack_mm")
        and bool(weights)
        and all(is_cpu_float32(weight) and _int8_kernel_takes(weight) for weight, _ in weights)
    )


def _int8_kernel_takes(weight: torch.Tensor) -> bool:
    """Rows the int8 kernel reads right: a multiple of `INT8_ROW_MULTIPLE` long."""
    return weight.shape[1] % INT8_ROW_MULTIPLE == 0


def _int8_is_faster(
    weights: list[tuple[torch.Tensor, torch.Tensor | None]],
    rounds: int = 10,
    clock: Callable[[], float] = time.perf_counter,
) -> bool:
    """
    Whether one-row products with `weights` are at least as fast in int8 as in float16 copies, timed cold (a cycle's
    first draft step reads them after the verification forward streamed the model through the caches). At least as
    fast is enough: int8 also serves the first step's 2-4 rows, where float16 copies cannot and float32 is slower.
    """
    copies = {int8: [DraftWeight.compact(weight, bias, int8) for weight, bias in weights] for int8 in (False, True)}
    inputs = {weight.shape[1]: torch.ones(1, weight.shape[1]) for weight, _ in weights}
    other_memory = torch.empty(MEMORY_BOUND_BYTES // 4)

    def kernel(int8: bool) -> Callable[[], None]:
        return lambda: [draft_linear(inputs[draft.weight.shape[1]], draft) for draft in copies[int8]]

    seconds = _best_rounds(
        {"float16": kernel(False), "int8": kernel(True)}, rounds, clock, before_each=lambda: other_memory.fill_(0.0)
    )
    return seconds["int8"] <= seconds["float16"]


@contextmanager
def compact_draft_weights(head: nn.Module, int8: bool) -> Iterator[int]:
    """
    While active, and while `few_row_linears` is, the head's float32 linear layers on a CPU compute with compact
    copies of their weights (`DraftWeight`): with `int8` (`draft_weights_int8`), int8 ones for draft steps (up to
    `INT8_MAX_ROWS` rows); otherwise float16 ones for one-row products (a one-row product is memory-bound: half the
    bytes, about half the time; the SmolLM2 head's layers: 1.43 -> 0.68 ms per draft step). Only for modules whose
    numbers choose drafts (the FastMTP head): the model verifies every draft in its own dtype, so output does not
    change. The copies are kept between calls while the weights are unchanged (`WeightSource`: int8 ones take ~7 ms
    to make for SmolLM2's head). Yields how many layers it applied to.
    """
    linears = [
        linear for linear in head.modules() if _is_cpu_float32_linear(linear) and DRAFT_WEIGHT not in vars(linear)
    ]
    for linear in linears:
        # A row length the int8 kernel cannot take gets a float16 copy, whatever was asked.
        layer_int8 = int8 and _int8_kernel_takes(linear.weight)
        setattr(linear, DRAFT_WEIGHT, _draft_weight(linear, layer_int8))
    try:
        yield len(linears)
    finally:
        for linear in linears:
            delattr(linear, DRAFT_WEIGHT)


def _draft_weight(linear: nn.Linear, int8: bool) -> DraftWeight:
    """The layer's `DraftWeight` in the format asked for: the last one made, unless the weights have changed since."""
    cached = _draft_weights.get(linear)
    if cached is None or not cached[0].matches(linear.weight, linear.bias) or cached[1].is_int8 != int8:
        cached = WeightSource(linear.weight, linear.bias), DraftWeight.compact(linear.weight, linear.bias, int8)
        _draft_weights[linear] = cached
    return cached[1]


def grouped_query_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """
    Transformers' SDPA attention, computed on a CPU on the grouped key and value heads as they are (see
    `native_gqa_attention`). Anything else (no grouped heads, no boolean mask shared by the heads, dropout, a position
    bias or a softcap) is left to Transformers' own SDPA attention.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    num_queries = query.shape[2]
    if (
        groups == 1
        or query.device.type != "cpu"
        or torch.compiler.is_compiling()  # (the folded masks are cached by identity)
        or attention_mask is None
        or attention_mask.dtype != torch.bool
        or attention_mask.shape[1:3] != (1, num_queries)
        or dropout
        or kwargs.get("position_bias") is not None
        or kwargs.get("softcap") is not None
    ):
        return ALL_ATTENTION_FUNCTIONS["sdpa"](
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if 1 < num_queries <= FOLDED_MAX_QUERIES:
        # Query head j of key/value head h is head h * groups + j: folding the groups into the query axis gives each
        # key/value head groups * num_queries rows (row j * num_queries + i), which read its keys and values once.
        query = query.reshape(query.shape[0], key.shape[1], groups * num_queries, query.shape[-1])
        output = nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=_folded_additive_mask(attention_mask, groups, query.dtype), scale=scaling
        )
    else:
        output = nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=True
        )
    # The batch comes from the output: SDPA broadcasts a batch-1 query or mask.
    return output.reshape(output.shape[0], -1, num_queries, value.shape[-1]).transpose(1, 2).contiguous(), None


def _folded_additive_mask(mask: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """
    A (batch, 1, num_queries, keys) boolean mask for the folded query rows, as an additive mask (which PyTorch's CPU
    kernel applies faster). Every layer of a forward gets the same mask object (one per layer type), so it is made
    once per forward, not once per layer.
    """
    cache_key = (id(mask), groups, dtype)
    if (cached := _folded_masks.get(cache_key)) is not None:
        return cached[1]
    folded = torch.zeros(mask.shape[0], 1, groups * mask.shape[2], mask.shape[3], dtype=dtype, device=mask.device)
    folded.masked_fill_(~mask.repeat(1, 1, groups, 1), float("-inf"))
    if len(_folded_masks) >= FOLDED_MASKS_KEPT:
        _folded_masks.clear()
    _folded_masks[cache_key] = (mask, folded)  # holding the mask keeps its id from going to another one meanwhile
    return folded


def _sdpa_mask(*args, **kwargs) -> torch.Tensor | None:
    """`grouped_query_sdpa` takes SDPA's masks: whatever function is registered for "sdpa" when the mask is made."""
    return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](*args, **kwargs)


AttentionInterface.register(GROUPED_QUERY_SDPA, grouped_query_sdpa)
AttentionMaskInterface.register(GROUPED_QUERY_SDPA, _sdpa_mask)


@contextmanager
def native_gqa_attention(model: nn.Module) -> Iterator[bool]:
    """
    While active, the SDPA attention of a CPU model with grouped-query attention runs `grouped_query_sdpa`: attention
    on the grouped key and value heads as they are. Transformers' SDPA path (before 5.23, or without
    `TRANSFORMERS_SDPA_FORCE_GQA`) first copies every key and value head once per query head in its group whenever
    a mask is given, which a K+1-token verification forward with a cache always has: the whole KV cache, in every
    layer. PyTorch's CPU kernel takes the grouped heads as they are (`enable_gqa`), and for a few queries (up to
    `FOLDED_MAX_QUERIES`: verification forwards) each group's query heads fold into one head of groups x queries
    rows, so that the kernel reads each key and value head once rather than once per query head. SmolLM2-135M, 900
    cached tokens: attention over 4 queries 136 -> 113 us per layer, a verification forward 31.6 -> 30.2 ms (2
    threads). The logits agree to float32 rounding.

    The switch is the attention implementation of the configs of the model's attention layers (the head's too):
    those that ask for "sdpa", of a model type in `GROUPED_QUERY_SDPA_MODEL_TYPES`, when every weight is on a CPU and
    PyTorch has `enable_gqa` (2.5). On exit each is restored, unless something else set it meanwhile. Yields whether
    it applied.
    """
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if (
            getattr(module, "num_key_value_groups", 1) > 1
            and getattr(config, "model_type", None) in GROUPED_QUERY_SDPA_MODEL_TYPES
            and attn_implementation(config) == "sdpa"
        ):
            configs[id(config)] = config
    applies = (
        bool(configs)
        and is_torch_greater_or_equal("2.5")
        and all(parameter.device.type == "cpu" for parameter in model.parameters())
    )
    if applies:
        for config in configs.values():
            set_attn_implementation_of_this_config(config, GROUPED_QUERY_SDPA)
    try:
        yield applies
    finally:
        if applies:
            for config in configs.values():
                if attn_implementation(config) == GROUPED_QUERY_SDPA:
                    set_attn_implementation_of_this_config(config, "sdpa")
            _folded_masks.clear()


@contextmanager
def cpu_verification_kernels(model: nn.Module) -> Iterator[None]:
    """Both of the above: what FastMTP verifies and drafts with, and the bench runs every mode but `ar-stock` with."""
    with few_row_linears(model), native_gqa_attention(model):
        yield


__all__ = [
    "DraftWeight",
    "WeightSource",
    "compact_draft_weights",
    "cpu_verification_kernels",
    "draft_linear",
    "draft_weights_int8",
    "few_row_linears",
    "grouped_query_sdpa",
    "is_cpu_float32",
    "native_gqa_attention",
    "one_row_products_weight_first",
]
