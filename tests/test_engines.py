"""
Serving engines: the exported MiMo checkpoint against the loading rules of SGLang's and vLLM's MiMo MTP models
(fixtures/mimo_mtp_engines.json, transcribed from their sources), position 0 as they compute it, and the
text-generation pipeline.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_fastmtp
from safetensors.torch import load_file
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm

from hf_fastmtp import FastMTPForCausalLM
from hf_fastmtp.checkpoints import export_sglang, export_vllm
from hf_fastmtp.training.objective import recursive_head_outputs

RULES = json.loads((Path(__file__).parent / "fixtures" / "mimo_mtp_engines.json").read_text(encoding="utf-8"))

pytestmark = pytest.mark.usefixtures("one_thread")


def exported_tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return {name: tensor for shard in set(index.values()) for name, tensor in load_file(folder / shard).items()}


def sglang_parameter_name(name: str, config: dict) -> str | None:
    """The parameter SGLang's `MiMoMTP.load_weights` loads checkpoint tensor `name` into; None: not loaded."""
    rules = RULES["sglang"]
    if any(skip in name for skip in rules["skip_substrings"]):
        return None
    if config.get("tie_word_embeddings") and "lm_head.weight" in name:
        return None
    layer = re.match(rules["layer_pattern"], name)
    if layer is not None:
        unprefixed = any(part in name for part in rules["unprefixed"])
        replacement = rules["unprefixed_replacement"] if unprefixed else rules["block_replacement"]
        name = name.replace(layer.group(), replacement)
    return stacked_or_plain(name, rules)


def vllm_parameter_name(name: str, config: dict) -> str | None:
    """The parameter vLLM's `MiMoMTP.load_weights` loads checkpoint tensor `name` into; None: not loaded."""
    rules = RULES["vllm"]
    if any(skip in name for skip in rules["skip_substrings"]):
        return None
    layer = re.match(rules["layer_pattern"], name)
    if layer is not None:
        index = int(layer.group(2)) + config[rules["layer_offset"]]
        name = name.replace(layer.group(), f"{layer.group(1)}{index}.")
    if not any(part in name for part in rules["unprefixed"]):
        block = re.match(rules["block_pattern"], name)
        if block is not None:
            name = name.replace(block.group(), block.group() + rules["block_insert"])
    return stacked_or_plain(name, rules)


def stacked_or_plain(name: str, rules: dict) -> str | None:
    """Both loaders: q/k/v and gate/up shards go into fused parameters (MTP layer only); the rest by name, if kept."""
    for fused, shard in rules["stacked"]:
        if shard in name:
            return name.replace(shard, fused) if rules["stacked_only_in"] in name else None
    return name if any(part in name for part in rules["loaded_only_if_contains"]) else None


def engine_parameters(engine: str, config: dict) -> set[str]:
    names = {name.replace("{L}", str(config["num_hidden_layers"])) for name in RULES[engine]["parameters"]}
    return {name for name in names if not (config.get("tie_word_embeddings") and name == "lm_head.weight")}


@pytest.fixture(scope="module")
def qwen2_model() -> FastMTPForCausalLM:
    return tiny_fastmtp("qwen2")


