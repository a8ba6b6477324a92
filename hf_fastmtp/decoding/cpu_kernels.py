"""
The kernels FastMTP computes with on a CPU: for every linear layer shape and row count, and for attention at every
query count, the one calibration measured fastest on this machine (`calibration.py`), Transformers' own included.

Why there is a choice at all: a FastMTP cycle verifies K drafts with one base forward over K+1 tokens. On a GPU that
costs about what a one-token forward does; on a CPU it depends on the BLAS kernel and the CPU. `x @ W.T` over one row
is a matrix-vector product at memory speed; over 2-4 rows PyTorch's float32 kernel may take 2-3x as long (a 2-core AMD
EPYC), or not (a 2-core Intel Xeon). The candidates compute the same arithmetic in another order, so their outputs
agree to float32 rounding, like those of any two BLAS kernels:

- "stock": `F.linear`, what Transformers runs.
- "weight_first": `W @ x.T` with x padded to 4 rows, made contiguous: about the cost of one row on some CPUs.
- "prepacked": oneDNN's linear on weights reordered once into its blocked layout (what Inductor's CPU path uses):
  nearly flat from 1 to 8 rows on some CPUs. It keeps a copy of the layer's weights.

Attention has the same kind of choice. For grouped-query attention, Transformers' SDPA path first copies every key and
value head `num_key_value_groups` times whenever a mask is given, which a verification forward with a cache always
has. "grouped" attention takes the grouped heads as they are (`enable_gqa`), and for a few queries folds each group's
query heads into one head, so that the kernel reads each key and value head once (the same numbers to float32
rounding).

`CPUKernels` applies a `KernelChoice` to a model while a `generate` call runs, by wrapping: each float32 `nn.Linear`
is replaced in its parent by a `CalibratedLinear` holding the very same parameters, and the attention layers' configs
name the grouped attention function; on exit the original modules and configs are back.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
from transformers.utils import is_torch_greater_or_equal

from .draft_weights import DraftWeight, WeightCopies, draft_linear
from .transformers_compat import attn_implementation, set_attn_implementation_of_this_config

LINEAR_KERNELS = ("stock", "weight_first", "prepacked")
# The row counts a layer's kernel choice has an entry for: a verification's 1..8 positions, then what batches reach
# (B rows decoding, B x (K + 1) verifying); an entry serves the row counts above the one before it, up to its own.
# More rows than the last (a prefill): Transformers' kernel.
KERNEL_ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, 64)
PADDED_ROWS = 4  # the weight-first product pads fewer rows to 4 columns, where MKL's kernel is fastest
# The attention implementations (Transformers' `AttentionInterface`) `CPUKernels` registers are named this, plus the
# query counts they serve.
GROUPED_ATTENTION = "fastmtp_grouped_sdpa"
# Up to this many queries, grouped attention folds a group's query heads into one: verification forwards.
FOLDED_MAX_QUERIES = 16
# Model types whose modeling code reaches attention only through `AttentionInterface` (some others branch on the name
# "sdpa", and would change under another one): read, and tested. The others keep Transformers' SDPA attention.
GROUPED_ATTENTION_MODEL_TYPES = frozenset({"gemma3_text", "llama", "mistral", "qwen2", "qwen3"})
# Folded masks kept by `_folded_additive_mask` (a forward has one per layer type).
FOLDED_MASKS_KEPT = 4
# Weight copies made for the kernels (prepacked, compact draft weights): kept while the weights are unchanged.
WEIGHT_COPIES = WeightCopies()
# (id(mask), groups, dtype) -> (mask, folded additive mask): see `_folded_additive_mask`.
_folded_masks: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def shape_name(weight: torch.Tensor) -> str:
    """A linear layer's shape as calibration tables name it: "out x in"."""
    return f"{weight.shape[0]}x{weight.shape[1]}"


@dataclass(frozen=True)
class KernelChoice:
    """
    Which kernel each product takes on this machine: `linear` maps a layer shape (`shape_name`) to a kernel per entry
    of `KERNEL_ROWS` (entries not listed: "stock"); grouped attention serves the query counts listed; draft steps read
    their weights in `draft_weights` (`DraftWeight`). The default chooses Transformers' own kernels everywhere.
    """

    linear: dict[str, tuple[str, ...]] = field(default_factory=dict)
    grouped_attention_queries: tuple[int, ...] = ()
    draft_weights: str = "native"

    def linear_kernels(self, weight: torch.Tensor) -> tuple[str, ...]:
        return self.linear.get(shape_name(weight), ())


