"""Batched FastMTP: left-padded prompts, ragged acceptance, rows finishing apart; lossless per row."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_fastmtp
from test_core import chi_square_p_value, exact_joint_distribution
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from hf_fastmtp import FastMTPCandidateGenerator

PROMPT_LENGTHS = (5, 9, 3, 12)
PAD = 0


def padded_batch(lengths=PROMPT_LENGTHS, vocab_size: int = 97, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random prompts of different lengths, left-padded as `tokenizer(..., padding_side="left")` returns them."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), PAD)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, width - length :] = torch.randint(1, vocab_size, (length,), generator=generator)
        attention_mask[row, width - length :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def greedy(model, batch, **kwargs) -> torch.LongTensor:
    return model.generate(**batch, do_sample=False, pad_token_id=PAD, **kwargs)


def scripted_drafts(reference: torch.LongTensor, prompt_width: int, rejections):
    """
    A `get_candidates` whose drafts are each row's true continuation (`reference`: plain batched output), wrong from
    draft `rejections(row, cycle)` on, so rows accept different numbers of drafts (0..K) in the same cycle. The head
    still runs, so its caches follow the rows too.
    """
    original = FastMTPCandidateGenerator.get_candidates
    cycles = []

    def get_candidates(generator, input_ids, **kwargs):
        candidates, logits = original(generator, input_ids, **kwargs)
        cycle = len(cycles)
        cycles.append(candidates.shape[1] - input_ids.shape[1])
        mask = kwargs.get("attention_mask")
        for batch_row, row in enumerate(generator.active_rows):
            real = int(mask[batch_row].sum()) if mask is not None else input_ids.shape[1]
            prompt_length = int((reference[row, :prompt_width] != PAD).sum())
            position = prompt_width + real - prompt_length  # the row's next token in `reference`
            reject_at = rejections(row, cycle)
            for draft in range(candidates.shape[1] - input_ids.shape[1]):
                index = min(position + draft, reference.shape[1] - 1)
                true_token = int(reference[row, index])
                wrong = reject_at is not None and draft >= reject_at
                candidates[batch_row, input_ids.shape[1] + draft] = (true_token + 1) % 97 if wrong else true_token
        return candidates, logits

    return get_candidates


def test_batch_equals_plain_batched_greedy(architecture):
    model = tiny_fastmtp(architecture)
    batch = padded_batch()
    plain = greedy(model, batch, max_new_tokens=30)
    fast = greedy(model, batch, max_new_tokens=30, fastmtp=True, num_draft_tokens=3)
    assert torch.equal(plain, fast)
    stats = model.last_fastmtp_stats
    assert len(stats.rows) == len(PROMPT_LENGTHS) and stats.new_tokens == sum(row.new_tokens for row in stats.rows)
    assert stats.cycles == sum(row.cycles for row in stats.rows)


@pytest.mark.parametrize("max_new_tokens", [7, 33])
def test_ragged_acceptance(architecture, monkeypatch, max_new_tokens):
    """Every row accepts its own number of drafts each cycle (0..K, all different), past Mistral's sliding window."""
    model = tiny_fastmtp(architecture)
    batch = padded_batch()
    plain = greedy(model, batch, max_new_tokens=max_new_tokens)

    def rejections(row: int, cycle: int) -> int | None:
        reject_at = (row + cycle) % 4
        return None if reject_at == 3 else reject_at  # 0, 1, 2 or all 3 accepted

    monkeypatch.setattr(
        FastMTPCandidateGenerator, "get_candidates", scripted_drafts(plain, batch["input_ids"].shape[1], rejections)
    )
    fast = greedy(model, batch, max_new_tokens=max_new_tokens, fastmtp=True, num_draft_tokens=3)
    assert torch.equal(plain, fast)
    rows = model.last_fastmtp_stats.rows
    if max_new_tokens > 20:  # each row accepted 0, 1, 2 and 3 drafts in some cycle: tau lies strictly inside (1, 4)
        assert all(1.4 < row.tau < 3.6 for row in rows), [row.tau for row in rows]
        assert len({round(row.tau, 3) for row in rows}) > 1


