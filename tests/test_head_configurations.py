"""The opt-in head configurations: EAGLE-3-style multi-layer features and a head of several decoder layers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ARCHITECTURES, CONFIGURATIONS, NEW_PARTS, configured_fastmtp, tiny_fastmtp
from safetensors.torch import load_file
from test_batch import greedy, padded_batch, scripted_drafts
from test_core import chi_square_p_value, exact_joint_distribution, sample_first_tokens
from test_hub import run_remote_code
from test_train import distilled_rows, run_config, tiny, write_distilled  # noqa: F401 (tiny: a fixture)

from hf_fastmtp import FastMTPCandidateGenerator, FastMTPForCausalLM
from hf_fastmtp.checkpoints import export_sglang, export_vllm
from hf_fastmtp.decoding.model_card import model_card
from hf_fastmtp.training.data import Example
from hf_fastmtp.training.hidden_states import collate_pairs, precompute_hidden_states
from hf_fastmtp.training.train import train

NUM_DRAFT_TOKENS = 3


def drafting_stats(model) -> dict:
    """The call's stats without its timings."""
    return {k: v for k, v in model.last_fastmtp_stats.to_dict().items() if not k.endswith("_seconds")}


# ----------------------------------------------------------------------------- expanding a one-layer head


@pytest.mark.parametrize("configuration", CONFIGURATIONS)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_expanded_head_drafts_exactly_as_the_one_layer_head(architecture, configuration):
    one_layer = tiny_fastmtp(architecture, vocab_size=6, sharpness=4.0)
    expanded = configured_fastmtp(architecture, configuration, random_new_parts=False, vocab_size=6, sharpness=4.0)
    # The one-layer head's parameters keep their (MiMo) names and values; the new parts have names of their own.
    old, new = one_layer.head.state_dict(), expanded.head.state_dict()
    assert all(torch.equal(new[name], tensor) for name, tensor in old.items())
    assert set(new) - set(old) and all(name.startswith(NEW_PARTS) for name in set(new) - set(old))

    input_ids = torch.tensor([[1, 4, 2, 5, 3]])
    with torch.no_grad():
        outputs = one_layer.model(input_ids, output_hidden_states=True)
        positions = torch.arange(input_ids.shape[1])[None]
        head_outputs = [
            model.mtp_forward(model.base_features(outputs.hidden_states), input_ids, positions, from_base=True)
            for model in (one_layer, expanded)
        ]
    assert torch.equal(*head_outputs)
    # Sampling, with the same seed: the same drafts and accept/reject draws, and drafts are often accepted.
    kwargs = {"do_sample": True, "max_new_tokens": 40, "fastmtp": True, "num_draft_tokens": NUM_DRAFT_TOKENS}
    generated = []
    for model in (one_layer, expanded):
        torch.manual_seed(0)
        generated.append(model.generate(input_ids, **kwargs))
    assert torch.equal(*generated)
    assert drafting_stats(one_layer) == drafting_stats(expanded)
    assert one_layer.last_fastmtp_stats.accepted_tokens > 10


def test_expanding_is_refused_where_it_cannot_reproduce_the_head():
    model = configured_fastmtp("llama", "both")
    with pytest.raises(ValueError, match="already fuses the base's hidden states \\[1, 2\\]"):
        model.expand_head(feature_layers=[0, 2])
    with pytest.raises(ValueError, match="cannot remove layers"):
        model.expand_head(num_head_layers=1)
    model.expand_head(feature_layers=[1, -1], num_head_layers=3)  # the same layers, one more decoder layer
    assert model.config.feature_layers == [1, 2] and model.config.num_head_layers == 3


@pytest.mark.parametrize(
    ("feature_layers", "message"),
    [([-1], "at least two"), ([2, 1], "end with the final one"), ([0, 3], "indices into"), ([2, -1], "distinct")],
)
def test_feature_layers_are_checked(feature_layers, message):
    with pytest.raises(ValueError, match=message):
        FastMTPForCausalLM.from_base(tiny_fastmtp("llama").model, feature_layers=feature_layers)


# ----------------------------------------------------------------------------- training equals drafting


# ----------------------------------------------------------------------------- lossless decoding


