"""
Export for serving engines: SGLang and vLLM serve FastMTP heads at scale through their MiMo MTP paths, from one
MiMo-style checkpoint (the base's weights plus the head as `model.mtp_layers.0.*` and a MiMo config; for SGLang also a
token map). The rules the engines' loaders apply to it are in tests/fixtures/mimo_mtp_engines.json.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .decoding.draft_vocab import vocab_map_filename
from .decoding.hub_files import MIMO_MODEL_TYPE
from .decoding.mimo import MIMO_ARCHITECTURE, MIMO_HEAD_PREFIX, SGLANG_BASE_TYPES, safetensors_keys
from .decoding.modeling_fastmtp import FastMTPForCausalLM

logger = logging.getLogger(__name__)

# The configuration module MiMo checkpoints ship: SGLang loads the config with Transformers' remote code.
MIMO_CONFIG_MODULE = '''"""MiMo configuration: Qwen2's, plus the number of MTP layers stored beside the base."""

from transformers.models.qwen2.configuration_qwen2 import Qwen2Config


class MiMoConfig(Qwen2Config):
    model_type = "mimo"

    def __init__(self, *args, num_nextn_predict_layers=0, **kwargs):
        self.num_nextn_predict_layers = num_nextn_predict_layers
        super().__init__(*args, **kwargs)
