"""`FastMTPForCausalLM`: a frozen decoder-only base model plus a FastMTP head, with `generate(fastmtp=True)`."""

from __future__ import annotations

import copy
import functools
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.cache_utils import StaticCache
from transformers.dynamic_module_utils import custom_object_save
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.utils import CONFIG_NAME

from .calibration import Calibration, calibration_enabled, calibration_key, load_or_calibrate
from .configuration_fastmtp import (
    FastMTPConfig,
    base_signature,
    check_draft_confidence_threshold,
    check_draft_length,
    resolve_feature_layers,
)
from .cpu_kernels import CPUKernels, KernelChoice, is_cpu_float32
from .draft_length import AutoDraftLength, DraftLength, FixedDraftLength
from .draft_vocab import DraftVocabularies, DraftVocabulary, detect_language, last_user_message, load_vocab_map
from .draft_weights import draft_linear
from .generate_with_head import save_custom_generate
from .hub_files import (
    HEAD_PREFIX,
    HEAD_WEIGHTS_NAME,
    HUB_KWARGS,
    is_mimo_config,
    local_draft_vocab_maps,
    read_safetensors,
    resolve_base_config,
    resolve_file,
    save_vocab_maps,
)
from .mimo import load_mimo, load_mimo_base
from .model_card import write_model_card
from .mtp_head import FastMTPHead, head_features, head_rope_layer_type, zero_first_position
from .speculative_decoding import fastmtp_decoding
from .stats import FastMTPStats
from .transformers_compat import (
    cache_keyword,
    custom_generate_call,
    list_as_text_generation_model,
    without_loader_internals,
)


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
        self.mtp_layers = nn.ModuleList([self._new_head()])
        self._rope_layer_type = head_rope_layer_type(decoder.rotary_emb, base_model.config)
        sliding = getattr(self.head_config, "layer_types", None) is None and getattr(
            self.head_config, "sliding_window", None
        )
        self._head_mask_function = create_sliding_window_causal_mask if sliding else create_causal_mask
        self._head_mask_cache_keyword = cache_keyword(self._head_mask_function)
        self.generation_config = GenerationConfig.from_dict(base_model.generation_config.to_dict())
        self.last_fastmtp_stats: FastMTPStats | None = None
        self.draft_vocabularies = DraftVocabularies(self.vocab_size)
        self._calibrations: dict[str, Calibration | None] = {}
        # Reads the prompt's language for draft_vocab="auto" when generate() is not given a `tokenizer`.
        self.prompt_tokenizer = None
        if config.draft_vocab_maps:  # local files by now (from_pretrained resolves and downloads them)
            maps = {key: load_vocab_map(path, self.vocab_size) for key, path in config.draft_vocab_maps.items()}
            self.set_draft_vocab_maps(maps, default=config.default_draft_vocab)
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
        feature_layers: list[int] | None = None,
        num_head_layers: int = 1,
    ) -> FastMTPForCausalLM:
        """
        Wraps a loaded causal LM. `head` is a `FastMTPHead`, a head state dict (`mtp_layers.0.*` or bare names),
        or `None` for a new head initialised from the base model's last decoder layer (untrained: drafts are poor
        until it is trained with `fastmtp train`). `feature_layers` and `num_head_layers` configure the head
        (`FastMTPConfig`).
        """
        if feature_layers is not None:
            feature_layers = resolve_feature_layers(feature_layers, base_model.config.num_hidden_layers)
        config = FastMTPConfig(
            # A copy: building a composite config resets the attention implementation of the config it is given.
            text_config=copy.deepcopy(base_model.config),
            base_model_name_or_path=base_model_name_or_path or base_model.config.name_or_path or None,
            num_draft_tokens=num_draft_tokens,
            feature_layers=feature_layers,
            num_head_layers=num_head_layers,
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
        draft_vocab_maps: dict[str, str] | None = None,
        **kwargs,
    ) -> FastMTPForCausalLM:
        """
        Loads a head-only folder or Hub repo and the base model it names (`config.base_model_name_or_path`), or the
        given `base_model` (a loaded model, or a path / Hub id to load instead of the one the head names). Also loads
        MiMo checkpoints (`TencentBAC/FastMTP`, `XiaomiMiMo/MiMo-7B-*`), whose base and MTP layer share one set of
        weights: the base becomes a plain `Qwen2ForCausalLM` and `model.mtp_layers.0` the head.

        `dtype`, `device_map`, `revision` and Hub arguments (`cache_dir`, `token`, `local_files_only`, ...) pass
        through to the base model's `from_pretrained`. `draft_vocab_maps` adds vocabulary maps (language -> local file
        or `"repo_id:filename"`); after loading, `config.draft_vocab_maps` holds every map as a local file path.
        """
        kwargs = without_loader_internals(kwargs)
        hub_kwargs = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
        kwargs.pop("trust_remote_code", None)
        if config is None:
            if is_mimo_config(resolve_file(pretrained_model_name_or_path, CONFIG_NAME, revision, hub_kwargs)):
                return load_mimo(
                    cls,
                    pretrained_model_name_or_path,
                    revision=revision,
                    dtype=dtype,
                    device_map=device_map,
                    draft_vocab_maps=draft_vocab_maps,
                    **hub_kwargs,
                    **kwargs,
                )
            config = cls.config_class.from_pretrained(pretrained_model_name_or_path, revision=revision, **hub_kwargs)
        if not isinstance(base_model, PreTrainedModel):
            base_id = base_model or config.base_model_name_or_path
            if base_id is None:
                raise ValueError(
                    f"The head at {pretrained_model_name_or_path} does not name its base model "
                    "(`base_model_name_or_path` is empty in config.json): pass `base_model=` (a model or its path)."
                )
            base_revision = config.base_model_revision if base_model is None else None
            base_model = load_base_model(base_id, base_revision, dtype, device_map, hub_kwargs, kwargs)
        config.draft_vocab_maps = local_draft_vocab_maps(
            config.draft_vocab_maps, draft_vocab_maps, pretrained_model_name_or_path, revision, hub_kwargs
        )
        model = cls(config, base_model=base_model)
        weights_file = resolve_file(pretrained_model_name_or_path, HEAD_WEIGHTS_NAME, revision, hub_kwargs)
        model.load_head_state_dict(read_safetensors(weights_file))
        model.name_or_path = str(pretrained_model_name_or_path)
        return model.eval()

    def save_pretrained(
        self, save_directory: str | os.PathLike, *, model_card_extra: dict[str, Any] | None = None, **kwargs
    ) -> None:
        """
        Writes a head-only folder: config (with `auto_map`), the code to load it, head weights, generation config,
        the vocabulary maps (written under `vocab/`), a model card (README.md; `model_card_extra` as in
        `model_card.model_card`) and `custom_generate/`, with which any copy of the base model drafts with this head
        (`base.generate(..., custom_generate=folder_or_repo, trust_remote_code=True)`).
        """
        save_directory = Path(save_directory)
        if save_directory.is_file():
            raise ValueError(f"{save_directory} is a file; `save_pretrained` needs a folder.")
        save_directory.mkdir(parents=True, exist_ok=True)
        self.config.architectures = [type(self).__name__]
        self.register_for_auto_class("AutoModelForCausalLM")
        self.config.register_for_auto_class()
        # Copies this module, its relative imports and the config's module into the folder and fills `auto_map`.
        custom_object_save(self, save_directory, config=self.config)
        save_custom_generate(save_directory)
        # The folder's config names its own copies of the maps.
        config = copy.deepcopy(self.config)
        config.draft_vocab_maps = save_vocab_maps(self.draft_vocab_maps, save_directory)
        config.save_pretrained(save_directory)
        self.generation_config.save_pretrained(save_directory)
        head_state = {HEAD_PREFIX + name: t.detach().contiguous().cpu() for name, t in self.head.state_dict().items()}
        save_file(head_state, save_directory / HEAD_WEIGHTS_NAME, metadata={"format": "pt"})
        write_model_card(config, save_directory, model_card_extra)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str = "Upload FastMTP head",
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        model_card_extra: dict[str, Any] | None = None,
    ):
        """Uploads exactly the head-only folder `save_pretrained` writes; returns the commit's `CommitInfo`."""
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, model_card_extra={"repo_id": repo_id, **(model_card_extra or {})})
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message,
                revision=revision,
                create_pr=create_pr,
            )

    @property
    def head(self) -> FastMTPHead:
        return self.mtp_layers[0]

    def _new_head(self) -> FastMTPHead:
        """A head as `self.config` describes it, untrained, on the base's device and dtype."""
        decoder = self.model.get_decoder()
        num_features = len(self.config.feature_layers) if self.config.feature_layers else 1
        head = FastMTPHead(self.head_config, type(decoder.layers[-1]), type(decoder.norm), num_features)
        return head.to(device=self.model.device, dtype=self.model.dtype)

    @torch.no_grad()
    def expand_head(self, *, feature_layers: list[int] | None = None, num_head_layers: int | None = None) -> None:
        """
        Replaces the head with one that reads `feature_layers` and/or has `num_head_layers` layers, and drafts exactly
        what it drafted: the trained weights are kept, and the parts the head lacked start as pass-throughs
        (`FastMTPHead.pass_through_new_parts`). Training goes on from there (`fastmtp train --init`).
        """
        config = self.config
        old_feature_layers, old_num_layers = config.feature_layers, config.num_head_layers
        if feature_layers is not None:
            feature_layers = resolve_feature_layers(feature_layers, self.model.config.num_hidden_layers)
            if old_feature_layers not in (None, feature_layers):
                raise ValueError(
                    f"This head already fuses the base's hidden states {old_feature_layers}; it cannot be converted "
                    f"to read {feature_layers}: train a new head, or start from one that reads the final state only."
                )
        if num_head_layers is not None and num_head_layers < old_num_layers:
            raise ValueError(
                f"This head has {old_num_layers} layers; expanding it cannot remove layers "
                f"(asked for {num_head_layers})."
            )
        config.feature_layers = feature_layers or old_feature_layers
        config.num_head_layers = num_head_layers or old_num_layers
        old_head = self.head
        self.head_config = config.head_config()
        self.mtp_layers[0] = self._new_head()
        self.head.load_state_dict({**self.head.state_dict(), **old_head.state_dict()})
        self.head.pass_through_new_parts(new_fusion=old_feature_layers is None, first_new_layer=old_num_layers)

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
        `input_proj` adds the normed hidden state and the next token's normed embedding, scaled to the size of the
        residual stream that the copied layer was trained on (measured on a short probe sequence).
        """
        decoder = self.model.get_decoder()
        self.head.load_state_dict(
            {**self.head.state_dict(), **decoder.layers[-1].state_dict(), **prefixed(decoder.norm, "final_layernorm")}
        )
        self.head.pass_through_new_parts()
        probe = torch.arange(1, min(self.vocab_size, 33), device=self.model.device).unsqueeze(0)
        last_layer_input = self.model(probe, output_hidden_states=True).hidden_states[-2]
        residual_rms = last_layer_input.float().pow(2).mean().sqrt()
        weight = self.head.input_proj.weight
        eye = torch.eye(weight.shape[0], device=weight.device, dtype=torch.float32)
        # Two independent unit-RMS inputs sum to RMS sqrt(2).
        weight.copy_(torch.cat([eye, eye], dim=1) * residual_rms / 2**0.5)

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
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ):
        """
        The base model's forward, unchanged: FastMTP only changes how `generate` proposes tokens. The KV cache passes
        through `kwargs` under the name `generate` gives it (`cache` since Transformers 5.24, `past_key_values`
        before).
        """
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
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
        *,
        from_base: bool = False,
    ) -> torch.Tensor:
        """
        One application of the head to pairs (h_j, t_{j+1}) at positions j. Returns g, whose lm_head logits predict
        t_{j+2} and which is the next recursive step's h. Used alike by drafting and by training. `from_base`: the
        `hidden_states` are the base's (`base_features`, the first draft step's input), which a head with
        `feature_layers` fuses first; otherwise they are a previous step's g.

        The token embedding at position 0 is zeroed, as MiMo's MTP layer does in SGLang and vLLM: a head then drafts
        the same here as when those engines serve its export (see `zero_first_position`).
        """
        head_device = self.head.input_proj.weight.device
        hidden_states = hidden_states.to(head_device)
        if from_base:
            hidden_states = self.head.fuse_features(hidden_states)
        position_ids = position_ids.to(head_device)
        token_embeddings = self.get_input_embeddings()(input_ids).to(head_device)
        token_embeddings = zero_first_position(token_embeddings, position_ids)
        rotary = self.get_decoder().rotary_emb
        if self._rope_layer_type is None:
            position_embeddings = rotary(token_embeddings, position_ids)
        else:
            position_embeddings = rotary(token_embeddings, position_ids, self._rope_layer_type)
        mask = self._head_mask_function(
            config=self.head_config,
            inputs_embeds=token_embeddings,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{self._head_mask_cache_keyword: past_key_values},
        )
        return self.head(hidden_states, token_embeddings, position_embeddings, position_ids, mask, past_key_values)

    def base_features(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """What the head's first step reads of a base forward's `hidden_states` (`mtp_head.head_features`)."""
        return head_features(hidden_states, self.config.feature_layers)

    def draft_logits(self, head_output: torch.Tensor, vocabulary: DraftVocabulary | None = None) -> torch.Tensor:
        """lm_head logits of the head's output, over the whole vocabulary or over a restricted one."""
        lm_head = self.get_output_embeddings()
        head_output = head_output.to(lm_head.weight.device)
        logits = lm_head(head_output) if vocabulary is None else draft_linear(head_output, vocabulary.lm_head)
        softcap = getattr(self.config.text_config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    # ------------------------------------------------------------------ draft vocabularies

    @property
    def draft_vocab_maps(self) -> dict[str, torch.LongTensor]:
        """Language code (or "all") -> token ids drafting may be restricted to, most frequent first."""
        return self.draft_vocabularies.maps

    def set_draft_vocab_maps(self, maps: dict[str, torch.Tensor], default: str | None = None) -> None:
        """
        Restricts drafting to frequent tokens: `maps` is language code (or "all") -> 1-D tensor of token ids,
        most frequent first (SGLang / FR-Spec token-map format). `default` serves prompts whose language has no map.
        """
        self.draft_vocabularies.set_maps(maps, default)
        self.config.default_draft_vocab = self.draft_vocabularies.default

    def draft_vocabulary(self, name: str, size: int | None = None, weight_format: str = "native") -> DraftVocabulary:
        """
        The map `name` (its `size` most frequent ids), with its lm_head rows sliced once and cached: on a CPU, in the
        draft steps' `weight_format` (`DraftWeight`: a draft step's product with them is memory-bound).
        """
        return self.draft_vocabularies.get(name, size, self.get_output_embeddings(), weight_format)

    def resolve_draft_vocab(
        self,
        draft_vocab: str | int | None,
        input_ids: torch.LongTensor | None = None,
        tokenizer=None,
        weight_format: str = "native",
    ) -> tuple[DraftVocabulary | None, str | None]:
        """The vocabulary to draft over and the detected language (`DraftVocabularies.resolve`)."""
        return self.draft_vocabularies.resolve(
            draft_vocab,
            self.get_output_embeddings(),
            lambda: self.prompt_language(input_ids, tokenizer),
            weight_format,
        )

    def prompt_language(self, input_ids: torch.LongTensor | None, tokenizer=None) -> str | None:
        """Language of the prompt's last user message, or None when it cannot be read or detected."""
        tokenizer = tokenizer or self.prompt_tokenizer
        if tokenizer is None or input_ids is None:
            return None
        prompt_text = tokenizer.decode(input_ids[0], skip_special_tokens=False)
        return detect_language(last_user_message(prompt_text, tokenizer))

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        *,
        fastmtp: bool | None = None,
        num_draft_tokens: int | str | None = None,
        draft_vocab: str | int | None = None,
        draft_confidence_threshold: float | None = None,
        **kwargs,
    ):
        """
        `GenerationMixin.generate`, plus FastMTP speculative decoding when `fastmtp=True`.

        Args:
            fastmtp (`bool`, *optional*, defaults to `False`):
                Draft with the MTP head and verify with the base model. Lossless: greedy output is identical to
                `fastmtp=False`, and sampled output has the same distribution. (On a CPU the calibrated kernels
                compute the same products in another order, so logits agree to float32 rounding, as between any
                two BLAS kernels: only an exact near-tie could tell them apart.)
            num_draft_tokens (`int` or `"auto"`, *optional*, defaults to `"auto"`):
                Tokens drafted per cycle (K). `"auto"` chooses K in every cycle (0, a plain step, included) for the
                most tokens per second, from this machine's measured costs of verifying and drafting and from the
                head's acceptance (`draft_length.AutoDraftLength`); an int keeps K fixed (0: plain decoding in this
                loop, with this machine's calibrated kernels).
            draft_vocab (`str` or `int`, *optional*):
                Vocabulary the head drafts over: `"auto"` (the default when the head ships maps: the map of the
                prompt's language), `"full"`, an int (the overall top-N map) or a language code.
            draft_confidence_threshold (`float`, *optional*):
                Stop drafting a cycle where the head's top probability falls below this; a cycle with no draft is a
                plain step. Worth it where verifying K+1 tokens costs much more than 1 (CPUs); off by default.

        With `prompt_lookup_num_tokens=N` (Transformers' prompt lookup option) FastMTP also looks the last tokens up in
        the prompt and the text so far; where the continuation it finds starts with the head's most likely token, the
        cycle drafts up to N tokens of it instead of K from the head: long accepted runs where text is copied
        (summaries, extraction, RAG). `max_matching_ngram_size` is honoured too. Lossless as well.

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
        num_draft_tokens = check_draft_length("auto" if num_draft_tokens is None else num_draft_tokens)
        if draft_confidence_threshold is None:
            draft_confidence_threshold = getattr(settings, "draft_confidence_threshold", None)
        draft_confidence_threshold = check_draft_confidence_threshold(draft_confidence_threshold)
        prompt_lookup_num_tokens = call_setting(settings, kwargs, "prompt_lookup_num_tokens")
        if num_draft_tokens == 0 and prompt_lookup_num_tokens:
            raise ValueError(
                "num_draft_tokens=0 never drafts, so prompt lookup would never run: drop prompt_lookup_num_tokens, "
                "or draft (num_draft_tokens='auto' or K >= 1)."
            )
        check_fastmtp_call(input_ids, settings, kwargs)
        # Measured (once per machine) where it chooses something: kernels for float32 on a CPU, K for "auto".
        wanted = num_draft_tokens == "auto" or is_cpu_float32(self.get_output_embeddings().weight)
        calibration = self.calibration() if wanted else None
        choice = calibration.choice if calibration is not None else KernelChoice()
        draft_vocabulary, language = None, None
        if num_draft_tokens != 0:  # (plain steps draft over nothing)
            draft_vocabulary, language = self.resolve_draft_vocab(
                draft_vocab, input_ids, kwargs.get("tokenizer"), choice.draft_weights
            )

        drafter_options = {
            "draft_length": self.draft_length(num_draft_tokens, calibration),
            "draft_vocabulary": draft_vocabulary,
            "language": language,
            "confidence_threshold": draft_confidence_threshold,
            "prompt_lookup_num_tokens": prompt_lookup_num_tokens,
            "max_matching_ngram_size": call_setting(settings, kwargs, "max_matching_ngram_size"),
        }
        # Not Transformers' assisted loop: ours, which stops exactly where plain decoding stops (see its module).
        kwargs.pop("prompt_lookup_num_tokens", None)
        kwargs.pop("max_matching_ngram_size", None)
        with (
            custom_generate_call(self, generation_config, kwargs) as (generation_config, loop_kwargs),
            CPUKernels(self, choice, draft_modules=self.head),
        ):
            decoding = functools.partial(
                fastmtp_decoding,
                drafter_options=drafter_options,
                prefill_cost=calibration and calibration.prefill_cost(),
                **loop_kwargs,
            )
            return super().generate(inputs, generation_config, custom_generate=decoding, **kwargs)

    def calibration(self, remeasure: bool = False) -> Calibration | None:
        """
        This machine's `Calibration` for this model (kernel choices, verification and draft-step costs): measured on
        first use, then read from the cache (`calibration.py`). None with `HF_FASTMTP_CALIBRATION=off`.
        """
        key = json.dumps([calibration_enabled(), calibration_key(self)], sort_keys=True)
        if remeasure or key not in self._calibrations:
            self._calibrations[key] = load_or_calibrate(self, remeasure=remeasure)
        return self._calibrations[key]

    def draft_length(self, num_draft_tokens: int | str, calibration: Calibration | None) -> DraftLength:
        """K for each cycle: fixed, or "auto" (`AutoDraftLength`) from the calibration's costs and the head's
        measured acceptance; "auto" without a calibration drafts the head's default K."""
        if num_draft_tokens != "auto":
            return FixedDraftLength(num_draft_tokens)
        if calibration is None:
            return FixedDraftLength(self.config.num_draft_tokens)
        # A head position costs about one decoder layer per head layer, plus its projections (the fusion's 2H -> H is
        # about a fifth of a layer; a multi-layer-feature head's adds more): half a layer, on the cautious side.
        head_share = (self.config.num_head_layers + 0.5) / self.config.text_config.num_hidden_layers
        return AutoDraftLength(
            calibration.forward_seconds, calibration.draft_step_seconds, self.config.draft_acceptance, head_share
        )


