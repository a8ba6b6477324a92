"""`fastmtp train`: the objective, the recursion (equal to drafting), the data checks, resume, and a short real run."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHITECTURES, CONFIGURATIONS, configured_fastmtp, tiny_fastmtp
from safetensors.torch import load_file
from test_distill import tiny_model_and_tokenizer
from transformers import GenerationConfig

import hf_fastmtp.cli
import hf_fastmtp.training.hidden_states as hidden_states_module
import hf_fastmtp.training.objective as objective_module
import hf_fastmtp.training.train as train_module
from hf_fastmtp import FastMTPCandidateGenerator, FastMTPForCausalLM
from hf_fastmtp.cli.train import register_cli
from hf_fastmtp.decoding.draft_length import FixedDraftLength
from hf_fastmtp.prompts import encode_chat
from hf_fastmtp.training import TrainError
from hf_fastmtp.training.data import Example, load_reference_examples
from hf_fastmtp.training.distill import tokenizer_fingerprint
from hf_fastmtp.training.hidden_states import collate_pairs, precompute_hidden_states
from hf_fastmtp.training.objective import (
    IGNORE_INDEX,
    FastMTPTrainingModule,
    LinearCrossEntropy,
    base_greedy_labels,
    loss_weights,
    recursive_attention_mask,
    recursive_head_outputs,
    step_labels,
)
from hf_fastmtp.training.train import TrainConfig, train

torch.set_num_threads(1)

NUM_DRAFT_TOKENS = 3
PROMPTS = ("give three tips for staying healthy", "what are the primary colors", "describe an atom", "why is sky blue")
PATTERN = ("sky", "is", "blue", "because", "of", "light")


# ---------------------------------------------------------------------------------------------- the objective


def test_loss_weights():
    assert loss_weights(3) == pytest.approx([1 / 1.96, 0.6 / 1.96, 0.36 / 1.96])
    assert [round(w, 2) for w in loss_weights(3)] == [0.51, 0.31, 0.18]
    assert loss_weights(1) == [1.0]
    assert loss_weights(2, beta=1.0) == [0.5, 0.5]
    assert loss_weights(3, weights=[1, 0, 0]) == [1.0, 0.0, 0.0]
    assert loss_weights(3, weights=[2, 1, 1]) == [0.5, 0.25, 0.25]
    for kwargs in ({"weights": [1, 0]}, {"weights": [1, -1, 1]}, {"weights": [0, 0, 0]}, {"beta": 0}):
        with pytest.raises(TrainError):
            loss_weights(3, **kwargs)


def test_pairs_labels_and_valid_steps():
    # ids t_0..t_5 with a 3-token prompt: pairs (h_p, t_{p+1}) at p = 0..3 predict t_{p+2}, counted from t_3 on.
    long = Example("a", (10, 11, 12, 13, 14, 15), prompt_length=3)
    short = Example("b", (20, 21, 22, 23), prompt_length=2)
    assert (long.num_pairs, long.num_labels, short.num_pairs, short.num_labels) == (4, 3, 2, 2)
    # A 1-token prompt: t_1 has no pair before it (the head needs h_p and t_{p+1}), so only t_2 is a label.
    assert Example("c", (1, 2, 3), prompt_length=1).num_labels == 1

    batch = collate_pairs([(long, torch.zeros(4, 5)), (short, torch.ones(2, 5))])
    x = IGNORE_INDEX
    assert batch["input_ids"].tolist() == [[11, 12, 13, 14], [21, 22, 0, 0]]
    assert batch["labels"].tolist() == [[x, 13, 14, 15], [22, 23, x, x]]
    assert batch["pair_mask"].tolist() == [[True] * 4, [True, True, False, False]]
    assert batch["hidden_states"][1, :, 0].tolist() == [1, 1, 0, 0]
    # Step k reads the chain g_1 (p-k+1) .. g_{k-1} (p-1): it exists from p = k-1 on.
    assert step_labels(batch["labels"], 1).tolist() == [[x, 13, 14, 15], [22, 23, x, x]]
    assert step_labels(batch["labels"], 2).tolist() == [[x, 13, 14, 15], [x, 23, x, x]]
    assert step_labels(batch["labels"], 3).tolist() == [[x, x, 14, 15], [x, x, x, x]]


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_linear_cross_entropy_matches_autograd(monkeypatch, softcap):
    """The fused loss gives autograd's loss and gradient, across row chunks, with a bias and with soft-capping."""
    monkeypatch.setattr(objective_module, "CE_CHUNK_ROWS", 3)
    torch.manual_seed(0)
    weight, bias = torch.randn(50, 8), torch.randn(50)
    hidden = torch.randn(7, 8, requires_grad=True)
    labels = torch.randint(0, 50, (7,))
    logits = F.linear(hidden, weight, bias)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    labels[:3] = logits[:3].argmax(dim=-1)
    expected = F.cross_entropy(logits, labels, reduction="sum")
    (expected_grad,) = torch.autograd.grad(0.5 * expected, hidden)

    loss, label_loss, hits = LinearCrossEntropy.apply(hidden, weight, bias, labels, softcap, True)
    (grad,) = torch.autograd.grad(0.5 * loss, hidden)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(label_loss, expected)
    torch.testing.assert_close(grad, expected_grad)
    assert hits == (logits.argmax(dim=-1) == labels).sum() >= 3
    with pytest.raises(ValueError, match="frozen lm_head"):
        LinearCrossEntropy.apply(hidden, weight.requires_grad_(), bias, labels, softcap, True)


