"""
Prefill in groups: a batch's prompts forwarded in groups of similar length where that is measured cheaper.

A left-padded batch of B prompts is B x (longest prompt) slots, and plain `generate()` forwards every one of them,
padding included: 16 Spec-Bench prompts make 12,304 slots for 3,381 tokens. Where a forward's cost grows with its
positions (a CPU), forwarding the prompts in groups of similar length skips most of that padding; where it hardly
grows (a GPU at these sizes), one padded forward is cheapest. The groups are chosen from the calibration's measured
cost of a forward over n positions (`Calibration.prefill_seconds`), and each group's cache and outputs are put back
where the padded forward would have left them, so that decoding goes on unchanged (padding is masked):

```
padded batch       groups (sorted by length)          back in the batch's layout
p p p a a          group 1: a a    (rows 0, 2)        0 0 0 a a
b b b b b                   c c                       b b b b b
p p p c c          group 2: b b b b b (rows 1, 3)     0 0 0 c c
p d d d d                   p d d d d                 p d d d d
```
(`p`: padding computed in a group's forward; `0`: padding never computed, masked.)
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .candidate_generator import positions_of
from .transformers_compat import cache_keyword, layer_states

# Positions at which the calibration times a forward from an empty cache.
PREFILL_POSITIONS = (16, 64, 256)
# Groups are formed only where their forwards are estimated at least this much cheaper than the padded one.
GROUPING_MARGIN = 0.03

ForwardCost = Callable[[int], float]


def forward_cost(seconds: Sequence[float], positions: Sequence[int] = PREFILL_POSITIONS) -> ForwardCost:
    """
    Seconds for a forward over n positions, from forwards timed at `positions`: the first timing below them (a
    forward costs at least a small one's), linear between them and on past the last one. Timings are taken as
    non-decreasing (noise must not make a longer forward look cheaper).
    """
    seconds = list(itertools.accumulate(seconds, max))

    def cost(n: int) -> float:
        if n <= positions[0]:
            return seconds[0]
        right = min(bisect.bisect_left(positions, n), len(positions) - 1)
        slope = (seconds[right] - seconds[right - 1]) / (positions[right] - positions[right - 1])
        return seconds[right - 1] + slope * (n - positions[right - 1])

    return cost


def prompt_spans(attention_mask: torch.Tensor) -> list[int]:
    """Each left-padded row's slots from its first real token on (a masked slot inside a prompt stays inside)."""
    return (attention_mask.shape[1] - attention_mask.int().argmax(-1)).tolist()


@dataclass
class PrefillPlan:
    """The forwards of a batch's prefill: the rows of each one and its length (the longest of its prompts)."""

    groups: list[list[int]]
    widths: list[int]

    @property
    def num_positions(self) -> int:
        """The positions the forwards compute, padding included."""
        return sum(len(rows) * width for rows, width in zip(self.groups, self.widths))


def plan_prefill(lengths: Sequence[int], width: int, cost: ForwardCost) -> PrefillPlan | None:
    """
    The grouping of rows (prompt lengths `lengths`, padded to `width` slots) whose padded forwards cost least in all,
    a group's forward costing `cost(rows x its longest length)`; None where it is not estimated `GROUPING_MARGIN`
    cheaper than one forward over every slot. Groups are runs of rows sorted by length (with a cost that grows with
    positions, the best grouping is among those), found by dynamic programming over where each run ends.
    """
    order = sorted(range(len(lengths)), key=lambda row: lengths[row])
    best = [0.0] + [math.inf] * len(order)  # best[end]: the cheapest grouping of order[:end]
    start = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        longest = lengths[order[end - 1]]
        for first in range(end):
            total = best[first] + cost((end - first) * longest)
            if total < best[end]:
                best[end], start[end] = total, first
    if best[-1] >= (1 - GROUPING_MARGIN) * cost(len(lengths) * width):
        return None
    groups, widths, end = [], [], len(order)
    while end:
        groups.append(sorted(order[start[end] : end]))
        widths.append(lengths[order[end - 1]])
        end = start[end]
    return PrefillPlan(groups[::-1], widths[::-1])


def grouped_prefill(
    base: torch.nn.Module,
    plan: PrefillPlan,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
    cache: DynamicCache,
    forward_options: dict,
) -> CausalLMOutputWithPast:
    """
    The padded batch's prefill, forwarded group by group (with the loop's `forward_options`, each group with a cache
    of its own): fills the empty `cache` and returns the last position's logits and every position's hidden states,
    each row where the padded forward would have put them.
    """
    batch_size, width = input_ids.shape
    cache_name = cache_keyword(base.forward)
    options = {name: value for name, value in forward_options.items() if name != cache_name}
    logits, hidden_states, states = None, [], []
    for group, group_width in zip(plan.groups, plan.widths):
        rows = torch.tensor(group)  # (a CPU index serves tensors on every device of a model split across several)
        group_mask = attention_mask[rows, width - group_width :]
        group_cache = DynamicCache()
        outputs = base(
            input_ids=input_ids[rows, width - group_width :],
            attention_mask=group_mask,
            position_ids=positions_of(group_mask, 0, group_width, input_ids.device),
            use_cache=True,
            logits_to_keep=1,
            **options,
            **{cache_name: group_cache},
        )
        logits = placed(logits, outputs.logits, rows, batch_size)
        hidden_states = [
            placed(full, part, rows, batch_size, width)
            for full, part in itertools.zip_longest(hidden_states, outputs.hidden_states)
        ]
        states = [
            tuple(placed(full, part, rows, batch_size, width) for full, part in zip(full_layer, layer))
            for full_layer, layer in itertools.zip_longest(states, layer_states(group_cache), fillvalue=(None, None))
        ]
    for layer_index in range(len(states)):
        keys, values = states[layer_index]
        states[layer_index] = None  # (the cache keeps a copy: this one can go)
        cache.update(keys, values, layer_index)
    return CausalLMOutputWithPast(logits=logits, hidden_states=tuple(hidden_states))


def placed(
    full: torch.Tensor | None, part: torch.Tensor | None, rows: torch.LongTensor, batch_size: int, width: int = 1
) -> torch.Tensor | None:
    """
    `part`, a group's (rows, ..., slots, features) tensor, put into the batch's `full` one (zeros of `width` slots,
    made on first use) at `rows` and its last slots. None stays None (`output_hidden_states=-1` returns None for the
    layers not asked for).
    """
    if part is None:
        return None
    if full is None:
        full = part.new_zeros(batch_size, *part.shape[1:-2], width, part.shape[-1])
    full[rows, ..., width - part.shape[-2] :, :] = part
    return full


__all__ = [
    "PREFILL_POSITIONS",
    "PrefillPlan",
    "forward_cost",
    "grouped_prefill",
    "plan_prefill",
    "prompt_spans",
]