def load_base_model(
    base_id: str | os.PathLike, revision: str | None, dtype, device_map, hub_kwargs: dict, kwargs: dict
) -> PreTrainedModel:
    """The base a head names: any causal LM, or the Qwen2 base of a MiMo checkpoint (its own MTP layers unused)."""
    hub_kwargs = {k: v for k, v in hub_kwargs.items() if k != "subfolder"}  # the subfolder is the head's
    if is_mimo_config(resolve_base_config(base_id, revision, hub_kwargs)):
        return load_mimo_base(base_id, revision=revision, dtype=dtype, device_map=device_map, **hub_kwargs, **kwargs)
    return AutoModelForCausalLM.from_pretrained(
        base_id, revision=revision, dtype=dtype, device_map=device_map, **hub_kwargs, **kwargs
    )


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


def call_setting(settings: GenerationConfig, kwargs: dict, name: str):
    """A generation setting as this call has it: its keyword argument, else its generation config's value."""
    return kwargs.get(name, getattr(settings, name, None))


def check_fastmtp_call(input_ids: torch.Tensor | None, settings: GenerationConfig, kwargs: dict) -> None:
    """Refuses settings FastMTP cannot serve, each with the way out."""

    def setting(name: str):
        return call_setting(settings, kwargs, name)

    batch_size = input_ids.shape[0] if input_ids is not None else 1
    pad = setting("pad_token_id")
    if batch_size > 1 and kwargs.get("attention_mask") is None and pad is not None and (input_ids == pad).any():
        raise ValueError(
            "This batch holds padding but no attention mask: pass the tokenizer's `attention_mask` too "
            "(`tokenizer(prompts, padding=True, padding_side='left', return_tensors='pt')`)."
        )
    if batch_size * (setting("num_return_sequences") or 1) > 1 and setting("prompt_lookup_num_tokens"):
        raise ValueError(
            "fastmtp=True with prompt lookup decodes one sequence at a time: drop `prompt_lookup_num_tokens` for a "
            "batch (or `num_return_sequences` > 1), or call generate once per prompt."
        )
    if (setting("num_beams") or 1) > 1:
        raise ValueError("fastmtp=True supports greedy decoding and sampling, not beam search: set num_beams=1.")
    if setting("cache_implementation") in ("static", "hybrid", "sliding_window", "offloaded_static") or any(
        isinstance(kwargs.get(name), StaticCache) for name in ("cache", "past_key_values")
    ):
        raise ValueError(
            "fastmtp=True needs a dynamic cache (rejected drafts are cropped from it): drop the static "
            "`cache_implementation` / `StaticCache`, or use fastmtp=False."
        )
    for other in ("assistant_model", "assistant_early_exit"):
        if setting(other) is not None:
            raise ValueError(
                f"fastmtp=True is a speculative decoding method of its own; it cannot be combined with `{other}`."
            )
    for lookup_setting in ("prompt_lookup_num_tokens", "max_matching_ngram_size"):
        value = setting(lookup_setting)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"`{lookup_setting}` must be a positive integer, got {value!r}.")
    if setting("use_cache") is False:
        raise ValueError("fastmtp=True needs the KV cache: do not pass use_cache=False.")


def prefixed(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{name}": tensor for name, tensor in module.state_dict().items()}


# So that `pipeline("text-generation", model=...)` takes the model without logging an error, also where it was loaded
# as a head repo's remote code.
list_as_text_generation_model(FastMTPConfig.model_type, FastMTPForCausalLM.__name__)

__all__ = ["FastMTPForCausalLM", "HeadMismatchError"]