def test_soft_targets_on_hand_computed_cases():
    """Two vocabulary entries, logits chosen so that the softmaxes are simple: the loss and its gradient by hand."""
    weight = torch.eye(2)  # logits = hidden
    hidden = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], requires_grad=True)  # p = (1/2, 1/2) and (3/4, 1/4)
    teacher = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])  # q = (3/4, 1/4) and (1/2, 1/2)
    labels = torch.tensor([0, 1])
    share = torch.tensor([0.5, 1.0])  # targets (7/8, 1/8) and (1/2, 1/2)
    loss, label_loss, hits = LinearCrossEntropy.apply(hidden, weight, None, labels, None, True, teacher, share)
    expected = -(7 / 8 * math.log(1 / 2) + 1 / 8 * math.log(1 / 2)) - (math.log(3 / 4) + math.log(1 / 4)) / 2
    torch.testing.assert_close(loss, torch.tensor(expected))
    torch.testing.assert_close(label_loss, torch.tensor(-math.log(1 / 2) - math.log(1 / 4)))  # the labels alone
    assert hits == 1  # row 1's argmax is 0, its label 1
    (grad,) = torch.autograd.grad(loss, hidden)  # softmax - target
    torch.testing.assert_close(grad, torch.tensor([[1 / 2 - 7 / 8, 1 / 2 - 1 / 8], [3 / 4 - 1 / 2, 1 / 4 - 1 / 2]]))


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_soft_targets_match_autograd(monkeypatch, softcap):
    """Cross-entropy to (1 - w) one_hot + w softmax(teacher logits), across chunks, soft-capped or not."""
    monkeypatch.setattr(objective_module, "CE_CHUNK_ROWS", 3)
    torch.manual_seed(1)
    weight, bias = torch.randn(50, 8), torch.randn(50)
    hidden = torch.randn(7, 8, requires_grad=True)
    teacher, share = torch.randn(7, 8), torch.rand(7)
    labels = torch.randint(0, 50, (7,))

    def logits_of(states):
        logits = F.linear(states, weight, bias)
        return torch.tanh(logits / softcap) * softcap if softcap else logits

    target = share[:, None] * logits_of(teacher).softmax(-1) + (1 - share[:, None]) * F.one_hot(labels, 50)
    expected = F.cross_entropy(logits_of(hidden), target, reduction="sum")
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    loss, label_loss, _ = LinearCrossEntropy.apply(hidden, weight, bias, labels, softcap, True, teacher, share)
    (grad,) = torch.autograd.grad(loss, hidden)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)
    torch.testing.assert_close(label_loss, F.cross_entropy(logits_of(hidden), labels, reduction="sum"))


def test_soft_target_weight_mixes_the_base_distribution_at_the_next_hidden_state():
    """Weight 0 is the hard loss; weight 1 is the cross-entropy to softmax(lm_head(h_{p+1})), except at each
    sequence's last pair (no h_{p+1}), which keeps its label; the logged cross-entropy is the labels' either way."""
    model = tiny_fastmtp("llama")
    torch.manual_seed(4)
    examples = [Example(name, tuple(torch.randint(1, 97, (n,)).tolist()), 3) for name, n in (("a", 12), ("b", 9))]
    hidden_size = model.config.text_config.hidden_size
    batch = collate_pairs([(example, torch.randn(example.num_pairs, hidden_size)) for example in examples])
    weights = [1.0, 0.0, 0.0]
    with torch.no_grad():
        hard_loss, hard_stats = FastMTPTrainingModule(model, weights)(**batch)
        zero_loss, zero_stats = FastMTPTrainingModule(model, weights, soft_target_weight=0.0)(**batch)
        soft_loss, soft_stats = FastMTPTrainingModule(model, weights, soft_target_weight=1.0)(**batch)
        output = recursive_head_outputs(model, batch["hidden_states"], batch["input_ids"], batch["pair_mask"], 1)[0]
    torch.testing.assert_close((zero_loss, zero_stats), (hard_loss, hard_stats))
    torch.testing.assert_close(soft_stats, hard_stats)
    lm_head = model.get_output_embeddings()
    expected, count = 0.0, 0
    for row, example in enumerate(examples):
        for p in range(example.num_pairs):
            label = int(batch["labels"][row, p])
            if label == IGNORE_INDEX:
                continue
            log_probs = lm_head(output[row, p]).log_softmax(-1)
            if p + 1 < example.num_pairs:
                expected -= (lm_head(batch["hidden_states"][row, p + 1]).softmax(-1) * log_probs).sum()
            else:
                expected -= log_probs[label]
            count += 1
    torch.testing.assert_close(soft_loss, expected / count)


