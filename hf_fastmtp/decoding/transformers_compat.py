"""
Every place hf_fastmtp relies on Transformers beyond its public API, in one module.

Each helper names the internal it uses and the versions it was read in (setup.cfg's range, 5.20 to 5.25). When a
release changes one, `check_transformers_internals()` (run by the tests) says which, instead of an AttributeError deep
inside `generate`. This file is part of a head's remote code: it imports nothing heavy.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import transformers
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.generation import GenerateDecoderOnlyOutput
from transformers.generation.stopping_criteria import StoppingCriteriaList, StopStringCriteria

# (major, minor) of the installed Transformers: the releases this module tells apart.
TRANSFORMERS_VERSION = tuple(int(part) for part in transformers.__version__.split(".")[:2])


def cache_keyword(function: Callable) -> str:
    """
    The keyword `function` takes a KV cache by: `cache` since Transformers 5.24, `past_key_values` before it (and in
    remote code written for earlier versions). Transformers' own functions still take the other name until 5.40, with
    a warning; remote code may not. (Public signatures, but renamed within the supported range.)
    """
    return "cache" if "cache" in inspect.signature(function).parameters else "past_key_values"


def generation_cache(model_kwargs: dict[str, Any]):
    """The cache `generate()` prepared for the decoding loop: `model_kwargs["cache"]` (5.24+) or `past_key_values`."""
    return model_kwargs.get("cache", model_kwargs.get("past_key_values"))


def activate_past_recording(cache, max_drafts: int) -> None:
    """
    `Cache.activate_past_recording`: sliding-window (and linear-attention) layers keep the states a crop of rejected
    drafts must restore. Since 5.25 it takes `recurrent_states_to_keep`, the most tokens one cycle can propose.
    """
    if "recurrent_states_to_keep" in inspect.signature(cache.activate_past_recording).parameters:
        cache.activate_past_recording(recurrent_states_to_keep=max_drafts)
    else:
        cache.activate_past_recording()


def last_hidden_state_only() -> int | bool:
    """`output_hidden_states=-1` keeps only the last layer's hidden state (5.23+); before, every layer's returns."""
    return -1 if TRANSFORMERS_VERSION >= (5, 23) else True


def hidden_states_to_output(all_layers: bool) -> int | bool:
    """
    `output_hidden_states` for a forward whose caller reads every layer's hidden states (indexed as with `True`, the
    final normed state last) or only the final one (`last_hidden_state_only`).
    """
    return True if all_layers else last_hidden_state_only()


def eos_token_ids(generation_config: GenerationConfig) -> torch.Tensor | None:
    """`GenerationConfig._eos_token_tensor`: the EOS ids `generate()` resolved (set by `_prepare_special_tokens`)."""
    return generation_config._eos_token_tensor


def pad_token_id(generation_config: GenerationConfig) -> int:
    """
    `GenerationConfig._pad_token_tensor`: the pad id `generate()` resolved (its EOS when none is set, as plain batched
    decoding pads finished rows with); 0 when there is neither.
    """
    pad = generation_config._pad_token_tensor
    if pad is None:
        pad = generation_config.pad_token_id
    return 0 if pad is None else int(pad.flatten()[0]) if isinstance(pad, torch.Tensor) else int(pad)


def layer_states(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`DynamicLayer.keys` / `.values`: each layer's key and value states, (batch, heads, slots, head_dim) each."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def shift_cache_rows(cache, shifts: list[int]) -> None:
    """
    `DynamicLayer.keys` / `.values`: moves row b of every layer right by `shifts[b]` slots, in place, copying only the
    rows that move; the slots a row leaves on the left keep stale states, which the attention mask hides. For caches
    whose layers keep every slot (no sliding-window layer, which keeps only its window).
    """
    rows_by_shift: dict[int, list[int]] = {}
    for row, shift in enumerate(shifts):
        if shift:
            rows_by_shift.setdefault(shift, []).append(row)
    for layer in cache.layers:
        if layer.keys is None or layer.keys.numel() == 0:
            continue
        for shift, rows in rows_by_shift.items():
            index = torch.tensor(rows, device=layer.keys.device)
            for states in (layer.keys, layer.values):
                # (Indexing by rows copies the source first, so the overlapping move reads no moved slot.)
                states[index, :, shift:] = states[index, :, :-shift]


def decoder_only_output(sequences: torch.LongTensor, scores, logits, cache) -> GenerateDecoderOnlyOutput:
    """`GenerateDecoderOnlyOutput`, whose cache field is `cache` since 5.24 and `past_key_values` before."""
    fields = GenerateDecoderOnlyOutput.__dataclass_fields__
    return GenerateDecoderOnlyOutput(
        sequences=sequences,
        scores=scores,
        logits=logits,
        **{"cache" if "cache" in fields else "past_key_values": cache},
    )


@contextmanager
def custom_generate_call(
    model: PreTrainedModel, generation_config: GenerationConfig | None, kwargs: dict[str, Any]
) -> Iterator[tuple[GenerationConfig | None, dict[str, Any]]]:
    """
    A `custom_generate` callable (the public route for a decoding loop of one's own) receives neither the call's
    `streamer` nor its `tokenizer` in 5.20-5.25 (`GenerationMixin._extract_generation_mode_kwargs` replaces them with
    the callable's own arguments), and without the tokenizer `generate()` refuses stop strings. So the streamer goes
    to the loop directly, and stop strings (from the call, its generation config or the model's) become a
    `StopStringCriteria` in `stopping_criteria`, which `generate()` merges with the other criteria as it would have;
    the model's own default stop strings are set aside meanwhile. Yields the generation config to pass (edits
    `kwargs` in place) and the keyword arguments for the loop.
    """
    tokenizer = kwargs.pop("tokenizer", None)
    stop_strings = kwargs.pop("stop_strings", None)
    for config in (generation_config, model.generation_config):
        stop_strings = stop_strings or (config.stop_strings if config is not None else None)
    if stop_strings:
        if tokenizer is None:
            raise ValueError(
                "`stop_strings` needs the tokenizer: pass `tokenizer=` to `generate` (as plain decoding requires)."
            )
        stop = StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings)
        kwargs["stopping_criteria"] = StoppingCriteriaList([*(kwargs.get("stopping_criteria") or []), stop])
    if generation_config is not None and generation_config.stop_strings:
        generation_config = copy.deepcopy(generation_config)
        generation_config.stop_strings = None
    model_stop_strings = model.generation_config.stop_strings
    model.generation_config.stop_strings = None
    try:
        yield generation_config, {"streamer": kwargs.pop("streamer", None)}
    finally:
        model.generation_config.stop_strings = model_stop_strings


def attn_implementation(config: PretrainedConfig) -> str | None:
    """`PretrainedConfig._attn_implementation`: the attention implementation a config's layers look up."""
    return config._attn_implementation


def set_attn_implementation_of_this_config(config: PretrainedConfig, implementation: str) -> None:
    """
    `PretrainedConfig._attn_implementation_internal`, as `set_attn_implementation` sets it: the public setter would
    also reach the config's sub-configs.
    """
    config._attn_implementation_internal = implementation


def initialize_weights(model: PreTrainedModel, module: torch.nn.Module) -> None:
    """`PreTrainedModel._init_weights`: the base model's own initialisation, applied to a new module."""
    module.apply(model._init_weights)


@contextmanager
def ignoring_unexpected_weights(model_class: type[PreTrainedModel], pattern: str) -> Iterator[None]:
    """
    `PreTrainedModel._keys_to_ignore_on_load_unexpected`: while active, `model_class.from_pretrained` loads a
    checkpoint with extra weights matching `pattern` (a regex) without warning about them.
    """
    original = model_class._keys_to_ignore_on_load_unexpected
    model_class._keys_to_ignore_on_load_unexpected = [*(original or []), pattern]
    try:
        yield
    finally:
        model_class._keys_to_ignore_on_load_unexpected = original


def without_loader_internals(kwargs: dict[str, Any]) -> dict[str, Any]:
    """
    `from_pretrained` keywords without those Transformers' auto classes pass for themselves (`_from_auto`,
    `_from_pipeline`, `_commit_hash`, ...): forwarded to the base model's `from_pretrained`, the auto class there
    would receive them twice (5.25: "got multiple values for keyword argument '_from_auto'").
    """
    return {key: value for key, value in kwargs.items() if not key.startswith("_")}


def list_as_text_generation_model(model_type: str, class_name: str) -> None:
    """
    Lists `class_name` among the models `pipeline("text-generation")` supports. The pipeline checks the model's class
    name against `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` (not against `AutoModelForCausalLM.register`'s classes) and
    logs an error for any other class, although it generates with it all the same. (Module-level mapping of
    `transformers.models.auto.modeling_auto`, read in 5.20 to 5.25.)
    """
    from transformers.models.auto import modeling_auto

    modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(model_type, class_name)


def check_transformers_internals() -> list[str]:
    """What the installed Transformers lacks of the above, each naming the internal and the version ([]: none)."""
    version = f"transformers {transformers.__version__}"
    problems = []
    prepare_special_tokens = inspect.getsource(transformers.GenerationMixin._prepare_special_tokens)
    for name in ("_eos_token_tensor", "_pad_token_tensor"):
        if name not in prepare_special_tokens:
            problems.append(f"GenerationConfig.{name} is no longer set by _prepare_special_tokens in {version}")
    if not hasattr(PretrainedConfig(), "_attn_implementation_internal"):
        problems.append(f"PretrainedConfig._attn_implementation_internal is gone in {version}")
    if not hasattr(PreTrainedModel, "_init_weights"):
        problems.append(f"PreTrainedModel._init_weights is gone in {version}")
    if not hasattr(PreTrainedModel, "_keys_to_ignore_on_load_unexpected"):
        problems.append(f"PreTrainedModel._keys_to_ignore_on_load_unexpected is gone in {version}")
    fields = GenerateDecoderOnlyOutput.__dataclass_fields__
    if "cache" not in fields and "past_key_values" not in fields:
        problems.append(f"GenerateDecoderOnlyOutput has neither `cache` nor `past_key_values` in {version}")
    from transformers.cache_utils import DynamicLayer

    if not all(hasattr(DynamicLayer(), name) for name in ("keys", "values")):
        problems.append(f"DynamicLayer.keys / .values are gone in {version}")
    generate_parameters = inspect.signature(transformers.GenerationMixin.generate).parameters
    if "custom_generate" not in generate_parameters:
        problems.append(f"GenerationMixin.generate takes no `custom_generate` in {version}")
    from transformers.models.auto import modeling_auto

    if not isinstance(getattr(modeling_auto, "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", None), dict):
        problems.append(
            f"transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES is gone in {version}"
        )
    return problems


__all__ = [
    "activate_past_recording",
    "attn_implementation",
    "cache_keyword",
    "check_transformers_internals",
    "custom_generate_call",
    "decoder_only_output",
    "eos_token_ids",
    "generation_cache",
    "hidden_states_to_output",
    "ignoring_unexpected_weights",
    "initialize_weights",
    "last_hidden_state_only",
    "layer_states",
    "list_as_text_generation_model",
    "pad_token_id",
    "shift_cache_rows",
    "set_attn_implementation_of_this_config",
    "without_loader_internals",
]
