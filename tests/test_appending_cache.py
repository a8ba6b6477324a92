"""The KV cache that appends in place: what a `DynamicLayer` holds at every step, without copying the whole cache."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, tiny_base, tiny_fastmtp
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from hf_fastmtp.decoding.appending_cache import AppendingLayer, append_in_place, appending_cache
from hf_fastmtp.decoding.transformers_compat import cache_keyword


def states(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, 2, length, 4, generator=generator) for _ in range(2))


def assert_same(layer: AppendingLayer, reference: DynamicLayer) -> None:
    assert layer.get_seq_length() == reference.get_seq_length()
    assert torch.equal(layer.keys, reference.keys) and torch.equal(layer.values, reference.values)


@pytest.mark.parametrize("capacity", [0, 7, 64])
def test_every_operation_leaves_what_a_dynamic_layer_holds(capacity):
    layer, reference = AppendingLayer(capacity), DynamicLayer()
    operations = [
        ("update", 5),
        *[("update", 1)] * 12,
        ("crop", 3),
        ("update", 4),  # (over the cropped slots)
        ("select", [2, 0]),  # rows leave; the next update copies into new buffers
        ("update", 1),
        ("update", 3),
        ("reorder", [1, 0]),
        ("update", 2),
        ("repeat", 2),
        *[("update", 1)] * 20,
    ]
    batch = 3
    for seed, (name, argument) in enumerate(operations):
        for target in (layer, reference):
            if name == "update":
                returned = target.update(*states(batch, argument, seed))
                assert returned[0] is target.keys and returned[1] is target.values
            elif name == "crop":
                target.crop(-argument)
            elif name == "select":
                target.batch_select_indices(torch.tensor(argument))
            elif name == "reorder":
                target.reorder_cache(torch.tensor(argument))
            else:
                target.batch_repeat_interleave(argument)
        batch = layer.keys.shape[0]
        assert_same(layer, reference)
    layer.reset()
    assert layer.get_seq_length() == 0 and layer._buffers is None
    layer.update(*states(1, 2, 99))
    assert layer.get_seq_length() == 2


def test_steps_write_in_place_and_buffers_grow_by_doubling():
    layer = AppendingLayer()
    layer.update(*states(2, 10, 0))
    assert layer._buffers[0].shape[-2] == 20
    buffers_made = []
    for step in range(100):
        buffer = layer._buffers[0]
        layer.update(*states(2, 1, step + 1))
        if layer._buffers[0] is not buffer:
            buffers_made.append(layer._buffers[0].shape[-2])
        assert layer.keys.data_ptr() == layer._buffers[0].data_ptr()  # a view of the buffer, not a copy
    assert buffers_made == [42, 86, 174]  # twice what they must hold: 21, 43 and 87 slots


def test_a_capacity_that_suffices_is_never_exceeded():
    layer = AppendingLayer(capacity=30)
    layer.update(*states(1, 10, 0))
    assert layer._buffers[0].shape[-2] == 20  # (twice the prefill is less than the capacity)
    for step in range(20):
        layer.update(*states(1, 1, step + 1))
    assert layer._buffers[0].shape[-2] == 30 and layer.get_seq_length() == 30
    layer.update(*states(1, 1, 99))  # beyond the capacity it was given: it still grows
    assert layer.get_seq_length() == 31


def test_append_in_place_turns_only_the_full_attention_layers_of_an_empty_cache():
    config = tiny_base("gemma3").config
    config.layer_types = ["sliding_attention", "full_attention"]
    cache = append_in_place(DynamicCache(config=config), capacity=40)
    assert [type(layer) for layer in cache.layers] == [DynamicSlidingWindowLayer, AppendingLayer]
    assert cache.layers[1].capacity == 40

    lazy = append_in_place(DynamicCache())  # layers made on first use
    lazy.update(*states(1, 3, 0), layer_idx=1)
    assert [type(layer) for layer in lazy.layers] == [AppendingLayer, AppendingLayer]

    used = DynamicCache()
    used.update(*states(1, 3, 0), layer_idx=0)
    assert type(append_in_place(used).layers[0]) is DynamicLayer  # (a cache with states is left as it is)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_model_decodes_the_same_logits_with_either_cache(architecture):
    model = tiny_base(architecture)
    ids = torch.randint(1, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    logits, name = [], cache_keyword(model.forward)
    for cache in (DynamicCache(), appending_cache(capacity=26)):
        with torch.no_grad():
            steps = [model(input_ids=ids[:, :20], use_cache=True, **{name: cache}).logits]
            for position in range(20, 24):  # (past the sliding window of 16)
                steps.append(model(input_ids=ids[:, position : position + 1], **{name: cache}).logits)
        logits.append(torch.cat(steps, dim=1))
    assert torch.equal(logits[0], logits[1])


def test_generate_with_fastmtp_decodes_into_an_appending_cache():
    model = tiny_fastmtp("llama")
    ids = torch.randint(1, 97, (1, 9), generator=torch.Generator().manual_seed(0))
    output = model.generate(ids, max_new_tokens=12, do_sample=False, fastmtp=True, return_dict_in_generate=True)
    plain = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(output.sequences, plain)
    cache = output.get("cache", output.get("past_key_values"))
    assert all(type(layer) is AppendingLayer for layer in cache.layers)