def test_base_greedy_labels_replace_the_data_labels_where_a_next_hidden_state_exists():
    model = tiny_fastmtp("llama")
    hidden_size = model.config.text_config.hidden_size
    examples = [Example("a", tuple(range(3, 12)), 4), Example("b", tuple(range(5, 11)), 2)]
    hidden = [torch.randn(example.num_pairs, hidden_size) for example in examples]
    batch = collate_pairs(list(zip(examples, hidden)))
    greedy = base_greedy_labels(model, batch["hidden_states"], batch["labels"], batch["pair_mask"])
    for row, (example, states) in enumerate(zip(examples, hidden)):
        choices = model.get_output_embeddings()(states).argmax(dim=-1)  # the base's choice after each position
        for p in range(batch["labels"].shape[1]):
            data_label = int(batch["labels"][row, p])
            if data_label == IGNORE_INDEX or p == example.num_pairs - 1:  # prompt, padding, or no h_{p+1}
                assert int(greedy[row, p]) == data_label
            else:
                assert int(greedy[row, p]) == int(choices[p + 1])


def test_feature_loss_pairs_each_output_with_the_next_hidden_state():
    hidden_states = torch.randn(2, 5, 4)
    pair_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    selected = torch.tensor([[False, True, True, True, True], [True, True, True, False, False]])
    output = torch.randn(2, 5, 4)
    # Pairs with a label and a next real position: row 0 at p = 1, 2, 3; row 1 at p = 0, 1.
    predicted = torch.stack([output[0, 1], output[0, 2], output[0, 3], output[1, 0], output[1, 1]])
    target = torch.stack(
        [hidden_states[0, 2], hidden_states[0, 3], hidden_states[0, 4], hidden_states[1, 1], hidden_states[1, 2]]
    )
    expected = F.smooth_l1_loss(predicted, target)
    assert torch.allclose(objective_module.feature_loss(output, hidden_states, selected, pair_mask), expected)
    shifted = output.clone()
    shifted[:, :-1] = hidden_states[:, 1:]
    assert objective_module.feature_loss(shifted, hidden_states, selected, pair_mask) == 0


def test_recursive_attention_mask_by_hand():
    # Step 2, 3 positions; keys: step 1 at q = 0, 1, 2, then step 2 at q = 0, 1, 2.
    mask = recursive_attention_mask(torch.ones(1, 3, dtype=torch.bool), step=2)
    assert mask.shape == (1, 1, 3, 6)
    assert mask[0, 0].int().tolist() == [
        [0, 0, 0, 1, 0, 0],  # p = 0 has no step-1 chain: only its own key, to avoid a NaN row
        [1, 0, 0, 0, 1, 0],  # drafted when position 0 was the last verified one
        [1, 1, 0, 0, 0, 1],
    ]
    # Step 3, 4 positions, the last one padding.
    mask = recursive_attention_mask(torch.tensor([[True, True, True, False]]), step=3)
    assert mask[0, 0].int().tolist() == [
        [0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0],
        [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0],  # step-1 keys up to p-2, step 2 at p-1, itself
        [1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1],  # padding: ignored by the loss, sees no padded key but its own
    ]
    # Step 1 is causal attention; a sliding window of 2 keeps the last two positions.
    mask = recursive_attention_mask(torch.ones(1, 4, dtype=torch.bool), step=1, sliding_window=2)
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]


