"""Recursive FastMTP drafting as a transformers `CandidateGenerator`."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import DynamicCache
from transformers.generation.candidate_generator import CandidateGenerator, PromptLookupCandidateGenerator

from .stats import FastMTPStats
from .transformers_compat import eos_token_ids, hidden_states_to_output

if TYPE_CHECKING:
    from transformers import GenerationConfig, LogitsProcessorList
    from transformers.utils import ModelOutput

    from .draft_length import DraftLength
    from .draft_vocab import DraftVocabulary
    from .modeling_fastmtp import FastMTPForCausalLM
    from .speculative_decoding import RowAlignment


# Catch-ups of at least this many positions per row are timed for `auto` (smaller ones cost about a head step,
# whatever their size, and would overstate the cost per position).
TIMED_CATCH_UP = 8


class FastMTPCandidateGenerator(CandidateGenerator):
    """
    Drafts up to K tokens per cycle with the model's MTP head, applied recursively; `draft_length` says K each cycle.

    It needs the base model's last hidden states (a multi-layer-feature head: its selected ones, `base_features`) from
    the previous verification (`requires_model_outputs`), as the decoding loop's `VerifiedStates`, so on the first
    iteration it proposes nothing and lets `generate` run the prefill. Each later call:
      1. extends the head's own KV cache with the pairs (h_j, t_{j+1}) of every position verified since the head
         last drafted, after dropping the head's speculative entries of that cycle (one forward);
      2. recursively feeds the head its own output and its last draft, one position per step.
    A cycle with K = 0 is a plain decoding step: the head does not run, and the pairs wait for the next cycle that
    drafts.

    Args:
        model: the [`FastMTPForCausalLM`] whose base verifies the drafts.
        draft_length: K for each cycle: fixed, or chosen from measured costs and acceptance (`draft_length.py`).
        generation_config: the call's generation config (`do_sample`, `max_length`).
        logits_processor: the call's processors; drafts are chosen from processed logits so that, when sampling, the
            returned candidate logits are exactly the distribution q each draft was drawn from.
        draft_vocabulary: optional restricted vocabulary to draft over (vocabulary compression); verification
            always uses the full vocabulary, so the output does not change.
        language: the prompt language the vocabulary was chosen for, recorded in the stats.
        confidence_threshold: stop drafting a cycle at the first position where the head's most likely token has a
            lower probability; a cycle with no draft is a plain decoding step. The decision never looks at the sampled
            draft itself, so speculative sampling stays exact, and greedy output is unchanged.
        prompt_lookup_num_tokens: also look the last n-gram up in the prompt and the text so far (Transformers'
            prompt lookup); where its continuation starts with the head's most likely token, draft up to this many
            tokens from it instead of recursing (the confidence threshold does not apply: agreement is the better
            signal). The head's recursion is weakest where text is copied (summaries, extraction, RAG), which is where
            lookup is right. Lookup drafts carry no distribution, so `generate` verifies them by sampling and
            matching, which is exact too.
        max_matching_ngram_size: the longest n-gram prompt lookup matches (Transformers' default: 2).
    """

    requires_model_outputs = True

    def __init__(
        self,
        model: FastMTPForCausalLM,
        draft_length: DraftLength,
        generation_config: GenerationConfig,
        logits_processor: LogitsProcessorList | None = None,
        draft_vocabulary: DraftVocabulary | None = None,
        language: str | None = None,
        confidence_threshold: float | None = None,
        prompt_lookup_num_tokens: int | None = None,
        max_matching_ngram_size: int | None = None,
    ):
        self.model = model
        # What the verification forward must return for the head (Transformers' assisted loop reads this too).
        self.model_kwargs_overrides = {
            "output_hidden_states": hidden_states_to_output(model.config.feature_layers is not None)
        }
        self.draft_length = draft_length
        self.do_sample = bool(generation_config.do_sample)
        self.max_length = generation_config.max_length
        self.logits_processor = logits_processor if logits_processor else None
        self.draft_vocabulary = draft_vocabulary
        self.confidence_threshold = confidence_threshold or 0.0
        # In the base cache's slots: pair j, (h_j, t_{j+1}), sits where the base cache holds token j (made on first
        # use, when the batch size is known).
        self.head_cache: DynamicCache | None = None
        self.head_cache_verified_length = 0
        self.head_cache_speculative_length = 0
        # The base's features of the positions verified since the head last drafted (see step 1).
        self.pending_hidden_states: list[torch.Tensor] = []
        # After `catch_up`: the head's output at each row's last pair and its position (the next first draft's input),
        # and whether the next call's verified positions are in the head's cache already.
        self.caught_up: tuple[torch.Tensor, torch.LongTensor] | None = None
        self._pairs_taken = False
        self.prompt_lookup = None
        if prompt_lookup_num_tokens:
            self.prompt_lookup = PromptLookupCandidateGenerator(
                eos_token_id=eos_token_ids(generation_config),
                num_output_tokens=prompt_lookup_num_tokens,
                max_matching_ngram_size=max_matching_ngram_size or 2,
                max_length=self.max_length,
                # Not the call's processors: lookup tests tokens against them with constant logits, which makes
                # top-p or epsilon warpers ban arbitrary tokens; a token they do ban is rejected by verification.
            )
        self.prompt_lookup_num_tokens = prompt_lookup_num_tokens or 0
        self.stats = FastMTPStats(
            max_draft_tokens=draft_length.max_draft_tokens,
            language=language,
            draft_vocab_size=model.vocab_size if draft_vocabulary is None else draft_vocabulary.size,
        )
        self.active_rows: list[int] = []  # the prompts the batch's rows decode (for the per-row stats)
        # Whether the head needs the slots' attention mask: padding, or a batch (whose rows move); else the head's
        # steps build no mask, as for one unpadded prompt.
        self.masked = False
        self._num_drafted = 0
        self._prefill_positions = 0
        self._drafted_by_lookup = False
        self._awaiting_prefill = True
        self._clock = time.perf_counter()

    @property
    def num_drafting_tokens(self) -> int:
        """The most tokens one cycle can propose: K from the head, or N from prompt lookup (the `CandidateGenerator`
        contract: caches record that many states back so rejected drafts can be cropped)."""
        return max(self.draft_length.max_draft_tokens, self.prompt_lookup_num_tokens)

    def get_candidates(
        self,
        input_ids: torch.LongTensor,
        model_kwargs: dict[str, Any] | None = None,
        model_outputs: ModelOutput | None = None,
        is_first_iteration: bool = False,
        n_last_matches: int = 0,
        attention_mask: torch.Tensor | None = None,
        cur_len: int | None = None,
        prefill_positions: int | None = None,
        **kwargs,
    ) -> tuple[torch.LongTensor, torch.FloatTensor | None]:
        """
        `input_ids` and up to K drafts after each row; when sampling, also the distributions they were drawn from.
        A batch's rows are right-aligned (left padding, masked by `attention_mask`); `cur_len` is the longest row's
        own length (without padding added by re-alignment), which `max_length` limits. `prefill_positions`: the
        positions the prefill computes, where not every slot (a prefill in groups).
        """
        # The head catches up on a lump (the prompt, or the positions of plain steps) only after a cycle that did not
        # draft; after one that did, on that cycle's kept tokens, which the cost of drafting includes.
        catching_up_after_plain_steps = self._num_drafted == 0
        self._num_drafted, self._drafted_by_lookup = 0, False
        if is_first_iteration:  # (the first call precedes the prefill, whose hidden states it needs)
            self._clock = time.perf_counter()
            self._prefill_positions = prefill_positions or input_ids.numel()
            self.active_rows = list(range(input_ids.shape[0]))
            self.masked = input_ids.shape[0] > 1 or (attention_mask is not None and not bool(attention_mask.all()))
            if input_ids.shape[0] > 1:
                self.stats.rows = [self.stats.empty_copy() for _ in self.active_rows]
            return input_ids, None
        start = self._synchronized_time()
        if self.head_cache is None:
            self.head_cache = new_head_cache(self.model.head_config, input_ids.shape[0])
        # After the prefill every prompt position is new; afterwards, the accepted drafts plus the verified token
        # (unless `catch_up` took them already).
        num_verified = (
            None if self.head_cache_verified_length == 0 and not self.pending_hidden_states else n_last_matches + 1
        )
        if self.draft_length.max_draft_tokens and not self._pairs_taken:  # (K fixed at 0 never drafts)
            self.pending_hidden_states.append(model_outputs.hidden_states[-1][:, :num_verified])
        self._pairs_taken = False
        room = self.max_length - (cur_len or input_ids.shape[1]) - 1
        lump = sum(hidden.shape[1] for hidden in self.pending_hidden_states) if catching_up_after_plain_steps else 0
        lump_positions = lump * input_ids.shape[0]
        max_drafts = min(self.draft_length(self.stats, input_ids.shape[0], lump_positions, room + 1), room)
        if max_drafts <= 0:
            self._clock = self._synchronized_time()
            return input_ids, None

        attention_mask = attention_mask if self.masked else None
        if self.pending_hidden_states:
            head_output, position_ids = self._extend_head_cache(input_ids, attention_mask)
        else:
            head_output, position_ids = self.caught_up
        self.caught_up = None
        if lump >= TIMED_CATCH_UP:
            self.draft_length.observe_catch_up(lump_positions, self._synchronized_time() - start)
        head_steps = self.stats.head_steps
        candidate_ids, draft_logits = self._draft(input_ids, attention_mask, head_output, position_ids, max_drafts)
        self._num_drafted = candidate_ids.shape[1] - input_ids.shape[1]
        self._clock = self._synchronized_time()
        if not lump:  # (after a lump, the catch-up's forward was also the first step's)
            self.draft_length.observe_draft_steps(self.stats.head_steps - head_steps, self._clock - start)
        self.stats.draft_seconds += self._clock - start
        return candidate_ids, draft_logits

    def _extend_head_cache(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.LongTensor]:
        """
        Drops the head's speculative entries of the last cycle that drafted and adds the pairs (h_j, t_{j+1}) of every
        position verified since, in one forward. Returns the head's output at the last of them and its position.
        """
        cur_len = input_ids.shape[1]
        hidden_states = torch.cat(self.pending_hidden_states, dim=1)
        self.pending_hidden_states = []
        num_new = hidden_states.shape[1]
        # Pair j holds (h_j, t_{j+1}) at token j's slot and position: the last pair is at slot cur_len - 2.
        head_mask = None if attention_mask is None else attention_mask[:, : cur_len - 1]
        position_ids = positions_of(head_mask, cur_len - 1 - num_new, num_new, input_ids.device)
        self._crop_speculative_entries()
        head_output = self.model.mtp_forward(
            hidden_states,
            input_ids[:, cur_len - num_new :],
            position_ids,
            self.head_cache,
            attention_mask=head_mask,
            from_base=True,
        )[:, -1:]
        self.head_cache_verified_length += num_new
        return head_output, position_ids[:, -1:]

    def _crop_speculative_entries(self) -> None:
        if self.head_cache_verified_length:  # (an empty sliding-window layer cannot be cropped)
            self.head_cache.crop(-self.head_cache_speculative_length)
        self.head_cache_speculative_length = 0

    def catch_up(
        self,
        hidden_states: torch.Tensor,
        tokens: torch.LongTensor,
        slot_mask: torch.Tensor,
        alignment: RowAlignment,
    ) -> None:
        """
        Before a batch's rows move (`RowAlignment`), adds this cycle's pairs to the head's cache as they stand: row b's
        first `num_kept[b]` of the verified positions, paired with its kept tokens (the rest masked; they fall off when
        the rows move). Keeps the head's output at each row's last pair for the next cycle's first draft.
        """
        self._crop_speculative_entries()
        width = tokens.shape[1]
        # (A finished row may have kept more than `width`: it leaves the batch, whatever it holds.)
        num_kept = torch.tensor(alignment.num_kept, device=tokens.device).clamp(max=width)
        new_mask = (torch.arange(width, device=tokens.device) < num_kept[:, None]).to(slot_mask.dtype)
        head_mask = torch.cat([slot_mask[:, :-1], new_mask], dim=-1)
        # The row's last token (the last slot before this cycle) is its pair 0's token position.
        position_ids = slot_mask.long().sum(-1, keepdim=True) - 1 + torch.arange(width, device=tokens.device)
        head_output = self.model.mtp_forward(
            hidden_states, tokens, position_ids, self.head_cache, attention_mask=head_mask, from_base=True
        )
        self.head_cache_verified_length += width
        self._pairs_taken = True
        last = (num_kept - 1)[:, None]
        self.caught_up = (
            head_output.gather(1, last[..., None].expand(-1, -1, head_output.shape[-1])),
            position_ids.gather(1, last),
        )

    def select_rows(self, alignment: RowAlignment) -> None:
        """Follows the loop's rows after a cycle: finished ones leave, moved ones move (`RowAlignment`)."""
        if alignment.all_survive and not alignment.ragged:
            return
        if self.head_cache is not None:
            alignment.apply_to(self.head_cache)
        self.pending_hidden_states = [alignment.select(hidden) for hidden in self.pending_hidden_states]
        if self.caught_up is not None:
            survivors = alignment.survivors.to(self.caught_up[0].device)
            self.caught_up = (self.caught_up[0][survivors], self.caught_up[1][survivors])
        self.active_rows = [self.active_rows[row] for row in alignment.survivors.tolist()]

    def _draft(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        head_output: torch.Tensor,
        position_ids: torch.LongTensor,
        max_drafts: int,
    ) -> tuple[torch.LongTensor, torch.FloatTensor | None]:
        """
        Step k drafts from the head's output; step k+1 feeds the head that output and the draft (the recursion),
        until `max_drafts`, a draft below the confidence threshold, or a prompt-lookup continuation taken instead.
        """
        candidate_ids = input_ids
        draft_logits = []
        for step in range(max_drafts):
            if step > 0:
                position_ids = position_ids + 1
                head_mask = None if attention_mask is None else extended(attention_mask[:, :-1], step)
                head_output = self.model.mtp_forward(
                    head_output, candidate_ids[:, -1:], position_ids, self.head_cache, attention_mask=head_mask
                )
                self.head_cache_speculative_length = step
            next_token, logits, confidence = self._select_draft(candidate_ids, head_output[:, -1])
            self.stats.head_steps += 1
            if step == 0 and self.prompt_lookup is not None:
                # Agreement is judged on the head's most likely token, never on a sampled draft: a cycle that drafts
                # with the head then still draws its drafts from q unconditionally, as speculative sampling needs.
                most_likely = next_token if logits is None else logits.argmax(dim=-1)
                if (looked_up := self._look_up(input_ids, most_likely)) is not None:
                    self._drafted_by_lookup = True
                    return looked_up, None
            if confidence < self.confidence_threshold:
                break  # an unlikely draft would cost a wider verification forward than it is expected to save
            candidate_ids = torch.cat([candidate_ids, next_token[:, None]], dim=-1)
            if logits is not None:
                draft_logits.append(logits)
        return candidate_ids, torch.stack(draft_logits, dim=1) if self.do_sample and draft_logits else None

    def _look_up(self, input_ids: torch.LongTensor, head_token: torch.LongTensor) -> torch.LongTensor | None:
        """
        Prompt lookup's candidates when it finds a continuation that starts with the head's token: the head picks the
        branch, the text so far supplies the rest of it. None otherwise.
        """
        cur_len = input_ids.shape[1]
        candidate_ids, _ = self.prompt_lookup.get_candidates(input_ids)
        if candidate_ids.shape[1] == cur_len or candidate_ids[0, cur_len] != head_token[0]:
            return None
        # Like the head's drafts, never more than max_length leaves room for (it does not count the verified token).
        return candidate_ids[:, : self.max_length - 1]

    def _select_draft(
        self, candidate_ids: torch.LongTensor, head_output: torch.Tensor
    ) -> tuple[torch.LongTensor, torch.FloatTensor | None, float]:
        """
        Next draft token from the head's output; when sampling, also the (full-vocabulary) logits it came from; and the
        head's confidence, when a threshold asks for it (1.0 otherwise).
        """
        logits = self.model.draft_logits(head_output, self.draft_vocabulary)
        if self.logits_processor is None and not self.do_sample:
            next_token = logits.argmax(dim=-1)
            if self.draft_vocabulary is not None:
                next_token = self.draft_vocabulary.token_ids[next_token]
            return next_token, None, self._confidence(logits)

        logits = self._to_full_vocabulary(logits.float())
        if self.logits_processor is not None:
            logits = self.logits_processor(candidate_ids, logits)
        if not self.do_sample:
            return logits.argmax(dim=-1), None, self._confidence(logits)
        next_token = torch.multinomial(logits.softmax(dim=-1), num_samples=1).squeeze(1)
        return next_token, logits, self._confidence(logits)

    def _confidence(self, logits: torch.FloatTensor) -> float:
        """The head's top probability (its greedy draft's): a function of q alone, not of the token drawn from it."""
        if not self.confidence_threshold:
            return 1.0
        return logits.float().softmax(dim=-1).amax(dim=-1).min().item()

    def _to_full_vocabulary(self, logits: torch.FloatTensor) -> torch.FloatTensor:
        if self.draft_vocabulary is None:
            return logits
        full = logits.new_full((logits.shape[0], self.model.vocab_size), float("-inf"))
        return full.index_copy_(1, self.draft_vocabulary.token_ids, logits)

    def update_candidate_strategy(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, num_matches: int | list[int]
    ) -> None:
        """Records the cycle: `num_matches` is the drafts accepted, one count per row of the batch."""
        now = self._synchronized_time()
        if self._awaiting_prefill:
            self._awaiting_prefill = False
            self.stats.prefill_seconds += now - self._clock
            self.draft_length.observe_prefill(self._prefill_positions, now - self._clock)
            return
        self.stats.verify_seconds += now - self._clock
        self.draft_length.observe(len(self.active_rows or [0]) * (self._num_drafted + 1), now - self._clock)
        num_matches = [num_matches] if isinstance(num_matches, int) else num_matches
        for row, matches in zip(self.active_rows or [0], num_matches):
            for stats in (self.stats, *self.stats.rows[row : row + 1]):
                stats.record_cycle(self._num_drafted, int(matches), from_lookup=self._drafted_by_lookup)

    def final_stats(self, new_tokens: list[int]) -> FastMTPStats:
        """The call's stats, with each row's new tokens (and the row's own stats, for a batch)."""
        self.stats.new_tokens = sum(new_tokens)
        for row_stats, row_new_tokens in zip(self.stats.rows, new_tokens):
            row_stats.new_tokens = row_new_tokens
        return self.stats

    def _synchronized_time(self) -> float:
        # Draft and verify times are only meaningful on an accelerator if queued kernels have finished.
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        return time.perf_counter()


def new_head_cache(head_config, batch_size: int) -> DynamicCache:
    """
    The head's KV cache: the head config's layer kinds for one row (sliding-window layers keep their past until the
    speculative entries are cropped); for a batch, whose rows move, layers that keep every slot.
    """
    if batch_size > 1:
        return DynamicCache()
    cache = DynamicCache(config=head_config)
    cache.activate_past_recording()
    return cache


def extended(attention_mask: torch.Tensor, num_new: int) -> torch.Tensor:
    return torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], num_new))], dim=-1)


def positions_of(
    attention_mask: torch.Tensor | None, past_length: int, num_new: int, device: torch.device
) -> torch.LongTensor:
    """The positions of the last `num_new` slots: after the cached ones, or counted over the mask's real tokens."""
    if attention_mask is None:
        return torch.arange(past_length, past_length + num_new, device=device).unsqueeze(0)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)[:, -num_new:].to(device)


__all__ = ["FastMTPCandidateGenerator"]
