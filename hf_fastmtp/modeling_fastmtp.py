"""`FastMTPForCausalLM`: a frozen decoder-only base model plus a FastMTP head, with `generate(fastmtp=True)`."""

from __future__ import annotations

import copy
import inspect
import json
import os
import threading
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import hf_hub_download
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.cache_utils import StaticCache
from transformers.dynamic_module_utils import custom_object_save
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .candidate_generator import FastMTPCandidateGenerator, FastMTPStats
from .configuration_fastmtp import FastMTPConfig, base_signature, check_num_draft_tokens
from .mtp_head import FastMTPHead

HEAD_WEIGHTS_NAME = "model.safetensors"
HEAD_PREFIX = "mtp_layers.0."
# generate() arguments that belong to FastMTP and must never reach the model's forward.
FASTMTP_GENERATE_KWARGS = ("fastmtp", "num_draft_tokens", "draft_vocab")


class HeadMismatchError(ValueError):
    """A head's weights or config do not fit the base model it is attached to."""


class FastMTPForCausalLM(PreTrainedModel, GenerationMixin):
    """
    A decoder-only causal LM with a FastMTP head for lossless speculative decoding.

    The base model (`self.model`) is any Transformers causal LM and is used as is; the head (`self.mtp_layers[0]`)
    shares its embedding and lm_head. `generate(..., fastmtp=True)` drafts `num_draft_tokens` tokens per cycle with
    the head and verifies them with the base in one forward pass, through Transformers' assisted-decoding loop, so
    streamers, stopping criteria and logits processors behave as in plain `generate()`. Greedy output is identical
    to plain greedy decoding; sampling uses speculative sampling and keeps the output distribution.

    Only the head is saved by `save_pretrained`: a head folder names its base and loads with `from_pretrained`, or
    with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` without hf_fastmtp installed.
    """

    config_class = FastMTPConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: FastMTPConfig, base_model: PreTrainedModel | None = None):
        super().__init__(config)
        if base_model is None:
            base_model = AutoModelForCausalLM.from_config(config.text_config)
        check_head_fits_base(config, base_model)
        self.model = base_model
        # One config object for the base, shared: cache and mask construction in generate() read it through ours.
        config.text_config = base_model.config
        self.head_config = config.head_config()
        decoder = base_model.get_decoder()
        head = FastMTPHead(self.head_config, type(decoder.layers[-1]), type(decoder.norm))
        self.mtp_layers = nn.ModuleList([head.to(device=base_model.device, dtype=base_model.dtype)])
        self._rope_layer_type = head_rope_layer_type(decoder.rotary_emb, base_model.config)
        sliding = getattr(self.head_config, "layer_types", None) is None and getattr(self.head_config, "sliding_window", None)
        self._head_mask_function = create_sliding_window_causal_mask if sliding else create_causal_mask
        self.generation_config = GenerationConfig.from_dict(base_model.generation_config.to_dict())
        self.last_fastmtp_stats: FastMTPStats | None = None
        self._fastmtp_call = threading.local()
        self.post_init()

    # ------------------------------------------------------------------ construction, loading and saving

    @classmethod
    def from_base(
        cls,
        base_model: PreTrainedModel,
        head: FastMTPHead | dict[str, torch.Tensor] | None = None,
        *,
        num_draft_tokens: int = 3,
        base_model_name_or_path: str | None = None,
    ) -> FastMTPForCausalLM:
        """
        Wraps a loaded causal LM. `head` is a `FastMTPHead`, a head state dict (`mtp_layers.0.*` or bare names),
        or `None` for a new head initialised from the base model's last decoder layer (untrained: drafts are poor
        until it is trained with `fastmtp train`).
        """
        config = FastMTPConfig(
            # A copy: building a composite config resets the attention implementation of the config it is given.
            text_config=copy.deepcopy(base_model.config),
            base_model_name_or_path=base_model_name_or_path or base_model.config.name_or_path or None,
            num_draft_tokens=num_draft_tokens,
        )
        model = cls(config, base_model=base_model)
        if head is None:
            model.initialize_head_from_base()
        elif isinstance(head, FastMTPHead):
            model.load_head_state_dict(head.state_dict())
        else:
            model.load_head_state_dict(head)
        return model

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args,
        base_model: PreTrainedModel | str | os.PathLike | None = None,
        config: FastMTPConfig | None = None,
        revision: str | None = None,
        dtype: torch.dtype | str | None = "auto",
        device_map: Any = None,
        **kwargs,
    ) -> FastMTPForCausalLM:
        """
        Loads a head-only folder or Hub repo and the base model it names (`config.base_model_name_or_path`), or the
        given `base_model` (a loaded model, or a path / Hub id to load instead of the one the head names).
        `dtype`, `device_map`, `revision` and Hub arguments (`cache_dir`, `token`, `local_files_only`, ...) pass
        through to the base model's `from_pretrained`.
        """
        hub_kwargs = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
        kwargs.pop("trust_remote_code", None)
        if config is None:
            config = FastMTPConfig.from_pretrained(pretrained_model_name_or_path, revision=revision, **hub_kwargs)
        if not isinstance(base_model, PreTrainedModel):
            base_id = base_model or config.base_model_name_or_path
            if base_id is None:
                raise ValueError(
                    f"The head at {pretrained_model_name_or_path} does not name its base model "
                    "(`base_model_name_or_path` is empty in config.json): pass `base_model=` (a model or its path)."
                )
            base_revision = config.base_model_revision if base_model is None else None
            base_model = AutoModelForCausalLM.from_pretrained(
                base_id, revision=base_revision, dtype=dtype, device_map=device_map, **hub_kwargs, **kwargs
            )
        model = cls(config, base_model=base_model)
        weights_file = resolve_file(pretrained_model_name_or_path, HEAD_WEIGHTS_NAME, revision, hub_kwargs)
        model.load_head_state_dict(read_safetensors(weights_file))
        model.name_or_path = str(pretrained_model_name_or_path)
        return model

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Writes a head-only folder: config (with `auto_map`), the code to load it, head weights, generation config."""
        save_directory = Path(save_directory)
        if save_directory.is_file():
            raise ValueError(f"{save_directory} is a file; `save_pretrained` needs a folder.")
        save_directory.mkdir(parents=True, exist_ok=True)
        self.config.architectures = [type(self).__name__]
        self.register_for_auto_class("AutoModelForCausalLM")
        # Copies this module, its relative imports and the config's module into the folder and fills `auto_map`.
        custom_object_save(self, save_directory, config=self.config)
        self.config.save_pretrained(save_directory)
        self.generation_config.save_pretrained(save_directory)
        head_state = {HEAD_PREFIX + name: t.detach().contiguous().cpu() for name, t in self.head.state_dict().items()}
        save_file(head_state, save_directory / HEAD_WEIGHTS_NAME, metadata={"format": "pt"})

    @property
    def head(self) -> FastMTPHead:
        return self.mtp_layers[0]

    def load_head_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Loads head weights named `mtp_layers.0.*` (or bare), with clear errors for missing or misshapen tensors."""
        state_dict = {k.removeprefix("model.").removeprefix(HEAD_PREFIX): v for k, v in state_dict.items()}
        expected = self.head.state_dict()
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            raise HeadMismatchError(
                f"The head weights do not match a FastMTP head for {type(self.model).__name__}: "
                f"missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
                f"unexpected {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}. "
                "Was this head trained for another architecture?"
            )
        wrong_shapes = [
            f"{name}: checkpoint {tuple(state_dict[name].shape)} vs model {tuple(tensor.shape)}"
            for name, tensor in expected.items()
            if state_dict[name].shape != tensor.shape
        ]
        if wrong_shapes:
            raise HeadMismatchError(
                "The head weights have the wrong shapes for this base model (was it trained for another base?): "
                + "; ".join(wrong_shapes[:4])
            )
        self.head.load_state_dict(state_dict)

    @torch.no_grad()
    def initialize_head_from_base(self) -> None:
        """
        A starting point for a new head: its decoder layer and final norm copy the base model's last ones, and
        `input_proj` adds the normed hidden state and the next token's normed embedding (x = h' + e).
        """
        decoder = self.model.get_decoder()
        self.head.load_state_dict(
            {**self.head.state_dict(), **decoder.layers[-1].state_dict(), **prefixed(decoder.norm, "final_layernorm")}
        )
        hidden_size = self.config.text_config.hidden_size
        eye = torch.eye(hidden_size, device=self.head.input_proj.weight.device, dtype=self.head.input_proj.weight.dtype)
        self.head.input_proj.weight.copy_(torch.cat([eye, eye], dim=1))

    # ------------------------------------------------------------------ base model plumbing

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def get_decoder(self) -> nn.Module:
        return self.model.get_decoder()

    @property
    def vocab_size(self) -> int:
        return self.get_output_embeddings().weight.shape[0]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ):
        """The base model's forward, unchanged: FastMTP only changes how `generate` proposes tokens."""
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    # ------------------------------------------------------------------ the head

    def mtp_forward(
        self,
        hidden_states: torch.Tensor,
        input_ids: torch.LongTensor,
        position_ids: torch.LongTensor,
        past_key_values=None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        One application of the head to pairs (h_j, t_{j+1}) at positions j. Returns g, whose lm_head logits predict
        t_{j+2} and which is the next recursive step's h. Used alike by drafting and by training.
        """
        head_device = self.head.input_proj.weight.device
        token_embeddings = self.get_input_embeddings()(input_ids).to(head_device)
        hidden_states = hidden_states.to(head_device)
        position_ids = position_ids.to(head_device)
        rotary = self.get_decoder().rotary_emb
        if self._rope_layer_type is None:
            position_embeddings = rotary(token_embeddings, position_ids)
        else:
            position_embeddings = rotary(token_embeddings, position_ids, self._rope_layer_type)
        mask = self._head_mask_function(
            config=self.head_config,
            inputs_embeds=token_embeddings,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        return self.head(hidden_states, token_embeddings, position_embeddings, position_ids, mask, past_key_values)

    def draft_logits(self, head_output: torch.Tensor, token_ids: torch.LongTensor | None = None) -> torch.Tensor:
        """lm_head logits of the head's output, over the whole vocabulary or only over `token_ids`."""
        lm_head = self.get_output_embeddings()
        head_output = head_output.to(lm_head.weight.device)
        if token_ids is None:
            logits = lm_head(head_output)
        else:
            bias = None if getattr(lm_head, "bias", None) is None else lm_head.bias[token_ids]
            logits = F.linear(head_output, lm_head.weight[token_ids], bias)
        softcap = getattr(self.config.text_config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        *,
        fastmtp: bool | None = None,
        num_draft_tokens: int | None = None,
        draft_vocab: str | int | None = None,
        **kwargs,
    ):
        """
        `GenerationMixin.generate`, plus FastMTP speculative decoding when `fastmtp=True`.

        Args:
            fastmtp (`bool`, *optional*, defaults to `False`):
                Draft with the MTP head and verify with the base model. Lossless: greedy output is identical to
                `fastmtp=False`, and sampled output has the same distribution.
            num_draft_tokens (`int`, *optional*):
                Tokens drafted per cycle (K); defaults to `config.num_draft_tokens`.
            draft_vocab (`str` or `int`, *optional*):
                Vocabulary drafting is restricted to: `"full"` (default) for now.

        After each call `model.last_fastmtp_stats` holds a [`FastMTPStats`] (tau, per-position acceptance,
        draft/verify seconds), or `None` after plain generation.
        """
        settings = generation_config or self.generation_config
        fastmtp = bool(fastmtp if fastmtp is not None else getattr(settings, "fastmtp", False))
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        check_prompt_and_length(input_ids, settings, kwargs)
        if not fastmtp:
            self.last_fastmtp_stats = None
            return super().generate(inputs, generation_config, **kwargs)

        if num_draft_tokens is None:
            num_draft_tokens = getattr(settings, "num_draft_tokens", None)
        num_draft_tokens = check_num_draft_tokens(
            num_draft_tokens if num_draft_tokens is not None else self.config.num_draft_tokens
        )
        draft_token_ids = self.resolve_draft_vocab(draft_vocab)
        check_fastmtp_call(input_ids, settings, kwargs)

        self._fastmtp_call.request = (num_draft_tokens, draft_token_ids)
        try:
            output = super().generate(inputs, generation_config, use_mtp=True, **kwargs)
            stats = self._fastmtp_call.generator.stats
        finally:
            self._fastmtp_call.request = None
            self._fastmtp_call.generator = None
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        stats.new_tokens = sequences.shape[1] - (input_ids.shape[1] if input_ids is not None else 0)
        self.last_fastmtp_stats = stats
        return output

    def resolve_draft_vocab(self, draft_vocab: str | int | None) -> torch.LongTensor | None:
        """Token ids drafting is restricted to, or `None` for the full vocabulary."""
        if draft_vocab in (None, "full"):
            return None
        raise ValueError(f"Unsupported `draft_vocab={draft_vocab!r}`: this head has no vocabulary maps; use 'full'.")

    def _get_candidate_generator(self, generation_config: GenerationConfig, logits_processor, **kwargs):
        request = getattr(self._fastmtp_call, "request", None)
        if request is None:
            return super()._get_candidate_generator(
                generation_config=generation_config, logits_processor=logits_processor, **kwargs
            )
        num_draft_tokens, draft_token_ids = request
        generator = FastMTPCandidateGenerator(
            self, num_draft_tokens, generation_config, logits_processor, draft_token_ids=draft_token_ids
        )
        self._fastmtp_call.generator = generator
        return generator


HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "proxies", "subfolder")


