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

from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from transformers.cache_utils import Cache, DynamicCache

from .appending_cache import append_in_place, appending_cache
from .candidate_generator import FastMTPCandidateGenerator, extended, positions_of
from .prefill import ForwardCost, grouped_prefill, plan_prefill, prompt_spans
from .transformers_compat import (
    activate_past_recording,
    cache_keyword,
    decoder_only_output,
    generation_cache,
    hidden_states_to_output,
    pad_token_id,
    shift_cache_rows,
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
    prefill_cost: ForwardCost | None = None,
    **model_kwargs,
):
    """
    Speculative decoding with the model's FastMTP head, as a `custom_generate` decoding loop, for a batch of B >= 1
    (left-padded) prompts.

    Each cycle: 1. the head drafts up to K tokens per row; 2. the base verifies each row's last token and drafts in one
    forward; 3. each row accepts the drafts the base agrees with, plus the base's own next token (greedy: matching
    argmaxes; sampling: speculative sampling, which keeps the distribution); 4. each row's kept tokens are cut where a
    stopping criterion fires, each criterion called once per token in order, as plain decoding calls them, and finished
    rows leave the batch; 5. the KV caches drop what was computed for rejected drafts, and rows that kept fewer tokens
    than others are re-aligned (`RowAlignment`). The prefill is a cycle with no drafts; a batch's prompts are
    prefilled in groups of similar length where `prefill_cost` (seconds of a forward over n positions, measured)
    says that is cheaper than one padded forward (`prefill.py`).
    `drafter_options` are `FastMTPCandidateGenerator`'s; its stats end up in `model.last_fastmtp_stats`.
    """
    attention_mask = model_kwargs.get("attention_mask")
    check_decoding_call(input_ids, attention_mask, generation_config, synced_gpus, streamer, model_kwargs)
    batch_size = input_ids.shape[0]
    drafter = FastMTPCandidateGenerator(
        model, generation_config=generation_config, logits_processor=logits_processor, **drafter_options
    )
    capacity = generation_config.max_length + drafter.num_drafting_tokens
    cache = decoding_cache(model, generation_cache(model_kwargs), batch_size, capacity)
    activate_past_recording(cache, drafter.num_drafting_tokens)
    forward_options = {
        cache_keyword(model.model.forward): cache,
        "output_hidden_states": hidden_states_to_output(model.config.feature_layers is not None),
    }
    rows = RowOutputs(input_ids, generation_config)
    if streamer is not None:  # (`generate()` streams the prompt only to loops it knows)
        streamer.put(input_ids.cpu())

    # The active rows' tokens right-aligned ("slots"; left padding masked), as the caches hold them.
    slot_ids, slot_mask = input_ids, attention_mask
    if slot_mask is None and batch_size > 1:
        slot_mask = torch.ones_like(input_ids)
    prefill = None  # (a plan of groups, where cheaper than one padded forward)
    if batch_size > 1 and prefill_cost is not None:
        prefill = plan_prefill(prompt_spans(slot_mask), slot_mask.shape[1], prefill_cost)
    prefill_positions = None if prefill is None else prefill.num_positions
    outputs, num_matches, first_cycle = None, 0, True
    while True:
        # 1. Draft: candidate_ids is slot_ids followed by each row's drafts.
        candidate_ids, draft_logits = drafter.get_candidates(
            slot_ids,
            model_outputs=outputs,
            is_first_iteration=first_cycle,
            n_last_matches=num_matches,
            attention_mask=slot_mask,
            cur_len=rows.longest(),
            prefill_positions=prefill_positions,
        )
        num_drafts = candidate_ids.shape[1] - slot_ids.shape[1]

        # 2. Verify every token not in the cache yet: the prompt on the first cycle, then the last token and drafts.
        past_length = cache.get_seq_length()
        new_ids = candidate_ids[:, past_length:]
        verify_mask = None if slot_mask is None else extended(slot_mask, num_drafts)
        if first_cycle and prefill is not None:
            outputs = grouped_prefill(model.model, prefill, new_ids, verify_mask, cache, forward_options)
        else:
            outputs = model.model(
                input_ids=new_ids,
                attention_mask=verify_mask,
                position_ids=positions_of(verify_mask, past_length, new_ids.shape[1], new_ids.device),
                use_cache=True,
                logits_to_keep=num_drafts + 1,
                **forward_options,
            )
        # Position i's logits choose the token after a row's tokens + drafts[:i]; processors see that prefix.
        verify_logits = outputs.logits[:, -num_drafts - 1 :].to(device=input_ids.device, dtype=torch.float32)
        drafts = candidate_ids[:, slot_ids.shape[1] :]
        processed = process_logits(logits_processor, rows, drafts, verify_logits)

        # 3. Accept: per row, the agreed drafts and one token of the base's own (`tokens[b, :num_kept[b]]`).
        if not generation_config.do_sample:
            tokens, num_kept = accept_greedy(drafts, processed)
        elif draft_logits is not None:
            tokens, num_kept = accept_speculative_sampling(drafts, draft_logits.to(processed.device), processed)
        else:  # drafts without a distribution (prompt lookup): sampled tokens that match them are exact too
            tokens, num_kept = accept_greedy(drafts, processed, sampled=sample(processed))

        # 4. Stop where plain decoding would: every criterion sees every prefix of each row, one token at a time.
        num_kept, finished = rows.append(tokens, num_kept, stopping_criteria, processed, verify_logits)
        if streamer is not None:
            streamer.put(tokens[:, : num_kept[0]].cpu())

        # 5. Caches and slots: keep each surviving row's verified positions, right-aligned (see `RowAlignment`).
        alignment = RowAlignment(num_kept, finished, num_drafts, input_ids.device)
        if alignment.rows_left:
            cache.crop(-alignment.cropped)
            hidden_states = alignment.verified_hidden_states(model.base_features(outputs.hidden_states))
            if alignment.ragged:  # the head takes this cycle's pairs before the rows move (see the drafter)
                drafter.catch_up(hidden_states, tokens[:, : alignment.width], slot_mask, alignment)
            slot_ids = alignment.select(torch.cat([slot_ids, tokens[:, : alignment.width]], dim=-1))
            slot_mask = alignment.mask(slot_mask)
            alignment.apply_to(cache)
        # (Timed to here: what "auto" weighs as a cycle's cost includes moving the rows.)
        drafter.update_candidate_strategy(slot_ids, processed, [kept - 1 for kept in num_kept])
        if not alignment.rows_left:
            break
        drafter.select_rows(alignment)
        rows.keep(alignment.survivors)
        outputs = VerifiedStates(hidden_states=(alignment.select(hidden_states),))
        num_matches = alignment.width - 1
        first_cycle = False

    if streamer is not None:
        streamer.end()
    model.last_fastmtp_stats = drafter.final_stats(rows.new_tokens())
    if not generation_config.return_dict_in_generate:
        return rows.sequences()
    # (A batch's cache lost its finished rows and moved the others: it no longer lines up with the sequences.)
    returned_cache = cache if batch_size == 1 else None
    return decoder_only_output(rows.sequences(), rows.scores(), rows.raw_logits(), returned_cache)