@pytest.mark.parametrize("configuration", [None, *CONFIGURATIONS])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_training_recursion_equals_drafting(architecture, configuration):
    """
    The head outputs of every training step equal those of the real drafting loop (`get_candidates`) with the true
    tokens as drafts, over many cycles with various accepted lengths (so the head cache is extended and cropped),
    past the sliding window of Mistral (16 < sequence length); for the one-layer head and every other configuration
    (random new parts).
    """
    model = tiny_fastmtp(architecture) if configuration is None else configured_fastmtp(architecture, configuration)
    length = 48
    torch.manual_seed(1)
    ids = torch.randint(1, model.vocab_size, (1, length))

    def features(token_ids):  # what drafting reads of a base forward (the final hidden states, or several layers')
        return model.base_features(model.model(token_ids, output_hidden_states=True).hidden_states)

    with torch.no_grad():
        hidden = features(ids)
        num_pairs = length - 2
        pair_mask = torch.ones(1, num_pairs, dtype=torch.bool)
        trained = recursive_head_outputs(
            model, hidden[:, :num_pairs], ids[:, 1 : num_pairs + 1], pair_mask, NUM_DRAFT_TOKENS
        )

    generator = FastMTPCandidateGenerator(
        model, FixedDraftLength(NUM_DRAFT_TOKENS), GenerationConfig(max_length=length, do_sample=False)
    )
    drafted = []

    def true_token_as_draft(candidate_ids, head_output):
        drafted.append((candidate_ids.shape[1], head_output))
        return ids[:, candidate_ids.shape[1]], None, 1.0

    generator._select_draft = true_token_as_draft
    cur_len, accepted, compared = 10, 0, 0
    # Like generate: the prefill's hidden states cover the prompt (cur_len - 1 tokens), a verification's its K + 1.
    verify_hidden = features(ids[:, : cur_len - 1])
    for cycle in range(12):
        drafted.clear()
        with torch.no_grad():
            generator.get_candidates(
                ids[:, :cur_len],
                model_outputs=SimpleNamespace(hidden_states=(verify_hidden,)),
                n_last_matches=accepted,
            )
        for step, (candidate_length, head_output) in enumerate(drafted):
            assert candidate_length == cur_len + step
            # Step k of a cycle whose last verified pair is at cur_len - 2 runs at position cur_len - 2 + (k - 1).
            torch.testing.assert_close(head_output[0], trained[step][0, candidate_length - 2], atol=1e-5, rtol=1e-5)
            compared += 1
        accepted = (0, 2, 1, 3)[cycle % 4]
        with torch.no_grad():
            verify_hidden = features(ids[:, : cur_len + NUM_DRAFT_TOKENS])[:, cur_len - 1 :]
        cur_len += accepted + 1
    assert compared == 12 * NUM_DRAFT_TOKENS and cur_len + NUM_DRAFT_TOKENS < length


def test_padded_batch_equals_single_sequences(tmp_path):
    """Right padding, length sorting and the hidden-state cache change nothing for any sequence of a batch."""
    model = tiny_fastmtp("mistral")
    torch.manual_seed(2)
    examples = [
        Example("a", tuple(torch.randint(1, 97, (40,)).tolist()), prompt_length=12),
        Example("b", tuple(torch.randint(1, 97, (23,)).tolist()), prompt_length=1),
    ]
    store = precompute_hidden_states(model.model, examples, tmp_path, dtype=torch.float32, progress=False)
    for index, example in enumerate(examples):
        expected = model.model(torch.tensor([example.input_ids]), output_hidden_states=-1).hidden_states[-1]
        torch.testing.assert_close(store[index], expected[0, : example.num_pairs], atol=1e-5, rtol=1e-5)

    module = FastMTPTrainingModule(model, loss_weights(NUM_DRAFT_TOKENS))
    with torch.no_grad():
        batch = collate_pairs([(e, store[i]) for i, e in enumerate(examples)])
        batched = recursive_head_outputs(
            model, batch["hidden_states"], batch["input_ids"], batch["pair_mask"], NUM_DRAFT_TOKENS
        )
        _, batched_stats = module(**batch, all_steps=True)
        single_stats = sum(module(**collate_pairs([(e, store[i])]), all_steps=True)[1] for i, e in enumerate(examples))
        for index, example in enumerate(examples):
            single = collate_pairs([(example, store[index])])
            alone = recursive_head_outputs(
                model, single["hidden_states"], single["input_ids"], single["pair_mask"], NUM_DRAFT_TOKENS
            )
            for step in range(NUM_DRAFT_TOKENS):
                torch.testing.assert_close(
                    batched[step][index, : example.num_pairs], alone[step][0], atol=1e-5, rtol=1e-5
                )
    torch.testing.assert_close(batched_stats, single_stats, atol=1e-4, rtol=1e-5)
    # Labels: response tokens (from index 2 on); step k has none at positions p < k - 1.
    assert batched_stats[:, 2].tolist() == [28 + 21, 28 + 20, 28 + 19]