def resolve_file(repo_or_dir: str | os.PathLike, filename: str, revision: str | None, hub_kwargs: dict) -> str:
    """Path of `filename` in a local folder, or in the Hugging Face cache for a Hub repo (downloaded if needed)."""
    local = Path(repo_or_dir) / hub_kwargs.get("subfolder", "") / filename
    if Path(repo_or_dir).is_dir():
        if not local.is_file():
            raise FileNotFoundError(f"{local} is missing: a FastMTP head folder needs {filename}.")
        return str(local)
    return hf_hub_download(str(repo_or_dir), filename, revision=revision, **hub_kwargs)


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, json.JSONDecodeError) as error:
        raise OSError(
            f"Could not read the weights in {path}: the file is corrupt or truncated ({error}). "
            "Delete it and download or save it again."
        ) from error


def check_head_fits_base(config: FastMTPConfig, base_model: PreTrainedModel) -> None:
    """Refuses a head trained for another architecture, width or vocabulary before any weight is loaded."""
    if base_model.config.is_encoder_decoder:
        raise ValueError("FastMTP needs a decoder-only causal LM; got an encoder-decoder model.")
    expected, actual = config.base_signature(), base_signature(base_model.config)
    differences = {k: (expected[k], actual[k]) for k in expected if expected[k] != actual[k]}
    if differences:
        details = ", ".join(f"{k}: head expects {e!r}, base has {a!r}" for k, (e, a) in differences.items())
        raise HeadMismatchError(
            f"This FastMTP head was trained for a different base model ({details}). "
            f"Load it with the base it names ({config.base_model_name_or_path!r}) or train a head for this base."
        )


