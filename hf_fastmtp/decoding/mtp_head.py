"""The FastMTP head: decoder layers of the base model's own class, in MiMo's MTP layout."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import Cache

from .transformers_compat import cache_keyword

# The projections that write a decoder layer's attention and MLP results into its residual stream: zeroed, the layer
# passes its input through unchanged.
RESIDUAL_OUTPUT_PROJECTIONS = ("self_attn.o_proj", "mlp.down_proj")


class FastMTPHead(nn.Module):
    """
    One multi-token-prediction layer, applied recursively to draft several tokens.

    ```
    e = token_layernorm(embed(t_next));  h' = hidden_layernorm(h)
    x = input_proj([h', e]);  x = decoder_layer(x);  g = final_layernorm(x)
    ```
    `h` is the base model's final (normed) hidden state for the first draft and the head's own previous `g` for the
    following ones. The embedding and lm_head are the base model's; the head owns neither.

    Parameter names follow MiMo's checkpoints (`mtp_layers.0.self_attn.q_proj.weight`, ...): the decoder layer's
    sub-modules are registered directly on the head instead of under a child module.

    Two opt-in variants (`FastMTPConfig`): with `num_features` > 1 the first draft's `h` is `feature_proj` of several
    of the base's hidden states, concatenated (EAGLE-3's fusion, `fuse_features`); with `config.num_hidden_layers` > 1
    further decoder layers (`extra_layers.<i>`, head cache layer i) follow the first.
    """

    def __init__(
        self,
        config: PretrainedConfig,
        decoder_layer_class: type[nn.Module],
        norm_class: type[nn.Module],
        num_features: int = 1,
    ):
        super().__init__()
        hidden_size = config.hidden_size
        self.feature_proj = None
        if num_features > 1:
            self.feature_proj = nn.Linear(num_features * hidden_size, hidden_size, bias=False)
        self.token_layernorm = norm_class(hidden_size, eps=config.rms_norm_eps)
        self.hidden_layernorm = norm_class(hidden_size, eps=config.rms_norm_eps)
        self.input_proj = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        decoder_layer = decoder_layer_class(config, layer_idx=0)
        for name, module in decoder_layer.named_children():
            self.add_module(name, module)
        # Kept outside the module tree (a plain list): the layer only lends its forward, its weights are ours above.
        self._decoder_layer = [decoder_layer]
        self.extra_layers = nn.ModuleDict(
            {str(index): decoder_layer_class(config, layer_idx=index) for index in range(1, config.num_hidden_layers)}
        )
        self._cache_keyword = cache_keyword(decoder_layer_class.forward)
        self.final_layernorm = norm_class(hidden_size, eps=config.rms_norm_eps)

    def fuse_features(self, features: torch.Tensor) -> torch.Tensor:
        """The first draft's `h` from the base's features (`head_features`): their fusion, or the final state."""
        return features if self.feature_proj is None else self.feature_proj(features)

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_embeddings: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        position_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
    ) -> torch.Tensor:
        """Returns the head's normed output `g` (fed to the lm_head, and to the next recursive step)."""
        x = torch.cat([self.hidden_layernorm(hidden_states), self.token_layernorm(token_embeddings)], dim=-1)
        x = self.input_proj(x)
        for layer in (self._decoder_layer[0], *self.extra_layers.values()):
            x = layer(
                x,
                attention_mask=attention_mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                **{self._cache_keyword: past_key_values},
            )
            if isinstance(x, tuple):  # some decoder layers still return (hidden_states, ...)
                x = x[0]
        return self.final_layernorm(x)

    @torch.no_grad()
    def pass_through_new_parts(self, new_fusion: bool = True, first_new_layer: int = 1) -> None:
        """
        Initialises what a one-layer head lacks so that the head computes exactly what that head computes: the fusion
        (if `new_fusion`) reads the final hidden state alone (weight [0 ... 0, I]) and extra layers from
        `first_new_layer` on, copies of the first, add nothing to their residual stream (zeroed output projections)
        until they are trained.
        """
        if new_fusion and self.feature_proj is not None:
            weight = self.feature_proj.weight
            weight.zero_()
            weight[:, -weight.shape[0] :].copy_(torch.eye(weight.shape[0]))
        for index, layer in self.extra_layers.items():
            if int(index) < first_new_layer:
                continue
            layer.load_state_dict(self._decoder_layer[0].state_dict())
            for name in RESIDUAL_OUTPUT_PROJECTIONS:
                for parameter in layer.get_submodule(name).parameters():
                    parameter.zero_()


def head_features(hidden_states: Sequence[torch.Tensor], feature_layers: Sequence[int] | None) -> torch.Tensor:
    """
    What the head's first step reads of a base forward's `hidden_states` (every layer's, or the last only): the final
    hidden state, or the `feature_layers`' states concatenated along the hidden dimension (the final one last).
    """
    if feature_layers is None:
        return hidden_states[-1]
    return torch.cat([hidden_states[index] for index in feature_layers], dim=-1)


def zero_first_position(token_embeddings: torch.Tensor, position_ids: torch.LongTensor) -> torch.Tensor:
    """
    `token_embeddings` with the pair at position 0 zeroed, as SGLang's and vLLM's MiMo MTP layers do: heads trained
    and drafting here then compute what those engines compute for them (tests/fixtures/mimo_mtp_engines.json).
    """
    return token_embeddings.masked_fill((position_ids == 0).unsqueeze(-1), 0)


def head_rope_layer_type(rotary_embedding: nn.Module, base_config) -> str | None:
    """For bases with one rotary embedding per attention type (Gemma-3): the full-attention one, if the base has it."""
    if "layer_type" not in inspect.signature(rotary_embedding.forward).parameters:
        return None
    layer_types = list(dict.fromkeys(base_config.layer_types))
    return "full_attention" if "full_attention" in layer_types else layer_types[0]


__all__ = ["FastMTPHead", "head_features", "head_rope_layer_type", "zero_first_position"]