def test_loss_vocabulary_is_a_cross_entropy_over_its_rows():
    model = tiny_fastmtp("llama")
    torch.manual_seed(3)
    examples = [Example(name, tuple(torch.randint(1, 97, (30,)).tolist()), prompt_length=5) for name in "ab"]
    hidden_size = model.config.text_config.hidden_size
    batch = collate_pairs([(example, torch.randn(example.num_pairs, hidden_size)) for example in examples])
    weights = loss_weights(NUM_DRAFT_TOKENS)
    with torch.no_grad():
        full_loss, full_stats = FastMTPTrainingModule(model, weights)(**batch, all_steps=True)
        # The whole vocabulary, in any order, is the full cross-entropy.
        everything = FastMTPTrainingModule(model, weights, loss_vocab=torch.randperm(model.vocab_size))
        loss, stats = everything(**batch, all_steps=True)
        torch.testing.assert_close((loss, stats), (full_loss, full_stats))

        subset = train_module.frequent_response_tokens(examples, 24)
        loss, stats = FastMTPTrainingModule(model, weights, loss_vocab=subset)(**batch, all_steps=True)
        outputs = recursive_head_outputs(
            model, batch["hidden_states"], batch["input_ids"], batch["pair_mask"], NUM_DRAFT_TOKENS
        )
    rows = torch.sort(subset).values
    for step, output in enumerate(outputs, start=1):
        labels = step_labels(batch["labels"], step)
        inside = (labels[..., None] == rows).any(-1)
        logits = model.get_output_embeddings()(output[inside])[:, rows]
        targets = torch.searchsorted(rows, labels[inside])
        expected = F.cross_entropy(logits, targets, reduction="sum")
        torch.testing.assert_close(stats[step - 1, 0], expected, atol=1e-4, rtol=1e-5)
        assert stats[step - 1, 2] == inside.sum() < (labels != IGNORE_INDEX).sum()
        assert stats[step - 1, 1] == (logits.argmax(-1) == targets).sum()


def test_frequent_response_tokens_count_responses_only():
    examples = [Example("a", (7, 7, 7, 1, 2, 2), prompt_length=3), Example("b", (3, 1, 2), prompt_length=1)]
    assert train_module.frequent_response_tokens(examples, 2).tolist() == [2, 1]  # 7 is prompt-only