@pytest.mark.parametrize("configuration", CONFIGURATIONS)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_greedy_identical_one_prompt_and_a_padded_batch(architecture, configuration, monkeypatch):
    model = configured_fastmtp(architecture, configuration)
    input_ids = torch.tensor([[5, 17, 3, 42, 8]])
    fast = greedy(model, {"input_ids": input_ids}, max_new_tokens=20, fastmtp=True, num_draft_tokens=NUM_DRAFT_TOKENS)
    assert torch.equal(fast, greedy(model, {"input_ids": input_ids}, max_new_tokens=20))
    # A batch whose rows accept different numbers of drafts (the head catches up before the rows move).
    batch = padded_batch()
    plain = greedy(model, batch, max_new_tokens=20)
    drafts = scripted_drafts(plain, batch["input_ids"].shape[1], lambda row, cycle: (row + cycle) % 4)
    monkeypatch.setattr(FastMTPCandidateGenerator, "get_candidates", drafts)
    fast = greedy(model, batch, max_new_tokens=20, fastmtp=True, num_draft_tokens=NUM_DRAFT_TOKENS)
    assert torch.equal(fast, plain)
    assert len({round(row.tau, 3) for row in model.last_fastmtp_stats.rows}) > 1


@pytest.mark.parametrize("configuration", CONFIGURATIONS)
def test_sampling_distribution_is_preserved(configuration):
    model = configured_fastmtp("llama", configuration, vocab_size=6, sharpness=4.0)
    input_ids = torch.tensor([[1, 4, 2]])
    expected = exact_joint_distribution(model, input_ids, 3, lambda logits: logits)
    samples, totals = sample_first_tokens(model, input_ids, 2000, 3, fastmtp=True, num_draft_tokens=2)
    assert totals["accepted_tokens"] > 2000 // 10
    assert chi_square_p_value(samples, expected) > 1e-3


# ----------------------------------------------------------------------------- saving, loading, exporting


def saved(model: FastMTPForCausalLM, tmp_path: Path) -> Path:
    """`model`'s head saved, naming its base saved beside it."""
    model.model.save_pretrained(tmp_path / "base")
    model.config.base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "head")
    return tmp_path / "head"


@pytest.mark.parametrize("configuration", CONFIGURATIONS)
def test_save_and_load_round_trip(configuration, tmp_path):
    model = configured_fastmtp("qwen2", configuration)
    head = saved(model, tmp_path)
    config = json.loads((head / "config.json").read_text())
    assert config.get("feature_layers") == model.config.feature_layers  # as resolved: indices from 0
    assert config.get("num_head_layers", 1) == CONFIGURATIONS[configuration].get("num_head_layers", 1)
    weights = load_file(head / "model.safetensors")
    assert weights.keys() == {f"mtp_layers.0.{name}" for name in model.head.state_dict()}
    loaded = FastMTPForCausalLM.from_pretrained(head)
    assert (loaded.config.feature_layers, loaded.config.num_head_layers) == (
        model.config.feature_layers,
        model.config.num_head_layers,
    )
    assert all(torch.equal(loaded.head.state_dict()[name], t) for name, t in model.head.state_dict().items())
    card = (head / "README.md").read_text()
    assert ("decoder layers" in card) == ("num_head_layers" in CONFIGURATIONS[configuration])
    assert ("learned fusion of the base's hidden states" in card) == (
        "feature_layers" in CONFIGURATIONS[configuration]
    )
    assert "fastmtp export --format sglang" not in card  # (a Qwen2 base, but a head the engines cannot serve)


def test_default_head_saves_and_loads_as_before(tmp_path):
    model = tiny_fastmtp("qwen2")
    head = saved(model, tmp_path)
    config = json.loads((head / "config.json").read_text())
    assert (config["feature_layers"], config["num_head_layers"]) == (None, 1)
    # A config.json written before these fields existed loads as the head it was.
    del config["feature_layers"], config["num_head_layers"]
    (head / "config.json").write_text(json.dumps(config))
    loaded = FastMTPForCausalLM.from_pretrained(head)
    assert (loaded.config.feature_layers, loaded.config.num_head_layers) == (None, 1)
    assert loaded.head.state_dict().keys() == model.head.state_dict().keys()
    names = load_file(head / "model.safetensors")
    assert not any(name.startswith(tuple(f"mtp_layers.0.{part}" for part in NEW_PARTS)) for name in names)
    card = model_card(model.config)
    assert "head: one decoder layer that drafts" in card and "fastmtp export --format sglang" in card


@pytest.mark.parametrize("configuration", ["features", "two-layers"])
def test_remote_code_loads_and_generates(configuration, tmp_path):
    model = configured_fastmtp("llama", configuration)
    head = saved(model, tmp_path)
    report = run_remote_code(head, tmp_path)
    assert report["module"].startswith("transformers_modules.") and report["loaded"] == []
    assert report["cycles"] > 0 and report["fast"] == report["plain"]
    assert (
        report["fast"]
        == model.generate(torch.tensor([[5, 17, 3, 42, 8]]), do_sample=False, max_new_tokens=15).tolist()
    )