@pytest.fixture(scope="module")
def exported(qwen2_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("export") / "mimo"
    export_vllm(qwen2_model, folder)
    return folder


# ----------------------------------------------------------------------------- config and weight names


def test_exported_config_is_what_the_engines_switch_to_mimo_mtp_on(exported):
    config = json.loads((exported / "config.json").read_text())
    rules = RULES["config"]
    assert config["architectures"][0] == rules["architecture"]
    assert config["model_type"] == rules["model_type"]
    assert config["num_nextn_predict_layers"] >= rules["min_num_nextn_predict_layers"]
    assert not [key for key in rules["required_keys"] if config.get(key) is None]


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_every_head_tensor_loads_into_the_engines_mtp_layer(engine, exported):
    config = json.loads((exported / "config.json").read_text())
    parameter_name = {"sglang": sglang_parameter_name, "vllm": vllm_parameter_name}[engine]
    tensors = exported_tensors(exported)
    loaded: dict[str, list[str]] = {}
    for name in tensors:
        target = parameter_name(name, config)
        if target is not None:
            loaded.setdefault(target, []).append(name)
    head_names = {name for name in tensors if name.startswith("model.mtp_layers.")}
    assert head_names <= {name for sources in loaded.values() for name in sources}, "head tensors the engine skips"
    assert set(loaded) == engine_parameters(engine, config)
    # A fused parameter takes all its shards: q, k and v (weights and biases), gate and up.
    shards = {fused: [s for f, s in RULES[engine]["stacked"] if f == fused] for fused, _ in RULES[engine]["stacked"]}
    for target, sources in loaded.items():
        fused = next((f for f in shards if f in target), None)
        if fused is not None:
            assert sorted(s for source in sources for s in shards[fused] if s in source) == sorted(shards[fused])


def test_name_rules_reject_a_head_saved_under_another_layout(qwen2_model):
    """The checks above can fail: a head saved as one child module (`mtp_layers.0.layer.*`) would not load."""
    config = {"num_hidden_layers": 2}
    assert sglang_parameter_name("model.mtp_layers.0.layer.self_attn.q_proj.weight", config) not in (
        engine_parameters("sglang", config)
    )
    assert vllm_parameter_name("model.mtp_layers.0.layer.mlp.up_proj.weight", config) not in (
        engine_parameters("vllm", config)
    )


# ----------------------------------------------------------------------------- commands


def test_vllm_command(exported, qwen2_model):
    command = export_vllm(qwen2_model, exported.parent / "again")
    words = shlex.split(command)
    assert words[:3] == ["vllm", "serve", str(exported.parent / "again")]
    assert "--trust-remote-code" in words
    speculative = json.loads(words[words.index("--speculative-config") + 1])
    assert speculative == {"method": RULES["vllm"]["method"], "num_speculative_tokens": 3}


def test_export_cli_vllm(exported, tmp_path, capsys):
    import argparse

    from hf_fastmtp.cli.export import register_cli

    parser = argparse.ArgumentParser(prog="fastmtp")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", "--format", "vllm", "--head", str(exported), "--output", str(tmp_path / "v")])
    args.func(args)
    out = capsys.readouterr().out
    assert "Launch vLLM with" in out and '"method": "mtp"' in out and '"num_speculative_tokens": 3' in out
    args = parser.parse_args(
        ["export", "--format", "vllm", "--head", str(exported), "--output", str(tmp_path / "w"), "--token-map", "zh"]
    )
    with pytest.raises(SystemExit, match="--token-map is SGLang's"):
        args.func(args)


def test_export_for_vllm_refuses_bases_it_cannot_serve(tmp_path):
    with pytest.raises(ValueError, match="vLLM serves .* Qwen2-architecture bases only"):
        export_vllm(tiny_fastmtp("llama"), tmp_path / "out")


# ----------------------------------------------------------------------------- position 0


class EngineMTPLayer(nn.Module):
    """MiMo's MTP layer as SGLang and vLLM compute it (fixture's position_zero), with Transformers' Qwen2 layer."""

    def __init__(self, config):
        super().__init__()
        self.token_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hidden_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.input_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.mtp_block = Qwen2DecoderLayer(config, layer_idx=0)
        self.final_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, embeds, positions, previous_hidden_states, position_embeddings):
        embeds = embeds.clone()
        embeds[positions == 0] = 0
        x = self.input_proj(
            torch.cat([self.hidden_layernorm(previous_hidden_states), self.token_layernorm(embeds)], dim=-1)
        )
        length = x.shape[1]
        causal = torch.full((length, length), float("-inf")).triu(1)[None, None]
        x = self.mtp_block(
            hidden_states=x, attention_mask=causal, position_ids=positions, position_embeddings=position_embeddings
        )
        return self.final_layernorm(x[0] if isinstance(x, tuple) else x)


def engine_layer_from_export(folder: Path, model: FastMTPForCausalLM) -> EngineMTPLayer:
    """The exported head loaded by SGLang's name rules (unfused: Transformers' layer keeps q, k and v apart)."""
    config = json.loads((folder / "config.json").read_text())
    layer = EngineMTPLayer(model.model.config)
    state = {}
    for name, tensor in exported_tensors(folder).items():
        if name.startswith("model.mtp_layers.") and sglang_parameter_name(name, config) is not None:
            mapped = re.sub(RULES["sglang"]["layer_pattern"], "", name)
            is_block = not any(part in name for part in RULES["sglang"]["unprefixed"])
            state[("mtp_block." if is_block else "") + mapped] = tensor
    layer.load_state_dict(state, strict=True)
    return layer.eval()


