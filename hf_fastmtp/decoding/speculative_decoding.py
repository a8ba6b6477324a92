"""
The FastMTP decode loop: draft with the head, verify with the base in one forward, keep what plain decoding keeps.

`generate(fastmtp=True)` runs it through Transformers' public route for a decoding loop of one's own
(`generate(custom_generate=<callable>)`): `generate()` prepares everything as usual (the generation config, logits
processors, stopping criteria, the KV cache, the attention mask), then calls `fastmtp_decoding` in place of its
greedy or sampling loop. Owning the loop is what makes stopping exact: Transformers' assisted loop trims the tokens a
cycle accepts at EOS and `max_length` only, so a stop string or a user's `StoppingCriteria` inside an accepted run
let decoding run past where plain decoding stops.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import DynamicCache

from .candidate_generator import FastMTPCandidateGenerator
from .transformers_compat import (
    activate_past_recording,
    cache_keyword,
    decoder_only_output,
    generation_cache,
    last_hidden_state_only,
)

if TYPE_CHECKING:
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    from .modeling_fastmtp import FastMTPForCausalLM

# What `generate()` may leave in `model_kwargs` for a decoder-only model; the loop builds the rest itself.
HANDLED_MODEL_KWARGS = frozenset(
    {"attention_mask", "position_ids", "cache", "past_key_values", "use_cache", "logits_to_keep", "cache_position"}
)


@torch.no_grad()
def fastmtp_decoding(
    model: FastMTPForCausalLM,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    synced_gpus: bool = False,
    streamer: BaseStreamer | None = None,
    *,
    drafter_options: dict[str, Any],
    **model_kwargs,
):
    """
    Speculative decoding with the model's FastMTP head, as a `custom_generate` decoding loop (batch size 1).

    Each cycle: 1. the head drafts up to K tokens; 2. the base verifies the last token and the drafts in one forward;
    3. the drafts the base agrees with are accepted, plus the base's own next token (greedy: matching argmaxes;
    sampling: speculative sampling, which keeps the distribution); 4. the kept tokens are cut where a stopping
    criterion fires, each criterion called once per token in order, exactly as plain decoding calls them; 5. the KV
    cache drops what was computed for the rejected drafts. The prefill is a cycle with no drafts.
    `drafter_options` are `FastMTPCandidateGenerator`'s; its stats end up in `model.last_fastmtp_stats`.
    """
    check_decoding_call(input_ids, generation_config, synced_gpus, model_kwargs)
    drafter = FastMTPCandidateGenerator(
        model, generation_config=generation_config, logits_processor=logits_processor, **drafter_options
    )
    cache = generation_cache(model_kwargs)
    if cache is None:
        cache = DynamicCache(config=model.config.text_config)
    activate_past_recording(cache, drafter.num_drafting_tokens)
    forward_options = {cache_keyword(model.model.forward): cache, "output_hidden_states": last_hidden_state_only()}
    attention_mask = model_kwargs.get("attention_mask")
    prompt_length = input_ids.shape[1]
    want_scores = generation_config.return_dict_in_generate and generation_config.output_scores
    want_logits = generation_config.return_dict_in_generate and generation_config.output_logits
    scores, raw_logits = [], []
    if streamer is not None:  # (`generate()` streams the prompt only to loops it knows)
        streamer.put(input_ids.cpu())

    outputs, num_matches, finished, first_cycle = None, 0, False, True
    while not finished:
        # 1. Draft: candidate_ids is input_ids followed by the drafts.
        candidate_ids, draft_logits = drafter.get_candidates(
            input_ids, model_outputs=outputs, is_first_iteration=first_cycle, n_last_matches=num_matches
        )
        num_drafts = candidate_ids.shape[1] - input_ids.shape[1]

        # 2. Verify every token not in the cache yet: the prompt on the first cycle, then the last token and drafts.
        new_ids = candidate_ids[:, cache.get_seq_length() :]
        verify_mask = None if attention_mask is None else extended(attention_mask, num_drafts)
        outputs = model.model(
            input_ids=new_ids,
            attention_mask=verify_mask,
            position_ids=position_ids(verify_mask, cache.get_seq_length(), new_ids.shape[1], new_ids.device),
            use_cache=True,
            logits_to_keep=num_drafts + 1,
            **forward_options,
        )
        # Position i's logits choose the token after input_ids + drafts[:i]; processors see that prefix.
        verify_logits = outputs.logits[:, -num_drafts - 1 :].to(device=input_ids.device, dtype=torch.float32)
        processed = process_logits(logits_processor, candidate_ids, verify_logits)

        # 3. Accept: the agreed drafts and one token of the base's own.
        drafts = candidate_ids[:, input_ids.shape[1] :]
        if not generation_config.do_sample:
            kept = accept_greedy(drafts, processed)
        elif draft_logits is not None:
            kept = accept_speculative_sampling(drafts, draft_logits.to(processed.device), processed)
        else:  # drafts without a distribution (prompt lookup): sampled tokens that match them are exact too
            kept = accept_greedy(drafts, processed, sampled=torch.multinomial(processed[0].softmax(-1), 1).T)

        # 4. Stop where plain decoding would: every criterion sees every prefix (a view), one token at a time.
        extended_ids = torch.cat([input_ids, kept], dim=-1)
        for length in range(1, kept.shape[1] + 1):
            if want_scores:
                scores.append(processed[:, length - 1])
            if want_logits:
                raw_logits.append(verify_logits[:, length - 1])
            if stopping_criteria(extended_ids[:, : input_ids.shape[1] + length], tuple(scores) or None).all():
                finished = True
                kept = kept[:, :length]
                break
        input_ids = extended_ids[:, : input_ids.shape[1] + kept.shape[1]]
        if attention_mask is not None:
            attention_mask = extended(attention_mask, kept.shape[1])
        if streamer is not None:
            streamer.put(kept.cpu())

        # 5. The cache holds every verified position; keep those before the last kept token (it is verified next).
        cache.crop(-(num_drafts + 1 - kept.shape[1]))
        num_matches = kept.shape[1] - 1
        drafter.update_candidate_strategy(input_ids, processed, num_matches)
        first_cycle = False

    if streamer is not None:
        streamer.end()
    drafter.stats.new_tokens = input_ids.shape[1] - prompt_length
    model.last_fastmtp_stats = drafter.stats
    if not generation_config.return_dict_in_generate:
        return input_ids
    return decoder_only_output(
        input_ids, tuple(scores) if want_scores else None, tuple(raw_logits) if want_logits else None, cache
    )


def process_logits(
    logits_processor: LogitsProcessorList, candidate_ids: torch.LongTensor, verify_logits: torch.FloatTensor
) -> torch.FloatTensor:
    """
    Each position's logits through the call's processors, given the prefix before it (position i follows
    `candidate_ids` without its last K - i drafts); without processors, the logits themselves.
    """
    if not logits_processor:
        return verify_logits
    prompt_length = candidate_ids.shape[1] - verify_logits.shape[1] + 1
    return torch.stack(
        [
            logits_processor(candidate_ids[:, : prompt_length + i], verify_logits[:, i].clone())
            for i in range(verify_logits.shape[1])
        ],
        dim=1,
    )


def accept_greedy(
    drafts: torch.LongTensor, processed: torch.FloatTensor, sampled: torch.LongTensor | None = None
) -> torch.LongTensor:
    """
    The drafts up to the first one that differs from the base's choice, then the base's choice there (or after the
    last draft). The base's choice is its argmax, or `sampled`: a token drawn from each position's distribution.
    """
    chosen = processed.argmax(dim=-1) if sampled is None else sampled
    agree = (drafts == chosen[:, :-1]).int().cumprod(dim=-1)
    num_accepted = int(agree.sum())
    return chosen[:, : num_accepted + 1]


def accept_speculative_sampling(
    drafts: torch.LongTensor, draft_logits: torch.FloatTensor, processed: torch.FloatTensor
) -> torch.LongTensor:
    """
    Speculative sampling (Leviathan et al. 2023, Algorithm 1): draft i, drawn from q_i, is accepted with probability
    min(1, p_i(d_i) / q_i(d_i)); at the first rejection the token is drawn from max(p_i - q_i, 0), renormalised; if
    every draft is accepted, one more is drawn from p_K. The kept tokens are distributed exactly as sampling from p.
    """
    p = processed.softmax(dim=-1)
    q = draft_logits.float().softmax(dim=-1)
    num_drafts = drafts.shape[1]
    p_of_drafts = p[:, :num_drafts].gather(-1, drafts[..., None]).squeeze(-1)
    q_of_drafts = q.gather(-1, drafts[..., None]).squeeze(-1)
    accepted = torch.rand_like(p_of_drafts) * q_of_drafts <= p_of_drafts
    num_accepted = int(accepted.int().cumprod(dim=-1).sum())
    if num_accepted < num_drafts:
        residual = (p[:, num_accepted] - q[:, num_accepted]).clamp(min=0)
        # (All-zero only if p == q there, where a rejection has probability 0: then p itself.)
        next_distribution = residual if residual.sum() > 0 else p[:, num_accepted]
    else:
        next_distribution = p[:, num_drafts]
    next_token = torch.multinomial(next_distribution / next_distribution.sum(-1, keepdim=True), 1)
    return torch.cat([drafts[:, :num_accepted], next_token], dim=-1)


def extended(attention_mask: torch.Tensor, num_new: int) -> torch.Tensor:
    return torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], num_new))], dim=-1)


def position_ids(
    attention_mask: torch.Tensor | None, past_length: int, num_new: int, device: torch.device
) -> torch.LongTensor:
    """Positions of the new tokens: after the cached ones, or counted over the attention mask's real tokens."""
    if attention_mask is None:
        return torch.arange(past_length, past_length + num_new, device=device).unsqueeze(0)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)[:, -num_new:].to(device)


def check_decoding_call(
    input_ids: torch.LongTensor, generation_config: GenerationConfig, synced_gpus: bool, model_kwargs: dict
) -> None:
    """Refuses what this loop cannot serve, each with the way out."""
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"fastmtp=True decodes one sequence at a time, got {input_ids.shape[0]}. Call generate once per prompt, "
            "or use fastmtp=False for batched generation."
        )
    if generation_config.output_attentions or generation_config.output_hidden_states:
        raise ValueError(
            "fastmtp=True does not return per-token attentions or hidden states: drop `output_attentions` / "
            "`output_hidden_states`, or use fastmtp=False."
        )
    if synced_gpus:
        raise ValueError("fastmtp=True does not support `synced_gpus` (DeepSpeed ZeRO-3 / FSDP generation).")
    unexpected = sorted(
        key for key, value in model_kwargs.items() if value is not None and key not in HANDLED_MODEL_KWARGS
    )
    if unexpected:
        raise ValueError(f"fastmtp=True takes `input_ids` and `attention_mask` only; got model inputs {unexpected}.")


__all__ = ["accept_greedy", "accept_speculative_sampling", "fastmtp_decoding"]