class VerifiedStates(NamedTuple):
    """
    What the drafter reads of a verification forward: the base's features (`base_features`: its final hidden states,
    or a multi-layer head's selected ones) of the kept positions.
    """

    hidden_states: tuple[torch.Tensor]


class RowOutputs:
    """
    Each prompt's tokens as plain decoding would have them (the padded prompt, then its new tokens), rows finishing at
    different times; the stopping criteria and logits processors see a row's own tokens, and the output is padded
    with the pad token after each row's end, as Transformers pads finished rows. `active` maps the loop's batch rows
    to prompts.
    """

    def __init__(self, input_ids: torch.LongTensor, generation_config: GenerationConfig):
        batch_size, self.prompt_length = input_ids.shape
        width = max(generation_config.max_length, self.prompt_length + 1)
        self.pad_token_id = pad_token_id(generation_config)
        self.ids = input_ids.new_full((batch_size, width), self.pad_token_id)
        self.ids[:, : self.prompt_length] = input_ids
        self.lengths = [self.prompt_length] * batch_size
        self.active = torch.arange(batch_size, device=input_ids.device)
        self.want_scores = generation_config.return_dict_in_generate and generation_config.output_scores
        self.want_logits = generation_config.return_dict_in_generate and generation_config.output_logits
        self.row_scores: list[list[torch.Tensor]] = [[] for _ in range(batch_size)]
        self.row_logits: list[list[torch.Tensor]] = [[] for _ in range(batch_size)]

    def row(self, batch_row: int) -> torch.LongTensor:
        """The tokens so far of the prompt in batch row `batch_row`, as a (1, length) view."""
        index = int(self.active[batch_row])
        return self.ids[index : index + 1, : self.lengths[index]]

    def longest(self) -> int:
        return max(self.lengths[index] for index in self.active.tolist())

    def append(
        self,
        tokens: torch.LongTensor,
        num_kept: list[int],
        stopping_criteria: StoppingCriteriaList,
        processed: torch.FloatTensor,
        verify_logits: torch.FloatTensor,
    ) -> tuple[list[int], list[bool]]:
        """Adds each row's kept tokens one by one, up to where a criterion fires; returns the counts and who ended."""
        finished = [False] * len(num_kept)
        for batch_row, index in enumerate(self.active.tolist()):
            for position in range(num_kept[batch_row]):
                self.ids[index, self.lengths[index]] = tokens[batch_row, position]
                self.lengths[index] += 1
                if self.want_scores:
                    self.row_scores[index].append(processed[batch_row, position])
                if self.want_logits:
                    self.row_logits[index].append(verify_logits[batch_row, position])
                row_ids = self.ids[index : index + 1, : self.lengths[index]]
                if stopping_criteria(row_ids, processed[batch_row : batch_row + 1, position]).all():
                    finished[batch_row] = True
                    num_kept[batch_row] = position + 1
                    break
        return num_kept, finished

    def keep(self, survivors: torch.LongTensor) -> None:
        self.active = self.active[survivors.to(self.active.device)]

    def new_tokens(self) -> list[int]:
        return [length - self.prompt_length for length in self.lengths]

    def sequences(self) -> torch.LongTensor:
        return self.ids[:, : max(self.lengths)]

    def scores(self) -> tuple[torch.FloatTensor, ...] | None:
        return self._per_step(self.row_scores) if self.want_scores else None

    def raw_logits(self) -> tuple[torch.FloatTensor, ...] | None:
        return self._per_step(self.row_logits) if self.want_logits else None

    def _per_step(self, per_row: list[list[torch.Tensor]]) -> tuple[torch.FloatTensor, ...]:
        """One (batch, vocab) tensor per step; a finished row's later steps put all probability on the pad token."""
        if len(per_row) == 1:
            return tuple(step[None] for step in per_row[0])
        vocab_size = next(row[0].shape[-1] for row in per_row if row)
        after_the_end = torch.full((vocab_size,), float("-inf"), device=self.ids.device)
        after_the_end[self.pad_token_id] = 0.0
        steps = max(len(row) for row in per_row)
        return tuple(
            torch.stack([row[step] if step < len(row) else after_the_end for row in per_row]) for step in range(steps)
        )