@torch.no_grad()
def test_head_computes_what_the_engines_compute_from_its_export(exported, qwen2_model):
    """Same output at every position, 0 included: the head zeroes position 0's token embedding as the engines do."""
    model = qwen2_model
    engine = engine_layer_from_export(exported, model)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, 97, (1, 9), generator=generator)
    hidden = torch.randn(1, 9, model.config.text_config.hidden_size, generator=generator)
    positions = torch.arange(9)[None]
    ours = model.mtp_forward(hidden, input_ids, positions)
    embeds = model.get_input_embeddings()(input_ids)
    theirs = engine(embeds, positions, hidden, model.model.model.rotary_emb(hidden, positions))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_position_0_token_is_not_read_but_later_positions_attend_to_it(qwen2_model):
    model = qwen2_model
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, 97, (1, 6), generator=generator)
    other = input_ids.clone()
    other[0, 0] = (input_ids[0, 0] % 96) + 1
    hidden = torch.randn(1, 6, model.config.text_config.hidden_size, generator=generator)
    positions = torch.arange(6)[None]
    first, second = model.mtp_forward(hidden, input_ids, positions), model.mtp_forward(hidden, other, positions)
    torch.testing.assert_close(first, second)  # the token at position 0 is zeroed, so it cannot matter anywhere
    changed = input_ids.clone()
    changed[0, 1] = (input_ids[0, 1] % 96) + 1
    third = model.mtp_forward(hidden, changed, positions)
    assert torch.equal(third[:, 0], first[:, 0]) and not torch.allclose(third[:, 1:], first[:, 1:])


@torch.no_grad()
def test_training_recursion_matches_drafting_at_position_0(qwen2_model):
    """Training's step-1 outputs are drafting's: both go through `mtp_forward`, which zeroes position 0 alike."""
    model = qwen2_model
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(1, 97, (1, 7), generator=generator)
    hidden = torch.randn(1, 7, model.config.text_config.hidden_size, generator=generator)
    step_1 = recursive_head_outputs(model, hidden, input_ids, torch.ones(1, 7, dtype=torch.bool), 1)[0]
    drafted = model.mtp_forward(hidden, input_ids, torch.arange(7)[None])
    torch.testing.assert_close(step_1, drafted, rtol=1e-5, atol=1e-5)


def test_sglang_and_vllm_exports_are_the_same_checkpoint(qwen2_model, exported, tmp_path):
    export_sglang(qwen2_model, tmp_path / "sglang")
    ours, theirs = exported_tensors(exported), exported_tensors(tmp_path / "sglang")
    assert set(ours) == set(theirs) and all(torch.equal(ours[name], theirs[name]) for name in ours)


# ----------------------------------------------------------------------------- pipeline


PIPELINE_SCRIPT = """
import json, logging, sys
sys.path.insert(0, sys.argv[1])
import transformers
from transformers.models.auto import modeling_auto
from conftest import tiny_fastmtp, tiny_tokenizer

errors = []
handler = logging.Handler(logging.ERROR)
handler.emit = lambda record: errors.append(record.getMessage())
logging.getLogger("transformers").addHandler(handler)
words = [f"w{i}" for i in range(92)]
model = tiny_fastmtp("llama", sharpness=4.0)
generate = transformers.pipeline("text-generation", model=model, tokenizer=tiny_tokenizer(words))
errors_listed = list(errors)
prompt = " ".join(words[:8])
plain = generate(prompt, max_new_tokens=16, do_sample=False)
fast = generate(prompt, max_new_tokens=16, do_sample=False, fastmtp=True)
del modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES["fastmtp"]
transformers.pipeline("text-generation", model=model, tokenizer=tiny_tokenizer(words))
print(json.dumps({
    "errors_listed": errors_listed,
    "errors_unlisted": errors[len(errors_listed):],
    "identical": fast == plain and len(plain[0]["generated_text"]) > len(prompt),
    "cycles": generate.model.last_fastmtp_stats.cycles,
}))
"""


def test_pipeline_accepts_the_model_without_an_error(tmp_path):
    """
    In a fresh interpreter (after other tests' remote-code loads, the pipeline's error did not reach the handler):
    no error with the listing, the same text with fastmtp=True, and the error back once the listing is removed, so
    the first check is a real one.
    """
    env = {**os.environ, "HF_FASTMTP_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", PIPELINE_SCRIPT, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["errors_listed"] == []
    assert outcome["identical"] and outcome["cycles"] > 0
    assert any("'FastMTPForCausalLM' is not supported" in message for message in outcome["errors_unlisted"])