def test_rows_finish_apart(architecture, monkeypatch):
    """A row that meets EOS (or a criterion of its own) leaves the batch; the others go on; output padded as plain."""
    model = tiny_fastmtp(architecture)
    batch = padded_batch()
    width = batch["input_ids"].shape[1]
    reference = greedy(model, batch, max_new_tokens=24)
    eos = int(reference[1, width + 6])  # row 1 ends at its 7th token (or earlier), others when they meet it

    class StopRowAtLength(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return (input_ids[:, 0] == batch["input_ids"][2, 0]) & (input_ids.shape[1] >= width + 11)

    criteria = StoppingCriteriaList([StopRowAtLength()])
    plain = greedy(model, batch, max_new_tokens=24, eos_token_id=eos, stopping_criteria=criteria)
    assert (plain[:, -1] == PAD).any()  # some row did finish early
    monkeypatch.setattr(
        FastMTPCandidateGenerator,
        "get_candidates",
        scripted_drafts(plain, width, lambda row, cycle: (row * 2 + cycle) % 3),
    )
    fast = greedy(
        model, batch, max_new_tokens=24, eos_token_id=eos, stopping_criteria=criteria, fastmtp=True, num_draft_tokens=3
    )
    assert torch.equal(plain, fast)
    new_tokens = [row.new_tokens for row in model.last_fastmtp_stats.rows]
    assert new_tokens == [int((plain[row, width:] != PAD).sum()) for row in range(len(PROMPT_LENGTHS))] or eos == PAD


def top2_gap(model, tokens: torch.LongTensor) -> float:
    """The gap between the two largest logits of the base's next-token prediction after `tokens`."""
    with torch.no_grad():
        top = model(tokens[None]).logits[0, -1].topk(2).values
    return float(top[0] - top[1])


def test_each_row_equals_its_own_greedy_output(architecture, monkeypatch):
    """Row b equals prompt b decoded alone, except after a numerical near-tie (batched forwards round differently)."""
    model = tiny_fastmtp(architecture)
    batch = padded_batch(seed=3)
    width = batch["input_ids"].shape[1]
    plain = greedy(model, batch, max_new_tokens=20)
    monkeypatch.setattr(
        FastMTPCandidateGenerator,
        "get_candidates",
        scripted_drafts(plain, width, lambda row, cycle: (row + cycle) % 3),
    )
    fast = greedy(model, batch, max_new_tokens=20, fastmtp=True, num_draft_tokens=2)
    monkeypatch.undo()
    for row, length in enumerate(PROMPT_LENGTHS):
        alone = greedy(model, {"input_ids": batch["input_ids"][row : row + 1, width - length :]}, max_new_tokens=20)
        mine, theirs = fast[row, width:].tolist(), alone[0, length:].tolist()
        differ = [i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b]
        if differ:  # allowed only where the unbatched logits nearly tie
            prefix = alone[0, : length + differ[0]]
            assert top2_gap(model, prefix) < 1e-4, (row, differ[0])


def test_sampling_distribution_is_exact_per_row():
    """Chi-square per row at B = 4, prompts of different lengths: each row samples its own prompt's distribution."""
    model = tiny_fastmtp("llama", vocab_size=6, sharpness=4.0)
    lengths = (3, 1, 4, 2)
    batch = padded_batch(lengths, vocab_size=6, seed=5)
    width = max(lengths)
    num_samples, num_tokens = 700, 3
    torch.manual_seed(1234)
    codes = [[] for _ in lengths]
    accepted = 0
    for _ in range(num_samples):
        output = model.generate(
            **batch, do_sample=True, max_new_tokens=num_tokens + 1, pad_token_id=PAD, fastmtp=True, num_draft_tokens=2
        )
        accepted += model.last_fastmtp_stats.accepted_tokens
        for row in range(len(lengths)):
            tokens = output[row, width : width + num_tokens].tolist()
            codes[row].append(sum(t * 6 ** (num_tokens - 1 - i) for i, t in enumerate(tokens)))
    assert accepted > num_samples  # drafts are accepted: the speculative path is what is tested
    for row, length in enumerate(lengths):
        prompt = batch["input_ids"][row : row + 1, width - length :]
        expected = exact_joint_distribution(model, prompt, num_tokens, lambda logits: logits)
        assert chi_square_p_value(torch.tensor(codes[row]), expected) > 1e-3, row


def test_output_scores_per_row():
    model = tiny_fastmtp()
    batch = padded_batch()
    kwargs = {"max_new_tokens": 6, "return_dict_in_generate": True, "output_scores": True}
    plain = greedy(model, batch, **kwargs)
    fast = greedy(model, batch, fastmtp=True, num_draft_tokens=2, **kwargs)
    assert torch.equal(plain.sequences, fast.sequences) and len(fast.scores) == len(plain.scores)
    for plain_step, fast_step in zip(plain.scores, fast.scores):
        torch.testing.assert_close(fast_step, plain_step, atol=1e-4, rtol=1e-4)


def test_batch_refuses_a_streamer():
    model = tiny_fastmtp()
    with pytest.raises(ValueError, match="streamer takes one sequence"):
        greedy(model, padded_batch(), max_new_tokens=4, fastmtp=True, streamer=TextStreamer(tokenizer=None))


def test_padded_batch_without_attention_mask_is_refused():
    model = tiny_fastmtp()
    with pytest.raises(ValueError, match="attention_mask"):
        greedy(model, {"input_ids": padded_batch()["input_ids"]}, max_new_tokens=4, fastmtp=True)


def test_right_padding_is_refused():
    model = tiny_fastmtp()
    batch = {key: value.flip(-1) for key, value in padded_batch().items()}
    with pytest.raises(ValueError, match="padding_side='left'"):
        greedy(model, batch, max_new_tokens=4, fastmtp=True)