class RowAlignment:
    """
    How the caches and slots follow a cycle in which rows kept different numbers of tokens (ragged acceptance).

    Every row verified its last token and the same K drafts, so the cache holds K + 1 new positions per row, of which
    row b keeps `num_kept[b]`. The caches keep the `width` = max(num_kept) first of them, and row b moves right by
    `width - num_kept[b]` slots: its rejected drafts fall off the end and its left padding grows. Each row's real
    tokens then stay contiguous and end in the last slot, so the next forward is rectangular, positions are counted
    over the attention mask, and a sliding window spans as many real tokens as in plain decoding. Finished rows leave
    the batch. (Moving rows copies the caches, as each forward's concatenation does anyway.)

    ```
    verified:   row 0   p p a b c | x d1 d2      kept x d1 + its token t0    ->   p p a b c x d1 | t0
                row 1   d e f g h | y e1 e2      kept y + its token t1       ->   p d e f g h y  | t1
    ```
    (`|`: the cache ends there; `p`: padding; t0 and t1 are verified with the next cycle's drafts.)
    """

    def __init__(self, num_kept: list[int], finished: list[bool], num_drafts: int, device: torch.device):
        survivors = [row for row, done in enumerate(finished) if not done]
        self.rows_left = len(survivors)
        self.all_survive = self.rows_left == len(finished)
        self.survivors = torch.tensor(survivors, dtype=torch.long, device=device)
        self.num_kept = num_kept
        self.width = max((num_kept[row] for row in survivors), default=0)
        self.cropped = num_drafts + 1 - self.width
        self.shifts = [self.width - num_kept[row] for row in survivors]
        self.ragged = any(self.shifts)

    def select(self, tensor: torch.Tensor) -> torch.Tensor:
        """The surviving rows of a (batch, slots, ...) tensor, each moved right by its shift."""
        if not self.all_survive:
            tensor = tensor[self.survivors.to(tensor.device)]
        if self.ragged:
            tensor = tensor.gather(1, self._slot_index(tensor))
        return tensor

    def _slot_index(self, tensor: torch.Tensor) -> torch.LongTensor:
        """Row b's slot j takes its slot j - shift (clamped at 0: those slots become padding, masked)."""
        shifts = torch.tensor(self.shifts, device=tensor.device)
        index = (torch.arange(tensor.shape[1], device=tensor.device) - shifts[:, None]).clamp(min=0)
        return index.view(*index.shape, *[1] * (tensor.ndim - 2)).expand_as(tensor)

    def mask(self, slot_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The slots' attention mask after the cycle: moved rows get padding on the left."""
        if slot_mask is None:  # (a single unpadded row: it never moves)
            return None
        slot_mask = self.select(extended(slot_mask, self.width))
        if self.ragged:
            shifts = torch.tensor(self.shifts, device=slot_mask.device)
            slot_mask = slot_mask * (torch.arange(slot_mask.shape[1], device=slot_mask.device) >= shifts[:, None])
        return slot_mask

    def verified_hidden_states(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The verification's hidden states (features) at the positions the caches keep (before rows move)."""
        return hidden_states[:, : hidden_states.shape[1] - self.cropped]

    def apply_to(self, cache: DynamicCache) -> None:
        """Drops finished rows from a cache (after `crop`) and moves the others."""
        if not self.all_survive:
            cache.batch_select_indices(self.survivors)
        if self.ragged:
            shift_cache_rows(cache, self.shifts)


def decoding_cache(model: FastMTPForCausalLM, cache: Cache | None, batch_size: int, capacity: int) -> Cache:
    """
    The base's KV cache for the loop, appending in place (`appending_cache.py`) where it starts empty; `capacity`: the
    most slots it will hold. For one row, `generate()`'s cache. A batch moves rows between cycles, which needs every
    slot kept: a cache without sliding-window layers (the masks still apply the window).
    """
    if batch_size == 1:
        if cache is None:
            cache = DynamicCache(config=model.config.text_config)
        return append_in_place(cache, capacity) if isinstance(cache, DynamicCache) else cache
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError("fastmtp=True with a batch starts from an empty cache: drop the `past_key_values` passed.")
    return appending_cache(capacity)


def process_logits(
    logits_processor: LogitsProcessorList,
    rows: RowOutputs,
    drafts: torch.LongTensor,
    verify_logits: torch.FloatTensor,
) -> torch.FloatTensor:
    """
    Each position's logits through the call's processors, given its row's tokens before it (position i follows the
    row's tokens and its first i drafts); without processors, the logits themselves.
    """
    if not logits_processor:
        return verify_logits
    return torch.stack(
        [
            torch.cat(
                [
                    logits_processor(
                        torch.cat([rows.row(batch_row), drafts[batch_row : batch_row + 1, :position]], dim=-1),
                        verify_logits[batch_row : batch_row + 1, position].clone(),
                    )
                    for position in range(verify_logits.shape[1])
                ]
            )
            for batch_row in range(verify_logits.shape[0])
        ]
    )


def sample(processed: torch.FloatTensor) -> torch.LongTensor:
    """A token drawn from each row's distribution at each position: (batch, positions)."""
    batch_size, positions, vocab_size = processed.shape
    probabilities = processed.reshape(-1, vocab_size).softmax(-1)
    return torch.multinomial(probabilities, 1).view(batch_size, positions)


def accept_greedy(
    drafts: torch.LongTensor, processed: torch.FloatTensor, sampled: torch.LongTensor | None = None
) -> tuple[torch.LongTensor, list[int]]:
    """
    Per row, the drafts up to the first one that differs from the base's choice, then the base's choice there (or
    after the last draft): returns the choices and how many each row keeps. The base's choice is its argmax, or
    `sampled`: a token drawn from each position's distribution.
    """
    chosen = processed.argmax(dim=-1) if sampled is None else sampled
    num_accepted = (drafts == chosen[:, :-1]).int().cumprod(dim=-1).sum(dim=-1)
    return chosen, (num_accepted + 1).tolist()


def accept_speculative_sampling(
    drafts: torch.LongTensor, draft_logits: torch.FloatTensor, processed: torch.FloatTensor
) -> tuple[torch.LongTensor, list[int]]:
    """
    Speculative sampling (Leviathan et al. 2023, Algorithm 1), per row: draft i, drawn from q_i, is accepted with
    probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection the token is drawn from max(p_i - q_i, 0),
    renormalised; if every draft is accepted, one more is drawn from p_K. The kept tokens are distributed exactly as
    sampling from p. Returns the tokens (drafts, with the drawn token after the accepted ones) and the counts kept.
    """
    p = processed.softmax(dim=-1)
    q = draft_logits.float().softmax(dim=-1)
    batch_size, num_drafts = drafts.shape
    p_of_drafts = p[:, :num_drafts].gather(-1, drafts[..., None]).squeeze(-1)
    q_of_drafts = q.gather(-1, drafts[..., None]).squeeze(-1)
    accepted = torch.rand_like(p_of_drafts) * q_of_drafts <= p_of_drafts
    num_accepted = accepted.int().cumprod(dim=-1).sum(dim=-1)
    rows = torch.arange(batch_size, device=drafts.device)
    # After the last draft q is 0: the residual there is p_K itself.
    p_next = p[rows, num_accepted]
    residual = (p_next - torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)[rows, num_accepted]).clamp(min=0)
    # (All-zero only if p == q there, where a rejection has probability 0: then p itself.)
    next_distribution = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_next)
    next_token = torch.multinomial(next_distribution / next_distribution.sum(-1, keepdim=True), 1)
    tokens = torch.cat([drafts, next_token], dim=-1)
    tokens[rows, num_accepted] = next_token[:, 0]
    return tokens, (num_accepted + 1).tolist()


def check_decoding_call(
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    generation_config: GenerationConfig,
    synced_gpus: bool,
    streamer: BaseStreamer | None,
    model_kwargs: dict,
) -> None:
    """Refuses what this loop cannot serve, each with the way out."""
    batch_size = input_ids.shape[0]
    if batch_size > 1 and streamer is not None:
        raise ValueError(
            f"A streamer takes one sequence; this batch has {batch_size}: stream one prompt at a time, or drop "
            "`streamer` (Transformers' streamers refuse batches too)."
        )
    if attention_mask is not None and not attention_mask[:, -1].all():
        raise ValueError(
            "fastmtp=True needs left padding (each prompt ends in the last column): tokenize the batch with "
            "`padding_side='left'`, as Transformers asks of every decoder-only model."
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