def is_cpu_float32(tensor: torch.Tensor) -> bool:
    """The weights these kernels apply to: float32 on a CPU."""
    return tensor.device.type == "cpu" and tensor.dtype == torch.float32


def prepacking_available() -> bool:
    """Whether this PyTorch build has oneDNN's prepacked linear (`torch.ops.mkldnn`)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def prepack(weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The weights in oneDNN's blocked layout, for `linear_product(..., "prepacked")` (the bias is used as it is:
    `bias` is there for `WeightCopies.get`, which passes both)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PADDED_ROWS)


def linear_product(
    kernel: str,
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    packed: torch.Tensor | None = None,
) -> torch.Tensor:
    """`input @ weight.T + bias` with one of `LINEAR_KERNELS`."""
    if kernel == "prepacked":
        return torch.ops.mkldnn._linear_pointwise(input, packed, bias, "none", [], "")
    if kernel != "weight_first":
        return nn.functional.linear(input, weight, bias)
    *leading, in_features = input.shape
    rows = math.prod(leading)
    flat = input.reshape(rows, in_features)
    if rows < PADDED_ROWS:
        output = torch.mm(weight, nn.functional.pad(flat, (0, 0, 0, PADDED_ROWS - rows)).t())[:, :rows]
    else:  # (K=3's four-row verification: no padding copy, no slice)
        output = torch.mm(weight, flat.t())
    # A contiguous result: the transposed view would make every later element-wise op slower than the product saved.
    output = output.t().contiguous()
    if bias is not None:
        output += bias
    return output.view(*leading, weight.shape[0])


class CalibratedLinear(nn.Linear):
    """
    A linear layer's parameters (the same tensors) with a kernel per row count: one per entry of `KERNEL_ROWS`,
    Transformers' `F.linear` beyond them. `draft_weight`, on the head's layers, serves the products it can
    (`DraftWeight.serves`).
    """

    def __init__(
        self,
        linear: nn.Linear,
        kernels: tuple[str, ...],
        packed: torch.Tensor | None = None,
        draft_weight: DraftWeight | None = None,
    ):
        nn.Module.__init__(self)  # (not nn.Linear's: the parameters are the wrapped layer's own)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_parameter("weight", linear.weight)
        self.register_parameter("bias", linear.bias)
        self.wrapped = [linear]  # (a list: not registered as a submodule, so the state dict keeps its keys)
        # Row count -> kernel, looked up by index (a forward makes ~200 products).
        self.kernel_by_rows = ["stock"] + [
            kernels[entry] if entry < len(kernels) else "stock"
            for entry, (fewest, most) in enumerate(zip((0, *KERNEL_ROWS), KERNEL_ROWS))
            for _ in range(fewest + 1, most + 1)
        ]
        self.packed = packed
        self.draft_weight = draft_weight

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # Called ~200 times per forward: its own overhead counts.
        rows = input.numel() // self.in_features
        if self.draft_weight is not None and self.draft_weight.serves(rows):
            return draft_linear(input, self.draft_weight)
        kernel = self.kernel_by_rows[rows] if rows < len(self.kernel_by_rows) else "stock"
        return linear_product(kernel, input, self.weight, self.bias, self.packed)


class CPUKernels:
    """
    Applies a `KernelChoice` to `model` while entered (once per `generate` call): its float32 linear layers on a CPU
    are wrapped in `CalibratedLinear`s (those under `draft_modules`, the head, also get compact draft weights), and
    the SDPA attention of its grouped-query layers switches to grouped attention at the chosen query counts. Layers
    with hooks (accelerate's offloading) are left alone. Everything is restored on exit, even on error.
    """

    def __init__(
        self,
        model: nn.Module,
        choice: KernelChoice,
        draft_modules: nn.Module | None = None,
        copies: WeightCopies = WEIGHT_COPIES,
    ):
        self.model = model
        self.choice = choice
        self.draft_modules = draft_modules
        self.copies = copies
        self._wrapped: list[tuple[nn.Module, str, nn.Linear]] = []
        self._switched: list = []

    def __enter__(self) -> CPUKernels:
        try:
            self._wrap_linears()
            self._switch_attention()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wrap_linears(self) -> None:
        drafting = {id(module) for module in self.draft_modules.modules()} if self.draft_modules is not None else set()
        for parent, name, linear in list(_plain_linears(self.model)):
            draft_weight = None
            if id(linear) in drafting and self.choice.draft_weights != "native":
                draft_weight = self.draft_weight(linear)
            kernels = self.choice.linear_kernels(linear.weight)
            if not kernels and draft_weight is None:
                continue
            packed = self.copies.get(linear, "prepacked", prepack) if "prepacked" in kernels else None
            setattr(parent, name, CalibratedLinear(linear, kernels, packed, draft_weight))
            self._wrapped.append((parent, name, linear))

    def _switch_attention(self) -> None:
        if self.choice.grouped_attention_queries and is_torch_greater_or_equal("2.5"):
            implementation = register_grouped_attention(self.choice.grouped_attention_queries)
            for config in _grouped_sdpa_configs(self.model):
                set_attn_implementation_of_this_config(config, implementation)
                self._switched.append((config, implementation))

    def __exit__(self, *exc_info) -> None:
        for parent, name, linear in reversed(self._wrapped):
            setattr(parent, name, linear)
        for config, implementation in self._switched:
            if attn_implementation(config) == implementation:  # unless something else set it meanwhile
                set_attn_implementation_of_this_config(config, "sdpa")
        self._wrapped, self._switched = [], []
        _folded_masks.clear()

    def draft_weight(self, linear: nn.Module) -> DraftWeight:
        """The layer's compact copy in the chosen format, kept between calls while its weights are unchanged."""
        weight_format = self.choice.draft_weights
        return self.copies.get(
            linear, f"draft-{weight_format}", lambda weight, bias: DraftWeight.compact(weight, bias, weight_format)
        )


def _plain_linears(model: nn.Module):
    """
    (parent, attribute, layer) for the float32 `nn.Linear` layers on a CPU under `model`, without hooks (accelerate's
    included: they replace `forward`).
    """
    for parent in model.modules():
        for name, child in parent.named_children():
            if (
                type(child) is nn.Linear
                and is_cpu_float32(child.weight)
                and not (child._forward_hooks or child._forward_pre_hooks or hasattr(child, "_hf_hook"))
            ):
                yield parent, name, child


def _grouped_sdpa_configs(model: nn.Module) -> list:
    """The configs of the model's grouped-query SDPA attention layers (the head's too) of a type read and tested."""
    if not all(parameter.device.type == "cpu" for parameter in model.parameters()):
        return []
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if (
            getattr(module, "num_key_value_groups", 1) > 1
            and getattr(config, "model_type", None) in GROUPED_ATTENTION_MODEL_TYPES
            and attn_implementation(config) == "sdpa"
        ):
            configs[id(config)] = config
    return list(configs.values())


def grouped_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    *,
    queries: frozenset[int] = frozenset(),
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """
    Transformers' SDPA attention, computed on a CPU on the grouped key and value heads as they are, for `queries`
    query counts. Anything else (other query counts, no grouped heads, no boolean mask shared by the heads, dropout,
    a position bias or a softcap) is left to Transformers' own SDPA attention.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    num_queries = query.shape[2]
    if (
        num_queries not in queries
        or groups == 1
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
    """Grouped attention takes SDPA's masks: whatever function is registered for "sdpa" when the mask is made."""
    return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](*args, **kwargs)


def register_grouped_attention(queries: tuple[int, ...]) -> str:
    """Registers grouped attention for these query counts with Transformers (once) and returns its name."""
    name = f"{GROUPED_ATTENTION}_{'_'.join(map(str, sorted(queries)))}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, functools.partial(grouped_attention, queries=frozenset(queries)))
        AttentionMaskInterface.register(name, _sdpa_mask)
    return name


__all__ = [
    "KERNEL_ROWS",
    "LINEAR_KERNELS",
    "CPUKernels",
    "CalibratedLinear",
    "KernelChoice",
    "grouped_attention",
    "is_cpu_float32",
    "linear_product",
    "prepack",
    "prepacking_available",
    "register_grouped_attention",
    "shape_name",
]
