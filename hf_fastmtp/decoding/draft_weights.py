"""
Compact copies of weights for draft steps, and copies of weights kept while the weights they came from are unchanged.

A draft step is a one-row forward of the head plus the draft vocabulary's lm_head rows: memory-bound products whose
cost is reading the weights. On a CPU they can read compact copies (`DraftWeight`): int8 rows with a scale each, or
float16 copies, whichever calibration measured faster. Drafts only choose what the model verifies in its own dtype, so
the output does not change.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import torch
from torch import nn

# PyTorch's int8 weight-only CPU kernel reads rows with aligned vector loads: it computes wrong numbers, or crashes,
# unless they are a multiple of 16 long (AVX-512; 8 on AVX2) and start aligned (inputs get a fresh buffer).
INT8_ROW_MULTIPLE = 16
# int8 draft weights serve products of up to this many rows (draft steps, and the first step of a cycle, which extends
# the head's cache over the accepted drafts); more rows (the head's pass over a prompt) keep the layer's own kernel.
INT8_MAX_ROWS = 16
# The formats a draft step's weights can take: the layer's own ("native"), float16 copies, int8 rows.
DRAFT_WEIGHT_FORMATS = ("native", "float16", "int8")

Copy = TypeVar("Copy")


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
    def compact(cls, weight: torch.Tensor, bias: torch.Tensor | None, weight_format: str) -> DraftWeight:
        """The weights in `weight_format`: as they are, float16 copies, or int8 rows (one symmetric scale each)."""
        if weight_format not in DRAFT_WEIGHT_FORMATS:
            raise ValueError(f"Unknown draft weight format {weight_format!r}: one of {DRAFT_WEIGHT_FORMATS}.")
        weight = weight.detach()
        bias = None if bias is None else bias.detach()
        if weight_format == "native" or (weight_format == "int8" and not int8_kernel_takes(weight)):
            # (a row length the int8 kernel cannot take gets the float16 copy instead)
            return cls(weight, bias) if weight_format == "native" else cls.compact(weight, bias, "float16")
        if weight_format == "float16":
            return cls(weight.to(torch.float16), None if bias is None else bias.to(torch.float16))
        # Rounded to bfloat16 first, so that the rows are quantized with the very scales the product multiplies by.
        scales = (weight.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.bfloat16).tiny).to(torch.bfloat16)
        rows = torch.round(weight / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(rows, None if bias is None else bias.to(torch.bfloat16), scales)

    def serves(self, rows: int) -> bool:
        """Whether a product over `rows` rows reads this copy: float16 ones serve one row, int8 ones a few."""
        return rows == 1 or (self.is_int8 and rows <= INT8_MAX_ROWS)


def int8_kernel_takes(weight: torch.Tensor) -> bool:
    """Rows the int8 kernel reads right: a multiple of `INT8_ROW_MULTIPLE` long, float32 on a CPU."""
    return (
        hasattr(torch, "_weight_int8pack_mm")
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and weight.shape[-1] % INT8_ROW_MULTIPLE == 0
    )


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


class WeightCopies:
    """
    Copies derived from linear layers' weights (compact draft weights, prepacked weights), one per layer and kind,
    kept while the layer's weights are unchanged (`WeightSource`) and dropped with the layer.
    """

    def __init__(self):
        self._copies: weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[WeightSource, object]]] = (
            weakref.WeakKeyDictionary()
        )

    def get(self, linear: nn.Module, kind: str, make: Callable[[torch.Tensor, torch.Tensor | None], Copy]) -> Copy:
        """The layer's copy of `kind`: the last one made, unless the weights have changed since."""
        copies = self._copies.setdefault(linear, {})
        cached = copies.get(kind)
        if cached is None or not cached[0].matches(linear.weight, linear.bias):
            cached = copies[kind] = WeightSource(linear.weight, linear.bias), make(linear.weight, linear.bias)
        return cached[1]


__all__ = [
    "DRAFT_WEIGHT_FORMATS",
    "INT8_MAX_ROWS",
    "DraftWeight",
    "WeightCopies",
    "WeightSource",
    "draft_linear",
    "int8_kernel_takes",
]