def check_prompt_and_length(input_ids: torch.Tensor | None, settings: GenerationConfig, kwargs: dict) -> None:
    if input_ids is not None and input_ids.ndim == 2 and input_ids.shape[1] == 0:
        raise ValueError("The prompt is empty: generate needs at least one input token (e.g. a chat template or BOS).")
    max_new_tokens = kwargs.get("max_new_tokens", getattr(settings, "max_new_tokens", None))
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be at least 1, got {max_new_tokens}.")


def check_fastmtp_call(input_ids: torch.Tensor | None, settings: GenerationConfig, kwargs: dict) -> None:
    """Refuses settings FastMTP cannot serve, each with the way out."""

    def setting(name: str):
        return kwargs.get(name, getattr(settings, name, None))

    batch_size = input_ids.shape[0] if input_ids is not None else 1
    if batch_size * (setting("num_return_sequences") or 1) > 1:
        raise ValueError(
            f"fastmtp=True decodes one sequence at a time, got {batch_size} prompts x "
            f"{setting('num_return_sequences') or 1} return sequences. Call generate once per prompt, "
            "or use fastmtp=False for batched generation."
        )
    if (setting("num_beams") or 1) > 1:
        raise ValueError("fastmtp=True supports greedy decoding and sampling, not beam search: set num_beams=1.")
    if setting("cache_implementation") in ("static", "hybrid", "sliding_window", "offloaded_static") or isinstance(
        kwargs.get("past_key_values"), StaticCache
    ):
        raise ValueError(
            "fastmtp=True needs a dynamic cache (rejected drafts are cropped from it): drop the static "
            "`cache_implementation` / `StaticCache`, or use fastmtp=False."
        )
    for other in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit"):
        if setting(other) is not None:
            raise ValueError(f"fastmtp=True is a speculative decoding method of its own; it cannot be combined with `{other}`.")
    if setting("use_cache") is False:
        raise ValueError("fastmtp=True needs the KV cache: do not pass use_cache=False.")


def head_rope_layer_type(rotary_embedding: nn.Module, base_config) -> str | None:
    """For bases with one rotary embedding per attention type (Gemma-3): the full-attention one, if the base has it."""
    if "layer_type" not in inspect.signature(rotary_embedding.forward).parameters:
        return None
    layer_types = list(dict.fromkeys(base_config.layer_types))
    return "full_attention" if "full_attention" in layer_types else layer_types[0]


def prefixed(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{name}": tensor for name, tensor in module.state_dict().items()}


__all__ = ["FastMTPForCausalLM", "HeadMismatchError"]
