"""Language-aware vocabulary compression: lossless drafting over restricted vocabularies, maps, router, build-vocab."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_fastmtp, use_kernels
from test_core import chi_square_p_value, exact_joint_distribution, greedy, prompt, sample_first_tokens

from hf_fastmtp import FastMTPForCausalLM
from hf_fastmtp.cli import main
from hf_fastmtp.decoding.draft_vocab import DraftVocabError, detect_language, last_user_message, load_vocab_map
from hf_fastmtp.training.build_vocab import build_maps, count_tokens, install_into_head, ranked_token_ids, write_maps


def with_maps(model, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ranking = torch.randperm(model.vocab_size, generator=generator)
    model.set_draft_vocab_maps({"all": ranking[:40], "en": ranking[10:50], "zh": ranking[:20]}, default="all")
    return model


@pytest.mark.parametrize("draft_vocab", ["all", "en", "zh:7", 16, "auto"])
def test_greedy_identical_with_compression(architecture, draft_vocab, draft_weights):  # draft rows in either format
    for seed in range(2):
        model = with_maps(tiny_fastmtp(architecture, seed=seed), seed)
        input_ids = prompt(9, seed=seed)
        plain = greedy(model, input_ids, max_new_tokens=30)
        fast = greedy(model, input_ids, max_new_tokens=30, fastmtp=True, draft_vocab=draft_vocab)
        assert torch.equal(plain, fast)
        drafted = model.last_fastmtp_stats
        assert drafted.draft_vocab_size == {"all": 40, "en": 40, "zh:7": 7, 16: 16, "auto": 40}[draft_vocab]


def test_drafts_come_only_from_the_map(monkeypatch):
    from hf_fastmtp import FastMTPCandidateGenerator

    model = with_maps(tiny_fastmtp("llama"))
    allowed = set(model.draft_vocab_maps["zh"].tolist())
    drafted = []
    original = FastMTPCandidateGenerator.get_candidates

    def spy(generator, input_ids, **kwargs):
        candidates, logits = original(generator, input_ids, **kwargs)
        drafted.extend(candidates[0, input_ids.shape[1] :].tolist())
        return candidates, logits

    monkeypatch.setattr(FastMTPCandidateGenerator, "get_candidates", spy)
    greedy(model, prompt(5), max_new_tokens=20, fastmtp=True, num_draft_tokens=3, draft_vocab="zh")
    assert drafted and set(drafted) <= allowed


@pytest.mark.parametrize("do_sample_kwargs", [{}, {"top_k": 4, "temperature": 0.8}])
def test_sampling_distribution_with_compression(do_sample_kwargs, draft_weights):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper

    model = tiny_fastmtp("llama", vocab_size=6, sharpness=4.0)
    model.set_draft_vocab_maps({"all": torch.tensor([3, 0, 5])})

    def warp(logits):
        if not do_sample_kwargs:
            return logits
        return TopKLogitsWarper(4)(None, TemperatureLogitsWarper(0.8)(None, logits[None]))[0]

    input_ids = torch.tensor([[1, 4, 2]])
    expected = exact_joint_distribution(model, input_ids, 3, warp)
    samples, totals = sample_first_tokens(
        model, input_ids, 2000, 3, fastmtp=True, num_draft_tokens=2, draft_vocab="all", **do_sample_kwargs
    )
    assert totals["accepted_tokens"] > 0
    assert chi_square_p_value(samples, expected) > 1e-3


def test_sliced_lm_head_is_cached_and_follows_the_model(monkeypatch):
    use_kernels(monkeypatch, "stock", "float16")
    model = with_maps(tiny_fastmtp("llama"))
    first = model.draft_vocabulary("en", weight_format="float16")
    assert model.draft_vocabulary("en", weight_format="float16") is first  # sliced once, reused by every call
    greedy(model, prompt(4), max_new_tokens=5, fastmtp=True, draft_vocab="en")
    assert model.draft_vocabulary("en", weight_format="float16") is first
    # On a CPU, float32 rows are kept as compact as the head's draft weights; drafts are verified all the same.
    expected = model.get_output_embeddings().weight[first.token_ids]
    assert first.lm_head.weight.dtype == torch.float16 and first.lm_head.scales is None
    torch.testing.assert_close(first.lm_head.weight, expected.half())
    int8 = model.draft_vocabulary("en", weight_format="int8")
    assert int8.lm_head.weight.dtype == torch.int8 and model.draft_vocabulary("en", weight_format="int8") is int8
    dequantized = int8.lm_head.weight * int8.lm_head.scales.float()[:, None]
    assert (dequantized - expected).norm() < 0.01 * expected.norm()
    lm_head = model.get_output_embeddings()
    lm_head.load_state_dict({"weight": 2 * lm_head.weight.detach()})  # reloaded in place: new rows
    reloaded = model.draft_vocabulary("en", weight_format="int8")
    assert reloaded is not int8 and torch.equal(reloaded.lm_head.weight, int8.lm_head.weight)
    torch.testing.assert_close(reloaded.lm_head.scales, 2 * int8.lm_head.scales)
    model.to(torch.float64)
    moved = model.draft_vocabulary("en", weight_format="int8")  # (only float32 rows on a CPU are compacted)
    assert moved.lm_head.weight.dtype == torch.float64
    assert torch.equal(moved.lm_head.weight, model.get_output_embeddings().weight[moved.token_ids])


@pytest.mark.parametrize(
    "token_ids, message",
    [
        (torch.tensor([1, 2, 97]), "another tokenizer"),
        (torch.tensor([1, 2, -1]), "another tokenizer"),
        (torch.arange(150_000), "another tokenizer"),
        (torch.tensor([1, 2, 2]), "more than once"),
        (torch.tensor([1.0, 2.0]), "integers"),
        (torch.tensor([[1, 2]]), "1-D"),
        (torch.tensor([], dtype=torch.long), "empty"),
        ([1, 2, 3], "1-D tensor"),
    ],
)
def test_bad_maps_are_refused(token_ids, message):
    model = tiny_fastmtp("llama")
    with pytest.raises(DraftVocabError, match=message):
        model.set_draft_vocab_maps({"en": token_ids})


def test_bad_map_files_are_refused(tmp_path):
    (tmp_path / "freq_en_4.pt").write_bytes(b"not a tensor")
    with pytest.raises(DraftVocabError, match="not a readable torch tensor"):
        load_vocab_map(tmp_path / "freq_en_4.pt", 97)
    torch.save(torch.tensor([5, 200]), tmp_path / "freq_zh_2.pt")
    with pytest.raises(DraftVocabError, match="97 tokens"):
        load_vocab_map(tmp_path / "freq_zh_2.pt", 97)
    torch.save(torch.tensor([5, 3, 9], dtype=torch.int32), tmp_path / "freq_zh_3.pt")
    assert load_vocab_map(tmp_path / "freq_zh_3.pt", 97).tolist() == [5, 3, 9]


def test_draft_vocab_argument_errors():
    model = tiny_fastmtp("llama")
    with pytest.raises(ValueError, match="needs vocabulary maps"):
        greedy(model, prompt(3), max_new_tokens=3, fastmtp=True, draft_vocab="en")
    with_maps(model)
    with pytest.raises(ValueError, match="No draft vocabulary 'fr'"):
        greedy(model, prompt(3), max_new_tokens=3, fastmtp=True, draft_vocab="fr")
    with pytest.raises(ValueError, match="cannot take the top 41"):
        greedy(model, prompt(3), max_new_tokens=3, fastmtp=True, draft_vocab=41)
    with pytest.raises(ValueError, match="must be an integer"):
        greedy(model, prompt(3), max_new_tokens=3, fastmtp=True, draft_vocab="en:many")


# ----------------------------------------------------------------------------- router


@pytest.mark.parametrize(
    "text, language",
    [
        ("请用两句话介绍一下长城的历史。", "zh"),
        ("Explain why the sky is blue, in three short sentences please.", "en"),
        ("Erkläre bitte, warum der Himmel blau ist und nicht grün.", "de"),
        ("def add(a, b):\n    return a + b\n\nprint(add(1, 2))", None),
        ("for (int i = 0; i < n; i++) { sum += a[i]; }", None),
        ("", None),
        ("   ", None),
        ("🙂🙂🎉", None),
        ("ok", None),
    ],
)
def test_router_is_deterministic(text, language):
    assert [detect_language(text) for _ in range(3)] == [language] * 3


class TemplateOnly:
    """The two things the router needs from a tokenizer: its template, rendered."""

    chat_template = "chatml with a system prompt"

    def apply_chat_template(self, messages, tokenize=False):
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def test_router_reads_the_last_user_message_not_the_system_prompt():
    prompt_text = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHello there, how are you today?<|im_end|>\n<|im_start|>assistant\nFine.<|im_end|>\n"
        "<|im_start|>user\n请用两句话介绍一下长城。<|im_end|>\n<|im_start|>assistant\n"
    )
    assert last_user_message(prompt_text, TemplateOnly()) == "请用两句话介绍一下长城。"
    assert detect_language(last_user_message(prompt_text, TemplateOnly())) == "zh"


# ----------------------------------------------------------------------------- build-vocab


def rows():
    return [
        {
            "id": "a",
            "response": "The sky is blue because of Rayleigh scattering of sunlight.",
            "response_ids": [5, 5, 5, 6, 7],
        },
        {"id": "b", "response": "天空之所以是蓝色的，是因为瑞利散射。", "response_ids": [8, 8, 9, 5]},
        {"id": "c", "response": "x = 1", "response_ids": [1, 2]},
    ]


def test_counting_and_ranking():
    counts = count_tokens(rows(), vocab_size=12)
    assert counts["all"].tolist() == [0, 1, 1, 0, 0, 4, 1, 1, 2, 1, 0, 0]
    assert counts["en"][5] == 3 and counts["zh"][8] == 2 and counts["zh"][5] == 1
    assert "x" not in counts  # code-only text counts overall only
    ranking = ranked_token_ids(counts["zh"], counts["all"]).tolist()
    # zh counts first (8, then 5 and 9 with 1 each: 5 wins on its overall count), then overall, then id.
    assert ranking[:5] == [8, 5, 9, 1, 2]


def test_token_ids_from_another_tokenizer_are_refused():
    with pytest.raises(ValueError, match="another tokenizer"):
        count_tokens([{"id": "z", "response": "hi", "response_ids": [3, 50]}], vocab_size=12)


def test_maps_written_load_and_install_into_a_head(tmp_path):
    counts = count_tokens(rows(), vocab_size=97)
    maps = build_maps(counts, sizes=[4, 8], min_tokens=1)
    manifest = write_maps(maps, tmp_path / "head" / "vocab", counts)
    assert manifest["files"]["zh"] == {4: "freq_zh_4.pt", 8: "freq_zh_8.pt"}
    assert load_vocab_map(tmp_path / "head" / "vocab" / "freq_zh_4.pt", 97).tolist()[:1] == [8]
    assert manifest["coverage"]["zh"][4] == pytest.approx(1.0)

    model = tiny_fastmtp("llama")
    model.save_pretrained(tmp_path / "head")
    install_into_head(tmp_path / "head", tmp_path / "head" / "vocab", json.loads(json.dumps(manifest)), "all")
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert config["draft_vocab_maps"]["zh"] == "vocab/freq_zh_8.pt" and config["default_draft_vocab"] == "all"
    loaded = FastMTPForCausalLM.from_pretrained(tmp_path / "head", base_model=model.model)
    assert set(loaded.draft_vocab_maps) == {"all", "en", "zh"}
    assert torch.equal(loaded.draft_vocab_maps["zh"], maps["zh"][8])
    plain = greedy(loaded, prompt(5), max_new_tokens=12)
    assert torch.equal(greedy(loaded, prompt(5), max_new_tokens=12, fastmtp=True), plain)
    assert loaded.last_fastmtp_stats.draft_vocab_size == 8  # "auto" by default once maps exist


def test_min_tokens_skips_thin_languages():
    counts = {"all": np.ones(20, dtype=np.int64), "de": np.ones(20, dtype=np.int64)}
    assert set(build_maps(counts, sizes=[4], min_tokens=100)) == {"all"}


def test_build_vocab_cli_installs_the_chosen_size_from_the_first_rows(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"tokenizer": {"vocab_size": 97, "fingerprint": "f"}}))
    extra = {"id": "d", "response": "Bonjour, je suis un modèle de langue.", "response_ids": [40, 41, 42]}
    shard = [
        {"source": "s", "lang": "en", "prompt": "p", "prompt_ids": [1], "finished": True, **row} for row in rows()
    ]
    shard.append({**shard[0], **extra})
    (data / "shard-00000.jsonl").write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in shard))
    model = tiny_fastmtp("llama")
    model.save_pretrained(tmp_path / "head")

    argv = ["build-vocab", "--data", str(data), "--head", str(tmp_path / "head"), "--sizes", "4", "8"]
    main([*argv, "--install-size", "4", "--max-rows", "3", "--min-tokens", "1"])
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert config["draft_vocab_maps"] == {
        "all": "vocab/freq_all_4.pt",
        "en": "vocab/freq_en_4.pt",
        "zh": "vocab/freq_zh_4.pt",
    }  # the fourth row (French) was not counted
    assert "all: 11 tokens" in capsys.readouterr().out
    card = (tmp_path / "head" / "README.md").read_text()
    assert card.count("## Vocabulary maps") == 1 and "| zh | `vocab/freq_zh_4.pt` | 4 | 100.0% |" in card
    with pytest.raises(ValueError, match="No 16-token map for 'all'"):
        main([*argv, "--install-size", "16"])
    main([*argv, "--install-size", "8", "--max-rows", "3", "--min-tokens", "1"])  # again: the section is replaced
    card = (tmp_path / "head" / "README.md").read_text()
    assert card.count("## Vocabulary maps") == 1 and "`vocab/freq_zh_8.pt`" in card and "freq_zh_4" not in card
