"""End-to-end on the real embedded model, SmolLM2-135M-Instruct (CI runs these too)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_core import CollectingStreamer

from hf_fastmtp.prompts import encode_chat, encode_chats

pytestmark = pytest.mark.slow

SPEC_BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench.jsonl"


def spec_bench_prompts(count: int) -> list[str]:
    """First turns spread over Spec-Bench's categories, in a fixed order."""
    rows = [json.loads(line) for line in SPEC_BENCH.read_text().splitlines()]
    by_category: dict[str, list[str]] = {}
    for row in rows:
        by_category.setdefault(row["category"], []).append(row["turns"][0])
    prompts, round_ = [], 0
    while len(prompts) < count:
        for questions in by_category.values():
            if round_ < len(questions) and len(prompts) < count:
                prompts.append(questions[round_])
        round_ += 1
    return prompts


def test_greedy_identical_on_spec_bench(smollm2):
    model, tokenizer = smollm2
    for question in spec_bench_prompts(10):
        inputs = encode_chat(tokenizer, question)
        plain = model.generate(**inputs, max_new_tokens=128, do_sample=False)
        fast = model.generate(**inputs, max_new_tokens=128, do_sample=False, fastmtp=True)
        assert torch.equal(plain, fast), question[:80]
        assert model.last_fastmtp_stats.cycles > 0


def test_batch_of_four_equals_plain_batched_greedy(smollm2):
    """
    B = 4 Spec-Bench prompts of different lengths, left-padded: each row equals plain batched greedy decoding. K is
    fixed: "auto" weighs measured costs, and on cores shared with other test workers it may rightly not draft.
    """
    model, tokenizer = smollm2
    inputs = encode_chats(tokenizer, spec_bench_prompts(4))
    assert len(set(inputs["attention_mask"].sum(-1).tolist())) > 1  # padding of different lengths
    plain = model.generate(**inputs, max_new_tokens=96, do_sample=False)
    fast = model.generate(**inputs, max_new_tokens=96, do_sample=False, fastmtp=True, num_draft_tokens=3)
    assert torch.equal(plain, fast)
    stats = model.last_fastmtp_stats
    assert len(stats.rows) == 4 and stats.tau > 1.2 and all(row.cycles > 0 for row in stats.rows)


def test_greedy_identical_with_prompt_lookup_on_copying_prompts(smollm2):
    model, tokenizer = smollm2
    questions = [row for row in map(json.loads, SPEC_BENCH.read_text().splitlines()) if row["category"] == "rag"]
    lookup_accepted = 0
    for question in questions[:3]:
        inputs = encode_chat(tokenizer, question["turns"][0])
        plain = model.generate(**inputs, max_new_tokens=96, do_sample=False)
        fast = model.generate(**inputs, max_new_tokens=96, do_sample=False, fastmtp=True, prompt_lookup_num_tokens=6)
        assert torch.equal(plain, fast), question["question_id"]
        lookup_accepted += model.last_fastmtp_stats.lookup_accepted
    assert lookup_accepted > 0  # RAG answers copy from their passages: lookup drafts are accepted


def test_the_shipped_head_is_trained_and_routes_by_language(smollm2):
    from hf_fastmtp.embedded import SHIPPED_HEAD_DIR

    model, tokenizer = smollm2
    card = (SHIPPED_HEAD_DIR / "README.md").read_text(encoding="utf-8")
    assert "## Training" in card and "fastmtp train" in card and "non-commercial" in card
    assert set(model.draft_vocab_maps) >= {"all", "en", "zh"}

    accepted = 0
    for question in spec_bench_prompts(6):
        model.generate(**encode_chat(tokenizer, question), max_new_tokens=64, fastmtp=True, num_draft_tokens=3)
        accepted += model.last_fastmtp_stats.accepted_tokens
    assert accepted > 0  # an untrained head accepts none (tau 1.00); K fixed, as "auto" may not draft on busy cores

    chinese = encode_chat(tokenizer, "请用三句话介绍一下长城的历史。")
    model.generate(**chinese, max_new_tokens=8, fastmtp=True)
    stats = model.last_fastmtp_stats
    assert stats.language == "zh" and stats.draft_vocab_size == model.draft_vocab_maps["zh"].numel()
    model.generate(**encode_chat(tokenizer, "Why is the sky blue?"), max_new_tokens=8, fastmtp=True)
    assert model.last_fastmtp_stats.language == "en"


