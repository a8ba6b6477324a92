"""Recursive FastMTP drafting as a transformers `CandidateGenerator`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import DynamicCache
from transformers.generation.candidate_generator import CandidateGenerator, PromptLookupCandidateGenerator

from .transformers_compat import eos_token_ids

if TYPE_CHECKING:
    from transformers import GenerationConfig, LogitsProcessorList
    from transformers.utils import ModelOutput

    from .draft_length import AutoDraftLength, FixedDraftLength
    from .draft_vocab import DraftVocabulary
    from .modeling_fastmtp import FastMTPForCausalLM


@dataclass
class FastMTPStats:
    """What happened during one `generate(fastmtp=True)` call."""

    num_draft_tokens: int  # the most drafts a cycle may take (with "auto", the most it may choose)
    cycles: int = 0
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    reached_per_position: list[int] = field(default_factory=list)
    new_tokens: int = 0
    head_steps: int = 0
    prefill_seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    language: str | None = None
    draft_vocab_size: int | None = None
    lookup_cycles: int = 0
    lookup_drafted: int = 0
    lookup_accepted: int = 0

    def __post_init__(self):
        if not self.drafted_per_position:
            self.drafted_per_position = [0] * self.num_draft_tokens
            self.accepted_per_position = [0] * self.num_draft_tokens
            self.reached_per_position = [0] * self.num_draft_tokens

    def record_cycle(self, num_drafted: int, num_accepted: int, from_lookup: bool = False) -> None:
        """One verification pass; a pass with no drafts (nothing confident enough) is a plain decoding step."""
        self.cycles += 1
        if from_lookup:  # prompt-lookup drafts are counted apart: they may be longer than K
            self.lookup_cycles += 1
            self.lookup_drafted += num_drafted
            self.lookup_accepted += num_accepted
            return
        for position in range(num_drafted):
            self.drafted_per_position[position] += 1
            # Draft k is only judged when drafts 1..k-1 were all accepted.
            self.reached_per_position[position] += position <= num_accepted
            self.accepted_per_position[position] += position < num_accepted

    @property
    def accepted_tokens(self) -> int:
        return sum(self.accepted_per_position) + self.lookup_accepted

    @property
    def tau(self) -> float:
        """Mean tokens produced per verification pass: accepted drafts plus the base model's own token."""
        return (self.accepted_tokens + self.cycles) / self.cycles if self.cycles else 0.0

    @property
    def acceptance_cumulative(self) -> list[float]:
        """P(drafts 1..k all accepted), per position k, over the cycles that drafted position k."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_position, self.drafted_per_position)]

    @property
    def acceptance_conditional(self) -> list[float]:
        """P(draft k accepted | drafts 1..k-1 accepted), per position k."""
        return [a / r if r else 0.0 for a, r in zip(self.accepted_per_position, self.reached_per_position)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_draft_tokens": self.num_draft_tokens,
            "cycles": self.cycles,
            "new_tokens": self.new_tokens,
            "head_steps": self.head_steps,
            "tau": self.tau,
            "drafted_per_position": list(self.drafted_per_position),
            "accepted_per_position": list(self.accepted_per_position),
            "reached_per_position": list(self.reached_per_position),
            "acceptance_cumulative": self.acceptance_cumulative,
            "acceptance_conditional": self.acceptance_conditional,
            "prefill_seconds": self.prefill_seconds,
            "draft_seconds": self.draft_seconds,
            "verify_seconds": self.verify_seconds,
            "language": self.language,
            "draft_vocab_size": self.draft_vocab_size,
            "lookup_cycles": self.lookup_cycles,
            "lookup_drafted": self.lookup_drafted,
            "lookup_accepted": self.lookup_accepted,
        }


class FastMTPCandidateGenerator(CandidateGenerator):
    """
    Drafts up to K tokens per cycle with the model's MTP head, applied recursively; `draft_length` says K each cycle.

    It needs the base model's last hidden states from the previous verification (`requires_model_outputs`), so on the
    first iteration it proposes nothing and lets `generate` run the prefill. Each later call:
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
    # Only the last layer's hidden state is kept from the verification forward.
    model_kwargs_overrides = {"output_hidden_states": -1}

    def __init__(
        self,
        model: FastMTPForCausalLM,
        draft_length: FixedDraftLength | AutoDraftLength,
        generation_config: GenerationConfig,
        logits_processor: LogitsProcessorList | None = None,
        draft_vocabulary: DraftVocabulary | None = None,
        language: str | None = None,
        confidence_threshold: float | None = None,
        prompt_lookup_num_tokens: int | None = None,
        max_matching_ngram_size: int | None = None,
    ):
        self.model = model
        self.draft_length = draft_length
        self.do_sample = bool(generation_config.do_sample)
        self.max_length = generation_config.max_length
        self.logits_processor = logits_processor if logits_processor else None
        self.draft_vocabulary = draft_vocabulary
        self.confidence_threshold = confidence_threshold or 0.0
        self.head_cache = DynamicCache(config=model.head_config)
        # Sliding-window layers (Mistral) must keep their past until the speculative entries are cropped.
        self.head_cache.activate_past_recording()
        self.head_cache_verified_length = 0
        self.head_cache_speculative_length = 0
        # The base's last hidden states of the positions verified since the head last drafted (see step 1).
        self.pending_hidden_states: list[torch.Tensor] = []
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
            num_draft_tokens=draft_length.max_draft_tokens,
            language=language,
            draft_vocab_size=model.vocab_size if draft_vocabulary is None else draft_vocabulary.size,
        )
        self._num_drafted = 0
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
        **kwargs,
    ) -> tuple[torch.LongTensor, torch.FloatTensor | None]:
        """`input_ids` and up to K drafts after them; when sampling, also the distributions they were drawn from."""
        self._num_drafted, self._drafted_by_lookup = 0, False
        if is_first_iteration:  # (the first call precedes the prefill, whose hidden states it needs)
            self._clock = time.perf_counter()
            return input_ids, None
        start = self._synchronized_time()
        # After the prefill every prompt position is new; afterwards, the accepted drafts plus the verified token.
        num_verified = (
            None if self.head_cache_verified_length == 0 and not self.pending_hidden_states else n_last_matches + 1
        )
        if self.draft_length.max_draft_tokens:  # (K fixed at 0 never drafts: nothing to keep)
            self.pending_hidden_states.append(model_outputs.hidden_states[-1][:, :num_verified])
        max_drafts = min(self.draft_length(self.stats), self.max_length - input_ids.shape[1] - 1)
        if max_drafts <= 0:
            self._clock = self._synchronized_time()
            return input_ids, None

        head_output, position_ids = self._extend_head_cache(input_ids)
        candidate_ids, draft_logits = self._draft(input_ids, head_output, position_ids, max_drafts)
        self._num_drafted = candidate_ids.shape[1] - input_ids.shape[1]
        self._clock = self._synchronized_time()
        self.stats.draft_seconds += self._clock - start
        return candidate_ids, draft_logits

    def _extend_head_cache(self, input_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.LongTensor]:
        """
        Drops the head's speculative entries of the last cycle that drafted and adds the pairs (h_j, t_{j+1}) of every
        position verified since, in one forward. Returns the head's output at the last of them and its position.
        """
        cur_len = input_ids.shape[1]
        hidden_states = torch.cat(self.pending_hidden_states, dim=1)
        self.pending_hidden_states = []
        num_new = hidden_states.shape[1]
        # Pair j holds (h_j, t_{j+1}) at position j: the last hidden state belongs to position cur_len - 2.
        position_ids = torch.arange(cur_len - 1 - num_new, cur_len - 1, device=input_ids.device).unsqueeze(0)
        if self.head_cache_verified_length:  # (an empty sliding-window layer cannot be cropped)
            self.head_cache.crop(-self.head_cache_speculative_length)
        head_output = self.model.mtp_forward(
            hidden_states, input_ids[:, cur_len - num_new :], position_ids, self.head_cache
        )[:, -1:]
        self.head_cache_verified_length += num_new
        self.head_cache_speculative_length = 0
        return head_output, position_ids[:, -1:]

    def _draft(
        self, input_ids: torch.LongTensor, head_output: torch.Tensor, position_ids: torch.LongTensor, max_drafts: int
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
                head_output = self.model.mtp_forward(head_output, candidate_ids[:, -1:], position_ids, self.head_cache)
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

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, num_matches: int):
        now = self._synchronized_time()
        if self._awaiting_prefill:
            self._awaiting_prefill = False
            self.stats.prefill_seconds += now - self._clock
        else:
            self.stats.verify_seconds += now - self._clock
            self.stats.record_cycle(self._num_drafted, int(num_matches), from_lookup=self._drafted_by_lookup)

    def _synchronized_time(self) -> float:
        # Draft and verify times are only meaningful on an accelerator if queued kernels have finished.
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        return time.perf_counter()


__all__ = ["FastMTPCandidateGenerator", "FastMTPStats"]