def test_eager_attention_takes_the_mask_as_a_bias():
    sdpa = tiny_fastmtp("llama")
    eager = tiny_fastmtp("llama")
    eager.head_config._attn_implementation = "eager"
    torch.manual_seed(3)
    hidden, input_ids = torch.randn(2, 12, 32), torch.randint(1, 97, (2, 12))
    pair_mask = torch.ones(2, 12, dtype=torch.bool)
    pair_mask[1, 7:] = False
    with torch.no_grad():
        expected = recursive_head_outputs(sdpa, hidden, input_ids, pair_mask, NUM_DRAFT_TOKENS)
        actual = recursive_head_outputs(eager, hidden, input_ids, pair_mask, NUM_DRAFT_TOKENS)
    for step in range(NUM_DRAFT_TOKENS):
        torch.testing.assert_close(actual[step], expected[step], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- training runs


@pytest.fixture(scope="module")
def tiny():
    """A tiny Llama and word-level tokenizer; a scaled lm_head lets a head reach peaked predictions in a few steps."""
    base, tokenizer = tiny_model_and_tokenizer()
    with torch.no_grad():
        base.lm_head.weight.mul_(30)
    return base, tokenizer


def distilled_rows(tokenizer, num_rows: int) -> list[dict]:
    """Rows whose responses repeat a short word pattern: a head can learn them quickly."""
    vocab = tokenizer.get_vocab()
    rows = []
    for index in range(num_rows):
        prompt = PROMPTS[index % len(PROMPTS)]
        words = [PATTERN[(index + i) % len(PATTERN)] for i in range(10 + index % 7)]
        response_ids = [vocab[word] for word in words] + [tokenizer.eos_token_id]
        rows.append(
            {
                "id": f"row-{index}",
                "source": "alpaca_en",
                "lang": "en",
                "prompt": prompt,
                "prompt_ids": encode_chat(tokenizer, prompt)["input_ids"][0].tolist(),
                "response_ids": response_ids,
                "response": " ".join(words),
                "finished": True,
            }
        )
    return rows


def write_distilled(folder: Path, tokenizer, rows: list[dict], fingerprint: str | None = None) -> Path:
    folder.mkdir(parents=True)
    manifest = {
        "format_version": 1,
        "model": "tiny",
        "tokenizer": {"vocab_size": len(tokenizer), "fingerprint": fingerprint or tokenizer_fingerprint(tokenizer)},
        "sampling": {"temperature": 0.6, "top_k": 20, "top_p": 0.95, "max_new_tokens": 32},
        "runs": [],
        "counts": {"rows": len(rows)},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    (folder / "shard-00000.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return folder


def run_config(tmp_path: Path, data: Path, **overrides) -> TrainConfig:
    settings = {
        "output": str(tmp_path / "out"),
        "data": str(data),
        "batch_size": 2,
        "max_steps": 4,
        "lr": 1e-2,
        "warmup_ratio": 0.25,
        "val_fraction": 0.25,
        "hidden_dtype": "float32",
        "log_every": 1,
        "progress": False,
    }
    return TrainConfig(**{**settings, **overrides})


def read_log(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_and_saves_a_loadable_head(tiny, tmp_path):
    base, tokenizer = tiny
    data = write_distilled(tmp_path / "data", tokenizer, distilled_rows(tokenizer, 24))
    config = run_config(tmp_path, data, max_steps=30, eval_every=30)
    result = train(base, tokenizer, config, base_model_name_or_path="tiny-llama")

    log = read_log(Path(config.output))
    validations = [r for r in log if "val_loss" in r]
    assert [r["step"] for r in validations] == [0, 30]
    assert validations[-1]["val_loss"] < 0.5 * validations[0]["val_loss"]
    assert all(late > early for early, late in zip(validations[0]["val_accuracy"], validations[-1]["val_accuracy"]))
    losses = [r["loss"] for r in log if "loss" in r]
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])

    trained = FastMTPForCausalLM.from_pretrained(result.head_dir, base_model=base)
    assert trained.config.base_model_name_or_path == "tiny-llama"
    assert trained.config.num_draft_tokens == NUM_DRAFT_TOKENS
    output = Path(config.output)
    summary = json.loads((output / "training_summary.json").read_text())
    assert summary["steps"] == 30 and summary["rows"]["train"] + summary["rows"]["validation"] == 24
    accuracy = validations[-1]["val_accuracy"]
    assert summary["final_validation"]["val_accuracy"] == accuracy
    expected_tau = 1 + accuracy[0] + accuracy[0] * accuracy[1] + accuracy[0] * accuracy[1] * accuracy[2]
    assert summary["tau_estimate"] == pytest.approx(expected_tau)
    assert summary["response_tokens"]["train"] > 0 and summary["train_tokens_per_second"] > 0
    assert (output / "training.png").stat().st_size > 0
    assert [path.name for path in (output / "checkpoints").iterdir()] == ["step-0000030"]
    card = (result.head_dir / "README.md").read_text()
    assert "## Training" in card and summary["command"] in card and "30 optimizer steps" in card
    assert summary["hardware"].startswith("CPU, ") and f"h on {summary['hardware']} (" in card
    assert f"{summary['response_tokens']['train']:,} response tokens" in card and "temperature 0.6" in card


@pytest.mark.parametrize("lora_rank", [None, 2])
def test_resume_gives_the_same_head_as_an_uninterrupted_run(tiny, tmp_path, monkeypatch, lora_rank):
    base, tokenizer = tiny
    data = write_distilled(tmp_path / "data", tokenizer, distilled_rows(tokenizer, 16))
    # 14 training rows (2 held out), batches of 2, 2 batches per step: 4 steps per epoch, the last of a single batch.
    # The run is interrupted in the middle of the first epoch and ends in the middle of the second.
    settings = {"max_steps": 6, "grad_accum": 2, "save_every": 3, "eval_every": 3, "lora_rank": lora_rank}
    uninterrupted = run_config(tmp_path / "a", data, **settings)
    train(base, tokenizer, uninterrupted)

    interrupted = run_config(tmp_path / "b", data, **settings)
    real_save = train_module.save_checkpoint

    def save_then_crash(run, target):
        real_save(run, target)
        if run.state.step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(base, tokenizer, interrupted)
    assert not (Path(interrupted.output) / "head").exists()
    monkeypatch.undo()
    train(base, tokenizer, interrupted)

    heads = [load_file(Path(c.output) / "head" / "model.safetensors") for c in (uninterrupted, interrupted)]
    assert heads[0].keys() == heads[1].keys()
    for name in heads[0]:
        assert torch.equal(heads[0][name], heads[1][name]), name
    logs = [read_log(Path(c.output)) for c in (uninterrupted, interrupted)]
    assert [r["step"] for r in logs[1]] == [r["step"] for r in logs[0]]
    assert [r.get("val_loss") for r in logs[1]] == [r.get("val_loss") for r in logs[0]]
    summary = json.loads((Path(interrupted.output) / "training_summary.json").read_text())
    assert summary["steps"] == 6 and summary["epochs"] == pytest.approx(1.5)

    with pytest.raises(TrainError, match="other settings.*lr"):
        train(base, tokenizer, run_config(tmp_path / "b", data, **settings, lr=5e-3))
    # Distillation has added a row since: resuming on it is refused, with the way to resume on the first rows.
    with open(data / "shard-00000.jsonl", "a") as file:
        file.write(json.dumps(distilled_rows(tokenizer, 17)[-1]) + "\n")
    with pytest.raises(TrainError, match=r"other data \(16 rows there, 17 now.*--max-rows 16 resumes it"):
        train(base, tokenizer, interrupted)
    assert train(base, tokenizer, run_config(tmp_path / "b", data, **settings, max_rows=16)).summary["steps"] == 6


def test_runs_on_the_same_data_share_a_hidden_state_cache(tiny, tmp_path, monkeypatch):
    base, tokenizer = tiny
    data = write_distilled(tmp_path / "data", tokenizer, distilled_rows(tokenizer, 16))
    cache = tmp_path / "hidden"
    first = run_config(tmp_path / "a", data, hidden_cache=str(cache))
    train(base, tokenizer, first)
    assert [path.name for path in cache.iterdir()] == ["chunk-00000.safetensors"]
    assert not (Path(first.output) / "hidden").exists()

    def recompute(*args, **kwargs):
        raise AssertionError("the cached hidden states should have been reused")

    monkeypatch.setattr(hidden_states_module, "base_hidden_states", recompute)
    second = run_config(tmp_path / "b", data, hidden_cache=str(cache))
    train(base, tokenizer, second)
    heads = [load_file(Path(c.output) / "head" / "model.safetensors") for c in (first, second)]
    assert all(torch.equal(heads[0][name], heads[1][name]) for name in heads[0])
    # A run on other rows recomputes the chunk rather than reading states that belong to other tokens.
    with pytest.raises(AssertionError, match="should have been reused"):
        train(base, tokenizer, run_config(tmp_path / "c", data, hidden_cache=str(cache), max_rows=15))


@pytest.mark.parametrize(
    "options",
    [
        {"init": "last-layer"},
        {"lora_rank": 2},
        {"loss_weights": [1.0, 0.0, 0.0]},
        {"labels": "base", "feature_weight": 1.0, "soft_target_weight": 0.5},
    ],
)
def test_other_initialisations_lora_and_vanilla_weights(tiny, tmp_path, options):
    base, tokenizer = tiny
    data = write_distilled(tmp_path / "data", tokenizer, distilled_rows(tokenizer, 16))
    result = train(base, tokenizer, run_config(tmp_path, data, max_steps=2, **options))
    # The saved head has the plain layout (LoRA merged) and loads; it can start a new run (--init PATH).
    trained = load_file(result.head_dir / "model.safetensors")
    assert all("lora" not in name for name in trained)
    if "lora_rank" in options:  # the adapters changed the Linear layers, and only them
        start = {f"mtp_layers.0.{k}": v for k, v in FastMTPForCausalLM.from_base(base).head.state_dict().items()}
        changed = {name for name in trained if not torch.equal(trained[name], start[name])}
        assert changed and all(name.endswith("proj.weight") for name in changed)
    again = train(base, tokenizer, run_config(tmp_path / "again", data, max_steps=1, init=str(result.head_dir)))
    assert again.summary["steps"] == 1
    # The continued head records its lineage: the first run's summary, and both stages in the model card.
    assert again.summary["initialised_from"] == json.loads((result.head_dir / "training_summary.json").read_text())
    card = (again.head_dir / "README.md").read_text()
    assert "In 2 stages" in card and card.index("### Stage 1") < card.index("2 optimizer steps") < card.index(
        "### Stage 2"
    ) < card.index("1 optimizer step (")
    if "loss_weights" in options:
        # Validation still measures every step, so the vanilla ablation's later drafts are reported too.
        assert len(read_log(tmp_path / "out")[-1]["val_accuracy"]) == NUM_DRAFT_TOKENS


def test_reference_data(tiny, tmp_path):
    _, tokenizer = tiny
    path = tmp_path / "prompts.jsonl"
    rows = [
        {"id": "x-0", "prompt": "describe an atom", "reference": "sky is blue"},
        {"prompt": "why", "reference": ""},
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    examples, report = load_reference_examples(path, tokenizer, max_seq_len=256)
    prompt_ids = encode_chat(tokenizer, "describe an atom")["input_ids"][0].tolist()
    response_ids = tokenizer("sky is blue", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert examples == [Example("x-0", (*prompt_ids, *response_ids), len(prompt_ids))]
    assert report.dropped_no_response == 1

    path.write_text('{"prompt": "why", "reference": "because"}\nnot json\n')
    with pytest.raises(TrainError, match="line 2: not valid JSON"):
        load_reference_examples(path, tokenizer, max_seq_len=256)


# ---------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda folder, tok: folder.mkdir(), "not a folder written by `fastmtp distill`"),
        (lambda folder, tok: write_distilled(folder, tok, []), "has no rows"),
        (
            lambda folder, tok: write_distilled(folder, tok, distilled_rows(tok, 2), fingerprint="0" * 16),
            "another tokenizer",
        ),
        (
            lambda folder, tok: write_distilled(
                folder, tok, [{**r, "response_ids": []} for r in distilled_rows(tok, 3)]
            ),
            "None of the 3 rows has a response",
        ),
        (
            lambda folder, tok: write_distilled(
                folder, tok, [{**r, "prompt_ids": "1 2 3"} for r in distilled_rows(tok, 3)]
            ),
            "row 'row-0' has malformed prompt_ids",
        ),
    ],
    ids=["empty-folder", "no-rows", "other-tokenizer", "no-responses", "malformed-row"],
)
def test_bad_data_is_refused_clearly(tiny, tmp_path, make, message):
    base, tokenizer = tiny
    make(tmp_path / "data", tokenizer)
    with pytest.raises(TrainError, match=message):
        train(base, tokenizer, run_config(tmp_path, tmp_path / "data"))


def test_corrupt_shard_and_missing_shards(tiny, tmp_path):
    base, tokenizer = tiny
    data = write_distilled(tmp_path / "data", tokenizer, distilled_rows(tokenizer, 3))
    shard = data / "shard-00000.jsonl"
    lines = shard.read_text().splitlines()
    shard.write_text("\n".join([lines[0], "{broken", lines[1]]) + "\n")
    with pytest.raises(TrainError, match="line 2"):
        train(base, tokenizer, run_config(tmp_path, data))
    shard.unlink()
    with pytest.raises(TrainError, match="no shard"):
        train(base, tokenizer, run_config(tmp_path, data))


def test_prompts_longer_than_the_context(tiny, tmp_path):
    base, tokenizer = tiny
    data = write_distilled(tmp_path / "data", tokenizer, distilled_rows(tokenizer, 4))
    shortest_prompt = min(len(row["prompt_ids"]) for row in distilled_rows(tokenizer, 4))
    with pytest.raises(TrainError, match="prompts leave no response token within --max-seq-len"):
        train(base, tokenizer, run_config(tmp_path, data, max_seq_len=shortest_prompt))
    with pytest.raises(TrainError, match="longer than the base model's context"):
        train(base, tokenizer, run_config(tmp_path, data, max_seq_len=base.config.max_position_embeddings + 1))


def test_options_are_checked_before_loading(tmp_path):
    for overrides, message in [
        ({"data": None}, "exactly one of --data"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"num_draft_tokens": 0}, "num_draft_tokens"),
        ({"loss_weights": [1.0]}, "1 loss weights given for 3"),
        ({"init": str(tmp_path)}, "--init must be"),
        ({"labels": "argmax"}, "labels must be one of data, base"),
        ({"feature_weight": -1.0}, "feature_weight must be >= 0"),
        ({"soft_target_weight": 1.5}, r"soft_target_weight must be in \[0, 1\]"),
    ]:
        with pytest.raises(TrainError, match=message):
            TrainConfig(output=str(tmp_path / "out"), **{"data": str(tmp_path), **overrides}).check()


def test_recorded_command_names_the_fastmtp_command(monkeypatch):
    from hf_fastmtp.training.outputs import command_line

    module_main = Path(hf_fastmtp.cli.__file__).with_name("__main__.py")  # what `python -m hf_fastmtp.cli` runs
    assert module_main.is_file()
    for program in ("/venv/bin/fastmtp", str(module_main)):  # the console script, python -m hf_fastmtp.cli
        monkeypatch.setattr("sys.argv", [program, "train", "--output", "my run"])
        assert command_line() == "fastmtp train --output 'my run'"


def test_cli(tiny, tmp_path, capsys):
    base, tokenizer = tiny
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    data = write_distilled(tmp_path / "data", tokenizer, distilled_rows(tokenizer, 8))
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    command = ["train", "--data", str(data), "--output", str(tmp_path / "out"), "--base", str(tmp_path / "base")]
    args = parser.parse_args(
        [*command, "--max-steps", "2", "--batch-size", "2", "-k", "2", "--loss-weights", "1", "1"]
    )
    args.func(args)
    assert "Head saved in" in capsys.readouterr().out
    assert FastMTPForCausalLM.from_pretrained(tmp_path / "out" / "head").config.num_draft_tokens == 2

    command[2] = str(tmp_path / "missing")
    with pytest.raises(SystemExit, match="fastmtp train: error: --data folder .*missing not found"):
        args = parser.parse_args(command)
        args.func(args)
