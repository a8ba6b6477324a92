"""Core FastMTP decoding on tiny random models: lossless greedy and sampling, caches, stats, generate() integration."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
from conftest import needs_transformers_5_23, tiny_fastmtp, use_kernels
from transformers import DynamicCache
from transformers.generation.candidate_generator import PromptLookupCandidateGenerator
from transformers.generation.streamers import BaseStreamer

from hf_fastmtp import FastMTPCandidateGenerator, FastMTPStats
from hf_fastmtp.decoding.draft_length import FixedDraftLength


def prompt(length: int, vocab_size: int = 97, seed: int = 0) -> torch.LongTensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab_size, (1, length), generator=generator)


def greedy(model, input_ids, **kwargs) -> torch.LongTensor:
    return model.generate(input_ids, do_sample=False, **kwargs)


def oracle_drafts(reference: torch.LongTensor, vocab_size: int, reject_at: int | None):
    """
    A `get_candidates` that replaces the head's drafts with the true greedy continuation, wrong from draft
    `reject_at` of every cycle on, so that every number of accepted drafts (0..K) is exercised. The head still runs,
    so its caches are exercised too.
    """
    original = FastMTPCandidateGenerator.get_candidates

    def get_candidates(generator, input_ids, **kwargs):
        candidates, logits = original(generator, input_ids, **kwargs)
        start = input_ids.shape[1]
        for index in range(start, candidates.shape[1]):
            true_token = int(reference[0, index]) if index < reference.shape[1] else 0
            wrong = reject_at is not None and index - start >= reject_at
            candidates[0, index] = (true_token + 1) % vocab_size if wrong else true_token
        return candidates, logits

    return get_candidates


@pytest.mark.parametrize("num_draft_tokens", [1, 3, 5])
def test_greedy_identical_random_head(architecture, num_draft_tokens):
    for seed, length in itertools.product(range(3), (1, 5, 23)):
        model = tiny_fastmtp(architecture, seed=seed)
        input_ids = prompt(length, seed=seed)
        plain = greedy(model, input_ids, max_new_tokens=30)
        fast = greedy(model, input_ids, max_new_tokens=30, fastmtp=True, num_draft_tokens=num_draft_tokens)
        assert torch.equal(plain, fast), (architecture, seed, length)
        assert model.last_fastmtp_stats.new_tokens == 30


@pytest.mark.parametrize("reject_at", [0, 1, 2, 3, None])
def test_greedy_identical_at_every_rejection_position(architecture, monkeypatch, reject_at):
    model = tiny_fastmtp(architecture)
    input_ids = prompt(9)
    plain = greedy(model, input_ids, max_new_tokens=40)
    monkeypatch.setattr(FastMTPCandidateGenerator, "get_candidates", oracle_drafts(plain, 97, reject_at))
    fast = greedy(model, input_ids, max_new_tokens=40, fastmtp=True, num_draft_tokens=3)
    assert torch.equal(plain, fast)
    stats = model.last_fastmtp_stats
    accepted = 3 if reject_at is None else reject_at
    # Every full cycle accepts exactly `accepted` drafts; only the last one may be cut by max_new_tokens.
    assert stats.accepted_per_position[:accepted] == stats.drafted_per_position[:accepted]
    assert sum(stats.accepted_per_position[accepted:]) == 0
    assert stats.tau == pytest.approx((stats.accepted_tokens + stats.cycles) / stats.cycles)


@pytest.mark.parametrize("max_new_tokens", range(1, 13))
def test_max_new_tokens_landing_mid_draft(monkeypatch, max_new_tokens):
    model = tiny_fastmtp("llama")
    input_ids = prompt(6)
    plain = greedy(model, input_ids, max_new_tokens=max_new_tokens)
    monkeypatch.setattr(FastMTPCandidateGenerator, "get_candidates", oracle_drafts(plain, 97, None))
    fast = greedy(model, input_ids, max_new_tokens=max_new_tokens, fastmtp=True, num_draft_tokens=3)
    assert torch.equal(plain, fast)
    assert fast.shape[1] == 6 + max_new_tokens


def test_eos_inside_accepted_draft(architecture, monkeypatch):
    model = tiny_fastmtp(architecture)
    input_ids = prompt(6)
    free_run = greedy(model, input_ids, max_new_tokens=30)[0, 6:]
    # An EOS that first appears a few tokens in, so that it falls inside a cycle of fully accepted drafts.
    eos = next(int(t) for i, t in enumerate(free_run) if i >= 3 and int(t) not in free_run[:i].tolist())
    plain = greedy(model, input_ids, max_new_tokens=30, eos_token_id=eos)
    monkeypatch.setattr(FastMTPCandidateGenerator, "get_candidates", oracle_drafts(plain, 97, None))
    fast = greedy(model, input_ids, max_new_tokens=30, eos_token_id=eos, fastmtp=True, num_draft_tokens=4)
    assert torch.equal(plain, fast)
    assert fast[0, -1] == eos and (fast[0, 6:-1] != eos).all()
    assert model.last_fastmtp_stats.accepted_tokens > 0


def test_logits_processors_greedy(architecture):
    model = tiny_fastmtp(architecture)
    input_ids = prompt(8)
    kwargs = dict(max_new_tokens=30, repetition_penalty=1.3, no_repeat_ngram_size=3, min_new_tokens=5)
    assert torch.equal(greedy(model, input_ids, **kwargs), greedy(model, input_ids, fastmtp=True, **kwargs))


def test_return_dict_scores_match_plain():
    model = tiny_fastmtp("qwen2")
    input_ids = prompt(5)
    kwargs = dict(max_new_tokens=12, return_dict_in_generate=True, output_scores=True, output_logits=True)
    plain = greedy(model, input_ids, **kwargs)
    fast = greedy(model, input_ids, fastmtp=True, **kwargs)
    assert torch.equal(plain.sequences, fast.sequences)
    assert len(fast.scores) == len(plain.scores) == 12
    for plain_scores, fast_scores in zip(plain.scores, fast.scores):
        torch.testing.assert_close(fast_scores, plain_scores, atol=1e-4, rtol=1e-4)


class CollectingStreamer(BaseStreamer):
    def __init__(self):
        self.chunks: list[list[int]] = []
        self.ended = False

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


def test_streamer_receives_exactly_the_generated_tokens():
    model = tiny_fastmtp("llama")
    input_ids = prompt(7)
    streamer = CollectingStreamer()
    output = greedy(model, input_ids, max_new_tokens=25, fastmtp=True, streamer=streamer)
    assert streamer.ended
    assert streamer.chunks[0] == input_ids[0].tolist()  # generate() first streams the prompt
    assert sum(streamer.chunks[1:], []) == output[0, 7:].tolist()


def test_fastmtp_kwargs_never_reach_the_model():
    model = tiny_fastmtp("llama")
    input_ids = prompt(4)
    # Plain generation ignores FastMTP settings instead of failing on unknown model kwargs.
    plain = greedy(model, input_ids, max_new_tokens=5, fastmtp=False, num_draft_tokens=2, draft_vocab="full")
    assert model.last_fastmtp_stats is None
    fast = greedy(model, input_ids, max_new_tokens=5, fastmtp=True, num_draft_tokens=2, draft_vocab="full")
    assert torch.equal(plain, fast)
    assert model.last_fastmtp_stats.max_draft_tokens == 2


def test_generation_config_can_enable_fastmtp():
    model = tiny_fastmtp("llama")
    model.generation_config.fastmtp = True
    model.generation_config.num_draft_tokens = 2
    greedy(model, prompt(4), max_new_tokens=6)
    assert model.last_fastmtp_stats.max_draft_tokens == 2
    model.generation_config.draft_confidence_threshold = 1.0
    greedy(model, prompt(4), max_new_tokens=6)
    assert sum(model.last_fastmtp_stats.drafted_per_position) == 0


def median_head_confidence(model, input_ids, monkeypatch, **kwargs) -> float:
    """The median of the head's top probabilities over a generation: a threshold that gates about half the drafts."""
    seen = []
    original = FastMTPCandidateGenerator._confidence

    def spy(self, logits):
        seen.append(original(self, logits))
        return seen[-1]

    with monkeypatch.context() as patch:
        patch.setattr(FastMTPCandidateGenerator, "_confidence", spy)
        greedy(model, input_ids, fastmtp=True, draft_confidence_threshold=1e-9, **kwargs)
    return sorted(seen)[len(seen) // 2]


def test_greedy_identical_with_confidence_gating(architecture, monkeypatch):
    model = tiny_fastmtp(architecture)
    input_ids = prompt(7)
    kwargs = dict(max_new_tokens=40, num_draft_tokens=3)
    threshold = median_head_confidence(model, input_ids, monkeypatch, **kwargs)
    plain = greedy(model, input_ids, max_new_tokens=40)
    fast = greedy(model, input_ids, fastmtp=True, draft_confidence_threshold=threshold, **kwargs)
    assert torch.equal(plain, fast)
    stats = model.last_fastmtp_stats
    drafted = stats.drafted_per_position
    assert 0 < drafted[0] < stats.cycles  # some cycles drafted, some were plain steps
    assert drafted[2] < drafted[0]  # and drafting stopped at different depths
    assert stats.new_tokens == 1 + stats.cycles + stats.accepted_tokens
    assert sum(drafted) < stats.head_steps <= sum(drafted) + stats.cycles  # a dropped draft still cost a head step


def test_confidence_threshold_of_one_is_plain_decoding():
    model = tiny_fastmtp("llama")
    input_ids = prompt(5)
    plain = greedy(model, input_ids, max_new_tokens=12)
    fast = greedy(model, input_ids, max_new_tokens=12, fastmtp=True, draft_confidence_threshold=1.0)
    assert torch.equal(plain, fast)
    stats = model.last_fastmtp_stats
    assert sum(stats.drafted_per_position) == 0 and stats.cycles == 11 and stats.tau == 1.0


# ----------------------------------------------------------------------------- prompt lookup


def oracle_first_draft(reference: torch.LongTensor):
    """
    A `_select_draft` whose most likely token is the true greedy next token: prompt lookup agrees with the head
    wherever the text so far continues as the model does, so lookup cycles happen on a random tiny model too.
    """
    original = FastMTPCandidateGenerator._select_draft

    def select_draft(generator, candidate_ids, head_output):
        token, logits, confidence = original(generator, candidate_ids, head_output)
        index = candidate_ids.shape[1]
        true_token = reference[:, index] if index < reference.shape[1] else token
        return true_token, logits, confidence

    return select_draft


def looping_prompt(length: int = 24, period: int = 5, seed: int = 0) -> torch.LongTensor:
    """A prompt that repeats itself, so that its last n-grams occur earlier and prompt lookup finds continuations."""
    return prompt(period, seed=seed).repeat(1, length // period + 1)[:, :length]


def test_greedy_identical_with_prompt_lookup(architecture, monkeypatch):
    lookup_cycles = lookup_drafted = lookup_accepted = 0
    for seed in range(5):
        model = tiny_fastmtp(architecture, seed=seed)
        input_ids = looping_prompt(seed=seed)
        plain = greedy(model, input_ids, max_new_tokens=40)
        with monkeypatch.context() as patch:
            patch.setattr(FastMTPCandidateGenerator, "_select_draft", oracle_first_draft(plain))
            fast = greedy(model, input_ids, max_new_tokens=40, fastmtp=True, prompt_lookup_num_tokens=6)
        assert torch.equal(plain, fast), (architecture, seed)
        stats = model.last_fastmtp_stats
        assert stats.new_tokens == 1 + stats.cycles + stats.accepted_tokens
        lookup_cycles += stats.lookup_cycles
        lookup_drafted += stats.lookup_drafted
        lookup_accepted += stats.lookup_accepted
    # Lookup drafted, and its drafts were both accepted and rejected: every path of a lookup cycle ran.
    assert lookup_cycles > 0 and 0 < lookup_accepted < lookup_drafted


def test_prompt_lookup_without_the_heads_agreement_drafts_nothing_from_it(monkeypatch):
    """Lookup's continuation is only used where it starts with the head's most likely token."""
    model = tiny_fastmtp("llama")
    input_ids = looping_prompt()
    plain = greedy(model, input_ids, max_new_tokens=30)
    found = []
    lookup_candidates = PromptLookupCandidateGenerator.get_candidates

    def spy(lookup, input_ids, **kwargs):
        candidates, logits = lookup_candidates(lookup, input_ids, **kwargs)
        found.append(candidates.shape[1] > input_ids.shape[1])
        return candidates, logits

    monkeypatch.setattr(PromptLookupCandidateGenerator, "get_candidates", spy)
    monkeypatch.setattr(FastMTPCandidateGenerator, "_select_draft", oracle_first_draft((plain + 1) % model.vocab_size))
    fast = greedy(model, input_ids, max_new_tokens=30, fastmtp=True, prompt_lookup_num_tokens=6)
    assert torch.equal(plain, fast)
    assert any(found)  # lookup found continuations, and none was used: the head never agreed
    assert model.last_fastmtp_stats.lookup_cycles == 0


def test_prompt_lookup_settings_reach_transformers_lookup(monkeypatch):
    model = tiny_fastmtp("llama")
    captured = capture_generator(model, monkeypatch)
    greedy(model, looping_prompt(), max_new_tokens=4, fastmtp=True)
    assert captured[-1].prompt_lookup is None
    greedy(
        model, looping_prompt(), max_new_tokens=4, fastmtp=True, prompt_lookup_num_tokens=5, max_matching_ngram_size=3
    )
    lookup = captured[-1].prompt_lookup
    assert (lookup.num_output_tokens, lookup.max_matching_ngram_size) == (5, 3)


def test_prompt_lookup_drafts_stop_at_max_length(monkeypatch):
    model = tiny_fastmtp("llama")
    input_ids = looping_prompt()
    reference = greedy(model, input_ids, max_new_tokens=30)
    monkeypatch.setattr(FastMTPCandidateGenerator, "_select_draft", oracle_first_draft(reference))
    cut_by_max_length = []
    get_candidates = FastMTPCandidateGenerator.get_candidates

    def spy(generator, input_ids, **kwargs):
        candidates, logits = get_candidates(generator, input_ids, **kwargs)
        assert candidates.shape[1] < generator.max_length  # room is left for the verified token
        cut_by_max_length.append(generator._drafted_by_lookup and candidates.shape[1] == generator.max_length - 1)
        return candidates, logits

    monkeypatch.setattr(FastMTPCandidateGenerator, "get_candidates", spy)
    for max_new_tokens in range(1, 30):
        fast = greedy(model, input_ids, max_new_tokens=max_new_tokens, fastmtp=True, prompt_lookup_num_tokens=10)
        assert torch.equal(fast, reference[:, : input_ids.shape[1] + max_new_tokens]), max_new_tokens
    assert any(cut_by_max_length)


# ----------------------------------------------------------------------------- caches


def capture_generator(model, monkeypatch) -> list[FastMTPCandidateGenerator]:
    """Every candidate generator `model` builds, in order."""
    captured = []
    original = FastMTPCandidateGenerator.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.model is model:
            captured.append(self)

    monkeypatch.setattr(FastMTPCandidateGenerator, "__init__", spy)
    return captured


@pytest.mark.parametrize("lookup_tokens", [None, 6])
def test_head_cache_extended_incrementally_equals_one_shot(architecture, monkeypatch, lookup_tokens):
    model = tiny_fastmtp(architecture)
    # Float32 draft steps, like the one-shot reference: this checks the cache's bookkeeping to float32 rounding.
    use_kernels(monkeypatch, "stock", "native")
    input_ids = prompt(11) if lookup_tokens is None else looping_prompt()
    if lookup_tokens is not None:  # cycles of up to 6 lookup drafts, between the head's own
        reference_output = greedy(model, input_ids, max_new_tokens=30)
        monkeypatch.setattr(FastMTPCandidateGenerator, "_select_draft", oracle_first_draft(reference_output))
    captured = capture_generator(model, monkeypatch)
    output = greedy(
        model, input_ids, max_new_tokens=30, fastmtp=True, num_draft_tokens=3, prompt_lookup_num_tokens=lookup_tokens
    )
    generator = captured[0]
    assert (generator.stats.lookup_cycles > 0) == (lookup_tokens is not None)
    generator.head_cache.crop(-generator.head_cache_speculative_length)
    verified = generator.head_cache_verified_length
    # Verified pairs cover every position whose successor is known, up to the last cycle's bonus token.
    assert output.shape[1] - 1 - verified <= max(3, lookup_tokens or 0) + 1

    with torch.no_grad():
        hidden = model.model(output, output_hidden_states=-1).hidden_states[-1]
        reference = DynamicCache(config=model.head_config)
        positions = torch.arange(verified).unsqueeze(0)
        model.mtp_forward(hidden[:, :verified], output[:, 1 : verified + 1], positions, reference)
    incremental_keys = generator.head_cache.layers[0].keys
    kept = incremental_keys.shape[-2]  # all of them, or the last window for sliding-window heads
    torch.testing.assert_close(incremental_keys, reference.layers[0].keys[..., -kept:, :], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        generator.head_cache.layers[0].values, reference.layers[0].values[..., -kept:, :], atol=1e-5, rtol=1e-4
    )


class ScriptedDraftLength(FixedDraftLength):
    """K for each cycle from a repeating script: plain steps between drafting cycles, as "auto" may choose."""

    def __init__(self, script: list[int]):
        super().__init__(num_draft_tokens=3)
        self.script, self.cycle = script, 0

    def __call__(self, stats, batch_size: int = 1, catch_up_positions: int = 0, tokens_left: int | None = None) -> int:
        self.cycle += 1
        return self.script[(self.cycle - 1) % len(self.script)]


class RecordingDraftLength(ScriptedDraftLength):
    """A scripted K that records what the drafter tells a draft-length policy."""

    def __init__(self, script: list[int]):
        super().__init__(script)
        self.calls, self.prefills, self.catch_ups, self.draft_steps = [], [], [], []

    def __call__(self, stats, batch_size: int = 1, catch_up_positions: int = 0, tokens_left: int | None = None) -> int:
        k = super().__call__(stats, batch_size)
        self.calls.append((k, catch_up_positions, tokens_left))
        return k

    def observe_prefill(self, num_positions: int, seconds: float) -> None:
        self.prefills.append(num_positions)

    def observe_catch_up(self, num_positions: int, seconds: float) -> None:
        self.catch_ups.append(num_positions)

    def observe_draft_steps(self, num_steps: int, seconds: float) -> None:
        self.draft_steps.append(num_steps)


def test_the_drafter_tells_auto_what_catching_up_costs_and_what_is_left(monkeypatch):
    model = tiny_fastmtp("llama")
    policy = RecordingDraftLength([0, 0, 2, 0, 1])
    monkeypatch.setattr(type(model), "draft_length", lambda self, *args: policy)
    input_ids = prompt(11)
    max_new_tokens = 20
    output = greedy(model, input_ids, max_new_tokens=max_new_tokens, fastmtp=True, num_draft_tokens=3)
    assert torch.equal(output, greedy(model, input_ids, max_new_tokens=max_new_tokens))
    assert policy.prefills == [11]
    ks, catch_ups, tokens_left = zip(*policy.calls)
    # The prompt's 11 positions, then one more per plain step, until the head drafts and takes them (8+ are timed).
    assert catch_ups[:3] == (11, 12, 13) and policy.catch_ups[0] == 13
    for previous_k, catch_up in zip(ks, catch_ups[1:]):
        assert (catch_up > 0) == (previous_k == 0)  # charged after plain steps only, never after a drafting cycle
    assert tokens_left[0] == max_new_tokens - 1  # (the prefill made the first token)
    assert all(left < before for before, left in zip(tokens_left, tokens_left[1:]))
    # Draft steps are observed for drafting cycles without a catch-up after plain steps (its forward is a step too).
    drafting_without_lump = [k for k, catch_up, _ in policy.calls if k and not catch_up]
    assert policy.draft_steps == drafting_without_lump


def test_head_cache_catches_up_after_plain_steps(architecture, monkeypatch):
    model = tiny_fastmtp(architecture)
    use_kernels(monkeypatch, "stock", "native")
    monkeypatch.setattr(type(model), "draft_length", lambda self, *args: ScriptedDraftLength([0, 0, 2, 0, 1, 3]))
    captured = capture_generator(model, monkeypatch)
    input_ids = prompt(11)
    output = greedy(model, input_ids, max_new_tokens=30, fastmtp=True, num_draft_tokens=3)
    assert torch.equal(output, greedy(model, input_ids, max_new_tokens=30))
    generator = captured[0]
    assert generator.stats.drafted_per_position[0] < generator.stats.cycles  # plain steps happened
    generator.head_cache.crop(-generator.head_cache_speculative_length)
    verified = generator.head_cache_verified_length
    # Up to the last drafting cycle's tokens (K + 1) and two plain steps after it are not in the head's cache yet.
    assert output.shape[1] - 1 - verified <= 3 + 1 + 2
    with torch.no_grad():
        hidden = model.model(output, output_hidden_states=-1).hidden_states[-1]
        reference = DynamicCache(config=model.head_config)
        positions = torch.arange(verified).unsqueeze(0)
        model.mtp_forward(hidden[:, :verified], output[:, 1 : verified + 1], positions, reference)
    kept = generator.head_cache.layers[0].keys.shape[-2]
    for name in ("keys", "values"):
        incremental = getattr(generator.head_cache.layers[0], name)
        expected = getattr(reference.layers[0], name)[..., -kept:, :]
        torch.testing.assert_close(incremental, expected, atol=1e-5, rtol=1e-4)


def test_head_never_recomputes_the_prefix(monkeypatch):
    model = tiny_fastmtp("llama")
    calls = []
    original = type(model).mtp_forward

    def counting(self, hidden_states, input_ids, *args, **kwargs):
        calls.append(input_ids.shape[1])
        return original(self, hidden_states, input_ids, *args, **kwargs)

    monkeypatch.setattr(type(model), "mtp_forward", counting)
    greedy(model, prompt(20), max_new_tokens=30, fastmtp=True, num_draft_tokens=3)
    stats = model.last_fastmtp_stats
    assert calls[0] == 20  # the prefill's pairs, once
    assert max(calls[1:]) <= 3 + 1  # afterwards only newly verified positions, or one recursive step
    assert len(calls) == sum(stats.drafted_per_position) == stats.head_steps  # one extend + K-1 recursive steps


@needs_transformers_5_23
def test_verification_keeps_only_the_last_hidden_state(monkeypatch):
    model = tiny_fastmtp("llama")
    seen = []
    original = type(model.model).forward

    def spy(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        seen.append([h is not None for h in output.hidden_states] if output.hidden_states else None)
        return output

    monkeypatch.setattr(type(model.model), "forward", spy)
    greedy(model, prompt(5), max_new_tokens=10, fastmtp=True)
    assert seen and all(flags == [False, False, True] for flags in seen)


# ----------------------------------------------------------------------------- sampling


def exact_joint_distribution(model, input_ids, num_tokens: int, warp) -> torch.Tensor:
    """P(t_1..t_n) of the base model's (warped) sampling, by enumerating every continuation."""
    vocab_size = model.vocab_size
    joint = torch.zeros((vocab_size,) * num_tokens, dtype=torch.float64)
    with torch.no_grad():
        for continuation in itertools.product(range(vocab_size), repeat=num_tokens - 1):
            sequence = torch.cat([input_ids, torch.tensor([continuation], dtype=torch.long)], dim=1)
            logits = model(sequence).logits[0, input_ids.shape[1] - 1 :].double()
            probs = [warp(logits[i]).softmax(-1) for i in range(num_tokens)]
            prefix_probability = 1.0
            for i, token in enumerate(continuation):
                prefix_probability *= probs[i][token].item()
            joint[continuation] = prefix_probability * probs[num_tokens - 1]
    return joint.reshape(-1)


def chi_square_p_value(samples: torch.Tensor, expected_probs: torch.Tensor) -> float:
    from scipy.stats import chi2

    counts = torch.bincount(samples, minlength=expected_probs.numel()).double()
    expected = expected_probs * len(samples)
    # Cells expected to be rare are pooled, so that the chi-square approximation holds.
    rare = expected < 5
    observed = torch.cat([counts[~rare], counts[rare].sum(0, keepdim=True)])
    expected = torch.cat([expected[~rare], expected[rare].sum(0, keepdim=True)])
    keep = expected > 0
    statistic = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    return float(chi2.sf(statistic, int(keep.sum()) - 1))


def sample_first_tokens(model, input_ids, num_samples: int, num_tokens: int, **kwargs) -> tuple[torch.Tensor, Counter]:
    """The first `num_tokens` of `num_samples` sampled generations, each coded as one int; and the summed stats."""
    vocab_size = model.vocab_size
    torch.manual_seed(1234)
    codes = []
    totals = Counter()
    for _ in range(num_samples):
        output = model.generate(input_ids, do_sample=True, max_new_tokens=num_tokens + 1, **kwargs)
        if (stats := model.last_fastmtp_stats) is not None:
            totals.update(
                cycles=stats.cycles, accepted_tokens=stats.accepted_tokens, lookup_cycles=stats.lookup_cycles
            )
        tokens = output[0, input_ids.shape[1] : input_ids.shape[1] + num_tokens].tolist()
        codes.append(sum(t * vocab_size ** (num_tokens - 1 - i) for i, t in enumerate(tokens)))
    return torch.tensor(codes), totals


SAMPLING_SETTINGS = {
    "plain": ({}, lambda logits: logits),
    "temperature_top_k": ({"temperature": 0.7, "top_k": 4}, None),
}


@pytest.mark.parametrize("setting", SAMPLING_SETTINGS)
def test_sampling_distribution_is_preserved(setting, draft_weights):  # q comes from the head's compact weights
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper

    kwargs, warp = SAMPLING_SETTINGS[setting]
    if warp is None:

        def warp(logits):
            scores = TemperatureLogitsWarper(0.7)(None, logits[None])
            return TopKLogitsWarper(4)(None, scores)[0]

    model = tiny_fastmtp("llama", vocab_size=6, sharpness=4.0)
    input_ids = torch.tensor([[1, 4, 2]])
    expected = exact_joint_distribution(model, input_ids, 3, warp)
    samples, totals = sample_first_tokens(model, input_ids, 2500, 3, fastmtp=True, num_draft_tokens=2, **kwargs)
    assert totals["accepted_tokens"] > 2500 // 4  # drafts are accepted often: the speculative path is what is tested
    assert chi_square_p_value(samples, expected) > 1e-3


def test_sampling_distribution_is_preserved_with_confidence_gating(monkeypatch):
    """The gate reads the head's top probability, never the sampled draft's, so the output distribution is exact."""
    model = tiny_fastmtp("llama", vocab_size=6, sharpness=4.0)
    input_ids = torch.tensor([[1, 4, 2]])
    threshold = median_head_confidence(model, input_ids, monkeypatch, max_new_tokens=4, num_draft_tokens=2)
    expected = exact_joint_distribution(model, input_ids, 3, lambda logits: logits)
    samples, totals = sample_first_tokens(
        model, input_ids, 2500, 3, fastmtp=True, num_draft_tokens=2, draft_confidence_threshold=threshold
    )
    assert totals["accepted_tokens"] > 2500 // 8
    assert chi_square_p_value(samples, expected) > 1e-3


def test_sampling_distribution_is_preserved_with_prompt_lookup():
    """
    Cycles that draft by lookup carry no q and are verified by sampling and matching; the others keep speculative
    sampling, which stays exact because the choice between them reads the head's most likely token, never its sample.
    The prompt is one where this untrained head often agrees with lookup, so both kinds of cycle are common.
    """
    model = tiny_fastmtp("llama", vocab_size=6, sharpness=4.0)
    input_ids = torch.tensor([[2, 2, 3, 1, 2, 2]])
    expected = exact_joint_distribution(model, input_ids, 3, lambda logits: logits)
    samples, totals = sample_first_tokens(
        model, input_ids, 2500, 3, fastmtp=True, num_draft_tokens=2, prompt_lookup_num_tokens=3
    )
    assert totals["lookup_cycles"] > 2500 // 4 and totals["cycles"] - totals["lookup_cycles"] > 2500 // 4
    assert chi_square_p_value(samples, expected) > 1e-3


def test_sampling_test_detects_lookup_chosen_on_the_sampled_draft(monkeypatch):
    """Negative control: choosing lookup where it agrees with the *sampled* draft skews the head's q: noticed."""
    select_draft, look_up = FastMTPCandidateGenerator._select_draft, FastMTPCandidateGenerator._look_up

    def remember_the_sample(self, candidate_ids, head_output):
        token, logits, confidence = select_draft(self, candidate_ids, head_output)
        self.sampled_draft = token
        return token, logits, confidence

    monkeypatch.setattr(FastMTPCandidateGenerator, "_select_draft", remember_the_sample)
    monkeypatch.setattr(
        FastMTPCandidateGenerator, "_look_up", lambda self, ids, _: look_up(self, ids, self.sampled_draft)
    )
    model = tiny_fastmtp("llama", vocab_size=6, sharpness=4.0)
    input_ids = torch.tensor([[2, 2, 3, 1, 2, 2]])
    expected = exact_joint_distribution(model, input_ids, 3, lambda logits: logits)
    samples, _ = sample_first_tokens(
        model, input_ids, 2500, 3, fastmtp=True, num_draft_tokens=2, prompt_lookup_num_tokens=3
    )
    assert chi_square_p_value(samples, expected) < 1e-3


def test_sampling_test_detects_gating_on_the_sampled_draft(monkeypatch):
    """Negative control: gating on the probability of the token actually drawn skews q, and the test must notice."""
    select_draft = FastMTPCandidateGenerator._select_draft

    def gate_on_the_sample(self, candidate_ids, head_output):
        token, logits, confidence = select_draft(self, candidate_ids, head_output)
        if logits is not None:
            confidence = logits.softmax(-1).gather(-1, token[:, None]).min().item()
        return token, logits, confidence

    model = tiny_fastmtp("llama", vocab_size=6, sharpness=4.0)
    input_ids = torch.tensor([[1, 4, 2]])
    threshold = median_head_confidence(model, input_ids, monkeypatch, max_new_tokens=4, num_draft_tokens=2)
    monkeypatch.setattr(FastMTPCandidateGenerator, "_select_draft", gate_on_the_sample)
    expected = exact_joint_distribution(model, input_ids, 3, lambda logits: logits)
    samples, _ = sample_first_tokens(
        model, input_ids, 2500, 3, fastmtp=True, num_draft_tokens=2, draft_confidence_threshold=threshold
    )
    assert chi_square_p_value(samples, expected) < 1e-3


def test_sampling_test_detects_a_biased_sampler(monkeypatch):
    """Negative control: accepting every draft samples from the head's q, and the test above must notice."""
    from hf_fastmtp.decoding import speculative_decoding

    def accept_all(drafts, draft_logits, processed):
        bonus = torch.multinomial(processed[0, -1].softmax(-1), 1)
        return torch.cat([drafts, bonus[None]], dim=1), [drafts.shape[1] + 1]

    monkeypatch.setattr(speculative_decoding, "accept_speculative_sampling", accept_all)
    model = tiny_fastmtp("llama", vocab_size=6, sharpness=4.0)
    input_ids = torch.tensor([[1, 4, 2]])
    expected = exact_joint_distribution(model, input_ids, 3, lambda logits: logits)
    samples, _ = sample_first_tokens(model, input_ids, 2500, 3, fastmtp=True, num_draft_tokens=2)
    assert chi_square_p_value(samples, expected) < 1e-3


# ----------------------------------------------------------------------------- stats


def test_stats_arithmetic():
    stats = FastMTPStats(max_draft_tokens=3)
    stats.record_cycle(3, 3)
    stats.record_cycle(3, 1)
    stats.record_cycle(3, 0)
    stats.record_cycle(2, 2)  # a last cycle cut short by max_new_tokens
    assert stats.cycles == 4
    assert stats.drafted_per_position == [4, 4, 3]
    assert stats.reached_per_position == [4, 3, 1]
    assert stats.accepted_per_position == [3, 2, 1]
    assert stats.accepted_tokens == 6
    assert stats.tau == pytest.approx((6 + 4) / 4)
    assert stats.acceptance_cumulative == pytest.approx([3 / 4, 2 / 4, 1 / 3])
    assert stats.acceptance_conditional == pytest.approx([3 / 4, 2 / 3, 1 / 1])
    as_dict = stats.to_dict()
    assert as_dict["tau"] == pytest.approx(2.5) and as_dict["cycles"] == 4


def test_stats_count_gated_cycles():
    """Cycles cut short by the confidence threshold: a plain step still costs a verification pass."""
    stats = FastMTPStats(max_draft_tokens=3)
    stats.record_cycle(0, 0)
    stats.record_cycle(1, 1)
    stats.record_cycle(2, 1)
    assert stats.cycles == 3
    assert stats.tau == pytest.approx((2 + 3) / 3)
    assert stats.drafted_per_position == [2, 1, 0]
    assert stats.reached_per_position == [2, 1, 0]
    assert stats.acceptance_conditional == pytest.approx([1.0, 0.0, 0.0])
    assert FastMTPStats(max_draft_tokens=2).tau == 0.0


def test_stats_times_are_recorded():
    model = tiny_fastmtp("llama")
    greedy(model, prompt(5), max_new_tokens=20, fastmtp=True)
    stats = model.last_fastmtp_stats
    assert stats.draft_seconds > 0 and stats.verify_seconds > 0 and stats.prefill_seconds > 0
    assert stats.cycles >= 20 // 4