def test_streamer_receives_exactly_the_generated_tokens(smollm2):
    from threading import Thread

    from transformers import TextIteratorStreamer

    model, tokenizer = smollm2
    inputs = encode_chat(tokenizer, "Name three colours of the rainbow.")
    collecting = CollectingStreamer()
    output = model.generate(**inputs, max_new_tokens=48, fastmtp=True, streamer=collecting)
    assert sum(collecting.chunks[1:], []) == output[0, inputs["input_ids"].shape[1] :].tolist()

    text_streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    thread = Thread(
        target=model.generate, kwargs=dict(**inputs, max_new_tokens=48, fastmtp=True, streamer=text_streamer)
    )
    thread.start()
    streamed = "".join(text_streamer)
    thread.join()
    assert streamed == tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])


def test_text_generation_pipeline(smollm2):
    from transformers import pipeline

    model, tokenizer = smollm2
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    plain = generator(messages, max_new_tokens=24, do_sample=False)
    fast = generator(messages, max_new_tokens=24, do_sample=False, fastmtp=True)
    assert fast[0]["generated_text"] == plain[0]["generated_text"]
    assert model.last_fastmtp_stats is not None


def test_demo_command_prints_the_comparison():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hf_fastmtp.cli",
            "demo",
            "--max-new-tokens",
            "12",
            "--prompts",
            "Hi!",
            "Count to five.",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "| overall" in result.stdout and "tok/s" in result.stdout
    overall = next(line for line in result.stdout.splitlines() if line.startswith("| overall"))
    assert overall.rstrip(" |").endswith("yes")


def test_generate_command_streams_the_answer_and_reports_speed():
    command = [sys.executable, "-m", "hf_fastmtp.cli", "generate", "What is 2 + 2?", "--max-new-tokens", "16"]
    fast = subprocess.run(command, capture_output=True, text=True, timeout=600)
    plain = subprocess.run([*command, "--no-fastmtp"], capture_output=True, text=True, timeout=600)
    assert fast.returncode == 0 and plain.returncode == 0, fast.stderr + plain.stderr
    assert fast.stdout.strip() and fast.stdout == plain.stdout  # greedy: the same streamed answer
    assert "tok/s" in fast.stderr and "tau" in fast.stderr and "[FastMTP]" in fast.stderr
    assert "[plain]" in plain.stderr
    looked_up = subprocess.run([*command, "--lookup-tokens", "3"], capture_output=True, text=True, timeout=600)
    assert looked_up.returncode == 0 and looked_up.stdout == plain.stdout, looked_up.stderr
    assert "cycles by prompt lookup" in looked_up.stderr


def test_stop_strings_and_stopping_criteria_stop_exactly(smollm2):
    """The issue's cases: a stop string inside an accepted run, one across a token boundary, and a user's criterion."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    model, tokenizer = smollm2
    inputs = encode_chat(tokenizer, "Count from 1 to 12, one number per line, like '1. 1'.")
    five = tokenizer.convert_tokens_to_ids("5")

    class StopAtFive(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == five

    cases = [
        {"stop_strings": ["7"], "tokenizer": tokenizer},
        {"stop_strings": ["10"], "tokenizer": tokenizer},
        {"stop_strings": ["\n8"], "tokenizer": tokenizer},
        {"stopping_criteria": StoppingCriteriaList([StopAtFive()])},
    ]
    for kwargs in cases:
        plain = model.generate(**inputs, max_new_tokens=80, do_sample=False, **kwargs)
        streamer = CollectingStreamer()
        fast = model.generate(**inputs, max_new_tokens=80, do_sample=False, fastmtp=True, streamer=streamer, **kwargs)
        new = plain[0, inputs["input_ids"].shape[1] :]
        assert torch.equal(plain, fast), (
            kwargs,
            tokenizer.decode(new),
            tokenizer.decode(fast[0, plain.shape[1] - len(new) :]),
        )
        assert len(new) < 80  # it did stop early
        assert sum(streamer.chunks[1:], []) == new.tolist()
