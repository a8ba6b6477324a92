"""GGUF bases for every command that takes --base: `--base FILE.gguf` or `--base FOLDER --gguf-file NAME`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from hf_fastmtp import FastMTPForCausalLM
from hf_fastmtp.cli import build_parser, main
from hf_fastmtp.embedded import gguf_file_of, load_base, load_model

gguf = pytest.importorskip("gguf")

pytestmark = pytest.mark.usefixtures("one_thread")

HIDDEN, FEED_FORWARD, LAYERS, HEADS, KV_HEADS = 32, 64, 2, 4, 2
SPECIAL = ["<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>{% endif %}"
)


def write_tiny_llama_gguf(path: Path, seed: int = 0) -> None:
    """A random 2-layer Llama with a byte-level BPE tokenizer, as llama.cpp writes one (float16 weights)."""
    rng = np.random.default_rng(seed)
    tokens = [*bytes_to_unicode().values(), "he", "ll", *SPECIAL]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FEED_FORWARD)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(["h e", "l l"])
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([1] * (len(tokens) - len(SPECIAL)) + [3] * len(SPECIAL))
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_chat_template(CHAT_TEMPLATE)

    def matrix(name: str, rows: int, columns: int) -> None:
        writer.add_tensor(name, (rng.standard_normal((rows, columns)) * 0.2).astype(np.float16))

    kv_width = KV_HEADS * HIDDEN // HEADS
    matrix("token_embd.weight", len(tokens), HIDDEN)
    matrix("output.weight", len(tokens), HIDDEN)
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    for i in range(LAYERS):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
        for name, rows, columns in [
            ("attn_q", HIDDEN, HIDDEN),
            ("attn_k", kv_width, HIDDEN),
            ("attn_v", kv_width, HIDDEN),
            ("attn_output", HIDDEN, HIDDEN),
            ("ffn_gate", FEED_FORWARD, HIDDEN),
            ("ffn_up", FEED_FORWARD, HIDDEN),
            ("ffn_down", HIDDEN, FEED_FORWARD),
        ]:
            matrix(f"blk.{i}.{name}.weight", rows, columns)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def gguf_base(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HF_FASTMTP_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "models" / "tiny.gguf"
    path.parent.mkdir()
    write_tiny_llama_gguf(path)
    return path


def test_a_gguf_file_or_a_folder_and_file_load_the_same_dequantised_base(gguf_base):
    model, tokenizer, name = load_base(gguf_base)
    again, _, same_name = load_base(gguf_base.parent, gguf_file=gguf_base.name)
    assert name == same_name and Path(name).is_dir() and Path(name).is_relative_to(gguf_base.parent.parent / "cache")
    reference = AutoModelForCausalLM.from_pretrained(gguf_base.parent, gguf_file=gguf_base.name, dtype=torch.float32)
    for parameter_name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[parameter_name], tensor), parameter_name
        assert torch.equal(again.state_dict()[parameter_name], tensor), parameter_name
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template == CHAT_TEMPLATE


def test_the_cache_is_made_once_and_renewed_when_the_file_changes(gguf_base, caplog):
    with caplog.at_level("WARNING", logger="hf_fastmtp.embedded"):
        _, _, name = load_base(gguf_base)
        assert "Dequantising" in caplog.text
        caplog.clear()
        load_base(gguf_base)
        assert "Dequantising" not in caplog.text
        write_tiny_llama_gguf(gguf_base, seed=1)
        _, _, renewed = load_base(gguf_base)
        assert renewed != name and "Dequantising" in caplog.text


def test_gguf_arguments_are_checked(tmp_path):
    assert gguf_file_of("org/model") is None and gguf_file_of(None) is None
    assert gguf_file_of("folder", "m.gguf") == Path("folder", "m.gguf")
    with pytest.raises(ValueError, match="--gguf-file m.gguf names a file inside the --base folder"):
        gguf_file_of(None, "m.gguf")
    with pytest.raises(FileNotFoundError, match="GGUF file .*missing.gguf not found"):
        load_base(tmp_path / "missing.gguf")


@pytest.mark.parametrize("command", ["generate", "demo", "distill", "train", "bench", "export"])
def test_every_command_with_base_takes_gguf_file(command):
    required = {
        "distill": ["--output", "o"],
        "train": ["--output", "o", "--data", "d"],
        "bench": ["--output", "o"],
        "export": ["--format", "vllm", "--output", "o"],
    }
    args = build_parser().parse_args(
        [command, *(["hi"] if command == "generate" else []), *required.get(command, []), "--base", "f"]
        + ["--gguf-file", "m.gguf"]
    )
    assert (args.base, args.gguf_file) == ("f", "m.gguf")


def test_head_trained_on_a_gguf_base_reloads_with_its_base(gguf_base, tmp_path):
    """`fastmtp train --base FILE.gguf`: the head names the dequantised folder, which loads without the GGUF."""
    data = tmp_path / "reference.jsonl"
    rows = [{"prompt": "hello there", "reference": "well hello to you"}, {"prompt": "tell me", "reference": "all"}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = tmp_path / "run"
    main(
        ["train", "--base", str(gguf_base), "--reference-data", str(data), "--output", str(output)]
        + ["--max-steps", "1"]
    )
    head = output / "head"
    _, _, base_folder = load_base(gguf_base)
    assert json.loads((head / "config.json").read_text())["base_model_name_or_path"] == base_folder

    gguf_base.unlink()  # the head's base is the dequantised folder, not the GGUF
    model = FastMTPForCausalLM.from_pretrained(head)
    reference, _, _ = load_base(base_folder)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.model.state_dict()[name], tensor), name
    input_ids = torch.tensor([[256, 78, 86, 75, 67, 220, 78]])
    fast = model.generate(input_ids, do_sample=False, max_new_tokens=12, fastmtp=True, num_draft_tokens=2)
    assert torch.equal(fast, model.generate(input_ids, do_sample=False, max_new_tokens=12, fastmtp=False))


def test_generate_with_a_gguf_base_from_the_command_line(gguf_base, capsys):
    main(["generate", "hello", "--base", str(gguf_base.parent), "--gguf-file", gguf_base.name] + ["-k", "2"])
    assert "[FastMTP]" in capsys.readouterr().err
    model, _ = load_model(str(gguf_base))
    assert model.config.base_model_name_or_path == load_base(gguf_base)[2]
