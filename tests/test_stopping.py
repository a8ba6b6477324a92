"""Stopping is exact: stop strings, a user's StoppingCriteria, EOS and max length cut a cycle's tokens where plain
decoding stops, wherever in the cycle that falls."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_fastmtp, tiny_tokenizer
from test_core import CollectingStreamer, greedy, oracle_drafts, prompt
from tokenizers import decoders
from transformers import StoppingCriteria, StoppingCriteriaList

from hf_fastmtp import FastMTPCandidateGenerator

# Two-character words, decoded without spaces: a stop string can be a whole token or span the boundary between two.
# ("abcdef" is the probe `StopStringCriteria` tokenizes to read every token's text.)
WORDS = ["abcdef", *[f"{letter}{digit}" for letter in "abcdefghij" for digit in range(10)][:91]]
PROMPT_LENGTH = 6
K = 3


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = tiny_tokenizer(WORDS)
    tokenizer.backend_tokenizer.decoder = decoders.Fuse()
    return tokenizer


@pytest.fixture
def setup(tokenizer):
    """
    A model whose vocabulary is the tokenizer's, its prompt, and its free-running greedy continuation's tokens (seed 4:
    the first ten are all different, so a stop string or token first appears where the test puts it).
    """
    model = tiny_fastmtp("llama", vocab_size=len(tokenizer), seed=4)
    input_ids = prompt(PROMPT_LENGTH, vocab_size=len(tokenizer), seed=4)
    free_run = greedy(model, input_ids, max_new_tokens=24)
    return model, input_ids, tokenizer.convert_ids_to_tokens(free_run[0, PROMPT_LENGTH:].tolist())


def stop_string_ending_at(tokens: list[str], position: int, across_boundary: bool) -> str:
    """New token `position`, or the two characters across its boundary with the token before it."""
    return tokens[position - 1][-1] + tokens[position][0] if across_boundary else tokens[position]


# With drafts that are always right, cycle c drafts new tokens 4c-3, 4c-2, 4c-1 and the base adds 4c: every position
# 1..9 is a first draft (1, 5, 9), a draft inside an accepted run (2, 3, 6, 7) or the base's own token (4, 8).
@pytest.mark.parametrize("across_boundary", [False, True])
@pytest.mark.parametrize("position", range(1, 10))
def test_stop_strings_cut_an_accepted_run_where_plain_decoding_stops(
    setup, tokenizer, monkeypatch, position, across_boundary
):
    model, input_ids, tokens = setup
    kwargs = dict(max_new_tokens=24, stop_strings=[stop_string_ending_at(tokens, position, across_boundary)])
    plain = greedy(model, input_ids, tokenizer=tokenizer, **kwargs)
    if plain.shape[1] != PROMPT_LENGTH + position + 1:
        pytest.skip("that text already ends the output earlier in this continuation")
    monkeypatch.setattr(FastMTPCandidateGenerator, "get_candidates", oracle_drafts(plain, len(tokenizer), None))
    streamer = CollectingStreamer()
    fast = greedy(model, input_ids, tokenizer=tokenizer, fastmtp=True, num_draft_tokens=K, streamer=streamer, **kwargs)
    assert torch.equal(plain, fast)
    assert sum(streamer.chunks[1:], []) == fast[0, PROMPT_LENGTH:].tolist()  # nothing past the stop was streamed
    stats = model.last_fastmtp_stats
    assert stats.new_tokens == position + 1
    # Only kept tokens count: the prefill's token, then per cycle its accepted drafts and the base's token.
    assert stats.accepted_tokens + stats.cycles + 1 == stats.new_tokens


def test_stop_strings_with_a_random_head_on_every_architecture(architecture, tokenizer):
    model = tiny_fastmtp(architecture, vocab_size=len(tokenizer))
    input_ids = prompt(PROMPT_LENGTH, vocab_size=len(tokenizer))
    tokens = tokenizer.convert_ids_to_tokens(greedy(model, input_ids, max_new_tokens=30)[0, PROMPT_LENGTH:].tolist())
    for stop in {token[0] for token in tokens[3:]} | {tokens[-1]}:
        kwargs = dict(max_new_tokens=30, stop_strings=stop, tokenizer=tokenizer)
        plain = greedy(model, input_ids, **kwargs)
        assert torch.equal(plain, greedy(model, input_ids, fastmtp=True, **kwargs)), (architecture, stop)


def test_stop_strings_on_the_generation_config(setup, tokenizer):
    model, input_ids, tokens = setup
    model.generation_config.stop_strings = [tokens[5]]
    try:
        plain = greedy(model, input_ids, max_new_tokens=24, tokenizer=tokenizer)
        fast = greedy(model, input_ids, max_new_tokens=24, tokenizer=tokenizer, fastmtp=True)
    finally:
        model.generation_config.stop_strings = None
    assert torch.equal(plain, fast) and plain.shape[1] <= PROMPT_LENGTH + 6


def test_stop_strings_without_a_tokenizer_fail_clearly(setup):
    model, input_ids, tokens = setup
    with pytest.raises(ValueError, match="tokenizer"):
        greedy(model, input_ids, max_new_tokens=5, stop_strings=[tokens[0]], fastmtp=True)


class StopAtToken(StoppingCriteria):
    """Stops when the last token is `token_id`; counts its calls and the sequence lengths it saw."""

    def __init__(self, token_id: int):
        self.token_id = token_id
        self.lengths_seen: list[int] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.lengths_seen.append(input_ids.shape[1])
        return input_ids[:, -1] == self.token_id


@pytest.mark.parametrize("position", range(1, 10))
def test_a_users_stopping_criteria_sees_each_token_once_and_stops_exactly(setup, monkeypatch, position):
    model, input_ids, tokens = setup
    plain_run = greedy(model, input_ids, max_new_tokens=24)
    token_id = int(plain_run[0, PROMPT_LENGTH + position])
    if token_id in plain_run[0, PROMPT_LENGTH : PROMPT_LENGTH + position].tolist():
        pytest.skip("that token appears earlier in this continuation")
    plain_criterion, fast_criterion = StopAtToken(token_id), StopAtToken(token_id)
    plain = greedy(model, input_ids, max_new_tokens=24, stopping_criteria=StoppingCriteriaList([plain_criterion]))
    monkeypatch.setattr(FastMTPCandidateGenerator, "get_candidates", oracle_drafts(plain, model.vocab_size, None))
    fast = greedy(
        model,
        input_ids,
        max_new_tokens=24,
        stopping_criteria=StoppingCriteriaList([fast_criterion]),
        fastmtp=True,
        num_draft_tokens=K,
    )
    assert torch.equal(plain, fast) and plain.shape[1] == PROMPT_LENGTH + position + 1
    # Called exactly as plain decoding calls it: once per new token, in order (a stateful criterion stays right).
    assert fast_criterion.lengths_seen == plain_criterion.lengths_seen


def test_num_drafting_tokens_is_the_most_one_cycle_proposes():
    model = tiny_fastmtp("llama")
    generated = []
    original = FastMTPCandidateGenerator.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        generated.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FastMTPCandidateGenerator, "__init__", spy)
        greedy(model, prompt(5), max_new_tokens=3, fastmtp=True, num_draft_tokens=3)
        greedy(model, prompt(5), max_new_tokens=3, fastmtp=True, num_draft_tokens=3, prompt_lookup_num_tokens=7)
        greedy(model, prompt(5), max_new_tokens=3, fastmtp=True, num_draft_tokens=4, prompt_lookup_num_tokens=2)
    assert [g.num_drafting_tokens for g in generated] == [3, 7, 4]