@pytest.mark.parametrize("export", [export_sglang, export_vllm])
def test_export_refuses_heads_mimo_cannot_express(export, tmp_path):
    with pytest.raises(ValueError, match=r"reads the base's hidden states \[0, 1, 2\].*final hidden state only"):
        export(configured_fastmtp("qwen2", "features"), tmp_path / "features")
    with pytest.raises(ValueError, match="it has 2 decoder layers.*MiMo's single MTP layer"):
        export(configured_fastmtp("qwen2", "two-layers"), tmp_path / "layers")
    assert not (tmp_path / "features").exists() and not (tmp_path / "layers").exists()


# ----------------------------------------------------------------------------- training


def test_hidden_state_cache_stores_the_feature_layers_and_is_keyed_by_them(tmp_path):
    base = tiny_fastmtp("llama").model
    examples = [Example("a", tuple(range(1, 9)), 3), Example("b", tuple(range(3, 15)), 4)]
    folder = tmp_path / "hidden"
    final = precompute_hidden_states(base, examples, folder, dtype=torch.float32, progress=False)
    final_states = [final[0], final[1]]
    assert final_states[1].shape == (10, 32)
    chunk = next(folder.iterdir())
    stamp = chunk.stat().st_mtime_ns
    # Another configuration in the same folder: recomputed, never the final-state chunk reused.
    layers = precompute_hidden_states(
        base, examples, folder, dtype=torch.float32, progress=False, feature_layers=[0, 2]
    )
    assert layers[1].shape == (10, 2, 32) and chunk.stat().st_mtime_ns != stamp
    with torch.no_grad():
        states = base(torch.tensor([examples[1].input_ids[:10]]), output_hidden_states=True).hidden_states
    torch.testing.assert_close(layers[1][:, 0], states[0][0])
    torch.testing.assert_close(layers[1][:, 1], states[2][0])
    torch.testing.assert_close(layers[1][:, 1], final_states[1])
    # The batch's `hidden_states` stay the final ones (the regression target, base labels); `features` are the head's.
    batch = collate_pairs([(examples[0], layers[0]), (examples[1], layers[1])])
    assert batch["features"].shape == (2, 10, 64)
    torch.testing.assert_close(batch["hidden_states"][1], final_states[1])
    torch.testing.assert_close(batch["features"][1, :, 32:], final_states[1])
    assert "features" not in collate_pairs([(examples[1], final_states[1])])
    stamp = chunk.stat().st_mtime_ns
    assert precompute_hidden_states(base, examples, folder, dtype=torch.float32, progress=False)[1].shape == (10, 32)
    assert chunk.stat().st_mtime_ns != stamp


def test_train_expands_an_initial_head_and_trains_it(tiny, tmp_path):  # noqa: F811 (tiny: the fixture)
    base, tokenizer = tiny
    data = write_distilled(tmp_path / "data", tokenizer, distilled_rows(tokenizer, 8))
    first = train(base, tokenizer, run_config(tmp_path / "one", data, max_steps=1))
    options = {"init": str(first.head_dir), "feature_layers": [1, -1], "head_layers": 2, "max_steps": 2}
    expanded = train(base, tokenizer, run_config(tmp_path / "two", data, **options))
    model = FastMTPForCausalLM.from_pretrained(expanded.head_dir, base_model=base)
    num_layers = base.config.num_hidden_layers
    assert (model.config.feature_layers, model.config.num_head_layers) == ([1, num_layers], 2)
    # Training moved the new parts away from their pass-through start.
    assert model.head.extra_layers["1"].self_attn.o_proj.weight.abs().sum() > 0
    # Continuing from it keeps its configuration, and reads the base's feature layers from the cache.
    options = {"init": str(expanded.head_dir), "max_steps": 1, "hidden_cache": str(tmp_path / "two" / "hidden")}
    again = train(base, tokenizer, run_config(tmp_path / "three", data, **options))
    assert FastMTPForCausalLM.from_pretrained(again.head_dir, base_model=base).config.num_head_layers == 2


def test_train_cli_options(tmp_path):
    import argparse

    from hf_fastmtp.cli.train import register_cli

    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    args = parser.parse_args(
        ["train", "--data", "d", "--output", "o", "--feature-layers", "3", "15", "-1", "--head-layers", "2"]
    )
    assert (args.feature_layers, args.head_layers) == ([3, 15, -1], 2)