'''


def draft_vocab_map_paths(config: PretrainedConfig, folder: str | os.PathLike | None = None) -> dict[str, Path]:
    """
    `config.draft_vocab_maps` as local paths. A loaded model's maps are local already; paths relative to a model
    folder (as in a saved config.json) are resolved against `folder`.
    """
    maps = config.draft_vocab_maps or {}
    return {language: Path(folder or "", path).absolute() for language, path in maps.items()}


# ----------------------------------------------------------------------------- SGLang and vLLM export


def export_sglang(
    model: FastMTPForCausalLM,
    output_dir: str | os.PathLike,
    *,
    token_map: str | None = None,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None,
) -> str:
    """
    Writes `model` as a MiMo checkpoint (its Qwen2 base plus the head as `model.mtp_layers.0`), which SGLang serves
    with EAGLE speculative decoding through its MiMo MTP path, and returns the command that launches the server.

    `token_map` picks the vocabulary map SGLang drafts over (one for all prompts; default: `default_draft_vocab`, or
    the only map). The tokenizer (default: the base model's) is saved beside the weights, where SGLang looks for it.
    """
    output_dir = write_mimo_checkpoint(model, output_dir, tokenizer, engine="SGLang")
    token_map_file = write_token_map(model, token_map, output_dir)
    return sglang_command(output_dir, model.config.num_draft_tokens, token_map_file)


def export_vllm(
    model: FastMTPForCausalLM,
    output_dir: str | os.PathLike,
    *,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None,
) -> str:
    """
    Writes `model` as a MiMo checkpoint, which vLLM serves through its MiMo MTP path (`MiMoMTPModel`), and returns
    the `vllm serve` command. vLLM drafts over the whole vocabulary: it takes no token map.
    """
    output_dir = write_mimo_checkpoint(model, output_dir, tokenizer, engine="vLLM")
    if model.draft_vocab_maps:
        logger.info("vLLM's MTP drafting takes no vocabulary map: it drafts over the whole vocabulary.")
    return vllm_command(output_dir, model.config.num_draft_tokens)


def write_mimo_checkpoint(
    model: FastMTPForCausalLM,
    output_dir: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None,
    engine: str,
) -> Path:
    """The checkpoint both engines read: the base's shards, the head's shard, a MiMo config and the tokenizer."""
    check_servable(model, engine)
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} is not empty: export writes a whole checkpoint; choose a new folder.")
    model.model.save_pretrained(output_dir)
    add_head_shard(model, output_dir)
    write_mimo_config(output_dir)
    save_tokenizer(tokenizer or model.config.base_model_name_or_path, output_dir)
    return output_dir


def check_servable(model: FastMTPForCausalLM, engine: str) -> None:
    """
    Both engines build MiMo's MTP layer around their Qwen2 decoder layer, so the base must be a Qwen2 model, and the
    head MiMo's: one layer reading the base's final hidden state.
    """
    config = model.config
    if config.feature_layers is not None:
        raise ValueError(
            f"{engine} cannot serve this head: it reads the base's hidden states {config.feature_layers} "
            "(feature_layers), and MiMo's MTP layer, which the export targets, reads the final hidden state only. "
            "Serve it with `generate(fastmtp=True)` in Transformers."
        )
    if config.num_head_layers != 1:
        raise ValueError(
            f"{engine} cannot serve this head: it has {config.num_head_layers} decoder layers (num_head_layers), and "
            "the export writes MiMo's single MTP layer (`model.mtp_layers.0`), which is all the engines' MiMo path "
            "runs per draft step. Serve it with `generate(fastmtp=True)` in Transformers."
        )
    model_type = model.model.config.model_type
    if model_type not in SGLANG_BASE_TYPES:
        raise ValueError(
            f"{engine} serves FastMTP heads through its MiMo MTP path, which supports Qwen2-architecture bases only "
            f"(model_type {', '.join(map(repr, SGLANG_BASE_TYPES))}: MiMo, Qwen2, Qwen2.5); this base is "
            f"{model_type!r} ({type(model.model).__name__}). Serve it with `generate(fastmtp=True)` in Transformers."
        )


def add_head_shard(model: FastMTPForCausalLM, output_dir: Path) -> None:
    """Adds the head as `model.mtp_layers.0.*` in a shard of its own and renames all shards into one indexed set."""
    index_file = output_dir / SAFE_WEIGHTS_INDEX_NAME
    if index_file.is_file():
        base_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
    else:
        base_map = dict.fromkeys(safetensors_keys(output_dir / SAFE_WEIGHTS_NAME), SAFE_WEIGHTS_NAME)
    base_shards = sorted(set(base_map.values()))
    count = len(base_shards) + 1
    names = {shard: f"model-{i:05d}-of-{count:05d}.safetensors" for i, shard in enumerate(base_shards, start=1)}
    for shard, name in names.items():
        (output_dir / shard).rename(output_dir / name)
    head_shard = f"model-{count:05d}-of-{count:05d}.safetensors"
    head = {MIMO_HEAD_PREFIX + name: t.detach().contiguous().cpu() for name, t in model.head.state_dict().items()}
    save_file(head, output_dir / head_shard, metadata={"format": "pt"})
    files = {**{name: names[shard] for name, shard in base_map.items()}, **dict.fromkeys(head, head_shard)}
    total_size = sum(tensor_bytes(output_dir / shard) for shard in [*names.values(), head_shard])
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(files.items()))}
    index_file.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def tensor_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file: all of it but the 8-byte length and the JSON header."""
    with open(path, "rb") as file:
        (header_size,) = struct.unpack("<Q", file.read(8))
    return path.stat().st_size - 8 - header_size


def write_mimo_config(output_dir: Path) -> None:
    """Turns the saved Qwen2 config.json into MiMo's, with the pre-v5 field names SGLang's Transformers reads."""
    config_file = output_dir / CONFIG_NAME
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config.update(
        model_type=MIMO_MODEL_TYPE,
        architectures=[MIMO_ARCHITECTURE],
        num_nextn_predict_layers=1,
        auto_map={"AutoConfig": "configuration_mimo.MiMoConfig"},
    )
    rope = config.get("rope_parameters") or {}
    config.setdefault("torch_dtype", config.get("dtype"))
    config.setdefault("rope_theta", rope.get("rope_theta"))
    if rope.get("rope_type", "default") != "default":
        config.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (output_dir / "configuration_mimo.py").write_text(MIMO_CONFIG_MODULE, encoding="utf-8")


def write_token_map(model: FastMTPForCausalLM, key: str | None, output_dir: Path) -> Path | None:
    """Writes the vocabulary map SGLang will draft over (`--speculative-token-map`); `None` if the head has none."""
    maps = model.draft_vocab_maps
    if key is None:
        if not maps:
            return None
        if model.config.default_draft_vocab in maps:
            key = model.config.default_draft_vocab
        elif len(maps) == 1:
            key = next(iter(maps))
        else:
            raise ValueError(
                f"The model has vocabulary maps for {sorted(maps)} and SGLang drafts over one: choose it with "
                "--token-map (`token_map=`)."
            )
    if key not in maps:
        raise ValueError(f"No vocabulary map {key!r}: the model has {sorted(maps) or 'none'}.")
    target = output_dir / vocab_map_filename(key, maps[key].numel())
    torch.save(maps[key].cpu().clone(), target)
    return target


def save_tokenizer(source: PreTrainedTokenizerBase | str | os.PathLike | None, output_dir: Path) -> None:
    if not isinstance(source, PreTrainedTokenizerBase):
        try:
            # Never prompts: a MiMo checkpoint's config names remote code, which its (Qwen2) tokenizer does not need.
            source = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        except (OSError, ValueError, TypeError, KeyError) as error:
            logger.warning(
                "No tokenizer found at %s (%s): copy the base model's tokenizer into %s, or pass --tokenizer-path "
                "to SGLang.",
                source,
                error,
                output_dir,
            )
            return
    source.save_pretrained(output_dir)


def sglang_command(model_dir: Path, num_draft_tokens: int, token_map: Path | None) -> str:
    """SGLang's launch command for FastMTP: K recursive steps of the one MTP layer, a chain (top-1) of K drafts."""
    arguments = [
        "python -m sglang.launch_server",
        f"--model-path {shlex.quote(str(model_dir))}",
        "--speculative-algorithm EAGLE",
        f"--speculative-num-steps {num_draft_tokens}",
        "--speculative-eagle-topk 1",
        f"--speculative-num-draft-tokens {num_draft_tokens + 1}",
    ]
    if token_map is not None:
        arguments.append(f"--speculative-token-map {shlex.quote(str(token_map))}")
    arguments.append("--trust-remote-code")
    return " ".join(arguments)


def vllm_command(model_dir: Path, num_draft_tokens: int) -> str:
    """
    vLLM's launch command: method "mtp" (vLLM's name since it deprecated "mimo_mtp", which it still maps to "mtp")
    drafts with the checkpoint's own MTP layer, applied `num_speculative_tokens` times in a chain.
    """
    speculative_config = json.dumps({"method": "mtp", "num_speculative_tokens": num_draft_tokens})
    return (
        f"vllm serve {shlex.quote(str(model_dir))} --trust-remote-code "
        f"--speculative-config {shlex.quote(speculative_config)}"
    )


__all__ = ["draft_vocab_map_paths", "export_sglang", "export_vllm"]
