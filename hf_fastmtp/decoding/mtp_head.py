"""The FastMTP head: one decoder layer of the base model's own class, in MiMo's MTP layout."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import Cache

from .transformers_compat import cache_keyword


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
    """

    def __init__(self, config: PretrainedConfig, decoder_layer_class: type[nn.Module], norm_class: type[nn.Module]):
        super().__init__()
        hidden_size = config.hidden_size
        self.token_layernorm = norm_class(hidden_size, eps=config.rms_norm_eps)
        self.hidden_layernorm = norm_class(hidden_size, eps=config.rms_norm_eps)
        self.input_proj = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        decoder_layer = decoder_layer_class(config, layer_idx=0)
        for name, module in decoder_layer.named_children():
            self.add_module(name, module)
        # Kept outside the module tree (a plain list): the layer only lends its forward, its weights are ours above.
        self._decoder_layer = [decoder_layer]
        self._cache_keyword = cache_keyword(decoder_layer_class.forward)
        self.final_layernorm = norm_class(hidden_size, eps=config.rms_norm_eps)

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
        x = self._decoder_layer[0](
            x,
            attention_mask=attention_mask,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            **{self._cache_keyword: past_key_values},
        )
        if isinstance(x, tuple):  # some decoder layers still return (hidden_states, ...)
            x = x[0]
        return self.final_layernorm(x)


__all__ = ["FastMTPHead"]
