"""Configuration of a FastMTP head and the base model it was trained for."""

from __future__ import annotations

import copy

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

MAX_DRAFT_TOKENS = 16
"""Above this many drafts per cycle acceptance is ~0 for every head we know of, and verification gets slow."""

# Fields that must agree between the base a head was trained on and the base it is attached to.
BASE_SIGNATURE_FIELDS = (
    "model_type",
    "hidden_size",
    "vocab_size",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "head_dim",
)


@strict
class FastMTPConfig(PretrainedConfig):
    r"""
    Configuration of [`FastMTPForCausalLM`]: a frozen decoder-only base model plus one shared-weight MTP head.

    The head's layers are decoder layers of the base model's class, built from the base model's config, which is kept
    here as `text_config` so that a head folder records exactly which architecture it belongs to and can be checked
    against the base it is loaded with. By default the head is MiMo's: one layer that reads the base's final hidden
    state; `feature_layers` and `num_head_layers` are opt-in variants (which SGLang and vLLM do not serve).

    Args:
        text_config (`dict` or `PretrainedConfig`):
            Config of the base causal LM (e.g. a `LlamaConfig`).
        base_model_name_or_path (`str`, *optional*):
            Hub id or local folder of the base model; `from_pretrained` of a head-only folder loads it from there.
        base_model_revision (`str`, *optional*):
            Revision of the base model the head was trained against.
        num_draft_tokens (`int`, *optional*, defaults to 3):
            The K the head was trained to draft recursively; `generate` drafts it when K is fixed by nobody else and
            calibration is off (its own default, `"auto"`, chooses K per cycle).
        draft_vocab_maps (`dict[str, str]`, *optional*):
            Language code -> file (in the head folder) holding a 1-D tensor of the token ids drafting is restricted
            to for prompts in that language.
        default_draft_vocab (`str`, *optional*):
            Key of `draft_vocab_maps` used when the prompt's language has no map of its own or is undetectable.
        draft_acceptance (`list[float]`, *optional*):
            The head's measured probability of drafting position k right given positions 1..k-1 were (training's
            final validation accuracy per step): where `num_draft_tokens="auto"` starts from.
        feature_layers (`list[int]`, *optional*):
            EAGLE-3-style features: indices into the base's `hidden_states` output (0 the embeddings, i the output of
            decoder layer i, `num_hidden_layers` or -1 the final normed hidden state), at least two, the last being the
            final hidden state. The head's first draft step reads a learned fusion of them (`feature_proj`) instead of
            the final hidden state alone. `None`: the final hidden state only.
        num_head_layers (`int`, *optional*, defaults to 1):
            Decoder layers stacked in the head; the first keeps MiMo's parameter names, the others are
            `extra_layers.<i>.*`.
    """

    model_type = "fastmtp"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PretrainedConfig | None = None
    base_model_name_or_path: str | None = None
    base_model_revision: str | None = None
    num_draft_tokens: int = 3
    draft_vocab_maps: dict[str, str] | None = None
    default_draft_vocab: str | None = None
    draft_acceptance: list[float] | None = None
    feature_layers: list[int] | None = None
    num_head_layers: int = 1

    def validate_num_draft_tokens(self):
        check_num_draft_tokens(self.num_draft_tokens)

    def validate_head_configuration(self):
        if self.num_head_layers < 1:
            raise ValueError(f"`num_head_layers` must be a positive integer, got {self.num_head_layers!r}.")
        if self.feature_layers is not None:
            resolve_feature_layers(self.feature_layers, self.text_config.num_hidden_layers)

    def base_signature(self) -> dict:
        return base_signature(self.text_config)

    def head_config(self) -> PretrainedConfig:
        """Config of the head's decoder layers: the base config with `num_head_layers` full-attention layers."""
        head_config = copy.deepcopy(self.text_config)
        head_config.num_hidden_layers = self.num_head_layers
        # The head attends over everything it has seen, whatever the base layer 0 does (e.g. Gemma-3's sliding
        # layers); architectures without `layer_types` keep their uniform attention (Mistral's window included).
        if getattr(head_config, "layer_types", None) is not None:
            head_config.layer_types = ["full_attention"] * self.num_head_layers
        return head_config

    def is_mimo_head(self) -> bool:
        """Whether the head is MiMo's own configuration (one layer reading the final hidden state)."""
        return self.feature_layers is None and self.num_head_layers == 1


def check_num_draft_tokens(num_draft_tokens: int) -> int:
    """Checks a requested K and returns it; used by the config, `generate` and training alike."""
    if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int):
        raise ValueError(f"`num_draft_tokens` must be an integer, got {num_draft_tokens!r}.")
    if not 1 <= num_draft_tokens <= MAX_DRAFT_TOKENS:
        raise ValueError(
            f"`num_draft_tokens` must be between 1 and {MAX_DRAFT_TOKENS}, got {num_draft_tokens}. "
            "FastMTP heads are trained for K around 3; far beyond that almost nothing is accepted."
        )
    return num_draft_tokens


def check_draft_length(num_draft_tokens: int | str) -> int | str:
    """Checks `generate`'s `num_draft_tokens`: "auto", or K from 0 (plain steps) to `MAX_DRAFT_TOKENS`."""
    if num_draft_tokens == "auto" or (type(num_draft_tokens) is int and num_draft_tokens == 0):
        return num_draft_tokens
    try:
        return check_num_draft_tokens(num_draft_tokens)
    except ValueError as error:
        raise ValueError(f"{error} Or pass num_draft_tokens='auto' (the default) to choose K per cycle.") from None


def check_draft_confidence_threshold(threshold: float | None) -> float | None:
    """Checks a requested confidence threshold (a probability, or None for none) and returns it."""
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(
            f"`draft_confidence_threshold` must be a probability between 0 and 1, got {threshold!r}: drafting stops "
            "where the head's top probability falls below it (None or 0 never stops early, 1 never drafts)."
        )
    return float(threshold)


def resolve_feature_layers(feature_layers: list[int], num_hidden_layers: int) -> list[int]:
    """
    `feature_layers` as indices from 0 (the embeddings) to `num_hidden_layers` (the final normed hidden state),
    checked: distinct, at least two, and ending with the final hidden state, which the one-layer head reads (so a
    fusion can start as that head) and which training's targets come from.
    """
    num_states = num_hidden_layers + 1
    if not all(type(index) is int and -num_states <= index < num_states for index in feature_layers):
        raise ValueError(
            f"`feature_layers` must be indices into the base's {num_states} hidden states (0 the embeddings, "
            f"{num_hidden_layers} or -1 the final one), got {feature_layers!r}."
        )
    resolved = [index % num_states for index in feature_layers]
    if len(resolved) < 2 or len(set(resolved)) != len(resolved) or resolved[-1] != num_hidden_layers:
        raise ValueError(
            f"`feature_layers` must name at least two distinct hidden states and end with the final one "
            f"({num_hidden_layers} or -1), got {feature_layers!r}."
        )
    return resolved


def base_signature(config: PretrainedConfig) -> dict:
    """The architecture facts a head depends on, for mismatch checks."""
    return {field: getattr(config, field, None) for field in BASE_SIGNATURE_FIELDS}


__all__ = [
    "MAX_DRAFT_TOKENS",
    "FastMTPConfig",
    "check_draft_confidence_threshold",
    "check_draft_length",
    "check_num_draft_tokens",
    "resolve_feature_layers",
]
